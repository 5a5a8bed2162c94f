"""A family the catalogue adds with one module: a tiny seeded PyTorch pose head with its own keypoint layout.

It proves that a family is its catalogue entry plus this module (``export``): the registry finds it by the
``exporter`` the entry names, the export gate holds its graph to its PyTorch forward, and the served model
carries the catalogue's keypoint names and skeleton. The network pools the image to each stride's grid and
reads every anchor's box, person score and K keypoints off a 1x1 convolution, in network-input pixels.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from build_engines.onnx_graph import OUTPUT_NAME, clean_and_check, finish_unified
from build_engines.registry import OPSET, ExportOptions, FamilyExport
from posetriton.core.contract import candidate_width
from posetriton.server.repository import ServedModel


class ToyPoseHead(nn.Module):
    def __init__(self, input_size: int, strides: tuple[int, ...], num_keypoints: int) -> None:
        super().__init__()
        self.strides = strides
        self.readouts = nn.ModuleList(nn.Conv2d(3, candidate_width(num_keypoints), 1) for _ in strides)
        for stride in strides:
            cells = (torch.arange(input_size // stride, dtype=torch.float32) + 0.5) * stride
            y, x = torch.meshgrid(cells, cells, indexing="ij")
            self.register_buffer(f"centres_{stride}", torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        levels = []
        for stride, readout in zip(self.strides, self.readouts, strict=True):
            features = readout(nn.functional.avg_pool2d(images, stride)).flatten(2).transpose(1, 2)  # [B, A_s, W]
            centres = getattr(self, f"centres_{stride}")
            half = stride * (1 + torch.sigmoid(features[..., 0:2]))
            score = torch.sigmoid(features[..., 4:5])
            keypoints = features[..., 5:].unflatten(-1, (-1, 3))
            xy = centres[:, None, :] + stride * torch.tanh(keypoints[..., 0:2])
            keypoints = torch.cat([xy, torch.sigmoid(keypoints[..., 2:3])], dim=-1).flatten(-2)
            levels.append(torch.cat([centres - half, centres + half, score, keypoints], dim=-1))
        return torch.cat(levels, dim=1)


def export(model: ServedModel, out_dir: Path, options: ExportOptions) -> FamilyExport:
    """The seeded head's unified graph (float input, every anchor) and its PyTorch forward as the reference."""
    if options.seed is None:
        raise ValueError(f"{model.name}: the toy family is seeded only: pass --seed N")
    torch.manual_seed(options.seed)
    size, keypoints = model.letterbox.input_size, model.postprocess.num_keypoints
    network = ToyPoseHead(size, model.strides, keypoints).eval()
    with tempfile.TemporaryDirectory(prefix="toy_pose_export_") as tmp:
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            network, (torch.zeros(1, 3, size, size),), str(raw), opset_version=OPSET, dynamo=False,
            input_names=["images"], output_names=[OUTPUT_NAME],
            dynamic_axes={"images": {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )  # fmt: skip
        source = onnx.load(str(raw))
    graph = gs.import_onnx(source)
    sizes = (size, model.num_anchors, candidate_width(keypoints))
    unified = clean_and_check(finish_unified(graph, graph.outputs[0], source, sizes))

    network_float64 = copy.deepcopy(network).double()

    def forward(net: nn.Module, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(batch)).numpy()

    return FamilyExport(
        unified=unified,
        reference=lambda batch: forward(network, batch),
        reference_float64=lambda batch: forward(network_float64, batch),
        source=f"seed:{options.seed}",
        extra_files={},
    )
