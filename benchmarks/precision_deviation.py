"""How far OpenVINO's bf16 (``--model-config-name cpu_bf16``) moves the served poses away from f32.

Runs the model's IR at both precisions on what the served network takes (the uint8 letterboxed canvas) for
real photos (and the same photos resampled to 1080p and 4K, since errors in original-image pixels grow with
the photo), post-processes both with the served code, matches detections by box IoU and reports detection
agreement and keypoint error distributions in original-image pixels. On a CPU without bf16 OpenVINO runs f32
for both (``openvino_precision`` in the output says what it ran), so the deviation is zero there.

    python benchmarks/precision_deviation.py --repository triton_models --model yolo11n_pose --json out.json
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from posetriton.core.images import decode_image
from posetriton.core.processing import Poses, letterbox, postprocess
from posetriton.server.openvino_runtime import OpenVinoRunner
from posetriton.server.repository import load_catalog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.lean_path import cpu_model, default_photos, emit_json  # noqa: E402

SIZES = {"original": None, "1080p": 1920, "4K": 3840}


def resampled(data: bytes, longest: int | None) -> bytes:
    if longest is None:
        return data
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = longest / max(image.size)
    out = io.BytesIO()
    image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS).save(
        out, "JPEG", quality=92
    )
    return out.getvalue()


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def compare(reference: Poses, other: Poses) -> dict[str, list[float] | int]:
    matched: list[tuple[int, int]] = []
    if len(reference) and len(other):
        iou = box_iou(reference.boxes, other.boxes)
        for i in np.argsort(-reference.scores):
            j = int(iou[i].argmax())
            if iou[i, j] >= 0.5 and j not in {m[1] for m in matched}:
                matched.append((int(i), j))
    errors, score_errors = [], []
    for i, j in matched:
        confident = reference.keypoints[i, :, 2] > 0.5
        delta = reference.keypoints[i, confident, :2] - other.keypoints[j, confident, :2]
        errors += np.linalg.norm(delta, axis=1).tolist()
        score_errors.append(abs(float(reference.scores[i] - other.scores[j])))
    return {
        "f32": len(reference),
        "bf16": len(other),
        "matched": len(matched),
        "keypoint_errors": errors,
        "score_errors": score_errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--model", default="yolo11n_pose")
    parser.add_argument("--photos", type=Path, nargs="+", default=None)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    model = load_catalog(ROOT / "build_engines" / "models.toml")[args.model]
    photos = args.photos or default_photos()
    xml = args.repository / f"{args.model}_network" / "1" / "model.xml"
    runners = {p: OpenVinoRunner(xml, precision=p) for p in ("f32", "bf16")}  # type: ignore[misc]
    report: dict[str, dict] = {}
    for size, longest in SIZES.items():
        totals: dict[str, list[float] | int] = {
            "f32": 0,
            "bf16": 0,
            "matched": 0,
            "keypoint_errors": [],
            "score_errors": [],
        }
        for photo in photos:
            image = decode_image(resampled(photo.read_bytes(), longest), model.letterbox.max_pixels)
            canvas, transform = letterbox(image, model.letterbox)
            batch = canvas[None]  # the served network input: the uint8 canvas, [1, S, S, 3]
            f32, bf16 = (postprocess(runners[p].infer(batch)[0], transform, model.postprocess) for p in ("f32", "bf16"))
            for key, value in compare(f32, bf16).items():
                totals[key] += value  # type: ignore[operator]
        errors = np.asarray(totals["keypoint_errors"])
        scores = np.asarray(totals["score_errors"])
        report[size] = {
            "detections_f32": totals["f32"],
            "detections_bf16": totals["bf16"],
            "matched": totals["matched"],
            "keypoints_compared": int(errors.size),
            "keypoint_error_px": {
                q: float(np.percentile(errors, p)) for q, p in (("p50", 50), ("p95", 95), ("max", 100))
            }
            if errors.size
            else {},
            "score_error_max": float(scores.max()) if scores.size else 0.0,
        }
    # What OpenVINO actually ran for each hint (a CPU without bf16 runs f32 for both).
    ran = {
        p: r.latency.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        for p, r in runners.items()
        if r.latency
    }
    emit_json(
        {
            "model": args.model,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": cpu_model(),
            "openvino_precision": ran,
            "photos": [p.name for p in photos],
            "by_size": report,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
