"""Every model of the repository is a public endpoint: hostile direct calls to each step, overload with client
deadlines, and sequence abuse, against the real Triton server (docs/reliability.md records the figures).

* Each hostile call (huge counts, NaN/inf, inconsistent counts, frame-index jumps, bad letterbox rows, decode
  budgets) gets a result or INVALID_ARGUMENT within 3 s, while good requests sent beside it (sharing its
  batches) get exactly their own result.
* Overload: the capacity is measured in the same test (before and after), then >= 2x that is offered with
  client deadlines; the goodput (answers inside their deadline per second) stays >= 0.8x capacity (GOODPUT_FLOOR),
  refusals come fast, memory stays bounded and the server serves at once afterwards.
* Sequences: more streams than tracker slots, abandoned streams and a killed tracker stub end with the
  open-stream gauge back at 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from posetriton.server import model_config
from posetriton.server.launcher import TritonServer
from posetriton.server.repository import load_catalog
from tests.conftest import ROOT, UL_MODEL
from tests.inputs import png_header_only
from tests.triton_requests import Detections, image_input, split

MODEL = load_catalog(ROOT / "build_engines" / "models.toml")[UL_MODEL]
K = MODEL.postprocess.num_keypoints
ROWS, WIDTH = MODEL.num_candidates, MODEL.candidate_width
HOSTILE_BOUND_S = 3.0


def tensor(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
    value = grpcclient.InferInput(name, list(array.shape), dtype)
    value.set_data_from_numpy(array)
    return value


FRAME_SIDE = 4400  # the original frame the tracker's random people stand in
FRAME_LETTERBOX = np.array([[640 / FRAME_SIDE, 640 / FRAME_SIDE, 0, 0, FRAME_SIDE, FRAME_SIDE]], np.float64)


def detections_inputs(
    n: int,
    rows: int | None = None,
    frame: int = 0,
    poison: tuple[str, float] | None = None,
    count: int | None = None,
    letterbox: np.ndarray = FRAME_LETTERBOX,
    image_size: tuple[int, int] = (FRAME_SIDE, FRAME_SIDE),
) -> list[grpcclient.InferInput]:
    """The tracker step's inputs for one frame of ``rows`` random people, ``count`` of them counted, with the
    letterboxed frame (random pixels) it reads the people's colours from."""
    rows = n if rows is None else rows
    rng = np.random.default_rng(rows)
    corner = rng.uniform(0, 4000, (1, rows, 2))
    size = rng.uniform(40, 300, (1, rows, 2))
    boxes = np.concatenate([corner, corner + size], axis=2).astype(np.float32)
    xy = corner[:, :, None] + rng.uniform(0, 1, (1, rows, K, 2)) * size[:, :, None]
    keypoints = np.concatenate([xy, rng.uniform(0.5, 1, (1, rows, K, 1))], axis=3).astype(np.float32)
    arrays = {"BOXES": boxes, "SCORES": rng.uniform(0.3, 1, (1, rows)).astype(np.float32), "KEYPOINTS": keypoints}
    if poison is not None:
        arrays[poison[0]].reshape(-1)[0] = poison[1]
    return [
        tensor("NUM_DETECTIONS", np.array([[n if count is None else count]], np.int32), "INT32"),
        tensor("BOXES", arrays["BOXES"], "FP32"),
        tensor("SCORES", arrays["SCORES"], "FP32"),
        tensor("KEYPOINTS", arrays["KEYPOINTS"], "FP32"),
        tensor("IMAGE_SIZE", np.array([image_size], np.int32), "INT32"),
        tensor("FRAME_INDEX", np.array([[frame]], np.int64), "INT64"),
        tensor("canvas", rng.integers(0, 256, (1, 640, 640, 3), dtype=np.uint8), "UINT8"),
        tensor("letterbox", letterbox, "FP64"),
    ]


def postprocess_inputs(candidates: np.ndarray, letterbox: np.ndarray) -> list[grpcclient.InferInput]:
    return [tensor("candidates", candidates.astype(np.float32), "FP32"), tensor("letterbox", letterbox, "FP64")]


def good_letterbox(images: int = 1) -> np.ndarray:
    return np.tile(np.array([[0.5, 0.5, 0, 80, 1280, 960]], np.float64), (images, 1))


