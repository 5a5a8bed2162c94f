"""PoseClient against real Triton servers: results, thresholds, metadata and every error it maps.

The session server (conftest ``served_url``) serves the real ensembles. A second, small server
started here serves a Python-backend model that fails on purpose, so the client meets a real
INTERNAL status and a model unloaded under it; nothing in tritonclient is replaced.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from posetriton.client import ImagePoses, PoseClient
from posetriton.client.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelNotReadyError,
    PoseClientError,
    ServerUnavailableError,
)  # fmt: skip
from posetriton.core.spec import COCO_KEYPOINT_NAMES, COCO_SKELETON
from posetriton.server.launcher import TritonServer
from posetriton.server.repository import load_catalog
from tests.conftest import ROOT, SG_MODEL, UL_MODEL, free_port, model_stats, photo_bounds, start_server

EXIF_ORIENTATION = 0x0112


def _photo(photo_paths: list[Path], name: str) -> Path:
    (path,) = [p for p in photo_paths if p.name == name]
    return path


def _rotated_jpeg(photo: Path) -> bytes:
    """The photo stored turned 90 degrees counter-clockwise, with EXIF orientation 6 (rotate 90 CW to display)."""
    with Image.open(photo) as image:
        stored = image.convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def _size(photo: Path) -> tuple[int, int]:
    with Image.open(photo) as image:
        return image.size


def _scores(result: ImagePoses) -> list[float]:
    return [pose.score for pose in result.poses]


def _assert_same_poses(a: ImagePoses, b: ImagePoses, bounds: dict[str, float]) -> None:
    assert len(a.poses) == len(b.poses), (a.image, _scores(a), _scores(b))
    for pa, pb in zip(a.poses, b.poses, strict=True):
        assert pa.score == pytest.approx(pb.score, abs=bounds["scores"])
        assert pa.box == pytest.approx(pb.box, abs=bounds["boxes"])


def _assert_cause_is_tritonclient(error: PoseClientError, status: str) -> None:
    assert error.status == status
    assert isinstance(error.__cause__, InferenceServerException)
    assert error.__cause__.status() == f"StatusCode.{status}"


# --- results ---------------------------------------------------------------------------------


def test_predict_sends_one_batch_and_returns_results_in_input_order(
    served_url: str, photo_paths: list[Path], float32_noise_of: dict[str, dict[str, float]]
) -> None:
    grace, bus, zidane, astronaut = (
        _photo(photo_paths, name) for name in ("grace_hopper.jpg", "bus.jpg", "zidane.jpg", "astronaut.webp")
    )
    rotated = _rotated_jpeg(grace)
    with Image.open(io.BytesIO(rotated)) as stored:
        assert stored.size == _size(grace)[::-1], "the rotated JPEG stores the photo on its side"
    images: list[Any] = [bus, rotated, zidane, astronaut]

    with PoseClient(served_url, UL_MODEL) as client:
        requests_before, _, images_before = model_stats(served_url, UL_MODEL)
        results = client.predict(images)
        requests_after, _, images_after = model_stats(served_url, UL_MODEL)
        singles = [client.predict([image])[0] for image in images]
        upright = client.predict([grace])[0]

    assert (requests_after - requests_before, images_after - images_before) == (1, len(images)), "one request"
    assert [(r.image, r.width, r.height) for r in results] == [
        (str(bus), *_size(bus)),
        ("<image 1>", *_size(grace)),  # the upright size, not the stored one
        (str(zidane), *_size(zidane)),
        (str(astronaut), *_size(astronaut)),
    ]
    counts = [len(r.poses) for r in results]
    assert counts[0] >= 4 and counts[2] == 2 and counts[0] != counts[2], counts  # bus.jpg vs zidane.jpg
    input_size = load_catalog(ROOT / "build_engines" / "models.toml")[UL_MODEL].letterbox.input_size
    for batched, single in zip(results, singles, strict=True):  # the same pixels: two float32 runs apart at most
        bounds = photo_bounds(float32_noise_of[UL_MODEL], batched.width, batched.height, input_size)
        _assert_same_poses(batched, single, bounds)
    # The server's coordinates refer to the upright photo, as the width and height say. Not the same pixels (the
    # rotated copy is a second JPEG encoding), so this bound is about where the people are, not about rounding.
    _assert_same_poses(results[1], upright, {"boxes": 3.0, "scores": 0.02})
    for result in results:
        for pose in result.poses:
            x1, y1, x2, y2 = pose.box
            assert 0 <= x1 < x2 <= result.width and 0 <= y1 < y2 <= result.height
            assert len(pose.keypoints) == len(COCO_KEYPOINT_NAMES)


def test_per_call_thresholds_reach_the_server(served_url: str, photo_paths: list[Path]) -> None:
    images = [_photo(photo_paths, "bus.jpg"), _photo(photo_paths, "astronaut.webp")]
    with PoseClient(served_url, UL_MODEL) as client:
        default_conf = float(client.model_metadata().parameters["default.conf"])
        default = client.predict(images)
        strict = client.predict(images, conf=0.5)
        loose = client.predict(images, conf=0.05)
        capped = client.predict(images, conf=0.05, max_det=1)

    # Preconditions that make each check below able to fail.
    assert any(score < 0.5 for score in _scores(default[0])), "bus.jpg has a person scored under 0.5"
    assert any(score < default_conf for r in loose for score in _scores(r)), "a person only a low conf finds"
    assert max(len(r.poses) for r in loose) > 1

    for before, after in zip(default, strict, strict=True):
        assert _scores(after) == pytest.approx([s for s in _scores(before) if s >= 0.5], abs=1e-4)
    assert all(score >= 0.05 for r in loose for score in _scores(r))
    for full, top in zip(loose, capped, strict=True):
        assert len(top.poses) == min(1, len(full.poses))
        assert _scores(top) == pytest.approx(_scores(full)[:1], abs=1e-4)


def test_model_metadata_comes_from_the_served_config(served_url: str) -> None:
    with PoseClient(served_url, UL_MODEL) as client:
        meta = client.model_metadata()
    assert meta.name == UL_MODEL and meta.family == "ultralytics_pose"
    # Read from the config, not the COCO fallback a model without metadata gets.
    assert "keypoint_names" in meta.parameters and "skeleton" in meta.parameters
    assert meta.keypoint_names == COCO_KEYPOINT_NAMES and meta.skeleton == COCO_SKELETON
    assert (meta.max_batch_size, meta.max_det_limit) == (32, 1000)
    assert meta.parameters["default.conf"] == "0.25"
    with PoseClient(served_url, SG_MODEL) as client:
        nas = client.model_metadata()
    assert nas.name == SG_MODEL and nas.family != meta.family and nas.parameters["default.conf"] == "0.5"


# --- refused inputs --------------------------------------------------------------------------


def test_invalid_argument_names_the_refused_image_of_a_batch(
    served_url: str, photo_paths: list[Path], tmp_path: Path
) -> None:
    grace = _photo(photo_paths, "grace_hopper.jpg")
    data = grace.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 3])  # the header is intact, so the client sends it

    with PoseClient(served_url, UL_MODEL) as client:
        with pytest.raises(InvalidInputError) as caught:
            client.predict([grace, truncated, data])
        error = caught.value
        assert (error.index, error.image) == (1, str(truncated))
        assert error.reason.startswith("corrupt or truncated JPEG data"), error.reason
        assert str(error) == f"{truncated}: {error.reason}"
        assert error.server_message is not None
        assert error.server_message.startswith(f"in ensemble '{UL_MODEL}', image 1 of 3: corrupt or truncated")
        _assert_cause_is_tritonclient(error, "INVALID_ARGUMENT")

        # Alone, the server names no index; the client still blames the only image sent.
        with pytest.raises(InvalidInputError) as caught:
            client.predict([truncated])
        assert (caught.value.index, caught.value.image) == (0, str(truncated))
        assert caught.value.reason.startswith("corrupt or truncated JPEG data")

        # The refusal was the image's alone: the others still work.
        assert [len(r.poses) for r in client.predict([grace, data])] == [1, 1]


def test_request_level_refusals_blame_no_image(served_url: str, photo_paths: list[Path]) -> None:
    grace = _photo(photo_paths, "grace_hopper.jpg")
    with PoseClient(served_url, UL_MODEL) as client:
        assert client.model_metadata().max_det_limit == 1000  # the client leaves the limit to the server
        with pytest.raises(InvalidInputError) as caught:
            client.predict([grace], max_det=5000)
        error = caught.value
        assert (error.index, error.image) == (None, None), "a single image is not blamed for the request"
        assert error.reason == str(error) == "max_det must be in [1, 1000], got 5000"
        assert error.server_message == f"in ensemble '{UL_MODEL}', max_det must be in [1, 1000], got 5000"
        _assert_cause_is_tritonclient(error, "INVALID_ARGUMENT")

        with pytest.raises(InvalidInputError) as caught:
            client.predict([grace] * 33)
        error = caught.value
        assert (error.index, error.image) == (None, None)
        assert error.reason == f"inference request batch-size must be <= 32 for '{UL_MODEL}'"
        _assert_cause_is_tritonclient(error, "INVALID_ARGUMENT")


# --- unreachable server, missing model, deadline ---------------------------------------------


def test_nothing_listening_is_server_unavailable(photo_paths: list[Path]) -> None:
    port = free_port()
    with PoseClient(f"127.0.0.1:{port}", UL_MODEL, timeout_s=30) as client:
        with pytest.raises(ServerUnavailableError) as caught:
            client.predict(photo_paths[:1])
        error = caught.value
        assert str(error).startswith(f"cannot reach Triton's gRPC endpoint at 127.0.0.1:{port} (")
        assert "is the server running (posetriton serve)" in str(error)
        assert "Connection refused" in str(error)  # tritonclient's reason is kept in the message
        _assert_cause_is_tritonclient(error, "UNAVAILABLE")
        with pytest.raises(ServerUnavailableError, match=f"127.0.0.1:{port}"):
            client.check_ready()


def test_unknown_model_is_not_ready(served_url: str, photo_paths: list[Path]) -> None:
    with PoseClient(served_url, "no_such_model") as client:
        with pytest.raises(ModelNotReadyError) as caught:
            client.predict(photo_paths[:1])
        error = caught.value
        assert str(error) == (
            f"model 'no_such_model' is not served at {served_url}: "
            "Request for unknown model: 'no_such_model' is not found"
        )
        _assert_cause_is_tritonclient(error, "NOT_FOUND")
        # check_ready() lists what the server does serve (the ensembles, not their steps).
        with pytest.raises(ModelNotReadyError) as caught:
            client.check_ready()
        assert str(caught.value) == (
            f"model 'no_such_model' is not ready on {served_url}; models ready there: "
            f"{UL_MODEL}, {UL_MODEL}_pixels, {SG_MODEL}, {SG_MODEL}_pixels"
        )


def test_a_timeout_shorter_than_inference_is_deadline_exceeded(served_url: str, photo_paths: list[Path]) -> None:
    with PoseClient(served_url, UL_MODEL, timeout_s=0.001) as client:
        with pytest.raises(DeadlineExceededError) as caught:
            client.predict(photo_paths * 2)
        error = caught.value
        assert str(error) == (
            f"Triton at {served_url} did not answer within 0.001 s; raise the timeout or send smaller batches"
        )
        _assert_cause_is_tritonclient(error, "DEADLINE_EXCEEDED")
    with PoseClient(served_url, UL_MODEL) as client:
        assert len(client.predict(photo_paths[:1])[0].poses) == 1, "the server keeps serving"


def test_a_model_that_is_not_a_pose_ensemble_is_named(served_url: str, photo_paths: list[Path]) -> None:
    """The preprocess step takes IMAGE too, but answers with network input instead of poses."""
    with PoseClient(served_url, f"{UL_MODEL}_preprocess") as client, pytest.raises(PoseClientError) as caught:
        client.predict(photo_paths[:1])
    assert type(caught.value) is PoseClientError
    assert str(caught.value) == (
        f"model '{UL_MODEL}_preprocess' returned no NUM_DETECTIONS output; is it a pose ensemble?"
    )


# --- a server whose model fails --------------------------------------------------------------

FAILING_MODEL = "failing_model"
SPARE_MODEL = "spare_model"
FAILURE = "the model failed on purpose"

_FAILING_CONFIG = """\
backend: "python"
max_batch_size: 8
input [ { name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "NUM_DETECTIONS" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

_FAILING_MODEL_PY = f"""\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        error = pb_utils.TritonError({FAILURE!r}, pb_utils.TritonError.INTERNAL)
        return [pb_utils.InferenceResponse(error=error) for _ in requests]
"""


@pytest.fixture(scope="module")
def failing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A real Triton whose Python-backend models answer every request with INTERNAL; SPARE_MODEL starts unloaded."""
    repository = tmp_path_factory.mktemp("failing_repository")
    for name in (FAILING_MODEL, SPARE_MODEL):
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "config.pbtxt").write_text(_FAILING_CONFIG)
        (repository / name / "1" / "model.py").write_text(_FAILING_MODEL_PY)
    server = start_server(repository, models=[FAILING_MODEL])
    yield server
    server.stop()


def test_other_server_failures_are_pose_client_errors(failing_server: TritonServer, photo_paths: list[Path]) -> None:
    url = failing_server.grpc_url
    with PoseClient(url, FAILING_MODEL) as client:
        client.check_ready()
        with pytest.raises(PoseClientError) as caught:
            client.predict(photo_paths[:1])
    error = caught.value
    assert type(error) is PoseClientError
    assert str(error) == f"Triton at {url} failed the request (INTERNAL): {FAILURE}"
    _assert_cause_is_tritonclient(error, "INTERNAL")


def test_a_model_unloaded_under_the_client_is_not_ready(failing_server: TritonServer, photo_paths: list[Path]) -> None:
    url = failing_server.grpc_url
    with grpcclient.InferenceServerClient(url) as triton, PoseClient(url, SPARE_MODEL) as client:
        triton.load_model(SPARE_MODEL)
        client.check_ready()
        with pytest.raises(PoseClientError, match="INTERNAL"):  # loaded: the request reaches the model
            client.predict(photo_paths[:1])
        triton.unload_model(SPARE_MODEL)

        with pytest.raises(ModelNotReadyError) as caught:
            client.predict(photo_paths[:1])
        error = caught.value
        assert str(error).startswith(
            f"model '{SPARE_MODEL}' is not served at {url}: Request for unknown model: '{SPARE_MODEL}'"
        )
        _assert_cause_is_tritonclient(error, "NOT_FOUND")
        with pytest.raises(ModelNotReadyError, match=f"not ready on {url}; models ready there: {FAILING_MODEL}$"):
            client.check_ready()
