"""Served results equal the upstream libraries' own: super-gradients predict() and Ultralytics predict().

YOLO-NAS Pose N runs with a seeded random init whose score head is re-initialised so that
scores spread over (0, 1) (see build_engines/yolo_nas_pose.py): each photo then yields several
detections at conf 0.5, so the comparison is not of empty sets.

No bound is a guess tuned on one CPU: each is FLOAT32_MARGIN x PyTorch float32's own distance from the same network
in float64 on the same photos (build_engines.parity), which does not depend on the instruction set that OpenVINO's
kernels happen to use; served results are held to it scaled to each photo's pixels (conftest.photo_bounds). The
Ultralytics comparison sends the cv2-decoded pixels to the ``_pixels`` ensemble, as the reference gets them, so
the JPEG decoder does not enter it.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from build_engines.parity import (
    FLOAT32_MARGIN,
    QUANTITIES,
    float32_noise,
    noise_bounds,
    top_k_differences,
    top_k_rows,
)
from posetriton.core.images import decode_image
from posetriton.core.processing import letterbox, to_network_input
from posetriton.server.openvino_runtime import OpenVinoRunner
from posetriton.server.repository import load_catalog
from tests.conftest import (
    CACHE,
    ROOT,
    SEED,
    SG_MODEL,
    UL_MODEL,
    _fingerprint,
    export_report,
    photo_bounds,
    run_export_python,
    start_server,
)  # fmt: skip
from tests.triton_requests import Detections, infer, match, pixels_input, split

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
        np.testing.assert_array_equal(our_network_input(photo, SG_MODEL), theirs, err_msg=photo.name)


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
    model: str, prefix: str, model_repository: Path, references: dict, photo_paths: list[Path],
    float32_noise_of: dict[str, dict[str, float]],
) -> None:  # fmt: skip
    """The IR Triton serves (f32, uint8 canvas in, top-k out) against the PyTorch network in float64, within
    FLOAT32_MARGIN x PyTorch float32's own distance from float64 on the same photos (build_engines.parity).

    The reference input is the library's own float tensor; the IR takes the uint8 RGB canvas it came from.
    Geometry is compared on rows scoring at least 0.01 whose rank is unambiguous (build_engines.parity).
    """
    spec = CATALOG[model]
    runner = OpenVinoRunner(model_repository / f"{model}_network" / "1" / "model.xml", precision="f32")
    floats = np.stack([references["arrays"][f"{prefix}_input/{p.name}"] for p in photo_paths])
    canvases = np.rint(floats * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    if spec.letterbox.channel_order == "BGR":
        canvases = canvases[..., ::-1]
    np.testing.assert_array_equal(to_network_input(canvases, spec.letterbox), floats)  # the same input, exactly
    ours = runner.infer(np.ascontiguousarray(canvases))

    exact = top_k_rows(
        np.stack([references["arrays"][f"{prefix}_candidates64/{p.name}"] for p in photo_paths]), spec.num_candidates
    )
    assert exact.dtype == np.float64, "the reference is the network in float64"
    assert ours.shape == exact.shape == (len(photo_paths), spec.num_candidates, spec.candidate_width)
    assert (exact[..., 4] >= 0.01).sum() >= 50
    keypoints = spec.postprocess.num_keypoints
    noise = float32_noise_of[model]
    bounds = noise_bounds(noise)
    worst = top_k_differences([exact], [ours], keypoints, bounds["scores"])
    print(f"\n{model}: OpenVINO f32 vs PyTorch float64 (bound = {FLOAT32_MARGIN:g} x PyTorch float32's own noise)")
    for key in QUANTITIES:
        print(f"  {key:14s} measured {worst[key]:.3g}  noise {noise[key]:.3g}  bound {bounds[key]:.3g}")
    assert all(worst[key] <= bounds[key] for key in QUANTITIES), {"measured": worst, "bounds": bounds}


def test_served_yolo_nas_pose_matches_super_gradients_predict(
    served_url: str, references: dict, photo_paths: list[Path], crowd_photo: Path,
    float32_noise_of: dict[str, dict[str, float]],
) -> None:  # fmt: skip
    """super-gradients' own predict() with its own default thresholds; the request sends none either."""
    total = 0
    for photo in [*photo_paths, crowd_photo]:
        expected = reference(references, "super_gradients", photo)
        (served,) = infer(served_url, SG_MODEL, [photo.read_bytes()])
        assert len(served.scores) == len(expected.scores), photo.name
        assert len(expected.scores) >= 2, f"{photo.name}: too few detections for a meaningful comparison"
        _assert_close(served, expected, photo, SG_MODEL, float32_noise_of[SG_MODEL])
        total += len(expected.scores)
    assert total >= 10