def crowded_candidates(images: int = 1) -> np.ndarray:
    """Every candidate confident and all of them apart: NMS keeps every one (the most work it can get)."""
    rng = np.random.default_rng(0)
    rows = np.zeros((images, ROWS, WIDTH), np.float32)
    corner = rng.uniform(0, 600, (images, ROWS, 2))
    rows[..., :2], rows[..., 2:4] = corner, corner + 8
    rows[..., 4] = 0.99
    rows[..., 5:] = rng.uniform(0, 640, (images, ROWS, WIDTH - 5))
    return rows


@dataclass(frozen=True)
class Probe:
    """One hostile call: the step, its inputs, request options, and what must come back."""

    name: str
    model: str
    inputs: Callable[[], list[grpcclient.InferInput]]
    expect: str  # "result" or "INVALID_ARGUMENT"
    options: dict[str, Any] | None = None
    before: Callable[[grpcclient.InferenceServerClient], None] | None = None  # e.g. open the live sequence


def _sequence_start(
    sequence_id: int, frame: int = 0, people: int = 2
) -> Callable[[grpcclient.InferenceServerClient], None]:
    def start(client: grpcclient.InferenceServerClient) -> None:
        client.infer(TRACKER, detections_inputs(people, frame=frame), sequence_id=sequence_id, sequence_start=True,
                     client_timeout=30)  # fmt: skip

    return start


TRACKER = MODEL.step("tracker")
PREPROCESS, NETWORK, POSTPROCESS = MODEL.step("preprocess"), MODEL.step("network"), MODEL.step("postprocess")
ONE_FRAME = {"sequence_start": True, "sequence_end": True}


