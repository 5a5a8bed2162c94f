"""The SDK against the real session Triton: inputs, order, sync and asyncio, errors, retries, discovery, shm, streams.

Nothing in tritonclient is replaced: retries are counted through the client's ``on_retry`` hook
and Triton's own statistics, shared memory through the server's registration status.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from posetriton.client import (
    AsyncPoseClient,
    DeadlineExceededError,
    ImagePoses,
    InvalidInputError,
    ModelNotReadyError,
    PoseClient,
    PoseClientError,
    RetryPolicy,
    ServerUnavailableError,
    directory_images,
    video_frames,
)
from posetriton.core.spec import COCO_KEYPOINT_NAMES, COCO_SKELETON
from posetriton.server.launcher import ServerOptions, TritonServer
from tests.conftest import SG_MODEL, UL_MODEL, free_port, model_stats

PIXELS_MODEL = f"{UL_MODEL}_pixels"


def _photo(photo_paths: list[Path], name: str) -> Path:
    (path,) = [p for p in photo_paths if p.name == name]
    return path


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _delta(before: tuple[int, ...], after: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(a - b for a, b in zip(after, before, strict=True))


def _same(a: ImagePoses, b: ImagePoses, box_atol: float = 1e-2, score_atol: float = 1e-3) -> None:
    assert (a.width, a.height) == (b.width, b.height)
    assert len(a.poses) == len(b.poses), (a.image, b.image)
    for pa, pb in zip(a.poses, b.poses, strict=True):
        assert pa.score == pytest.approx(pb.score, abs=score_atol)
        assert pa.box == pytest.approx(pb.box, abs=box_atol)
        assert pa.keypoints_array() == pytest.approx(pb.keypoints_array(), abs=max(box_atol, score_atol))


# --- inputs and order ------------------------------------------------------------------------


def test_every_input_type_gives_the_same_poses(served_url: str, photo_paths: list[Path]) -> None:
    zidane = _photo(photo_paths, "zidane.jpg")
    pixels = _rgb(zidane)  # what the server decodes from the file
    with PoseClient(served_url, UL_MODEL) as client, PoseClient(served_url, UL_MODEL, array_encoding="png") as png:
        reference = client.predict(zidane)
        before_image, before_pixels = model_stats(served_url, UL_MODEL), model_stats(served_url, PIXELS_MODEL)
        as_str = client.predict(str(zidane))
        as_bytes = client.predict(zidane.read_bytes())
        as_array = client.predict(pixels)
        with Image.open(zidane) as opened:
            as_pil = client.predict(opened)
        as_png = png.predict(pixels)
        image_delta = _delta(before_image, model_stats(served_url, UL_MODEL))
        pixels_delta = _delta(before_pixels, model_stats(served_url, PIXELS_MODEL))

    assert len(reference.poses) == 2 and reference.image == str(zidane)
    assert (as_str.image, as_bytes.image, as_array.image) == (str(zidane), "<image 0>", "<image 0>")
    for result in (as_str, as_bytes, as_array, as_pil, as_png):
        _same(reference, result)
    # Arrays and PIL images travel raw to NAME_pixels; a PNG-encoded array goes to NAME like a file.
    assert pixels_delta == (2, 0, 2) and image_delta == (3, 0, 3), (pixels_delta, image_delta)


def test_a_mixed_batch_keeps_input_order(served_url: str, photo_paths: list[Path]) -> None:
    bus, zidane, grace = (_photo(photo_paths, n) for n in ("bus.jpg", "zidane.jpg", "grace_hopper.jpg"))
    images: list[Any] = [_rgb(bus), zidane, _rgb(grace), bus.read_bytes(), _rgb(zidane), grace]
    with PoseClient(served_url, UL_MODEL) as client:
        singles = [client.predict(image) for image in images]
        before_image, before_pixels = model_stats(served_url, UL_MODEL), model_stats(served_url, PIXELS_MODEL)
        batch = client.predict_batch(images)
        image_delta = _delta(before_image, model_stats(served_url, UL_MODEL))
        pixels_delta = _delta(before_pixels, model_stats(served_url, PIXELS_MODEL))
    counts = [len(r.poses) for r in batch]
    assert counts[0] >= 4 and counts[1] == 2 and counts[2] == 1, counts  # bus, zidane, grace: order matters
    for got, expected in zip(batch, singles, strict=True):
        _same(got, expected)
    # Encoded images in one request; the arrays in one request per shape (three shapes here).
    assert image_delta == (1, 0, 3) and pixels_delta == (3, 0, 3), (image_delta, pixels_delta)
    assert [r.image for r in batch] == ["<image 0>", str(zidane), "<image 2>", "<image 3>", "<image 4>", str(grace)]


def test_results_as_arrays_names_and_coco(served_url: str, photo_paths: list[Path]) -> None:
    bus = _photo(photo_paths, "bus.jpg")
    with PoseClient(served_url, UL_MODEL) as client:
        client.model_metadata()  # the client then names keypoints as the model does
        result = client.predict(bus)
    arrays = result.as_arrays()
    n = len(result.poses)
    assert arrays.boxes.shape == (n, 4) and arrays.scores.shape == (n,) and arrays.keypoints.shape == (n, 17, 3)
    pose = result.poses[0]
    assert pose.keypoint_names == COCO_KEYPOINT_NAMES
    assert pose["left_wrist"] == pose.keypoints[9] and next(iter(pose.named_keypoints)) == "nose"
    assert pose["left_wrist"].conf == pose.keypoints[9][2]
    coco = result.to_coco(image_id=7)
    assert len(coco) == n
    first = coco[0]
    assert set(first) == {"image_id", "category_id", "keypoints", "score", "bbox"}
    assert (first["image_id"], first["category_id"], len(first["keypoints"])) == (7, 1, 51)
    x1, y1, x2, y2 = pose.box
    assert first["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-3)
    assert first["keypoints"][27:30] == pytest.approx(list(pose["left_wrist"]), abs=1e-3)


# --- asyncio ---------------------------------------------------------------------------------


def test_async_client_matches_the_sync_client_with_many_requests_in_flight(
    served_url: str, photo_paths: list[Path]
) -> None:
    images: list[Any] = [*photo_paths, _rgb(photo_paths[0]), photo_paths[2].read_bytes()]
    with PoseClient(served_url, UL_MODEL) as client:
        expected = [client.predict(image) for image in images]
        strict = client.predict_batch(photo_paths, conf=0.6, max_det=1)

    async def run() -> tuple[list[ImagePoses], list[ImagePoses], list[ImagePoses], bool]:
        async with AsyncPoseClient(served_url, UL_MODEL) as aclient:
            ready = await aclient.is_model_ready()
            await aclient.check_ready()
            # Twelve requests on one channel at once.
            singles = await asyncio.gather(*(aclient.predict(image) for image in images * 2))
            batch = await aclient.predict_batch(images)
            thresholded = await aclient.predict_batch(photo_paths, conf=0.6, max_det=1)
            return list(singles), batch, thresholded, ready

    singles, batch, thresholded, ready = asyncio.run(run())
    assert ready
    for got, want in zip(singles, expected * 2, strict=True):
        _same(got, want)
    for got, want in zip(batch, expected, strict=True):
        _same(got, want)
    assert all(len(r.poses) <= 1 and all(p.score >= 0.6 for p in r.poses) for r in thresholded)
    for got, want in zip(thresholded, strict, strict=True):
        _same(got, want)


def test_async_errors_are_the_same_classes(served_url: str, photo_paths: list[Path], tmp_path: Path) -> None:
    data = photo_paths[0].read_bytes()
    truncated = data[: len(data) // 3]

    async def run() -> dict[str, BaseException]:
        caught: dict[str, BaseException] = {}
        async with AsyncPoseClient(f"127.0.0.1:{free_port()}", UL_MODEL, retry=1) as down:
            try:
                await down.predict(data)
            except PoseClientError as exc:
                caught["down"] = exc
        async with AsyncPoseClient(served_url, "no_such_model") as unknown:
            try:
                await unknown.predict(data)
            except PoseClientError as exc:
                caught["unknown"] = exc
            try:
                await unknown.check_ready()
            except PoseClientError as exc:
                caught["not_ready"] = exc
        async with AsyncPoseClient(served_url, UL_MODEL, timeout_s=0.001) as hasty:
            try:
                await hasty.predict_batch(photo_paths * 2)
            except PoseClientError as exc:
                caught["deadline"] = exc
        async with AsyncPoseClient(served_url, UL_MODEL) as client:
            try:
                await client.predict_batch([data, truncated])
            except PoseClientError as exc:
                caught["bad"] = exc
        return caught

    caught = asyncio.run(run())
    assert isinstance(caught["down"], ServerUnavailableError) and "Connection refused" in str(caught["down"])
    assert isinstance(caught["unknown"], ModelNotReadyError) and caught["unknown"].status == "NOT_FOUND"
    assert isinstance(caught["not_ready"], ModelNotReadyError) and f"models ready there: {UL_MODEL}" in str(
        caught["not_ready"]
    )
    assert isinstance(caught["deadline"], DeadlineExceededError)
    bad = caught["bad"]
    assert isinstance(bad, InvalidInputError) and (bad.index, bad.image) == (1, "<image 1>")
    assert bad.reason.startswith("corrupt or truncated JPEG data"), bad.reason


def test_an_array_refused_by_the_server_is_named_in_the_callers_order(served_url: str) -> None:
    """A 0-height array passes no client check the server would not make: the client refuses it first."""
    with PoseClient(served_url, UL_MODEL) as client:
        with pytest.raises(InvalidInputError, match="arrays must be") as caught:
            client.predict_batch([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)])
        assert caught.value.index == 1
        # The pixels ensemble's own limit: a request of 33 arrays names no image.
        with pytest.raises(InvalidInputError, match="batch-size must be <= 32") as caught:
            client.predict_batch([np.zeros((16, 16, 3), np.uint8)] * 33)
        assert caught.value.index is None


# --- retries ---------------------------------------------------------------------------------


def test_retries_reach_a_server_that_starts_late(model_repository: Path, photo_paths: list[Path]) -> None:
    options = ServerOptions(
        repository=model_repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        models=[UL_MODEL],
    )  # fmt: skip
    late = TritonServer(options)
    retries: list[tuple[int, str, float]] = []
    starter = threading.Timer(1.0, lambda: late.start(timeout=180))
    policy = RetryPolicy(attempts=400, initial_backoff_s=0.1, max_backoff_s=0.5)
    try:
        with PoseClient(
            late.grpc_url, UL_MODEL, retry=policy, on_retry=lambda n, e, d: retries.append((n, type(e).__name__, d))
        ) as client:
            started = time.monotonic()
            starter.start()
            result = client.predict(_photo(photo_paths, "zidane.jpg"))
            elapsed = time.monotonic() - started
    finally:
        starter.join()
        late.stop()
    assert len(result.poses) == 2
    assert len(retries) >= 2, "the first attempts met no server"
    assert [n for n, _, _ in retries] == list(range(1, len(retries) + 1))
    assert {name for _, name, _ in retries} <= {"ServerUnavailableError", "ModelNotReadyError"}
    assert all(delay <= 0.5 for _, _, delay in retries) and elapsed > 1.0


def test_invalid_argument_is_not_retried(served_url: str, photo_paths: list[Path]) -> None:
    """Triton's failure count per refused request, measured with a client that never retries, must not grow."""
    retries: list[int] = []
    truncated = photo_paths[0].read_bytes()[:2000]

    def refused_requests(client: PoseClient) -> int:
        before = model_stats(served_url, UL_MODEL)
        with pytest.raises(InvalidInputError):
            client.predict(truncated)
        with pytest.raises(InvalidInputError):
            client.predict(photo_paths[0], max_det=5000)
        successes, failures, _ = _delta(before, model_stats(served_url, UL_MODEL))
        assert successes == 0
        return failures

    with PoseClient(served_url, UL_MODEL, retry=1) as once:
        baseline = refused_requests(once)
    with PoseClient(served_url, UL_MODEL, retry=5, on_retry=lambda n, e, d: retries.append(n)) as client:
        counted = refused_requests(client)
    assert baseline > 0 and counted == baseline, "each refused request reached the server exactly once"
    assert retries == []


