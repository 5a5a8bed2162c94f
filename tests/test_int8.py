"""INT8 by explicit quantization: the calibration reader, the accuracy gate's arithmetic, and a real Q/DQ model
of the exported yolo11n-pose gated against FP32 on held-out photos (ONNX Runtime on CPU, export environment)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from build_engines.quantize import (
    AccuracyGateError,
    AccuracyLimits,
    PhotoCalibrationReader,
    accuracy_report,
    compare_poses,
    gate,
    gate_failures,
    match_detections,
)
from posetriton.core.contract import CANVAS
from posetriton.core.images import decode_image
from posetriton.core.processing import Poses, letterbox
from posetriton.server.repository import load_catalog
from tests.conftest import EXPORT_PYTHON, ROOT, UL_MODEL
from tests.test_tensorrt_offline import TRT_OPS, graph_summary

SPEC = load_catalog(ROOT / "build_engines" / "models.toml")[UL_MODEL]


def poses(boxes: list[list[float]], scores: list[float], keypoints: np.ndarray) -> Poses:
    return Poses(np.array(boxes, np.float32), np.array(scores, np.float32), keypoints.astype(np.float32))


def person(x: float, y: float, conf: float = 0.9) -> np.ndarray:
    keypoints = np.zeros((17, 3), np.float32)
    keypoints[:, 0], keypoints[:, 1], keypoints[:, 2] = x, y, conf
    return keypoints


# ------------------------------------------------------------------------------------------------ calibration


def test_calibration_reader_letterboxes_photos_and_variants_with_the_served_code(photo_paths: list[Path]) -> None:
    photos = photo_paths[:2]
    reader = PhotoCalibrationReader(photos, SPEC.letterbox)
    assert reader.count == len(reader) == 2 * 5  # photo, mirror, three crops
    first = reader.get_next()
    assert first is not None and list(first) == [CANVAS]  # what the served preprocess step hands the network
    assert first[CANVAS].shape == (1, 640, 640, 3) and first[CANVAS].dtype == np.uint8
    image = decode_image(photos[0].read_bytes(), SPEC.letterbox.max_pixels)
    np.testing.assert_array_equal(first[CANVAS][0], letterbox(image, SPEC.letterbox)[0])
    mirror = reader.get_next()
    canvas, _ = letterbox(np.ascontiguousarray(image[:, ::-1]), SPEC.letterbox)
    np.testing.assert_array_equal(mirror[CANVAS][0], canvas)  # type: ignore[index]
    remaining = 0
    while reader.get_next() is not None:
        remaining += 1
    assert remaining == 8 and reader.get_next() is None
    reader.rewind()
    np.testing.assert_array_equal(next(iter(reader))[CANVAS], first[CANVAS])
    batched = PhotoCalibrationReader(photos, SPEC.letterbox, augment=False, batch_size=2)
    assert len(batched) == 1 and batched.get_next()[CANVAS].shape == (2, 640, 640, 3)  # type: ignore[index]


# ---------------------------------------------------------------------------------------------- gate arithmetic


def test_matching_is_one_to_one_by_best_iou() -> None:
    reference = poses([[0, 0, 10, 10], [20, 0, 30, 10]], [0.9, 0.8], np.stack([person(5, 5), person(25, 5)]))
    other = poses([[21, 0, 31, 10], [0, 0, 10, 10], [100, 100, 110, 110]], [0.7, 0.9, 0.9], np.zeros((3, 17, 3)))
    assert match_detections(reference, other) == [(0, 1), (1, 0)]
    assert match_detections(reference, poses([[50, 50, 60, 60]], [0.5], np.zeros((1, 17, 3)))) == []


def test_gate_measures_keypoint_score_and_detection_errors_and_fails_above_the_limits() -> None:
    reference = poses([[0, 0, 100, 100], [200, 0, 300, 100]], [0.9, 0.8], np.stack([person(50, 50), person(250, 50)]))
    moved = person(53, 54)  # 5 px away
    moved[0, 2] = 0.9
    moved_other = person(250, 50)
    moved_other[:, 0] += 1.0  # 1 px away
    quantized = poses([[0, 0, 100, 100], [200, 0, 300, 100]], [0.85, 0.8], np.stack([moved, moved_other]))
    report = accuracy_report([compare_poses(reference, quantized)])
    assert report["keypoints_compared"] == 34 and report["detection_agreement"] == 1.0
    assert report["keypoint_error_max_px"] == pytest.approx(5.0)
    assert report["keypoint_error_p50_px"] == pytest.approx(3.0)  # half at 5 px, half at 1 px
    # 0.9 - 0.85 of two float32 scores: exact but for their rounding to float32 (one spacing at most).
    assert report["score_error_max"] == pytest.approx(0.05, abs=float(np.spacing(np.float32(0.9))))
    assert gate_failures(report, AccuracyLimits(keypoint_error_p50_px=3.0, keypoint_error_p95_px=5.0)) == []
    failures = gate_failures(
        report, AccuracyLimits(keypoint_error_p50_px=2.9, keypoint_error_p95_px=4.9, score_error=0.01)
    )
    assert [f.split()[0] for f in failures] == ["keypoint_error_p50_px", "keypoint_error_p95_px", "score_error_max"]
    with pytest.raises(AccuracyGateError, match=r"INT8 accuracy gate failed: keypoint_error_p50_px 3px > 2\.9px"):
        gate(report, AccuracyLimits(keypoint_error_p50_px=2.9))

    # a lost detection lowers agreement; low-confidence keypoints are not compared
    one = poses([[0, 0, 100, 100]], [0.9], np.stack([person(50, 50)]))
    report = accuracy_report([compare_poses(reference, one)])
    assert report["detection_agreement"] == 0.5
    assert "detection_agreement 0.500 < 0.8" in gate_failures(report, AccuracyLimits())[0]
    assert compare_poses(one, poses([[0, 0, 100, 100]], [0.9], np.stack([person(90, 90, 0.1)])))["keypoint_errors"]
    faint = compare_poses(
        poses([[0, 0, 100, 100]], [0.9], np.stack([person(50, 50, 0.3)])), one, AccuracyLimits(keypoint_confidence=0.5)
    )
    assert faint["keypoint_errors"] == [] and faint["matched"] == 1
    # nobody detected by FP32: the gate refuses to pass on nothing
    empty = poses(np.zeros((0, 4)).tolist(), [], np.zeros((0, 17, 3)))
    assert any(
        "detects nobody" in f for f in gate_failures(accuracy_report([compare_poses(empty, empty)]), AccuracyLimits())
    )
    assert gate_failures({**report, "keypoint_error_p50_px": float("nan")}, AccuracyLimits())


# ------------------------------------------------------------------------------------------ real Q/DQ model


def _quantize_cli(repository: Path, calibration: Path, holdout: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXPORT_PYTHON), "-m", "build_engines", "quantize", UL_MODEL, "--repository", str(repository),
         "--calibration", str(calibration), "--holdout", str(holdout), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "YOLO_OFFLINE": "1"},
    )  # fmt: skip


@pytest.mark.slow
def test_int8_qdq_model_of_yolo11n_pose_passes_the_gate_on_held_out_photos(
    model_repository: Path, photo_paths: list[Path], tmp_path: Path
) -> None:
    repository = tmp_path / "repo"
    version = repository / f"{UL_MODEL}_network" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").symlink_to(model_repository / f"{UL_MODEL}_network" / "1" / "model.onnx")
    calibration, holdout = tmp_path / "calibration", tmp_path / "holdout"
    for folder, photos in ((calibration, photo_paths[:2]), (holdout, photo_paths[2:])):  # samples | bus, zidane
        folder.mkdir()
        for photo in photos:
            (folder / photo.name).symlink_to(photo)

    # a limit the INT8 model cannot meet fails the build and leaves no Q/DQ model behind
    strict = _quantize_cli(repository, calibration, holdout, "--max-keypoint-error-p50", "0.01")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "INT8 accuracy gate failed: keypoint_error_p50_px" in strict.stderr
    assert not (version / "model.qdq.onnx").exists()

    passed = _quantize_cli(repository, calibration, holdout)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "trtexec --onnx=" in passed.stdout and "--int8" in passed.stdout
    report = json.loads((version / "model.qdq.report.json").read_text())
    assert report["detections_reference"] >= 5 and report["detection_agreement"] >= 0.8
    assert report["keypoint_error_p50_px"] <= 3.0 and report["keypoint_error_p95_px"] <= 20.0
    assert report["score_error_max"] <= 0.1
    assert [Path(p).name for p in report["holdout_photos"]] == ["bus.jpg", "zidane.jpg"]
    assert report["calibration"]["inputs"] == 10 and report["float_convs"]

    # TensorRT-ready: only TensorRT ops, symmetric INT8 (zero point 0), dynamic batch kept
    summary = graph_summary(version / "model.qdq.onnx")[str(version / "model.qdq.onnx")]
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(summary["ops"]) <= TRT_OPS
    assert summary["inputs"] == {CANVAS: ["batch", 640, 640, 3]}
    zero_points = json.loads(
        subprocess.run(
            [str(EXPORT_PYTHON), "-c", ZERO_POINTS, str(version / "model.qdq.onnx")],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout
    )  # fmt: skip
    assert zero_points["count"] > 50 and zero_points["types"] == ["int8"] and zero_points["nonzero"] == 0


ZERO_POINTS = """
import json, sys, onnx
from onnx import numpy_helper
model = onnx.load(sys.argv[1])
init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
zps = [init[n.input[2]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
print(json.dumps({"count": len(zps), "types": sorted({str(z.dtype) for z in zps}),
                  "nonzero": int(sum((z != 0).sum() for z in zps))}))
"""