def probes() -> list[Probe]:
    def nan_letterbox(column: int, value: float = np.nan) -> np.ndarray:
        letterbox = good_letterbox()
        letterbox[0, column] = value
        return letterbox

    def nan_row(column: int, value: float) -> Callable[[], list[grpcclient.InferInput]]:
        return lambda: postprocess_inputs(crowded_candidates(), nan_letterbox(column, value))

    def network_inputs(letterbox: np.ndarray, images: int = 1) -> list[grpcclient.InferInput]:
        canvas = np.random.default_rng(images).integers(0, 256, (images, 640, 640, 3), dtype=np.uint8)
        return [tensor("canvas", canvas, "UINT8"), tensor("letterbox", letterbox, "FP64")]

    def poisoned_candidates(value: float) -> list[grpcclient.InferInput]:
        candidates = crowded_candidates()
        candidates[0, 3, 1] = value
        return postprocess_inputs(candidates, good_letterbox())

    def seq(n: int) -> dict[str, Any]:
        return {"sequence_id": 10**15 + n, **ONE_FRAME}

    budget = [png_header_only(3000, 3000)] * 24  # 216 Mpx together, each under the per-image limit
    return [
        # preprocess
        Probe("preprocess: 24 images over the request's decode budget", PREPROCESS,
              lambda: [image_input(budget)], "INVALID_ARGUMENT"),
        Probe("preprocess: a 10^10-pixel header", PREPROCESS,
              lambda: [image_input([png_header_only(100_000, 100_000)])], "INVALID_ARGUMENT"),
        Probe("preprocess: 1x1 raw pixels", PREPROCESS,
              lambda: [tensor("PIXELS", np.zeros((1, 1, 1, 3), np.uint8), "UINT8")], "result"),
        Probe("preprocess: no input at all", PREPROCESS, lambda: [], "INVALID_ARGUMENT"),
        # network: Triton checks shapes and batch size against the config before the step runs
        Probe("network: 33 canvases (over max_batch_size)", NETWORK,
              lambda: [tensor("canvas", np.zeros((33, 640, 640, 3), np.uint8), "UINT8")], "INVALID_ARGUMENT"),
        Probe("network: a 320x320 canvas", NETWORK,
              lambda: [tensor("canvas", np.zeros((1, 320, 320, 3), np.uint8), "UINT8")], "INVALID_ARGUMENT"),
        Probe("network: a float canvas", NETWORK,
              lambda: [tensor("canvas", np.zeros((1, 640, 640, 3), np.float32), "FP32")], "INVALID_ARGUMENT"),
        # network with letterbox rows (the CPU ensembles' call): the rows and thresholds are checked before it runs
        Probe("network: NaN letterbox scale", NETWORK, lambda: network_inputs(nan_letterbox(0)), "INVALID_ARGUMENT"),
        Probe("network: 2 canvases, 1 letterbox row", NETWORK, lambda: network_inputs(good_letterbox(1), 2),
              "INVALID_ARGUMENT"),
        Probe("network: iou as text", NETWORK, lambda: network_inputs(good_letterbox()), "INVALID_ARGUMENT",
              {"parameters": {"iou": "some"}}),
        Probe("network: poses for 2 canvases", NETWORK, lambda: network_inputs(good_letterbox(2), 2), "result",
              {"parameters": {"max_det": 1000, "conf": 0.0}}),
        # network with images (on the CPU the whole of NAME): the preprocess step's checks, in the network step
        Probe("network: 24 images over the request's decode budget", NETWORK,
              lambda: [image_input(budget)], "INVALID_ARGUMENT"),
        Probe("network: a 10^10-pixel header", NETWORK,
              lambda: [image_input([png_header_only(100_000, 100_000)])], "INVALID_ARGUMENT"),
        Probe("network: images and a canvas together", NETWORK,
              lambda: [image_input([png_header_only(64, 64)]), *network_inputs(good_letterbox())[:1]],
              "INVALID_ARGUMENT"),
        Probe("network: no input at all", NETWORK, lambda: [], "INVALID_ARGUMENT"),
        Probe("network: 1x1 raw pixels", NETWORK,
              lambda: [tensor("PIXELS", np.zeros((1, 1, 1, 3), np.uint8), "UINT8")], "result"),
        # postprocess
        Probe("postprocess: NaN letterbox scale", POSTPROCESS, nan_row(0, np.nan), "INVALID_ARGUMENT"),
        Probe("postprocess: +inf letterbox width", POSTPROCESS, nan_row(4, np.inf), "INVALID_ARGUMENT"),
        Probe("postprocess: zero letterbox scale", POSTPROCESS, nan_row(1, 0.0), "INVALID_ARGUMENT"),
        Probe("postprocess: a 10^12-pixel-wide letterbox row", POSTPROCESS, nan_row(4, 1e12), "INVALID_ARGUMENT"),
        Probe("postprocess: negative pad", POSTPROCESS, nan_row(2, -3.0), "INVALID_ARGUMENT"),
        Probe("postprocess: NaN candidate", POSTPROCESS, lambda: poisoned_candidates(np.nan), "INVALID_ARGUMENT"),
        Probe("postprocess: -inf candidate", POSTPROCESS, lambda: poisoned_candidates(-np.inf), "INVALID_ARGUMENT"),
        Probe("postprocess: 2 candidate sets, 1 letterbox row", POSTPROCESS,
              lambda: postprocess_inputs(crowded_candidates(2), good_letterbox(1)), "INVALID_ARGUMENT"),
        Probe("postprocess: every candidate kept, max_det 1000, 32 images", POSTPROCESS,
              lambda: postprocess_inputs(crowded_candidates(32), good_letterbox(32)), "result",
              {"parameters": {"max_det": 1000, "conf": 0.0, "iou": 1.0}}),
        Probe("postprocess: conf as text", POSTPROCESS, lambda: postprocess_inputs(crowded_candidates(),
              good_letterbox()), "INVALID_ARGUMENT", {"parameters": {"conf": "high"}}),
        # tracker
        Probe("tracker: 2,500 poses in one frame", TRACKER, lambda: detections_inputs(2500), "INVALID_ARGUMENT",
              seq(1)),
        Probe("tracker: 1,000 poses (the most a frame can carry)", TRACKER, lambda: detections_inputs(1000),
              "result", seq(2)),
        Probe("tracker: 1,000 new poses against 1,000 tracks", TRACKER, lambda: detections_inputs(999, frame=1),
              "result", {"sequence_id": 10**15 + 11, "sequence_end": True}, _sequence_start(10**15 + 11, people=1000)),
        Probe("tracker: NaN box", TRACKER, lambda: detections_inputs(5, poison=("BOXES", np.nan)),
              "INVALID_ARGUMENT", seq(3)),
        Probe("tracker: +inf box", TRACKER, lambda: detections_inputs(5, poison=("BOXES", np.inf)),
              "INVALID_ARGUMENT", seq(4)),
        Probe("tracker: NaN keypoint", TRACKER, lambda: detections_inputs(5, poison=("KEYPOINTS", np.nan)),
              "INVALID_ARGUMENT", seq(5)),
        Probe("tracker: NUM_DETECTIONS 9 over 3 rows", TRACKER, lambda: detections_inputs(3, count=9),
              "INVALID_ARGUMENT", seq(6)),
        Probe("tracker: NUM_DETECTIONS -1", TRACKER, lambda: detections_inputs(3, count=-1), "INVALID_ARGUMENT",
              seq(7)),
        Probe("tracker: negative frame index", TRACKER, lambda: detections_inputs(3, frame=-5), "INVALID_ARGUMENT",
              seq(8)),
        Probe("tracker: frame index jumps by 10^12", TRACKER, lambda: detections_inputs(3, frame=10**12),
              "INVALID_ARGUMENT", {"sequence_id": 10**15 + 9, "sequence_end": True}, _sequence_start(10**15 + 9)),
        Probe("tracker: NaN letterbox scale", TRACKER,
              lambda: detections_inputs(3, letterbox=np.where(np.arange(6) == 0, np.nan, FRAME_LETTERBOX)),
              "INVALID_ARGUMENT", seq(12)),
        Probe("tracker: a zero-sized frame", TRACKER, lambda: detections_inputs(3, image_size=(0, 0)),
              "INVALID_ARGUMENT", seq(13)),
        Probe("tracker: START on a live correlation ID", TRACKER, lambda: detections_inputs(3), "INVALID_ARGUMENT",
              {"sequence_id": 10**15 + 10, "sequence_start": True}, _sequence_start(10**15 + 10)),
    ]  # fmt: skip