def test_an_unreachable_server_is_retried_then_reported(photo_paths: list[Path]) -> None:
    retries: list[float] = []
    policy = RetryPolicy(attempts=3, initial_backoff_s=0.05, multiplier=2.0, jitter=0.0)
    with PoseClient(f"127.0.0.1:{free_port()}", UL_MODEL, retry=policy, on_retry=lambda n, e, d: retries.append(d)):
        pass
    with (
        PoseClient(f"127.0.0.1:{free_port()}", UL_MODEL, retry=policy, on_retry=lambda n, e, d: retries.append(d)) as c,
        pytest.raises(ServerUnavailableError),
    ):
        c.predict(photo_paths[0])
    assert retries == pytest.approx([0.05, 0.1])


# --- discovery, TLS ---------------------------------------------------------------------------


def test_models_are_discovered_from_the_repository_index_and_configs(served_url: str) -> None:
    expected = [UL_MODEL, PIXELS_MODEL, SG_MODEL, f"{SG_MODEL}_pixels"]
    with PoseClient(served_url) as client:
        found = client.list_models()
        assert client.is_server_live() and client.is_server_ready() and not client.is_model_ready("nope")
    assert [m.name for m in found] == expected
    assert [m.input_name for m in found] == ["IMAGE", "PIXELS", "IMAGE", "PIXELS"]
    for meta in found:
        assert meta.keypoint_names == COCO_KEYPOINT_NAMES and meta.skeleton == COCO_SKELETON
        assert meta.max_batch_size == 32
    assert {m.family for m in found} == {"ultralytics_pose", "yolo_nas_pose"} or len({m.family for m in found}) == 2

    async def discover() -> list[str]:
        async with AsyncPoseClient(served_url) as aclient:
            return [m.name for m in await aclient.list_models()]

    assert asyncio.run(discover()) == expected


