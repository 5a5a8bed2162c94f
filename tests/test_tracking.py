"""Pose tracking (NAME_track): stable track IDs on videos made from real photos, against the real Triton server.

The clips (posetriton.core.clips) move a virtual camera over a photo or slide two photos past each
other, so each frame's ground truth is the still photo's detections mapped through the frame's
known scale and offset. ID switches are counted the MOT way (a person's matched track ID differs
from the one matched before) and printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from posetriton.client import AsyncPoseClient, PoseClient, TrackedFrame, TrackingStreamError
from posetriton.client.inputs import encode_rgb
from posetriton.core.clips import (
    ClipFrame,
    KeypointScore,
    TrackScore,
    Walker,
    camera_path,
    noisy_still,
    occluder,
    score_keypoints,
    score_tracks,
    slide,
)
from posetriton.core.contract import FRAME_INDEX, ContractError, Smoothing, Thresholds
from posetriton.server import model_config
from posetriton.server.launcher import TritonServer
from posetriton.server.repository import load_catalog, render, track_models
from posetriton.server.tracking import (
    DEFAULT_SMOOTHING,
    REID_MAX_LOST,
    KeypointSmoother,
    PoseTracker,
    SequenceStore,
    TrackerSpec,
    box_iou,
)
from tests.conftest import ROOT, UL_MODEL, start_server

TRACKER = UL_MODEL + "_tracker"
# Longer than a frame can take through the steps before the tracker (the idle clock runs meanwhile).
SHORT_IDLE_S = 8.0


# ------------------------------------------------------------------------------------------- no server
def _person(x: float, y: float, size: float, shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keypoints = np.concatenate([shape * [size / 2, size] + [x, y], np.full((17, 1), 0.9)], axis=1)
    return np.array([x, y, x + size / 2, y + size]), keypoints


def test_tracker_keeps_ids_of_two_people_crossing_and_late_frames_change_nothing() -> None:
    shape = np.random.default_rng(0).uniform(0, 1, (17, 2))
    tracker = PoseTracker(TrackerSpec(), 17)
    seen: dict[str, set[int]] = {"a": set(), "b": set()}
    for frame in range(30):
        a, b = _person(10 + 12 * frame, 100, 200, shape), _person(400 - 12 * frame, 110, 190, shape)
        order = ("a", "b") if frame % 2 else ("b", "a")  # detection order must not matter
        people = {"a": a, "b": b}
        boxes = np.stack([people[k][0] for k in order])
        keypoints = np.stack([people[k][1] for k in order])
        ids = tracker.update(boxes, np.array([0.9, 0.8]), keypoints, frame)
        for key, track_id in zip(order, ids, strict=True):
            seen[key].add(int(track_id))
    assert len(seen["a"]) == 1 and len(seen["b"]) == 1 and seen["a"] != seen["b"], seen
    # A frame older than the last one (it overtook another in the server) is matched, never learnt from.
    state = [o.estimate.copy() for o in tracker._tracker.tracked_objects]
    late = tracker.update(boxes, np.array([0.9, 0.8]), keypoints, 5)
    assert sorted(late.tolist()) == sorted(seen["a"] | seen["b"])
    assert all(np.array_equal(s, o.estimate) for s, o in zip(state, tracker._tracker.tracked_objects, strict=True))
    assert tracker.last_frame == 29


def _jitter(track: np.ndarray) -> float:
    """Mean frame-to-frame movement of keypoints ``[T, K, 2]``."""
    return float(np.linalg.norm(np.diff(track, axis=0), axis=2).mean())


def test_smoother_halves_jitter_ignores_unseen_keypoints_and_counts_dropped_frames() -> None:
    rng = np.random.default_rng(1)
    still = rng.uniform(100, 300, (17, 2))
    raw = still + rng.normal(0, 2.0, (60, 17, 2))
    smoother = KeypointSmoother(17, gate=0.3)
    filtered = [
        smoother.update(np.concatenate([r, np.full((17, 1), 0.9)], 1), 200, t, DEFAULT_SMOOTHING)
        for t, r in enumerate(raw)
    ]
    smoothed = np.stack(filtered)[:, :, :2]
    assert _jitter(smoothed[10:]) <= 0.5 * _jitter(raw[10:])
    assert np.linalg.norm(smoothed[10:] - still, axis=2).mean() < np.linalg.norm(raw[10:] - still, axis=2).mean()
    assert np.array_equal(filtered[0][:, 2], np.full(17, 0.9, np.float32))  # confidences are the detection's
    # A keypoint the detector lost (low confidence, a wild position) neither moves the filter nor is moved.
    held = smoother.value.copy()
    wild = np.concatenate([still + 500, np.full((17, 1), 0.1)], 1)
    out = smoother.update(wild, 200, 60, DEFAULT_SMOOTHING)
    assert np.array_equal(out[:, :2], held.astype(np.float32)) and np.array_equal(smoother.value, held)
    # Time is the frame index: after 20 dropped frames a moved keypoint is followed further than after one.
    moved = np.concatenate([still + 20, np.full((17, 1), 0.9)], 1)
    after_one, after_gap = KeypointSmoother(17, 0.3), KeypointSmoother(17, 0.3)
    for s in (after_one, after_gap):
        s.update(np.concatenate([still, np.full((17, 1), 0.9)], 1), 200, 0, DEFAULT_SMOOTHING)
    near = after_one.update(moved, 200, 1, DEFAULT_SMOOTHING)[:, :2] - still
    far = after_gap.update(moved, 200, 21, DEFAULT_SMOOTHING)[:, :2] - still
    assert np.all(far > near) and np.all(far <= 20)


def test_tracker_returns_smoothed_keypoints_and_resets_them_for_a_new_track() -> None:
    shape = np.random.default_rng(0).uniform(0, 1, (17, 2))
    rng = np.random.default_rng(2)
    tracker = PoseTracker(TrackerSpec(), 17)
    raw, smoothed = [], []
    for frame in range(30):
        box, keypoints = _person(100, 100, 200, shape)
        keypoints[:, :2] += rng.normal(0, 2.0, (17, 2))
        ids, filtered = tracker.track(box[None], np.array([0.9]), keypoints[None], frame)
        assert ids.tolist() == [1] and filtered.shape == (1, 17, 3) and filtered.dtype == np.float32
        raw.append(keypoints[:, :2])
        smoothed.append(filtered[0, :, :2])
    assert _jitter(np.stack(smoothed)[5:]) <= 0.5 * _jitter(np.stack(raw)[5:])
    # A second person far away: a new track, whose first keypoints are its own raw ones (no filter state).
    other_box, other = _person(600, 100, 200, shape)
    boxes = np.stack([box, other_box])
    ids, filtered = tracker.track(boxes, np.array([0.9, 0.9]), np.stack([keypoints, other]), 30)
    assert ids[0] == 1 and np.allclose(filtered[1], other)
    # A frame older than the last one (it overtook another in the server) changes no filter: it gets its tracks'
    # latest filtered keypoints, not its raw ones (a jump back in a video), and the next frame goes on as before.
    current = tracker.track(boxes, np.array([0.9, 0.9]), np.stack([keypoints, other]), 31)[1]
    noisy = np.stack([keypoints, other]).copy()
    noisy[:, :, :2] += 25.0
    ids, late = tracker.track(boxes, np.array([0.9, 0.9]), noisy, 10)
    assert ids.tolist() == [1, 2] and np.allclose(late[..., :2], current[..., :2]) and np.allclose(late[..., 2], 0.9)
    assert np.allclose(tracker.track(boxes, np.array([0.9, 0.9]), np.stack([keypoints, other]), 32)[1][..., :2],
                       current[..., :2], atol=0.5)  # fmt: skip


def test_smoothing_parameters_are_validated_once_and_pass_the_other_steps() -> None:
    assert Smoothing.from_parameters({"smooth_min_cutoff": 0.05, "conf": 0.3}) == Smoothing(0.05, None)
    assert Thresholds.from_parameters({"smooth_beta": 1, "conf": 0.3}) == Thresholds(conf=0.3)
    for bad, message in (
        ({"smooth_min_cutoff": 0}, "smooth_min_cutoff must be > 0"),
        ({"smooth_beta": -1}, "smooth_beta must be >= 0"),
        ({"smooth_beta": "x"}, "smooth_beta must be a number"),
        ({"smoothing": 1}, "unknown request parameter"),
    ):
        with pytest.raises(ContractError, match=re.escape(message)):
            Smoothing.from_parameters(bad).check()
    assert Smoothing(beta=3.0).or_defaults(DEFAULT_SMOOTHING) == Smoothing(DEFAULT_SMOOTHING.min_cutoff, 3.0)


def test_a_hidden_person_keeps_the_id_and_another_one_does_not_take_it() -> None:
    rng = np.random.default_rng(3)
    shape, other_shape = rng.uniform(0, 1, (17, 2)), rng.uniform(0, 1, (17, 2))

    def run(returning_shape: np.ndarray) -> list[int]:
        tracker = PoseTracker(TrackerSpec(), 17)
        ids = []
        for frame in range(70):
            x = 20 + 5 * frame  # walks right at 5 px per frame, hidden for frames 20-49 (30 frames)
            if 20 <= frame < 50:
                tracker.track(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 17, 3)), frame, frame_size=(640, 480))
                continue
            box, keypoints = _person(x, 100, 200, shape if frame < 20 else returning_shape)
            found, _ = tracker.track(box[None], np.array([0.9]), keypoints[None], frame, frame_size=(640, 480))
            ids += found.tolist()
        return ids

    # Back in view, a detection is a new track for one frame (no ID yet), then re-identified: the same ID.
    same = run(shape)
    assert same == [1] * 20 + [-1] + [1] * 19, same
    intruder = run(other_shape)
    assert intruder[:21] == [1] * 20 + [-1] and len(set(intruder[21:])) == 1 and 1 not in intruder[21:], intruder


def test_sequence_store_frees_state_at_end_and_after_idle() -> None:
    now = [0.0]
    store = SequenceStore(lambda: PoseTracker(TrackerSpec(), 17), idle_s=5.0, clock=lambda: now[0])
    first = store.open(1)
    store.open(2)
    assert store.get(1) is first and len(store) == 2
    store.close(2)
    assert 2 not in store
    now[0] = 4.0
    store.get(1)  # a frame keeps the stream alive
    now[0] = 8.5
    assert store.evict_idle() == [] and 1 in store
    now[0] = 9.5
    assert store.evict_idle() == [1] and len(store) == 0
    with pytest.raises(ValueError, match="no tracking state"):
        store.get(1)


def test_track_configs_are_valid_model_configs() -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    model = load_catalog(ROOT / "build_engines" / "models.toml")[UL_MODEL]
    files = render(model)
    track, tracker = track_models(model)
    plain = text_format.Parse(files[f"{model.name}/config.pbtxt"], model_config_pb2.ModelConfig())
    ensemble = text_format.Parse(files[f"{track}/config.pbtxt"], model_config_pb2.ModelConfig())
    step = text_format.Parse(files[f"{tracker}/config.pbtxt"], model_config_pb2.ModelConfig())
    # NAME_track = NAME's steps, then the tracker; NAME's outputs plus TRACK_IDS and SMOOTHED_KEYPOINTS.
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [
        *(s.model_name for s in plain.ensemble_scheduling.step),
        tracker,
    ]
    assert [o.name for o in ensemble.output] == [*(o.name for o in plain.output), "TRACK_IDS", "SMOOTHED_KEYPOINTS"]
    # The tracker reads the frame the network saw (for the colours that re-identify a returning person).
    assert {"canvas", "letterbox"} <= {i.name for i in step.input}
    assert [i.name for i in ensemble.input] == [*(i.name for i in plain.input), FRAME_INDEX]
    assert ensemble.parameters["keypoint_names"] == plain.parameters["keypoint_names"]
    batching = step.sequence_batching
    assert batching.WhichOneof("strategy_choice") == "oldest"
    assert batching.max_sequence_idle_microseconds > 0
    assert {c.name for c in batching.control_input} == {"START", "END", "CORRID"}


# ---------------------------------------------------------------------------------------- real server
def _photo(photo_paths: list[Path], name: str) -> np.ndarray:
    (path,) = [p for p in photo_paths if p.name == name]
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def people(served_url: str, photo_paths: list[Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Photos and their people (boxes from the served model on the still photo)."""
    found = {}
    with PoseClient(served_url, model=UL_MODEL) as client:
        for name in ("bus.jpg", "zidane.jpg", "grace_hopper.jpg", "astronaut.webp"):
            photo = _photo(photo_paths, name)
            boxes = client.predict(encode_rgb(photo), conf=0.5).as_arrays().boxes
            found[name] = (photo, boxes)
    return found