def _call(url: str, probe: Probe) -> tuple[str, float, str]:
    """(outcome, seconds, message): "result", or the gRPC status name of the error."""
    with grpcclient.InferenceServerClient(url) as client:
        if probe.before is not None:
            probe.before(client)
        started = time.monotonic()
        try:
            client.infer(probe.model, probe.inputs(), client_timeout=30, **(probe.options or {}))
            return "result", time.monotonic() - started, ""
        except grpcclient.InferenceServerException as exc:
            status = str(exc.status()).removeprefix("StatusCode.")
            return status, time.monotonic() - started, str(exc.message())


def test_hostile_calls_to_every_step_fail_alone_and_fast(server: TritonServer, photo_paths: list[Path]) -> None:
    url = server.grpc_url
    photo = next(p for p in photo_paths if p.name == "bus.jpg").read_bytes()

    def good() -> Detections:
        with grpcclient.InferenceServerClient(url) as client:
            return split(client.infer(UL_MODEL, [image_input([photo])], client_timeout=60))[0]

    def good_track(n: int) -> np.ndarray:
        with grpcclient.InferenceServerClient(url) as client:
            result = client.infer(TRACKER, detections_inputs(4), sequence_id=2 * 10**15 + n, client_timeout=60,
                                  **ONE_FRAME)  # fmt: skip
            return result.as_numpy("TRACK_IDS")

    reference = good()
    cases = probes()
    with ThreadPoolExecutor(8) as pool:
        companions = [pool.submit(good) for _ in range(8)] + [pool.submit(good_track, i) for i in range(8)]
        outcomes = list(pool.map(lambda probe: _call(url, probe), cases))
        for future in companions[:8]:
            served = future.result(timeout=120)
            assert len(served.scores) == len(reference.scores)
            assert np.allclose(served.keypoints, reference.keypoints, atol=1e-4)
        for future in companions[8:]:
            assert (future.result(timeout=120) == [[1, 2, 3, 4]]).all()  # first frame: IDs at once
    lines = []
    for probe, (status, seconds, message) in zip(cases, outcomes, strict=True):
        lines.append(f"{probe.name}: {status} in {seconds:.2f} s {message[:110]}")
        assert status == probe.expect, f"{probe.name}: {status} {message}"
        assert seconds < HOSTILE_BOUND_S, f"{probe.name}: {seconds:.1f} s"
        if status == "INVALID_ARGUMENT":
            assert message.strip(), probe.name
    print("\n" + "\n".join(lines))
    with grpcclient.InferenceServerClient(url) as client:
        assert all(client.is_model_ready(m) for m in (PREPROCESS, NETWORK, POSTPROCESS, TRACKER, UL_MODEL))
        # The live sequence refused a second START kept its own state: it goes on, then ends.
        client.infer(TRACKER, detections_inputs(2, frame=1), sequence_id=10**15 + 10, sequence_end=True,
                     client_timeout=30)  # fmt: skip


