"""The served ensembles against a real Triton: inputs, thresholds, batching, and bad input isolation."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from posetriton.core.images import decode_image
from posetriton.server import model_config
from posetriton.server.launcher import TritonServer
from tests.conftest import SG_MODEL, UL_MODEL, start_server
from tests.inputs import bad_inputs, encode, exif_rotated_jpeg, sixteen_bit_png
from tests.triton_requests import (
    Detections,
    assert_same,
    image_input,
    infer,
    infer_error,
    match,
    pixels_input,
    split,
)

INVALID = "StatusCode.INVALID_ARGUMENT"


@pytest.fixture(scope="module")
def photos(photo_paths: list[Path]) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in photo_paths}


@pytest.fixture(scope="module")
def bounds(
    photos: dict[str, bytes], bounds_for: Callable[[str, bytes], dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Per photo: how far two float32 runs of the served yolo11n_pose on it may differ (conftest.photo_bounds)."""
    return {name: bounds_for(UL_MODEL, data) for name, data in photos.items()}


@pytest.fixture(scope="module")
def singles(served_url: str, photos: dict[str, bytes]) -> dict[str, Detections]:
    """Each photo alone, the reference for batched and concurrent runs."""
    return {name: infer(served_url, UL_MODEL, [data])[0] for name, data in photos.items()}


def test_batch_keeps_input_order(
    served_url: str, photos: dict[str, bytes], singles: dict[str, Detections], bounds: dict[str, dict[str, float]]
) -> None:
    names = ["zidane.jpg", "bus.jpg", "grace_hopper.jpg", "astronaut.webp", "bus.jpg"]
    batched = infer(served_url, UL_MODEL, [photos[n] for n in names])
    for name, detections in zip(names, batched, strict=True):
        assert_same(detections, singles[name], bounds[name])
    assert len(batched[1].scores) >= 4  # bus.jpg holds several people; zidane.jpg two
    assert len(batched[0].scores) != len(batched[1].scores)


def test_raw_pixels_give_the_same_result_as_bytes(
    served_url: str, photos: dict[str, bytes], singles: dict, bounds: dict[str, dict[str, float]]
) -> None:
    rgb = decode_image(photos["bus.jpg"], 10**8)
    with grpcclient.InferenceServerClient(served_url) as client:
        result = client.infer(f"{UL_MODEL}_pixels", [pixels_input(rgb[None])])
    (pixels,) = split(result)
    assert_same(pixels, singles["bus.jpg"], bounds["bus.jpg"])


def test_per_request_thresholds(
    served_url: str, photos: dict[str, bytes], references: dict, bounds: dict[str, dict[str, float]]
) -> None:
    bus = photos["bus.jpg"]
    loose = infer(served_url, UL_MODEL, [bus], {"conf": 0.05, "iou": 0.9})[0]
    default = infer(served_url, UL_MODEL, [bus])[0]
    strict = infer(served_url, UL_MODEL, [bus], {"conf": 0.8})[0]
    capped = infer(served_url, UL_MODEL, [bus], {"conf": 0.05, "iou": 0.9, "max_det": 2})[0]
    assert len(loose.scores) > len(default.scores) > len(strict.scores)
    # As many as the references say: Ultralytics' own predict() at its default conf 0.25, and of those the
    # ones scoring at least 0.8 (NMS keeps a box unless a higher-scoring one suppresses it).
    upstream = np.asarray(references["detections"]["ultralytics"]["bus.jpg"]["scores"])
    assert np.abs(upstream - 0.8).min() > 2e-3, "a reference score at the threshold would make the count ambiguous"
    assert len(default.scores) == len(upstream) and default.scores.min() >= 0.25
    assert len(strict.scores) == int((upstream >= 0.8).sum()) >= 1 and strict.scores.min() >= 0.8
    assert_same(capped, Detections(loose.boxes[:2], loose.scores[:2], loose.keypoints[:2]), bounds["bus.jpg"])
    tighter_iou = infer(served_url, UL_MODEL, [bus], {"conf": 0.05, "iou": 0.3})[0]
    assert len(tighter_iou.scores) < len(loose.scores)
    # super-gradients' model defaults differ (conf 0.5) and come from that model's own config.
    nas = infer(served_url, SG_MODEL, [bus])[0]
    assert len(nas.scores) == len(references["detections"]["super_gradients"]["bus.jpg"]["scores"])
    assert np.all(nas.scores >= 0.5)


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({"conf": 1.5}, "conf must be in [0, 1]"),
        ({"iou": -0.1}, "iou must be in [0, 1]"),
        ({"max_det": 0}, "max_det must be in [1, 1000]"),
        ({"max_det": 2.5}, "max_det must be an integer"),
        ({"conf": "high"}, "conf must be a number"),
        ({"confidence": 0.3}, "unknown request parameter(s) ['confidence']"),
    ],
)
def test_bad_thresholds_are_invalid_argument(served_url: str, photos: dict, parameters: dict, fragment: str) -> None:
    error = infer_error(served_url, UL_MODEL, [image_input([photos["bus.jpg"]])], parameters=parameters)
    assert error.status() == INVALID and fragment in error.message()