def _clips(people: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[list[ClipFrame], list[np.ndarray]]]:
    bus, bus_boxes = people["bus.jpg"]
    walkers = []
    for name in ("grace_hopper.jpg", "astronaut.webp"):
        photo, boxes = people[name]
        walkers.append((photo, tuple(int(v) for v in boxes[0]), boxes[:1]))
    (grace, grace_crop, grace_box), (astronaut, astronaut_crop, astronaut_box) = walkers
    return {
        # A camera pans and zooms over four people.
        "pan_zoom": (camera_path(bus, [(0, 300, 810), (120, 380, 600), (0, 420, 760)], 12), [bus_boxes]),
        # One person stays; the other walks out of the frame and comes back.
        "leave_return": (
            slide(
                [
                    Walker(grace, grace_crop, (20, 60, 20), 80, 300),
                    Walker(astronaut, astronaut_crop, (360, 700, 360), 100, 300),
                ],
                12,
            ),
            [grace_box, astronaut_box],
        ),
        # She walks behind a pillar (hidden for about 2 s at 15 fps) and comes out on the other side.
        "occlusion": (
            slide([Walker(grace, grace_crop, (-40, 460), 130, 220), _pillar()], 65),
            [grace_box, np.zeros((0, 4))],
        ),
        # She walks behind the pillar and stays there; someone else, as tall, comes out where she would.
        "intruder": (
            slide(
                [
                    Walker(grace, grace_crop, (-40, 240, 240), 130, 220),
                    Walker(astronaut, astronaut_crop, (230, 230, 470), 130, 220),
                    _pillar(),
                ],
                35,
            ),
            [grace_box, astronaut_box, np.zeros((0, 4))],
        ),
        # Two people cross; the second, nearer (larger, lower), passes in front of the first.
        "crossing": (
            slide(
                [Walker(grace, grace_crop, (0, 400), 40, 260), Walker(astronaut, astronaut_crop, (380, -20), 170, 300)],
                24,
            ),
            [grace_box, astronaut_box],
        ),
    }