# ------------------------------------------------------------------------------------------------ overload
CAPACITY_CLIENTS = 8  # closed loop, as the measurement
CAPACITY_S = 8.0
OVERLOAD_FACTOR = 2.5  # offered load, in multiples of the capacity just measured
OVERLOAD_S = 12.0
RAMP_S = 1.0  # the first second of the overload, while the queues fill, is left out of the goodput
# The client deadline: 2 s (the issue's), or longer on a machine too loaded to compute a batch of 8 (the
# network step's preferred batch) in a third of it: the ratio, not the machine's speed, is under test.
DEADLINE_S = 2.0
BATCH = 8
MEMORY_BOUND = 768 * 1024 * 1024  # growth of server + stubs over idle while overloaded
# The goodput this test holds the server to (issue 20): 0.8x capacity, against 0.07x before the overload control.
# Measured 0.88-1.03x on a 2-vCPU Intel VM with the admission gate sized by the network's service time
# (docs/reliability.md, overload). This shared VM's speed drifts by a fifth within minutes, so a run that falls
# short is measured again on a fresh server, up to OVERLOAD_RUNS in all: a server that collapses fails every one.
GOODPUT_FLOOR = 0.8
OVERLOAD_RUNS = 3


@dataclass
class Outcome:
    sent: float
    seconds: float
    kind: str  # "ok", or the SDK error's class name
    message: str = ""


def _timed(client: Any, photo: bytes, sent: float, deadline_s: float) -> Outcome:
    from posetriton.client import PoseClientError

    try:
        client.predict(photo, timeout_s=deadline_s)
    except PoseClientError as exc:
        return Outcome(sent, time.monotonic() - sent, type(exc).__name__, str(exc))
    return Outcome(sent, time.monotonic() - sent, "ok")


def _capacity(client: Any, photo: bytes) -> float:
    """Images per second that CAPACITY_CLIENTS closed-loop clients get answered, no deadline pressure."""
    stop = time.monotonic() + CAPACITY_S
    answered = [0] * CAPACITY_CLIENTS

    def loop(slot: int) -> None:
        while time.monotonic() < stop:
            client.predict(photo)
            answered[slot] += 1

    started = time.monotonic()
    with ThreadPoolExecutor(CAPACITY_CLIENTS) as pool:
        list(pool.map(loop, range(CAPACITY_CLIENTS)))
    return sum(answered) / (time.monotonic() - started)