@pytest.mark.parametrize("name", list(bad_inputs(b"")))
def test_bad_images_are_invalid_argument(served_url: str, photos: dict[str, bytes], name: str) -> None:
    data, fragment = bad_inputs(photos["bus.jpg"])[name]
    error = infer_error(served_url, UL_MODEL, [image_input([data])])
    assert error.status() == INVALID, error
    assert fragment in error.message()


def test_bad_image_in_a_batch_is_named(served_url: str, photos: dict[str, bytes]) -> None:
    error = infer_error(
        served_url, UL_MODEL, [image_input([photos["bus.jpg"], b"GIF89a-not-really", photos["bus.jpg"]])]
    )
    assert error.status() == INVALID and "image 1 of 3" in error.message()


def test_wrong_dtype_and_shape_are_invalid_argument(served_url: str) -> None:
    as_int = grpcclient.InferInput("IMAGE", [1, 4], "INT32")
    as_int.set_data_from_numpy(np.zeros((1, 4), np.int32))
    assert infer_error(served_url, UL_MODEL, [as_int]).status() == INVALID
    four_channels = pixels_input(np.zeros((1, 32, 32, 4), np.uint8))
    assert infer_error(served_url, f"{UL_MODEL}_pixels", [four_channels]).status() == INVALID
    floats = grpcclient.InferInput("PIXELS", [1, 32, 32, 3], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.float32))
    assert infer_error(served_url, f"{UL_MODEL}_pixels", [floats]).status() == INVALID
    empty = pixels_input(np.zeros((1, 0, 32, 3), np.uint8))
    error = infer_error(served_url, f"{UL_MODEL}_pixels", [empty])
    assert error.status() == INVALID and "no pixels" in error.message()


def test_odd_but_valid_images_give_correct_results(
    served_url: str, photos: dict[str, bytes], singles: dict, bounds: dict[str, dict[str, float]]
) -> None:
    rgb = decode_image(photos["bus.jpg"], 10**8)
    grey = encode(np.asarray(rgb.mean(axis=2), np.uint8), "JPEG", quality=95)
    rgba = encode(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "PNG")
    rotated, sixteen = exif_rotated_jpeg(rgb), sixteen_bit_png(rgb)
    grey_res, rgba_res, rotated_res, sixteen_res = infer(served_url, UL_MODEL, [grey, rgba, rotated, sixteen])
    assert_same(rgba_res, singles["bus.jpg"], bounds["bus.jpg"])  # alpha dropped, pixels identical
    # EXIF orientation applied: same people at the same upright coordinates (JPEG re-encoding aside).
    reference = singles["bus.jpg"]
    confident = reference.scores > 0.5
    assert confident.sum() >= 3
    order = match(
        rotated_res, Detections(reference.boxes[confident], reference.scores[confident], reference.keypoints[confident])
    )
    np.testing.assert_allclose(rotated_res.boxes[order], reference.boxes[confident], atol=6)
    for result in (grey_res, sixteen_res):  # colour lost, people still found
        assert len(result.scores) >= 3


def test_bad_requests_do_not_disturb_concurrent_good_ones(
    server: TritonServer, photos: dict[str, bytes], singles: dict[str, Detections], bounds: dict[str, dict[str, float]]
) -> None:
    """Good and bad requests in flight together share dynamic batches; only the bad ones fail."""
    bad = bad_inputs(photos["bus.jpg"])
    jobs = [("good", name, photos[name]) for name in ["bus.jpg", "zidane.jpg"] * 6]
    jobs += [("bad", name, data) for name, (data, _) in bad.items()]
    jobs = [jobs[i] for i in np.random.default_rng(0).permutation(len(jobs))]

    def run(job: tuple[str, str, bytes]) -> Detections | str:
        try:
            return infer(server.grpc_url, UL_MODEL, [job[2]])[0]
        except grpcclient.InferenceServerException as exc:
            return str(exc.status())

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for (kind, name, _), result in zip(jobs, results, strict=True):
        if kind == "good":
            assert isinstance(result, Detections), f"{name}: {result}"
            assert_same(result, singles[name], bounds[name])
        else:
            assert result == INVALID, name
    assert server.is_ready() and server.process is not None and server.process.poll() is None


