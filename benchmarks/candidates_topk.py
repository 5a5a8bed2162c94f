"""How many candidates the network must return: the smallest in-graph top-k that leaves the poses unchanged.

Runs in the export environment (ONNX Runtime, onnx-graphsurgeon). Takes the model's served ONNX, lifts its TopK
to every anchor, and for each photo (the sample photos, Ultralytics' bus / zidane, and bus.jpg tiled into
2x2 / 3x3 / 4x4 crowds, halved: the 4x4 one is the tests' crowd photo) reports how many anchors score above
each conf and the smallest k (in steps of 10) whose poses after NMS equal those from all anchors, at the
family's default conf and at COCO-eval's 0.001.

    .venv-export/bin/python benchmarks/candidates_topk.py --repository triton_models --model yolo11n_pose
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from PIL import Image

from posetriton.core.contract import CANDIDATES, CANVAS, SCORE_COLUMN, Thresholds
from posetriton.core.images import decode_image
from posetriton.core.processing import letterbox, select_poses
from posetriton.server.repository import load_catalog

ROOT = Path(__file__).resolve().parent.parent


def every_anchor(served: Path, anchors: int) -> ort.InferenceSession:
    """The served graph with its TopK's k raised to every anchor (sorted candidates, nothing dropped)."""
    graph = gs.import_onnx(onnx.load(str(served)))
    (topk,) = [node for node in graph.nodes if node.op == "TopK"]
    topk.inputs[1] = gs.Constant("every_anchor_k", np.array([anchors], dtype=np.int64))
    for tensor in graph.tensors().values():  # the shapes downstream of the TopK change with k
        if isinstance(tensor, gs.Variable) and tensor not in graph.inputs:
            tensor.shape = None
    return ort.InferenceSession(gs.export_onnx(graph).SerializeToString(), providers=["CPUExecutionProvider"])


def photos() -> dict[str, bytes]:
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    found = {p.name: p.read_bytes() for p in [*sorted((ROOT / "samples").glob("*.*")), assets / "bus.jpg",
                                             assets / "zidane.jpg"] if p.suffix in {".jpg", ".webp"}}  # fmt: skip
    with Image.open(assets / "bus.jpg") as bus:
        for side in (2, 3, 4):
            tile = Image.new("RGB", (bus.width * side, bus.height * side))
            for column in range(side):
                for row in range(side):
                    tile.paste(bus, (column * bus.width, row * bus.height))
            out = io.BytesIO()  # halved, as the crowd photo of the tests (tests/conftest.py)
            tile.resize((tile.width // 2, tile.height // 2), Image.Resampling.LANCZOS).save(out, "JPEG", quality=95)
            found[f"bus tiled {side}x{side}"] = out.getvalue()
    return found


def smallest_k(candidates: np.ndarray, model: object, conf: float, step: int = 10) -> int:
    spec = model.postprocess  # type: ignore[attr-defined]
    full = select_poses(candidates, spec, Thresholds(conf=conf))
    for k in range(step, len(candidates) + step, step):
        got = select_poses(candidates[:k], spec, Thresholds(conf=conf))
        if len(got) == len(full) and np.array_equal(got.boxes, full.boxes):
            return k
    return len(candidates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--model", default="yolo11n_pose")
    args = parser.parse_args()
    model = load_catalog(ROOT / "build_engines" / "models.toml")[args.model]
    session = every_anchor(args.repository / f"{args.model}_network" / "1" / "model.onnx", model.num_anchors)
    default_conf = model.postprocess.conf
    rows = {}
    for name, data in photos().items():
        canvas, _ = letterbox(decode_image(data, model.letterbox.max_pixels), model.letterbox)
        candidates = session.run([CANDIDATES], {CANVAS: canvas[None]})[0][0]
        scores = candidates[:, SCORE_COLUMN]
        rows[name] = {
            f"above_{default_conf}": int((scores >= default_conf).sum()),
            "above_0.001": int((scores >= 0.001).sum()),
            f"poses_at_{default_conf}": len(select_poses(candidates, model.postprocess)),
            f"smallest_k_at_{default_conf}": smallest_k(candidates, model, default_conf),
            "smallest_k_at_0.001": smallest_k(candidates, model, 0.001),
        }
    print(json.dumps({"model": args.model, "served_k": model.num_candidates, "photos": rows}, indent=2))


if __name__ == "__main__":
    main()