def test_tls_against_a_plaintext_server_is_unavailable(served_url: str, photo_paths: list[Path]) -> None:
    with (
        PoseClient(served_url, UL_MODEL, ssl=True, retry=1, timeout_s=10) as client,
        pytest.raises(ServerUnavailableError),
    ):
        client.predict(photo_paths[0])


# --- shared memory ---------------------------------------------------------------------------


def _registered(url: str) -> set[str]:
    with grpcclient.InferenceServerClient(url) as triton:
        status = triton.get_system_shared_memory_status(as_json=True)
    return {region["name"] for region in status.get("regions", {}).values()}


def test_shared_memory_gives_the_same_results_and_cleans_up(served_url: str, photo_paths: list[Path]) -> None:
    images: list[Any] = [*photo_paths, _rgb(photo_paths[2]), _rgb(photo_paths[2])]
    with PoseClient(served_url, UL_MODEL) as plain:
        expected = plain.predict_batch(images)
    with PoseClient(served_url, UL_MODEL, shared_memory=True) as client:
        got = client.predict_batch(images)
        again = client.predict(photo_paths[0])
        registered = _registered(served_url)
        keys = [r.key for r in client._regions._all]
    for a, b in zip(got, expected, strict=True):
        _same(a, b)
    _same(again, expected[0])
    assert len(registered) >= 1 and all(name.startswith("posetriton_") for name in registered)
    assert not _registered(served_url), "close() unregisters every region"
    assert keys and not any(Path("/dev/shm", key.lstrip("/")).exists() for key in keys), "and unlinks them"

    async def concurrent() -> list[ImagePoses]:
        async with AsyncPoseClient(served_url, UL_MODEL, shared_memory=True) as aclient:
            results = await asyncio.gather(*(aclient.predict(image) for image in images))
            assert len(_registered(served_url)) >= 2, "one region per request in flight"
            return list(results)

    for a, b in zip(asyncio.run(concurrent()), expected, strict=True):
        _same(a, b)
    assert not _registered(served_url)