def test_cpu_network_step_finishes_the_poses_as_the_postprocess_step_does(
    served_url: str, photos: dict[str, bytes]
) -> None:
    """On the CPU path the network step is the whole ensemble: from the images it gives the same outputs, value for
    value, as from NAME_preprocess's canvas and letterbox rows, and those are what NAME_postprocess gives for the
    candidates that very call computed."""
    outputs = ["NUM_DETECTIONS", "BOXES", "SCORES", "KEYPOINTS", "IMAGE_SIZE"]
    parameters = {"conf": 0.1, "iou": 0.6, "max_det": 3}
    images = image_input([photos["bus.jpg"], photos["zidane.jpg"]])
    with grpcclient.InferenceServerClient(served_url) as client:
        steps = client.get_model_config(UL_MODEL, as_json=True)["config"]["ensemble_scheduling"]["step"]
        assert [step["model_name"] for step in steps] == [f"{UL_MODEL}_network"]
        track = client.get_model_config(f"{UL_MODEL}_track", as_json=True)["config"]["ensemble_scheduling"]["step"]
        assert [step["model_name"] for step in track][:2] == [f"{UL_MODEL}_preprocess", f"{UL_MODEL}_network"]
        prepared = client.infer(f"{UL_MODEL}_preprocess", [images])
        canvas, letterbox = prepared.as_numpy("canvas"), prepared.as_numpy("letterbox")
        inputs = [grpcclient.InferInput("canvas", list(canvas.shape), "UINT8"),
                  grpcclient.InferInput("letterbox", list(letterbox.shape), "FP64")]  # fmt: skip
        inputs[0].set_data_from_numpy(canvas)
        inputs[1].set_data_from_numpy(letterbox)
        wanted = [grpcclient.InferRequestedOutput(name) for name in ["candidates", *outputs]]
        network = client.infer(f"{UL_MODEL}_network", inputs, outputs=wanted, parameters=parameters)
        candidates = network.as_numpy("candidates")
        post_inputs = [grpcclient.InferInput("candidates", list(candidates.shape), "FP32"), inputs[1]]
        post_inputs[0].set_data_from_numpy(candidates)
        post = client.infer(f"{UL_MODEL}_postprocess", post_inputs, parameters=parameters)
        raw = client.infer(f"{UL_MODEL}_network", inputs[:1])  # no letterbox rows: the candidates alone
        decoded = client.infer(f"{UL_MODEL}_network", [images], outputs=wanted, parameters=parameters)
    counts = network.as_numpy("NUM_DETECTIONS")[:, 0]
    assert counts[0] == 3 and counts[1] == 2  # bus.jpg holds more people than max_det, zidane.jpg two
    for name in outputs:
        assert np.array_equal(network.as_numpy(name), post.as_numpy(name)), name
    for name in ["candidates", *outputs]:
        assert np.array_equal(decoded.as_numpy(name), network.as_numpy(name)), name
    assert raw.as_numpy("candidates").shape == candidates.shape and raw.as_numpy("BOXES") is None


def test_ensemble_publishes_keypoint_metadata(served_url: str) -> None:
    with grpcclient.InferenceServerClient(served_url) as client:
        config = client.get_model_config(UL_MODEL, as_json=True)["config"]
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    names = json.loads(params["keypoint_names"])
    assert names[0] == "nose" and len(names) == 17
    assert [5, 6] in json.loads(params["skeleton"])
    assert params["letterbox.pad_position"] == "center" and params["default.conf"] == "0.25"


def test_reduced_jpeg_decode_is_opt_in_and_maps_back_to_the_original(
    served_url: str, model_repository: Path, photos: dict[str, bytes], tmp_path: Path
) -> None:
    """With reduced_jpeg_decode on, a 4K JPEG is decoded at a fraction of its size, yet IMAGE_SIZE and the poses
    refer to the original photo (within the deviation docs/benchmarks.md publishes for 4K)."""
    repository = tmp_path / "repository"
    for entry in model_repository.iterdir():
        if entry.name.startswith(UL_MODEL):
            shutil.copytree(entry, repository / entry.name, symlinks=True)
    # Both steps that decode carry the catalogue's letterbox parameters: the preprocess step (GPU, tracking) and the
    # CPU network step (NAME's whole pipeline on the CPU).
    for config in (repository / f"{UL_MODEL}_preprocess" / "config.pbtxt",
                   repository / f"{UL_MODEL}_network" / "configs" / "cpu.pbtxt"):  # fmt: skip
        with model_config.editing(config) as decoding:
            reduced = decoding.parameters["reduced_jpeg_decode"]
            assert reduced.string_value == "false", "off by default"
            reduced.string_value = "true"
    bus = cv2.imdecode(np.frombuffer(photos["bus.jpg"], np.uint8), cv2.IMREAD_COLOR)
    big = cv2.resize(bus, (bus.shape[1] * 4, bus.shape[0] * 4), interpolation=cv2.INTER_CUBIC)  # 3240x4320
    data = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()

    (full,) = infer(served_url, UL_MODEL, [data])
    server = start_server(repository, models=[UL_MODEL])
    try:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            result = client.infer(UL_MODEL, [image_input([data])], client_timeout=120)
    finally:
        server.stop()
    assert result.as_numpy("IMAGE_SIZE").tolist() == [[3240, 4320]]
    (reduced,) = split(result)
    assert len(reduced.scores) == len(full.scores) >= 4
    order = match(reduced, full)
    confident = full.keypoints[..., 2] > 0.5
    deviation = np.linalg.norm(reduced.keypoints[order, :, :2] - full.keypoints[..., :2], axis=-1)[confident]
    assert 0 < np.median(deviation) < 10.0, np.median(deviation)  # px; docs: median 4.4 px at 4K
