"""The input checks every step makes (posetriton.core.validation), the tracker's caps (posetriton.server.tracking) and
the SDK's busy/deadline policy (client/_core.py, client/errors.py): pure functions, no server. The same
checks are exercised through the real server in tests/test_hostile.py."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from posetriton.client import RetryPolicy, ServerBusyError
from posetriton.client._core import Deadline
from posetriton.client.errors import ModelNotReadyError, ServerUnavailableError, translate
from posetriton.client.tracking import new_sequence_id
from posetriton.core.contract import ContractError
from posetriton.core.processing import LetterboxTransform, letterbox_geometry
from posetriton.core.spec import LetterboxSpec, SpecError
from posetriton.core.validation import (
    MAX_FRAME_GAP,
    check_candidates,
    check_detections,
    check_frame_index,
    check_letterbox_rows,
    check_request_pixels,
    count_non_finite,
)
from posetriton.server import model_config, tracking
from posetriton.server.repository import QUEUE_LIMITS, load_catalog, queue_policy, render, stream_limits
from tests.conftest import ROOT, UL_MODEL

K = 17
DEFAULT_SPEC = LetterboxSpec()


def _row(height: int, width: int, spec: LetterboxSpec = DEFAULT_SPEC) -> np.ndarray:
    return letterbox_geometry(height, width, spec)[2].to_array()


def test_letterbox_rows_the_preprocess_step_writes_pass() -> None:
    for spec in (LetterboxSpec(), LetterboxSpec(pad_position="center", per_axis_scale=True)):
        rows = np.stack([_row(h, w, spec) for h, w in ((480, 640), (1, 5000), (5000, 1), (640, 640), (17, 23))])
        check_letterbox_rows(rows, spec.input_size)
    reduced = LetterboxTransform.from_array(_row(1000, 1500)).for_original(6000, 4000).to_array()
    check_letterbox_rows(reduced[None], 640)  # a reduced JPEG decode maps back to the full-size photo


@pytest.mark.parametrize(
    ("column", "value", "needle"),
    [
        (0, np.nan, "NaN or infinite"),
        (1, np.inf, "NaN or infinite"),
        (0, 0.0, "scales must be positive"),
        (1, -2.0, "scales must be positive"),
        (2, 0.5, "pad_x must be a whole number"),
        (3, 640.0, "pad_y must be a whole number"),
        (4, 0.0, "width must be a whole number"),
        (5, 2.0**31, "height must be a whole number"),
        (4, 1e7, "does not fit"),
    ],
)
def test_bad_letterbox_rows_are_named(column: int, value: float, needle: str) -> None:
    rows = np.stack([_row(480, 640), _row(480, 640)])
    rows[1, column] = value
    with pytest.raises(ContractError, match=needle):
        check_letterbox_rows(rows, 640)
    with pytest.raises(ContractError, match=r"letterbox must be \[B, 6\]"):
        check_letterbox_rows(np.zeros((2, 5)), 640)


def test_candidates_shape_count_and_finiteness() -> None:
    rows = np.stack([_row(480, 640)] * 2)
    good = np.zeros((2, 300, 5 + 3 * K), np.float32)
    check_candidates(good, rows, 300, 5 + 3 * K)
    with pytest.raises(ContractError, match=r"must be \[B, 300, 56\]"):
        check_candidates(good[:, :10], rows, 300, 5 + 3 * K)
    with pytest.raises(ContractError, match="one row per image"):
        check_candidates(good, rows[:1], 300, 5 + 3 * K)
    bad = good.copy()
    bad[1, 7, 2], bad[0, 0, 4] = np.nan, -np.inf
    with pytest.raises(ContractError, match="2 NaN or infinite"):
        check_candidates(bad, rows, 300, 5 + 3 * K)
    assert count_non_finite(np.array([1, 2, 3])) == 0


def _frame(n: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rows = n if rows is None else rows
    rng = np.random.default_rng(n)
    boxes = rng.uniform(0, 100, (1, rows, 4)).astype(np.float32)
    return (np.array([[n]], np.int32), boxes, rng.uniform(0, 1, (1, rows)).astype(np.float32),
            rng.uniform(0, 1, (1, rows, K, 3)).astype(np.float32))  # fmt: skip


def test_detections_counts_shapes_and_values() -> None:
    assert check_detections(*_frame(3, rows=5), max_detections=10, num_keypoints=K) == 3
    assert check_detections(*_frame(0), max_detections=10, num_keypoints=K) == 0
    with pytest.raises(ContractError, match="at most 10"):
        check_detections(*_frame(11), max_detections=10, num_keypoints=K)
    count, boxes, scores, keypoints = _frame(3)
    for wrong in (np.array([[4]], np.int32), np.array([[-1]], np.int32)):
        with pytest.raises(ContractError, match="NUM_DETECTIONS is"):
            check_detections(wrong, boxes, scores, keypoints, max_detections=10, num_keypoints=K)
    with pytest.raises(ContractError, match="one frame"):
        check_detections(np.array([[3], [3]]), boxes, scores, keypoints, max_detections=10, num_keypoints=K)
    with pytest.raises(ContractError, match="inconsistent detections"):
        check_detections(count, boxes, scores[:, :2], keypoints, max_detections=10, num_keypoints=K)
    for name, array in (("BOXES", boxes), ("SCORES", scores), ("KEYPOINTS", keypoints)):
        poisoned = array.copy()
        poisoned.reshape(-1)[0] = np.nan
        arrays = {"BOXES": boxes, "SCORES": scores, "KEYPOINTS": keypoints, name: poisoned}
        with pytest.raises(ContractError, match=f"{name} holds 1 NaN"):
            check_detections(count, arrays["BOXES"], arrays["SCORES"], arrays["KEYPOINTS"], max_detections=10,
                             num_keypoints=K)  # fmt: skip
    # padding rows past NUM_DETECTIONS are not looked at (the postprocess step pads with zeros)
    boxes[0, 2] = np.inf
    assert check_detections(np.array([[2]], np.int32), boxes, scores, keypoints, max_detections=10, num_keypoints=K)


def test_frame_index_bounds() -> None:
    check_frame_index(0, None)
    check_frame_index(5, 10)  # an older frame: matched only
    check_frame_index(10 + MAX_FRAME_GAP, 10)
    with pytest.raises(ContractError, match="jumps from 10"):
        check_frame_index(10 + MAX_FRAME_GAP + 1, 10)
    with pytest.raises(ContractError, match="jumps"):
        check_frame_index(10**12, 3)
    for bad in (-1, 2**53):
        with pytest.raises(ContractError, match=r"must be in \[0, 2\*\*53\)"):
            check_frame_index(bad, None)


def test_request_pixel_budget() -> None:
    check_request_pixels([(1000, 1000)] * 100, 100_000_000)
    with pytest.raises(ContractError, match="101 image"):
        check_request_pixels([(1000, 1000)] * 101, 100_000_000)
    with pytest.raises(SpecError, match="max_request_pixels"):
        LetterboxSpec(max_pixels=10, max_request_pixels=9)


def test_a_start_on_a_live_id_is_refused_and_the_stream_cap_holds() -> None:
    store = tracking.SequenceStore(lambda: tracking.PoseTracker(tracking.TrackerSpec(), K), idle_s=10)
    first = tracking.PoseTracker(tracking.TrackerSpec(), K)
    store.start(7, first, max_sequences=2)
    with pytest.raises(tracking.TrackingError, match="already open"):
        store.start(7, tracking.PoseTracker(tracking.TrackerSpec(), K), max_sequences=2)
    assert store.get(7) is first  # the live stream keeps its own state
    store.start(8, tracking.PoseTracker(tracking.TrackerSpec(), K), max_sequences=2)
    with pytest.raises(tracking.TrackerFull, match="2 open streams"):
        store.start(9, tracking.PoseTracker(tracking.TrackerSpec(), K), max_sequences=2)
    store.close(8)
    store.start(9, tracking.PoseTracker(tracking.TrackerSpec(), K), max_sequences=2)
    assert len(store) == 2


def test_live_tracks_are_capped_weakest_first() -> None:
    tracker = tracking.PoseTracker(tracking.TrackerSpec(initialization_delay=0), K)
    _, boxes, scores, keypoints = _frame(40)
    keypoints[..., 2] = 0.9
    tracker.update(boxes[0], scores[0], keypoints[0], 0)
    tracker.update(boxes[0, :10], scores[0, :10], keypoints[0, :10], 1)  # 10 of them seen twice
    assert tracker.live_tracks == 40
    assert tracking.cap_live_tracks(tracker, 15) == 25 and tracker.live_tracks == 15
    survivors = {o.id for o in tracker._tracker.tracked_objects}
    again = tracker.update(boxes[0, :10], scores[0, :10], keypoints[0, :10], 2)
    assert set(again.tolist()) <= survivors and len(set(again.tolist())) == 10  # the twice-seen ones were kept
    assert tracking.cap_live_tracks(tracker, 100) == 0


def test_stream_limits_travel_in_the_tracker_config() -> None:
    model = load_catalog(ROOT / "build_engines" / "models.toml")[UL_MODEL]
    limits = stream_limits(model)
    assert limits.max_rows == model.postprocess.max_det_limit and limits.max_tracked == model.postprocess.max_det
    tracker = model_config.parse(render(model)[f"{UL_MODEL}_tracker/config.pbtxt"])
    parsed = {key: value.string_value for key, value in tracker.parameters.items() if key.startswith("limit.")}
    assert tracking.StreamLimits.from_parameters(parsed) == limits
    with pytest.raises(tracking.TrackingError):
        tracking.StreamLimits(max_tracked=10, max_tracks=5)


def test_queue_policy_is_written_for_every_step() -> None:
    model = load_catalog(ROOT / "build_engines" / "models.toml")[UL_MODEL]
    files = render(model)
    for role in QUEUE_LIMITS:
        path = f"{UL_MODEL}_{role}/configs/cpu.pbtxt" if role == "network" else f"{UL_MODEL}_{role}/config.pbtxt"
        policy = model_config.parse(files[path]).dynamic_batching.default_queue_policy
        assert policy == queue_policy(role) and policy.max_queue_size == QUEUE_LIMITS[role].max_queue_size


# ------------------------------------------------------------------------------------------------- SDK side
def _exception(status: str, message: str) -> InferenceServerException:
    return InferenceServerException(msg=message, status=f"StatusCode.{status}")


def test_busy_answers_are_typed_and_transient() -> None:
    common = {"url": "127.0.0.1:1", "model": UL_MODEL, "timeout_s": 1.0}
    for message in ("in ensemble 'yolo11n_pose', Exceeds maximum queue size", "Request timeout expired"):
        error = translate(_exception("UNAVAILABLE", message), **common)
        assert isinstance(error, ServerBusyError) and error.transient and "busy" in str(error)
    assert isinstance(translate(_exception("RESOURCE_EXHAUSTED", "too many"), **common), ServerBusyError)
    assert isinstance(translate(_exception("UNAVAILABLE", "failed to connect"), **common), ServerUnavailableError)
    assert isinstance(translate(_exception("UNAVAILABLE", "model x is not ready"), **common), ModelNotReadyError)


def test_full_jitter_backoff_stays_within_the_deadline() -> None:
    policy = RetryPolicy(attempts=10, initial_backoff_s=0.1, max_backoff_s=1.0)
    delays = np.array([[policy.delay(n) for n in range(6)] for _ in range(2000)])
    caps = np.minimum(1.0, 0.1 * 2.0 ** np.arange(6))
    assert (delays <= caps).all() and (delays >= 0).all()
    assert np.allclose(delays.mean(axis=0), caps / 2, rtol=0.1)  # uniform over [0, cap]: full jitter
    now = [0.0]
    deadline = Deadline(1.0, clock=lambda: now[0])
    now[0] = 0.75
    assert deadline.remaining() == pytest.approx(0.25)
    assert deadline.server_timeout_us() == 75_000  # QUEUE_SHARE (0.3) of what is left, for queueing
    now[0] = 2.0
    assert deadline.remaining() == 0.0 and deadline.server_timeout_us() == 1


def test_the_client_does_not_retry_past_its_deadline() -> None:
    from posetriton.client import PoseClient

    now = [0.0]
    busy = translate(_exception("UNAVAILABLE", "Exceeds maximum queue size"), url="u", model="m", timeout_s=1)
    with PoseClient("127.0.0.1:1", retry=RetryPolicy(attempts=5, initial_backoff_s=0.4, jitter=0.0)) as client:
        deadline = Deadline(1.0, clock=lambda: now[0])
        assert client._should_retry(busy, 1, deadline) == pytest.approx(0.4)
        now[0] = 0.7
        assert client._should_retry(busy, 2, deadline) is None  # a 0.8 s pause would end past the deadline


def test_busy_answers_are_retried_only_while_the_client_has_budget() -> None:
    """gRPC-style retry throttling: a saturated server's refusals drain the client's tokens, answers earn them
    back; a server that is down costs none (its retries go on until the deadline)."""
    from posetriton.client import PoseClient

    busy = translate(_exception("UNAVAILABLE", "Exceeds maximum queue size"), url="u", model="m", timeout_s=1)
    down = translate(_exception("UNAVAILABLE", "failed to connect to all addresses"), url="u", model="m", timeout_s=1)
    policy = RetryPolicy(attempts=100, initial_backoff_s=0.0, busy_tokens=10, busy_token_ratio=0.5)
    with PoseClient("127.0.0.1:1", retry=policy) as client:
        retried = [client._should_retry(busy, 1) is not None for _ in range(8)]
        assert retried == [True, True, True, True, False, False, False, False]  # 9, 8, 7, 6 left; then <= 5
        assert all(client._should_retry(down, n) is not None for n in range(1, 50))  # 2 tokens left
        for _ in range(5):  # answered calls: 2 + 5 x 0.5 = 4.5 tokens
            client._answered(None)
        assert client._should_retry(busy, 1) is None  # 3.5 left after this refusal
        for _ in range(6):  # 3.5 + 3 = 6.5
            client._answered(None)
        assert client._should_retry(busy, 1) is not None  # 5.5 left > 5


def test_sequence_ids_are_unpredictable_and_in_range() -> None:
    ids = {new_sequence_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(1 <= i < 2**63 for i in ids)