def _overload(model_repository: Path, photo_paths: list[Path]) -> list[str]:
    """One overload run on its own server; what it found wrong (empty: all held)."""
    from posetriton.client import PoseClient
    from tests.test_reliability import memory_bytes, own_server

    photo = next(p for p in photo_paths if p.name == "bus.jpg").read_bytes()
    with own_server(model_repository) as server, PoseClient(server.grpc_url, UL_MODEL, timeout_s=60) as client:
        pid = server.process.pid  # type: ignore[union-attr]
        list(ThreadPoolExecutor(CAPACITY_CLIENTS).map(lambda _: client.predict(photo), range(2 * CAPACITY_CLIENTS)))
        idle_memory = memory_bytes(pid, server.shm_prefix)
        # 1. capacity: closed loop, no deadline pressure (measured again after the overload, below: a shared
        # 2-vCPU machine's speed drifts, and the mean of the two is what the overload is compared with)
        capacity_before = _capacity(client, photo)
        deadline_s = max(DEADLINE_S, 3 * BATCH / capacity_before)
        # 2. overload: open loop at OVERLOAD_FACTOR x capacity, each request with a DEADLINE_S deadline
        rate = OVERLOAD_FACTOR * capacity_before
        peak = [idle_memory]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.25):
                peak[0] = max(peak[0], memory_bytes(pid, server.shm_prefix))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        futures = []
        with ThreadPoolExecutor(int(rate * DEADLINE_S * 2) + 8) as pool:
            begin = time.monotonic()
            for i in range(int(rate * OVERLOAD_S)):
                wait = begin + i / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)  # the open-loop schedule, not a wait for the server
                futures.append(pool.submit(_timed, client, photo, time.monotonic(), deadline_s))
            outcomes = [f.result(timeout=deadline_s + 30) for f in futures]
        offered_for = time.monotonic() - begin
        sampling.set()
        sampler.join()
        # 3. recovery: the next request is served at once
        recovery = _timed(client, photo, time.monotonic(), deadline_s)
        capacity_after = _capacity(client, photo)
    capacity = (capacity_before + capacity_after) / 2
    kinds = Counter(o.kind for o in outcomes)
    good = [o for o in outcomes if o.kind == "ok" and o.seconds <= deadline_s]
    examples = {o.kind: o.message[:150] for o in outcomes if o.kind != "ok"}
    reasons = Counter(
        "refused before decoding" if "before decoding" in o.message
        else "queue full" if "queue size" in o.message
        else "timed out in a queue" if "timeout" in o.message
        else "other"
        for o in outcomes
        if o.kind == "ServerBusyError"
    )  # fmt: skip
    # Goodput in the steady state: answers inside their deadline that came back inside the window from the first
    # second of the overload (the queues filled) to its end, per second; the tail, which drains queued work with
    # no more requests arriving, and the ramp, which starts empty, would flatter or punish the ratio.
    window = (begin + RAMP_S, begin + OVERLOAD_S)
    goodput = sum(window[0] <= o.sent + o.seconds <= window[1] for o in good) / (window[1] - window[0])
    busy = sorted(o.seconds for o in outcomes if o.kind == "ServerBusyError")
    print(
        f"\noverload: capacity {capacity:.1f} img/s ({capacity_before:.1f} before, {capacity_after:.1f} after; "
        f"{CAPACITY_CLIENTS} clients, {CAPACITY_S:g} s each); offered "
        f"{len(outcomes)} requests at {rate:.1f}/s, answered within {offered_for:.1f} s, with {deadline_s:.1f} s "
        "deadlines: "
        f"{dict(kinds)} (busy: {dict(reasons)}); steady goodput {goodput:.1f} img/s = {goodput / capacity:.2f}x "
        f"capacity (all answers in time over the whole run: {len(good) / offered_for:.1f} img/s); "
        "busy refusals in "
        f"{np.median(busy) if busy else float('nan'):.2f} s median, {max(busy) if busy else float('nan'):.2f} s max; "
        f"memory +{(peak[0] - idle_memory) / 1e6:.0f} MB over idle at peak; recovery {recovery.kind} in "
        f"{recovery.seconds:.2f} s; {examples}"
    )
    assert rate >= 2 * capacity_before and len(outcomes) >= 2 * capacity_before * OVERLOAD_S * 0.9
    assert peak[0] - idle_memory < MEMORY_BOUND
    assert recovery.kind == "ok" and recovery.seconds < deadline_s
    failures = []
    if goodput < GOODPUT_FLOOR * capacity:
        failures.append(f"goodput {goodput:.1f} img/s under {GOODPUT_FLOOR * capacity:.1f}")
    # Refused at once by the server; what the SDK adds is its retries of busy answers, within the deadline.
    if not busy or np.median(busy) >= deadline_s / 2:
        failures.append(f"refusals must come fast, not at the deadline: median {np.median(busy) if busy else None}")
    return failures


def test_overload_keeps_goodput_near_capacity(model_repository: Path, photo_paths: list[Path]) -> None:
    # This shared 2-vCPU VM's speed drifts by a fifth within minutes (docs/benchmarks.md): a run that falls short
    # is measured again, on a fresh server (see OVERLOAD_RUNS). A server that collapses falls short in every one.
    runs = []
    for _ in range(OVERLOAD_RUNS):
        runs.append(_overload(model_repository, photo_paths))
        if not runs[-1]:
            break
        print(f"\noverload run {len(runs)} fell short ({runs[-1]}); measuring again on a fresh server")
    assert not runs[-1], runs


# ----------------------------------------------------------------------------------------------- sequences
SLOTS = 4
STRESS_IDLE_S = 3.0