def _taken(url: str) -> int:
    """Requests the network step has taken so far (Triton's statistics count one once ``execute`` hands it over, on
    the CPU to the step's own decode and OpenVINO, long before its answer)."""
    with grpcclient.InferenceServerClient(url) as triton:
        (stats,) = triton.get_inference_statistics(f"{UL_MODEL}_network", as_json=True)["model_stats"]
    return int(stats["inference_stats"]["success"].get("count", 0))


def test_close_waits_for_the_server_to_release_a_region_in_use(served_url: str, photo_paths: list[Path]) -> None:
    # Triton refuses to unregister a region a request still holds; close() during a request waits.
    images: list[Any] = [photo_paths[2]] * 16  # a request of about a second on 2 cores
    with PoseClient(served_url, UL_MODEL) as plain:
        expected = plain.predict_batch(images)
    client = PoseClient(served_url, UL_MODEL, shared_memory=True)
    sending, infer = threading.Event(), client._client.infer

    def recorded_infer(*args: Any, **kwargs: Any) -> Any:
        sending.set()
        return infer(*args, **kwargs)

    client._client.infer = recorded_infer
    outcome: dict[str, Any] = {}
    taken = _taken(served_url)
    worker = threading.Thread(target=lambda: outcome.update(result=client.predict_batch(images)))
    worker.start()
    assert sending.wait(30), "the request was sent"
    # Taken by the network step, the request is inside the ensemble (it takes most of its second there), which
    # holds its region until the response is written: close() now meets a region in use.
    deadline = time.monotonic() + 30
    while _taken(served_url) == taken:
        assert time.monotonic() < deadline, "the request reached the server"
        time.sleep(0.005)
    assert _registered(served_url), "the request registered its region"
    keys = [r.key for r in client._regions._all]
    client.close()
    worker.join(timeout=60)
    for a, b in zip(outcome["result"], expected, strict=True):
        _same(a, b)
    assert not _registered(served_url)
    assert keys and not any(Path("/dev/shm", key.lstrip("/")).exists() for key in keys)


