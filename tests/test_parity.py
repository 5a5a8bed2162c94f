"""Served results equal the upstream libraries' own: super-gradients predict() and Ultralytics predict().

YOLO-NAS Pose N runs with a seeded random init whose score head is re-initialised so that
scores spread over (0, 1) (see build_engines/export.py): each photo then yields several
detections at conf 0.5, so the comparison is not of empty sets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from posetriton.images import decode_image
from posetriton.openvino_runtime import OpenVinoRunner
from posetriton.processing import letterbox, to_network_input
from posetriton.repository import load_catalog
from tests.conftest import ROOT, SG_MODEL, UL_MODEL
from tests.triton_requests import Detections, infer, match

CATALOG = load_catalog(ROOT / "build_engines" / "models.toml")


def reference(references: dict, library: str, photo: Path) -> Detections:
    d = references["detections"][library][photo.name]
    return Detections(
        np.asarray(d["boxes"], np.float32).reshape(-1, 4),
        np.asarray(d["scores"], np.float32),
        np.asarray(d["keypoints"], np.float32).reshape(-1, 17, 3),
    )


def our_network_input(photo: Path, model: str) -> np.ndarray:
    spec = CATALOG[model].letterbox
    canvas, _ = letterbox(decode_image(photo.read_bytes(), spec.max_pixels), spec)
    return to_network_input(canvas[None], spec)[0]


def test_letterbox_is_bit_exact_with_super_gradients(references: dict, photo_paths: list[Path]) -> None:
    for photo in photo_paths:
        theirs = references["arrays"][f"sg_input/{photo.name}"]
        np.testing.assert_allclose(our_network_input(photo, SG_MODEL), theirs, rtol=0, atol=1e-7, err_msg=photo.name)


def test_letterbox_matches_ultralytics(references: dict, photo_paths: list[Path]) -> None:
    """Same geometry (pad pixels identical); content differs only by JPEG decoder rounding (Pillow vs OpenCV)."""
    for photo in photo_paths:
        theirs = references["arrays"][f"ul_input/{photo.name}"]
        ours = our_network_input(photo, UL_MODEL)
        pad = np.isclose(theirs, 114 / 255).all(axis=0)
        np.testing.assert_array_equal(np.isclose(ours, 114 / 255).all(axis=0)[pad], True, err_msg=photo.name)
        assert np.abs(ours - theirs).mean() < 1 / 255, photo.name


@pytest.mark.parametrize(("model", "prefix"), [(SG_MODEL, "sg"), (UL_MODEL, "ul")])
def test_openvino_ir_matches_pytorch(
    model: str, prefix: str, model_repository: Path, references: dict, photo_paths: list[Path]
) -> None:
    """The IR Triton serves (f32) against the PyTorch network on the same inputs: 1e-3 px, 1e-5 scores.

    Geometry is compared on anchors scoring at least 0.01 (the ones NMS can ever see): below that the
    trained network's own float32-vs-float64 noise reaches 1.7e-3 px, so no runtime can be held to 1e-3.
    """
    runner = OpenVinoRunner(model_repository / f"{model}_network" / "1" / "model.xml", precision="f32")
    inputs = np.stack([references["arrays"][f"{prefix}_input/{p.name}"] for p in photo_paths])
    ours = runner.infer(inputs)
    theirs = np.stack([references["arrays"][f"{prefix}_candidates/{p.name}"] for p in photo_paths])
    assert ours.shape == theirs.shape == (len(photo_paths), 8400, 56)
    kpt_xy = np.r_[5:56].reshape(17, 3)[:, :2].ravel()
    kpt_conf = np.r_[5:56].reshape(17, 3)[:, 2]
    relevant = theirs[..., 4] >= 0.01
    assert relevant.sum() >= 50
    assert np.abs(ours[relevant][:, :4] - theirs[relevant][:, :4]).max() < 1e-3  # boxes, px
    assert np.abs(ours[relevant][:, kpt_xy] - theirs[relevant][:, kpt_xy]).max() < 1e-3  # keypoints, px
    assert np.abs(ours[..., 4] - theirs[..., 4]).max() < 1e-5  # person score
    assert np.abs(ours[relevant][:, kpt_conf] - theirs[relevant][:, kpt_conf]).max() < 1e-5  # keypoint confidence


def test_served_yolo_nas_pose_matches_super_gradients_predict(
    served_url: str, references: dict, photo_paths: list[Path]
) -> None:
    total = 0
    for photo in photo_paths:
        expected = reference(references, "super_gradients", photo)
        (served,) = infer(served_url, SG_MODEL, [photo.read_bytes()], {"conf": 0.5, "iou": 0.7})
        assert len(served.scores) == len(expected.scores), photo.name
        assert len(expected.scores) >= 2, f"{photo.name}: too few detections for a meaningful comparison"
        order = match(served, expected)
        np.testing.assert_allclose(served.boxes[order], expected.boxes, atol=1.0, err_msg=photo.name)
        np.testing.assert_allclose(served.scores[order], expected.scores, atol=1e-3, err_msg=photo.name)
        np.testing.assert_allclose(served.keypoints[order, :, :2], expected.keypoints[..., :2], atol=1.0)
        np.testing.assert_allclose(served.keypoints[order, :, 2], expected.keypoints[..., 2], atol=1e-3)
        total += len(expected.scores)
    assert total >= 10


def test_served_yolo11n_pose_matches_ultralytics_predict(
    served_url: str, references: dict, photo_paths: list[Path]
) -> None:
    counts = {}
    for photo in photo_paths:
        expected = reference(references, "ultralytics", photo)
        (served,) = infer(served_url, UL_MODEL, [photo.read_bytes()])
        assert len(served.scores) == len(expected.scores), photo.name
        order = match(served, expected)
        np.testing.assert_allclose(served.keypoints[order, :, :2], expected.keypoints[..., :2], atol=2.0)
        np.testing.assert_allclose(served.boxes[order], expected.boxes, atol=2.0, err_msg=photo.name)
        np.testing.assert_allclose(served.scores[order], expected.scores, atol=1e-2, err_msg=photo.name)
        counts[photo.name] = len(expected.scores)
    # Trained weights on real photos: the multi-person photos really hold several people.
    assert counts["bus.jpg"] >= 4 and counts["zidane.jpg"] >= 2, counts