PILLAR_LEFT, PILLAR_WIDTH = 200, 220


def _pillar() -> Walker:
    """A grey-green pillar from the top of the frame to the bottom, drawn in front of everyone."""
    return Walker(occluder(PILLAR_WIDTH, 480), (0, 0, PILLAR_WIDTH, 480), (PILLAR_LEFT,) * 3, 0, 480)


def _frames(clip: list[ClipFrame]) -> list[bytes]:
    return [encode_rgb(frame.rgb) for frame in clip]


def _track(url: str, frames: list[Any], **options: Any) -> list[TrackedFrame]:
    with PoseClient(url, model=UL_MODEL) as client:
        return list(client.track(frames, **options))


def _score(clip: list[ClipFrame], truth: list[np.ndarray], results: list[TrackedFrame]) -> TrackScore:
    ids = [r.track_ids for r in results]
    boxes = [np.array([p.box for p in r.poses]).reshape(-1, 4) for r in results]
    return score_tracks(clip, truth, ids, boxes)


def open_sequences(server: TritonServer, tracker: str = TRACKER) -> int:
    """Streams with tracking state on the server: the tracker's gauge summed over its instances."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.options.metrics_port}/metrics", timeout=10).read()
    pattern = re.compile(rf'^posetriton_track_sequences\{{[^}}]*model="{tracker}"[^}}]*\}} (\S+)$', re.M)
    return int(sum(float(v) for v in pattern.findall(text.decode())))


def _poll(condition: Any, timeout: float) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.mark.parametrize("name", ["pan_zoom", "leave_return", "crossing", "occlusion"])
def test_same_person_keeps_the_same_id(served_url: str, server: TritonServer, people: dict, name: str) -> None:
    clip, truth = _clips(people)[name]
    results = _track(served_url, _frames(clip), max_in_flight=2)
    assert [r.index for r in results] == list(range(len(clip))) and all(r.ok for r in results)
    score = _score(clip, truth, results)
    tracked = {key: [i for i in seen if i is not None] for key, seen in score.ids.items()}
    print(f"\n{name}: {len(clip)} frames, ID switches {score.switches}, coverage {score.coverage:.2f}, IDs {tracked}")
    assert score.coverage >= 0.8, score
    # leave_return: she comes back after 13 frames out of view; occlusion: hidden behind a pillar (33 frames
    # under 60 % visible, 2.2 s at 15 fps). Both are re-identified (posetriton.server.tracking.Reidentifier).
    # Measured: 0 switches on every clip.
    if name == "occlusion":
        hidden = sum(not any(source == 0 for source, _, _ in frame.ground_truth(truth)) for frame in clip)
        assert hidden >= 30, hidden  # the clip hides her for at least 2 s at 15 fps
    assert score.switches == 0, score
    assert _poll(lambda: open_sequences(server) == 0, 10) < 10  # END freed the state


def test_someone_else_appearing_where_a_hidden_person_would_does_not_take_her_id(served_url: str, people: dict) -> None:
    clip, truth = _clips(people)["intruder"]
    results = _track(served_url, _frames(clip), max_in_flight=2)
    score = _score(clip, truth, results)
    hidden, intruder = ({i for i in score.ids[(source, 0)] if i is not None} for source in (0, 1))
    print(f"\nintruder: her IDs {hidden}, the other person's IDs {intruder}, switches {score.switches}")
    assert len(hidden) == 1 and intruder and not hidden & intruder, score


def _truth_view(client: PoseClient, photo: np.ndarray, window: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """The people of an unshaken view of the photo, in photo pixels: (boxes [P, 4], keypoints [P, K, 3])."""
    (view,) = camera_path(photo, [window], 1)
    (placement,) = view.placements
    found = client.predict(encode_rgb(view.rgb), conf=0.5).as_arrays()
    boxes = (found.boxes.reshape(-1, 2, 2) - placement.offset) / placement.scale
    keypoints = found.keypoints.copy()
    keypoints[:, :, :2] = (found.keypoints[:, :, :2] - placement.offset) / placement.scale
    return boxes.reshape(-1, 4), keypoints


def _keypoint_scores(
    url: str, photo: np.ndarray, clip: list[ClipFrame], window: tuple[float, float, float], direction: tuple
) -> tuple[KeypointScore, KeypointScore]:
    """(raw, smoothed) keypoints of one tracked clip against the truth; frames sent as PNG (no JPEG noise)."""
    with PoseClient(url, model=UL_MODEL) as client:
        truth_boxes, truth_keypoints = _truth_view(client, photo, window)
        results = list(client.track([encode_rgb(f.rgb, "png") for f in clip], max_in_flight=2))
    assert all(r.ok for r in results)
    boxes = [np.array([p.box for p in r.poses]).reshape(-1, 4) for r in results]
    k = truth_keypoints.shape[1]
    raw = [np.array([p.raw_keypoints for p in r.poses]).reshape(-1, k, 3) for r in results]
    smoothed = [np.array([p.keypoints for p in r.poses]).reshape(-1, k, 3) for r in results]
    return tuple(  # type: ignore[return-value]
        score_keypoints(clip, truth_boxes, truth_keypoints, boxes, points, direction) for points in (raw, smoothed)
    )


# Views of the photos with people: (photo, window x, y, width in photo pixels).
STILL_VIEWS = {"bus.jpg": (0, 250, 810), "zidane.jpg": (0, 0, 1280)}
# The steady pan: 40 frames, the camera moving right by this fraction of the window; the bound on the lag.
PAN_FRACTION, PAN_FRAMES, MAX_LAG_FRAMES = 0.25, 40, 1.0


@pytest.mark.parametrize("name", sorted(STILL_VIEWS))
def test_smoothed_keypoints_jitter_at_most_half_as_much_and_stay_as_close_to_the_truth(
    served_url: str, people: dict, name: str
) -> None:
    photo = people[name][0]
    clip = noisy_still(photo, STILL_VIEWS[name], 40, seed=len(name))
    raw, smoothed = _keypoint_scores(served_url, photo, clip, STILL_VIEWS[name], (0.0, 0.0))
    print(f"\n{name} still: raw {raw}\n{name} still: smoothed {smoothed}")
    assert raw.matched >= 40 and smoothed.matched == raw.matched  # at least one person in every frame
    assert smoothed.jitter_px <= 0.5 * raw.jitter_px, (raw, smoothed)
    assert smoothed.error_px <= raw.error_px and smoothed.oks >= raw.oks, (raw, smoothed)


def test_smoothed_keypoints_lag_a_steady_pan_by_a_bounded_amount(served_url: str, people: dict) -> None:
    photo = people["bus.jpg"][0]
    x, y, w = STILL_VIEWS["bus.jpg"]
    clip = camera_path(photo, [(x, y, w), (x + PAN_FRACTION * w, y, w)], PAN_FRAMES)
    speed = PAN_FRACTION * 640 / PAN_FRAMES  # frame pixels per frame: the people move left
    raw, smoothed = _keypoint_scores(served_url, photo, clip, (x, y, w), (-1.0, 0.0))
    lag = raw.along_px - smoothed.along_px  # behind the motion (to the right) is positive
    print(f"\npan at {speed:.1f} px/frame: lag {lag:.2f} px ({lag / speed:.2f} frames); raw {raw}; smoothed {smoothed}")
    assert lag <= MAX_LAG_FRAMES * speed, (raw, smoothed)
    assert smoothed.error_px <= raw.error_px + MAX_LAG_FRAMES * speed
    # The switch: smoothed=False gives the raw keypoints; the smoothing parameters are the request's.
    frames = [encode_rgb(f.rgb, "png") for f in clip[:6]]
    plain = _track(served_url, frames, smoothed=False)
    assert all(p.keypoints == p.raw_keypoints for r in plain for p in r.poses) and plain[-1].poses
    lighter = _track(served_url, frames, smoothing=Smoothing(min_cutoff=0.4, beta=0.0))
    heavier = _track(served_url, frames, smoothing=Smoothing(min_cutoff=0.001, beta=0.0))

    def moved(results: list[TrackedFrame]) -> float:
        """How far the keypoints of each track follow the pan from the first frame to the last."""
        start = {p.track_id: np.array([k[:2] for k in p.keypoints]) for p in results[0].poses}
        end = {p.track_id: np.array([k[:2] for k in p.keypoints]) for p in results[-1].poses}
        common = [i for i in start.keys() & end.keys() if i is not None]
        assert common
        return float(np.mean([np.abs(end[i] - start[i]).mean() for i in common]))

    assert moved(heavier) < moved(lighter)
    with pytest.raises(ValueError, match="smooth_min_cutoff must be > 0"):
        _track(served_url, frames, smoothing=Smoothing(min_cutoff=0.0))


def test_concurrent_streams_never_share_ids_or_state(served_url: str, server: TritonServer, people: dict) -> None:
    clips = _clips(people)
    videos = {name: _frames(clips[name][0]) for name in ("pan_zoom", "crossing")}
    # One frame in flight per stream: the order frames reach the tracker is then fixed, so a stream's IDs
    # are a pure function of its frames; any mixing of state between streams would change them.
    alone = {
        name: [r.track_ids for r in _track(served_url, frames, max_in_flight=1)] for name, frames in videos.items()
    }
    opened: list[int] = []

    async def together() -> dict[str, list[list[int | None]]]:
        async with AsyncPoseClient(served_url, model=UL_MODEL) as client:

            async def run(frames: list[bytes]) -> list[list[int | None]]:
                out = []
                async for result in client.track(frames, max_in_flight=1):
                    out.append(result.track_ids)
                    if result.index == 5:
                        opened.append(await asyncio.to_thread(open_sequences, server))
                return out

            names = list(videos)
            results = await asyncio.gather(*(run(videos[name]) for name in names), run(videos["pan_zoom"]))
        return {**dict(zip(names, results[:2], strict=True)), "pan_zoom_again": results[2]}

    concurrent = asyncio.run(together())
    assert concurrent["pan_zoom"] == alone["pan_zoom"] == concurrent["pan_zoom_again"]
    assert concurrent["crossing"] == alone["crossing"]
    assert max(opened) >= 2  # the streams really were open at once
    _poll(lambda: open_sequences(server) == 0, 10)


def _truncated(frame: bytes) -> bytes:
    return frame[: len(frame) // 2]  # the header is intact, so only the server's decoder can tell


def test_corrupt_frame_mid_stream_fails_alone(served_url: str, server: TritonServer, people: dict) -> None:
    clip, _ = _clips(people)["pan_zoom"]
    frames = _frames(clip)
    clean = _track(served_url, frames, max_in_flight=1)
    broken = _track(served_url, [*frames[:8], _truncated(frames[8]), *frames[9:]], max_in_flight=1)
    assert [r.ok for r in broken] == [i != 8 for i in range(len(frames))]
    assert "truncated" in (broken[8].error or "") or "corrupt" in (broken[8].error or ""), broken[8].error
    assert [r.track_ids for i, r in enumerate(broken) if i != 8] == [r.track_ids for i, r in enumerate(clean) if i != 8]
    # The server's status for that frame is INVALID_ARGUMENT (seen on a unary call of the same sequence).
    triton = grpcclient.InferenceServerClient(served_url)
    try:
        _unary_frame(triton, frames[0], 0, start=True)
        with pytest.raises(InferenceServerException) as refused:
            _unary_frame(triton, _truncated(frames[1]), 1, start=False)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        _unary_frame(triton, frames[2], 2, start=False, end=True)  # the sequence goes on, then ends
    finally:
        triton.close()


def _unary_frame(triton: Any, data: bytes, index: int, *, start: bool, end: bool = False) -> Any:
    image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[data]], dtype=object))
    frame = grpcclient.InferInput(FRAME_INDEX, [1, 1], "INT64")
    frame.set_data_from_numpy(np.array([[index]], np.int64))
    return triton.infer(UL_MODEL + "_track", [image, frame], sequence_id=77, sequence_start=start, sequence_end=end)


# ------------------------------------------------------------------- own server: short idle limit, restarts
@pytest.fixture(scope="module")
def short_idle_server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """yolo11n_pose_track with a short idle limit, on its own server (so it can be stopped and started)."""
    repository = tmp_path_factory.mktemp("short_idle")
    for entry in model_repository.iterdir():
        if entry.name.startswith(UL_MODEL):
            (repository / entry.name).symlink_to(entry) if entry.name != TRACKER else shutil.copytree(
                entry, repository / entry.name
            )
    with model_config.editing(repository / TRACKER / "config.pbtxt") as config:
        config.sequence_batching.max_sequence_idle_microseconds = int(SHORT_IDLE_S * 1e6)
    triton = start_server(repository, models=[UL_MODEL + "_track"])
    yield triton
    triton.stop()


def test_idle_sequence_is_freed_and_cannot_come_back(short_idle_server: TritonServer, people: dict) -> None:
    clip, _ = _clips(people)["pan_zoom"]
    frames = _frames(clip)
    with PoseClient(short_idle_server.grpc_url, model=UL_MODEL) as client:
        stream = client.track(frames, max_in_flight=1)
        assert next(stream).index == 0
        assert open_sequences(short_idle_server) == 1
        # The caller stops reading: no frame, no END. The idle limit frees the state.
        freed_after = _poll(lambda: open_sequences(short_idle_server) == 0, SHORT_IDLE_S + 10)
        print(f"\nidle sequence freed {freed_after:.1f} s after its last frame (limit {SHORT_IDLE_S} s)")
        assert freed_after >= SHORT_IDLE_S - 0.5
        # Going on would need the lost state: refused, with a message that says to start again.
        with pytest.raises(TrackingStreamError, match="call track\\(\\) again") as lost:
            list(stream)
        assert lost.value.frames_done in (1, 2)  # frame 1 was already on its way when the caller paused
        again = list(client.track(frames[3:6]))
        assert [r.ok for r in again] == [True] * 3 and again[0].track_ids


def test_server_restart_mid_stream_is_a_clear_error_and_track_resumes(
    short_idle_server: TritonServer, people: dict
) -> None:
    clip, _ = _clips(people)["pan_zoom"]
    frames = _frames(clip)
    with PoseClient(short_idle_server.grpc_url, model=UL_MODEL, retry=1) as client:
        stream = client.track(frames, max_in_flight=2)
        done = [next(stream) for _ in range(4)]
        short_idle_server.stop()
        with pytest.raises(TrackingStreamError, match="call track\\(\\) again") as lost:
            done += list(stream)
        print(f"\nrestart: {lost.value}")
        restarted = TritonServer(short_idle_server.options).start(timeout=180)  # same ports
        try:
            resumed = list(client.track(frames[len(done) :]))
            assert resumed and all(r.ok for r in resumed) and resumed[0].track_ids
            assert _poll(lambda: open_sequences(restarted) == 0, 10) < 10
        finally:
            restarted.stop()


def test_box_iou_matches_hand_computed() -> None:
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30]], float)
    assert np.allclose(box_iou(a, b), [[50 / 150, 0.0]])


def test_live_source_drops_old_frames_and_counts_them(served_url: str, people: dict) -> None:
    clip, _ = _clips(people)["crossing"]
    frames = [frame.rgb for frame in clip] * 2  # 50 frames offered at 50 fps: faster than this server answers

    def camera() -> Iterator[np.ndarray]:
        for frame in frames:
            time.sleep(0.02)
            yield frame

    results = _track(served_url, camera(), live=True, max_in_flight=1)
    indices = [r.index for r in results]
    assert indices == sorted(indices) and len(results) < len(frames)
    # Every offered frame was either sent or replaced by a newer one before it could be, and counted.
    assert len(results) + results[-1].dropped == len(frames)
    assert results[-1].index == len(frames) - 1  # the newest frame is never the one dropped

    async def web_socket_like() -> list[TrackedFrame]:
        async def arriving() -> Any:
            for frame in frames[:20]:
                await asyncio.sleep(0.02)
                yield frame

        async with AsyncPoseClient(served_url, model=UL_MODEL) as client:
            return [r async for r in client.track(arriving(), live=True, max_in_flight=1)]

    received = asyncio.run(web_socket_like())
    assert len(received) + received[-1].dropped == 20 and all(r.ok for r in received)
    assert {pose.track_id for r in received for pose in r.poses} - {None}


def test_cli_track_writes_json_lines_and_an_annotated_video(served_url: str, people: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from posetriton.client.cli import app
    from posetriton.client.drawing import VideoSink

    clip, _ = _clips(people)["crossing"]
    video = tmp_path / "crossing.mp4"
    with VideoSink(video, 15.0, 640, 480) as sink:
        for frame in clip:
            sink.write(frame.rgb)
    lines, drawn = tmp_path / "tracks.jsonl", tmp_path / "tracks.mp4"
    result = CliRunner().invoke(
        app, ["track", str(video), "--url", served_url, "-o", str(lines), "--draw-video", str(drawn), "--no-progress"]
    )
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [row["frame"] for row in rows] == list(range(len(clip)))
    assert rows[1]["timestamp"] == pytest.approx(1 / 15, abs=1e-3)
    ids = [d["track_id"] for row in rows for d in row["detections"]]
    # Two people (ID quality is measured above; here the mp4 round trip and 4 frames in flight add noise).
    assert 2 <= len({i for i in ids if i is not None}) <= 3
    assert sum(i is not None for i in ids) >= 0.9 * len(ids)
    capture = cv2.VideoCapture(str(drawn))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == len(clip)
    capture.release()


def test_a_stream_remembers_a_bounded_number_of_lost_people() -> None:
    """Re-identification compares each new track with every remembered lost one: a crowd that vanishes at once
    (or a client that makes it up) leaves at most REID_MAX_LOST of them, the latest, so a frame's cost is bounded."""
    shape = np.random.default_rng(0).uniform(0, 1, (17, 2))
    people = [_person(150.0 * (i % 20), 400.0 * (i // 20), 100, shape) for i in range(2 * REID_MAX_LOST)]
    boxes, keypoints = np.stack([b for b, _ in people]), np.stack([k for _, k in people])
    tracker = PoseTracker(TrackerSpec(), 17)
    for frame in range(8):
        ids = tracker.update(boxes, np.full(len(boxes), 0.9), keypoints, frame)
    assert (ids > 0).sum() == len(people)
    for frame in range(8, 12):  # everyone gone
        tracker.update(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 17, 3)), frame)
    assert 0 < len(tracker._reid.remembered) <= REID_MAX_LOST