# --- streaming -------------------------------------------------------------------------------


def _write_video(path: Path, photos: list[Path], frames: int, size: tuple[int, int] = (640, 480)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 5.0, size)
    assert writer.isOpened()
    for i in range(frames):
        bgr = cv2.cvtColor(_rgb(photos[i % len(photos)]), cv2.COLOR_RGB2BGR)
        writer.write(cv2.resize(bgr, size))
    writer.release()


def test_a_video_streams_in_order_sync_and_async(served_url: str, photo_paths: list[Path], tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    _write_video(video, [_photo(photo_paths, "zidane.jpg"), _photo(photo_paths, "bus.jpg")], frames=10)
    encoded = [frame.image for frame in video_frames(video)]
    assert len(encoded) == 10
    with PoseClient(served_url, UL_MODEL) as client:
        expected = [client.predict(data) for data in encoded]  # type: ignore[call-overload]
        streamed = list(client.stream(video_frames(video), in_flight=3, progress=True, total=10))
    counts = [len(r.poses) for r in expected]
    assert counts[0::2] != counts[1::2] and len(set(counts)) > 1, counts  # the order is visible in the results

    async def run() -> list[Any]:
        async with AsyncPoseClient(served_url, UL_MODEL) as aclient:
            return [item async for item in aclient.stream(video_frames(video), in_flight=4)]

    for items in (streamed, asyncio.run(run())):
        assert [item.frame.index for item in items] == list(range(10))
        assert [item.result.image for item in items] == [f"{video}#{i}" for i in range(10)]
        for item, want in zip(items, expected, strict=True):
            assert isinstance(item.result, ImagePoses)
            _same(item.result, want)


def test_a_directory_streams_in_order_and_a_bad_file_fails_alone(
    served_url: str, photo_paths: list[Path], tmp_path: Path
) -> None:
    for i, photo in enumerate(photo_paths):
        (tmp_path / f"{i:02d}_{photo.name}").write_bytes(photo.read_bytes())
    (tmp_path / "02b_broken.jpg").write_bytes(b"not an image at all")
    (tmp_path / "notes.txt").write_text("ignored")
    files = directory_images(tmp_path)
    assert len(files) == len(photo_paths) + 1 and files == sorted(files)
    with PoseClient(served_url, UL_MODEL) as client:
        items = list(client.stream(files, in_flight=2))
    assert [item.result.image for item in items] == [str(f) for f in files]
    failed = [item for item in items if not isinstance(item.result, ImagePoses)]
    assert [item.frame.name for item in failed] == [str(tmp_path / "02b_broken.jpg")]
    assert "not a recognised image" in failed[0].result.to_dict()["error"]


def test_pil_images_are_sent_without_exif_rotation(served_url: str, photo_paths: list[Path]) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_rgb(_photo(photo_paths, "zidane.jpg"))).save(buffer, "PNG")
    with PoseClient(served_url, UL_MODEL) as client:
        result = client.predict(Image.open(io.BytesIO(buffer.getvalue())))
    assert (result.width, result.height) == (1280, 720) and len(result.poses) == 2