def test_served_yolo11n_pose_matches_ultralytics_predict(
    served_url: str, references: dict, photo_paths: list[Path], crowd_photo: Path,
    float32_noise_of: dict[str, dict[str, float]],
) -> None:  # fmt: skip
    """Ultralytics predict() on the static square ONNX and the served NAME_pixels, both fed cv2's decode.

    The crowd photo holds more candidates above conf 0.25 than the in-graph top-k of a smaller k would keep:
    it is what fixes ``candidates_topk`` for this family.
    """
    counts = {}
    with grpcclient.InferenceServerClient(served_url) as client:
        for photo in [*photo_paths, crowd_photo]:
            expected = reference(references, "ultralytics", photo)
            rgb = np.ascontiguousarray(cv2.imread(str(photo))[..., ::-1])
            (served,) = split(client.infer(f"{UL_MODEL}_pixels", [pixels_input(rgb[None])], client_timeout=120))
            assert len(served.scores) == len(expected.scores), photo.name
            _assert_close(served, expected, photo, UL_MODEL, float32_noise_of[UL_MODEL])
            counts[photo.name] = len(expected.scores)
    # Trained weights on real photos: the multi-person photos really hold several people.
    assert counts["bus.jpg"] >= 4 and counts["zidane.jpg"] >= 2 and counts[crowd_photo.name] >= 30, counts


def _assert_close(served: Detections, expected: Detections, photo: Path, model: str, noise: dict[str, float]) -> None:
    """Served vs upstream on one photo, within the bounds of two float32 runs in its pixels (photo_bounds)."""
    height, width = decode_image(photo.read_bytes(), CATALOG[model].letterbox.max_pixels).shape[:2]
    bounds = photo_bounds(noise, width, height, CATALOG[model].letterbox.input_size)
    order = match(served, expected)
    worst = {
        "boxes": np.abs(served.boxes[order] - expected.boxes).max(initial=0.0),
        "scores": np.abs(served.scores[order] - expected.scores).max(initial=0.0),
        "keypoints_xy": np.abs(served.keypoints[order, :, :2] - expected.keypoints[..., :2]).max(initial=0.0),
        "keypoint_conf": np.abs(served.keypoints[order, :, 2] - expected.keypoints[..., 2]).max(initial=0.0),
    }
    print(f"\n{model} {photo.name} ({width}x{height}): " + ", ".join(
        f"{key} {worst[key]:.3g} <= {bounds[key]:.3g}" for key in QUANTITIES
    ))  # fmt: skip
    assert all(worst[key] <= bounds[key] for key in QUANTITIES), (photo.name, {"measured": worst, "bounds": bounds})


@pytest.mark.slow
def test_seeded_yolo_nas_pose_s_exports_and_serves_like_super_gradients(photo_paths: list[Path]) -> None:
    """A second YOLO-NAS Pose size through the whole path: export gate, Triton, super-gradients' predict()."""
    model = "yolo_nas_pose_s"
    key = _fingerprint(model, str(SEED))
    repository, references_dir = CACHE / "yolo_nas_pose_s" / "repository", CACHE / "yolo_nas_pose_s" / "references"
    stamp = CACHE / "yolo_nas_pose_s" / "key"
    photos = [p for p in photo_paths if p.name in {"bus.jpg", "zidane.jpg"}]
    if not (stamp.exists() and stamp.read_text() == key):
        run_export_python(
            "-m", "build_engines", "build", model, "--seed", str(SEED), "--repository", str(repository),
            "--workdir", str(CACHE / "yolo_nas_pose_s" / "export"),
        )  # fmt: skip
        checkpoint = export_report(repository, model)["files"]["checkpoint"]
        run_export_python(
            "tests/reference/make_references.py", "--out", str(references_dir), "--photos", *map(str, photos),
            "--sg-variant", model, "--sg-checkpoint", checkpoint,
        )  # fmt: skip
        stamp.write_text(key)
    report = export_report(repository, model)["parity"]
    for key_name, tolerance in report["tolerances"].items():
        assert report["openvino_vs_pytorch"][key_name] <= tolerance, (key_name, report)
    expected_all = json.loads((references_dir / "detections.json").read_text())
    with np.load(references_dir / "arrays.npz") as arrays:
        k = CATALOG[model].num_candidates

        def rows(name: str) -> list[np.ndarray]:
            return [top_k_rows(arrays[f"sg_{name}/{photo.name}"][None], k) for photo in photos]

        noise = float32_noise(rows("candidates64"), rows("candidates"), CATALOG[model].postprocess.num_keypoints)
    server = start_server(repository, models=[model])
    try:
        for photo in photos:
            d = expected_all["super_gradients"][photo.name]
            expected = Detections(
                np.asarray(d["boxes"], np.float32).reshape(-1, 4),
                np.asarray(d["scores"], np.float32),
                np.asarray(d["keypoints"], np.float32).reshape(-1, 17, 3),
            )
            (served,) = infer(server.grpc_url, model, [photo.read_bytes()])
            assert len(served.scores) == len(expected.scores) >= 2, photo.name
            _assert_close(served, expected, photo, model, noise)
    finally:
        server.stop()