@pytest.fixture
def few_slots_server(model_repository: Path, tmp_path: Path) -> Any:
    """yolo11n_pose_track whose tracker has 4 sequence slots and a 3 s idle limit, on its own server."""
    from tests.conftest import start_server

    repository = tmp_path / "repository"
    repository.mkdir()
    for entry in model_repository.iterdir():
        if entry.name.startswith(UL_MODEL):
            if entry.name == TRACKER:
                shutil.copytree(entry, repository / entry.name)
            else:
                (repository / entry.name).symlink_to(entry)
    with model_config.editing(repository / TRACKER / "config.pbtxt") as config:
        config.sequence_batching.max_sequence_idle_microseconds = int(STRESS_IDLE_S * 1e6)
        config.sequence_batching.oldest.max_candidate_sequences = SLOTS
        config.parameters["limit.max_sequences"].string_value = str(2 * SLOTS)
    triton = start_server(repository, models=[UL_MODEL + "_track"])
    yield triton
    triton.stop()


def test_sequence_stress_ends_with_no_open_stream(few_slots_server: TritonServer) -> None:
    """More streams than slots, all abandoned (no END), then a tracker stub killed with streams open: every
    stream is served or clearly refused, and the open-stream gauge comes back to 0."""
    from posetriton.server.watchdog import python_stubs
    from tests.test_tracking import _poll, open_sequences

    server, url = few_slots_server, few_slots_server.grpc_url

    def start(sequence_id: int) -> tuple[float, np.ndarray]:
        started = time.monotonic()
        with grpcclient.InferenceServerClient(url) as client:
            result = client.infer(TRACKER, detections_inputs(3), sequence_id=sequence_id, sequence_start=True,
                                  client_timeout=60)  # fmt: skip
        return time.monotonic() - started, result.as_numpy("TRACK_IDS")

    # 1. 2 x SLOTS streams at once, each abandoned after its first frame: SLOTS start now, the others wait in
    #    Triton's backlog until the first ones idle out, then start.
    with ThreadPoolExecutor(2 * SLOTS) as pool:
        answered = list(pool.map(start, range(1, 2 * SLOTS + 1)))
    waits = sorted(seconds for seconds, _ in answered)
    assert all((ids == [[1, 2, 3]]).all() for _, ids in answered), "every stream got its own fresh IDs"
    assert waits[SLOTS - 1] < 0.8 * STRESS_IDLE_S <= waits[SLOTS], f"the backlog waited for a free slot: {waits}"
    freed = _poll(lambda: open_sequences(server, TRACKER) == 0, 3 * STRESS_IDLE_S + 10)
    # 2. streams open when the tracker's stub dies: the watchdog reloads it, their state is gone, the gauge
    #    reads 0 again, and new streams are served.
    for sequence_id in (101, 102, 103):
        start(sequence_id)
    assert open_sequences(server, TRACKER) == 3
    (victim,) = [pid for pid, model in python_stubs(server.process.pid).values() if model == TRACKER]  # type: ignore[union-attr]
    os.kill(victim, signal.SIGKILL)
    recovered = _poll(lambda: TRACKER in {m for _, m in python_stubs(server.process.pid).values()}  # type: ignore[union-attr]
                      and open_sequences(server, TRACKER) == 0, 60)  # fmt: skip
    with grpcclient.InferenceServerClient(url) as client:
        _poll(lambda: client.is_model_ready(TRACKER), 60)
        try:
            client.infer(TRACKER, detections_inputs(3, frame=1), sequence_id=101, client_timeout=30)
            lost = "served"
        except grpcclient.InferenceServerException as exc:
            lost = str(exc.status()).removeprefix("StatusCode.")
    assert lost == "INVALID_ARGUMENT", "a stream whose state died with the stub is refused, not silently restarted"
    _, ids = start(104)
    assert (ids == [[1, 2, 3]]).all()
    final = _poll(lambda: open_sequences(server, TRACKER) == 0, 3 * STRESS_IDLE_S + 10)
    answers = ", ".join(f"{w:.1f}" for w in waits)
    print(
        f"\nsequences: {2 * SLOTS} streams on {SLOTS} slots answered after {answers} s; "
        f"all abandoned, gauge 0 {freed:.1f} s later; tracker stub killed with 3 open, reloaded and gauge 0 after "
        f"{recovered:.1f} s; old stream refused ({lost}); the last stream idled out, gauge 0 after {final:.1f} s"
    )
