"""Pose tracking across the frames of one video: track IDs that stay with each person.

The tracker is Norfair's (Tryolabs): a constant-velocity Kalman filter per tracked point and
greedy association by a distance. Each pose is tracked as ``2 + K`` points (the box corners,
then the keypoints) and associated by a distance that blends the box IoU with the keypoints'
OKS (COCO's object keypoint similarity), so two people whose boxes overlap while they cross are
still told apart by where their limbs are.

Why Norfair and not a ByteTrack package: every maintained ByteTrack on the package index either
needs numpy 2 (Roboflow ``trackers``), pulls PyTorch (``boxmot``, ``bytetracker``), needs
``opencv-python`` beside our ``opencv-python-headless`` (``supervision`` <= 0.26) or no longer
ships a tracker (``supervision`` >= 0.27); Triton's Python backend needs numpy < 2. Norfair
supports numpy < 2, keypoints and a custom distance.

One :class:`PoseTracker` per video stream; :class:`SequenceStore` keeps them by Triton correlation
ID and frees a stream's state at its END or after it was idle too long. The Triton model
(``posetriton.serving.track``), the tests and the benchmark share this code; only :class:`PoseTracker`
imports Norfair (a serving dependency), so the client and the repository generator can import the
names here without it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import NDArray

from posetriton.contract import (  # noqa: F401  (re-exported: the tracking names live in the contract)
    CONTROL_CORRID,
    CONTROL_END,
    CONTROL_START,
    FRAME_INDEX,
    SMOOTHED_KEYPOINTS,
    TRACK_IDS,
    TRACK_SUFFIX,
    TRACKER_SUFFIX,
    UNTRACKED,
    Smoothing,
)

# COCO's per-keypoint OKS constants (sigmas) for the 17 person keypoints.
COCO_SIGMAS = (
    np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89])
    / 10.0
)


class TrackingError(ValueError):
    """A tracking request that cannot be served (bad shapes, unknown sequence); the message says why."""


@dataclass(frozen=True)
class TrackerSpec:
    """Tracker settings; they travel as ``track.NAME`` parameters of the tracker step's config."""

    # Weight of the box IoU in the similarity; the keypoints' OKS gets the rest.
    box_weight: float = 0.5
    # A detection joins a track only if 1 - similarity is below this.
    max_distance: float = 0.75
    # Keypoints below this confidence neither count in OKS nor update the Kalman filter.
    keypoint_threshold: float = 0.3
    # Frames a track lives on without a matching detection (30 = 2 s at 15 fps).
    max_missed_frames: int = 30
    # Frames a new track must be seen again before it gets an ID, so a one-frame false detection gets none
    # (0: at once). The people of a stream's first frame get theirs at once, as in ByteTrack.
    initialization_delay: int = 1
    # Re-identification of a person who was hidden or out of view (see ReidDistance): a lost track is kept this
    # many frames after it would have died, for a new track that reappears where it could be.
    reid_frames: int = 30
    # ... within this many person heights of where it was last seen or where the motion model puts it now,
    reid_max_offset: float = 1.5
    # ... with a box height within this factor of its own, and a pose shape this close (RMS, see pose_shape).
    reid_max_scale: float = 1.5
    reid_max_shape: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.box_weight <= 1.0:
            raise TrackingError(f"track.box_weight must be in [0, 1], got {self.box_weight}")
        if not 0.0 < self.max_distance <= 1.0:
            raise TrackingError(f"track.max_distance must be in (0, 1], got {self.max_distance}")
        if not 0.0 <= self.keypoint_threshold <= 1.0:
            raise TrackingError(f"track.keypoint_threshold must be in [0, 1], got {self.keypoint_threshold}")
        if self.max_missed_frames < 1 or not 0 <= self.initialization_delay < self.max_missed_frames:
            raise TrackingError(
                "track.max_missed_frames must be >= 1 and track.initialization_delay in [0, max_missed_frames), got "
                f"{self.max_missed_frames} and {self.initialization_delay}"
            )

        if self.reid_frames < 0 or self.reid_max_offset <= 0 or self.reid_max_scale < 1 or self.reid_max_shape <= 0:
            raise TrackingError(
                "track.reid_frames must be >= 0, reid_max_offset > 0, reid_max_scale >= 1 and reid_max_shape > 0, got "
                f"{self.reid_frames}, {self.reid_max_offset}, {self.reid_max_scale}, {self.reid_max_shape}"
            )

    def to_parameters(self) -> dict[str, str]:
        return {f"track.{f.name}": str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> TrackerSpec:
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = parameters.get(f"track.{f.name}")
            if raw is not None:
                values[f.name] = int(raw) if f.type in ("int", int) else float(raw)
        return cls(**values)


def box_iou(a: NDArray[Any], b: NDArray[Any]) -> NDArray[Any]:
    """IoU of every box in ``a [N, 4]`` with every box in ``b [M, 4]`` (xyxy) -> ``[N, M]``."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    iou: NDArray[Any] = inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)
    return iou


def _oks(
    keypoints: NDArray[Any], visible: NDArray[Any], areas: NDArray[Any], predicted: NDArray[Any], sigmas: NDArray[Any]
) -> NDArray[Any]:
    """OKS of detections (``keypoints [N, K, 2]``, ``visible [N, K]``) against tracks' predicted keypoints
    ``[M, K, 2]``, at the object scales ``areas [N, M]`` -> ``[N, M]``; NaN for a detection with no visible
    keypoint."""
    squared = np.sum((keypoints[:, None] - predicted[None]) ** 2, axis=3)  # [N, M, K]
    scale = 2.0 * np.maximum(areas, 1.0)[:, :, None] * (2.0 * sigmas) ** 2
    similarity = np.exp(-squared / scale) * visible[:, None, :]
    counted = visible.sum(axis=1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        oks: NDArray[Any] = np.where(counted > 0, similarity.sum(axis=2) / counted, np.nan)
    return oks


def _areas(boxes: NDArray[Any]) -> NDArray[Any]:
    areas: NDArray[Any] = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)
    return areas


class PoseDistance:
    """1 - (w * IoU + (1 - w) * OKS) between detections and the Kalman-predicted tracks (IoU alone when a
    detection has no confident keypoint). Norfair's ``Distance`` interface, vectorized: one numpy pass per frame."""

    def __init__(self, spec: TrackerSpec, sigmas: NDArray[Any]) -> None:
        self.spec = spec
        self.sigmas = sigmas

    def get_distances(self, objects: Sequence[Any], candidates: Sequence[Any] | None) -> NDArray[Any]:
        if not objects or not candidates:
            return np.full((len(candidates or ()), len(objects)), np.inf, dtype=np.float32)
        points = np.stack([c.points for c in candidates])  # [N, P, 2], norfair Detections
        scores = np.stack([c.scores for c in candidates])  # [N, P]
        predicted = np.stack([o.estimate for o in objects])  # [M, P, 2]
        boxes, predicted_boxes = points[:, :2].reshape(-1, 4), predicted[:, :2].reshape(-1, 4)
        iou = box_iou(boxes, predicted_boxes)
        # The person's scale: the larger of the detected and the predicted box, since a partly hidden
        # person's box shrinks while their keypoints do not move apart any less.
        areas = np.maximum(_areas(boxes)[:, None], _areas(predicted_boxes)[None, :])
        visible = (scores[:, 2:] >= self.spec.keypoint_threshold).astype(np.float64)
        oks = _oks(points[:, 2:], visible, areas, predicted[:, 2:], self.sigmas)
        w = self.spec.box_weight
        similarity = np.where(np.isnan(oks), iou, w * iou + (1.0 - w) * np.nan_to_num(oks))
        return (1.0 - similarity).astype(np.float32)


# ------------------------------------------------------------------------------------------ re-identification
def pose_shape(keypoints: NDArray[Any], visible: NDArray[Any]) -> tuple[NDArray[Any], float]:
    """A pose's keypoints ``[K, 2]`` centred on the mean of the ``visible [K]`` ones and divided by their RMS
    spread: the shape of the pose, independent of where the person is and how large (NaN where not visible),
    and the spread in pixels."""
    points = np.where(visible[:, None], keypoints, np.nan)
    if visible.sum() < 3:
        return points, 0.0
    centred = points - np.nanmean(points, axis=0)
    spread = float(np.sqrt(np.nanmean(np.sum(centred**2, axis=1))))
    return centred / max(spread, 1e-6), spread


def shape_distance(a: NDArray[Any], a_visible: NDArray[Any], b: NDArray[Any], b_visible: NDArray[Any]) -> float:
    """RMS distance of two poses' shapes (:func:`pose_shape`) over the keypoints visible in both, each shape
    normalised on those keypoints alone (a partly hidden person is compared on what is seen); inf when fewer
    than 4 keypoints are shared."""
    common = a_visible & b_visible
    if common.sum() < 4:
        return math.inf
    shape_a, _ = pose_shape(a, common)
    shape_b, _ = pose_shape(b, common)
    return float(np.sqrt(np.nanmean(np.sum((shape_a - shape_b) ** 2, axis=1))))


class ReidDistance:
    """Whether a new track is a lost one back: Norfair's ``reid_distance_function``, as a ``Distance`` object.

    Norfair offers each track in its first confirmed frame to the tracks that went unmatched (hidden
    behind something, out of view) and merges it into the nearest one under the threshold, so it keeps
    the lost track's ID. The distance is the largest of three ratios, each 1 at its limit: how far the
    new box's centre is from where the lost person was last seen or from where the Kalman filter puts
    them now (clamped into the frame: a person who left comes back where they left), in person heights,
    against ``reid_max_offset``; the box heights' ratio against ``reid_max_scale``; and the RMS distance
    of the pose shapes (:func:`shape_distance`) against ``reid_max_shape``. So a different person
    appearing there with another build or stance, or another size, starts a track of their own.
    """

    threshold = 1.0

    def __init__(self, spec: TrackerSpec) -> None:
        self.spec = spec
        self.frame_size: tuple[float, float] | None = None

    def get_distances(self, objects: Sequence[Any], candidates: Sequence[Any] | None) -> NDArray[Any]:
        distances = np.full((len(candidates or ()), len(objects)), np.inf, dtype=np.float64)
        for i, new in enumerate(candidates or ()):
            for j, lost in enumerate(objects):
                distances[i, j] = self.distance(new, lost)
        return distances

    def distance(self, new: Any, lost: Any) -> float:
        seen, now = lost.last_detection, new.last_detection
        box, seen_box = now.points[:2].reshape(4), seen.points[:2].reshape(4)
        predicted_box = lost.estimate[:2].reshape(4)
        height = max(seen_box[3] - seen_box[1], 1.0)
        centre = (box[:2] + box[2:]) / 2
        places = [(seen_box[:2] + seen_box[2:]) / 2, (predicted_box[:2] + predicted_box[2:]) / 2]
        if self.frame_size is not None:
            places[1] = np.clip(places[1], 0.0, self.frame_size)
        offset = min(float(np.linalg.norm(centre - place)) for place in places) / height
        scale = max(box[3] - box[1], 1.0) / height
        threshold = self.spec.keypoint_threshold
        shape = shape_distance(
            now.points[2:], now.scores[2:] >= threshold, seen.points[2:], seen.scores[2:] >= threshold
        )
        return max(
            offset / self.spec.reid_max_offset,
            abs(math.log(scale)) / math.log(self.spec.reid_max_scale) if self.spec.reid_max_scale > 1 else 0.0,
            shape / self.spec.reid_max_shape,
        )


# ------------------------------------------------------------------------------------------------ smoothing
DEFAULT_SMOOTHING = Smoothing(min_cutoff=0.02, beta=2.0)
# Cutoff (cycles per frame) of the One Euro filter's speed estimate, as in the filter's paper (1 Hz at ~30 fps).
DERIVATIVE_CUTOFF = 0.03


def one_euro_alpha(cutoff: NDArray[Any] | float, elapsed: NDArray[Any]) -> NDArray[Any]:
    """The One Euro filter's smoothing factor for a cutoff (cycles per frame) over ``elapsed`` frames."""
    tau = 1.0 / (2.0 * math.pi * np.asarray(cutoff, np.float64))
    alpha: NDArray[Any] = 1.0 / (1.0 + tau / elapsed)
    return alpha


class KeypointSmoother:
    """One Euro filters (Casiez et al., CHI 2012) for the ``K x 2`` keypoint coordinates of one track.

    Vectorised over keypoints; time is the frame index, so frames a live source dropped count as
    elapsed time. A keypoint below the confidence gate neither moves its filter nor is moved: its
    filtered position stays where it was (and its confidence, taken from the detection, says it is
    not seen). The speed that raises the cutoff is measured in person heights per frame, so ``beta``
    means the same for a person near the camera and one far away.
    """

    def __init__(self, num_keypoints: int, gate: float) -> None:
        self.gate = gate
        self.value = np.zeros((num_keypoints, 2))
        self.speed = np.zeros((num_keypoints, 2))
        self.seen_at = np.full(num_keypoints, -1, np.int64)  # frame each keypoint's filter was last updated

    def update(self, keypoints: NDArray[Any], height: float, frame: int, smoothing: Smoothing) -> NDArray[Any]:
        """The filtered ``[K, 3]`` (x, y, the detection's confidence) of one detection of this track."""
        raw = keypoints[:, :2].astype(np.float64)
        seen = keypoints[:, 2] >= self.gate
        known = self.seen_at >= 0
        fresh = seen & ~known
        self.value[fresh], self.speed[fresh], self.seen_at[fresh] = raw[fresh], 0.0, frame
        step = seen & known & (self.seen_at < frame)
        if step.any():
            elapsed = (frame - self.seen_at[step]).astype(np.float64)[:, None]
            speed = (raw[step] - self.value[step]) / elapsed
            self.speed[step] += one_euro_alpha(DERIVATIVE_CUTOFF, elapsed) * (speed - self.speed[step])
            relative = np.linalg.norm(self.speed[step], axis=1, keepdims=True) / max(height, 1.0)
            assert smoothing.min_cutoff is not None and smoothing.beta is not None
            cutoff = smoothing.min_cutoff + smoothing.beta * relative
            self.value[step] += one_euro_alpha(cutoff, elapsed) * (raw[step] - self.value[step])
            self.seen_at[step] = frame
        out = keypoints.astype(np.float32).copy()
        known = self.seen_at >= 0
        out[known, :2] = self.value[known]
        return out


def smooth_tracks(
    smoothers: dict[int, KeypointSmoother],
    ids: NDArray[Any],
    boxes: NDArray[Any],
    keypoints: NDArray[Any],
    frame: int,
    smoothing: Smoothing,
    gate: float,
) -> NDArray[Any]:
    """Each tracked detection's keypoints through its track's :class:`KeypointSmoother` (created when the track
    is first seen); an untracked one keeps its raw keypoints. ``smoothers`` (by track ID) is updated in place."""
    smoothed = keypoints.astype(np.float32).copy()
    for row, track_id in enumerate(ids.tolist()):
        if track_id == UNTRACKED:
            continue
        smoother = smoothers.get(track_id)
        if smoother is None:
            smoother = smoothers[track_id] = KeypointSmoother(keypoints.shape[1], gate)
        smoothed[row] = smoother.update(keypoints[row], float(boxes[row, 3] - boxes[row, 1]), frame, smoothing)
    return smoothed


class PoseTracker:
    """Track IDs (1, 2, ...) for the poses of one video, frame after frame.

    :meth:`update` takes a frame's detections and its index in the video. Frames normally arrive in
    order; a skipped index (a live source that dropped frames) tells the tracker how many frames
    passed. A frame older than the last one seen (it overtook another inside the server) is
    matched against the current tracks without changing them.
    """

    def __init__(self, spec: TrackerSpec, num_keypoints: int) -> None:
        from norfair.tracker import Tracker

        self.spec = spec
        self.num_keypoints = num_keypoints
        sigmas = COCO_SIGMAS if num_keypoints == len(COCO_SIGMAS) else np.full(num_keypoints, COCO_SIGMAS.mean())
        # Norfair warns about (and wraps) plain callables; a Distance object is set directly instead.
        self._tracker = Tracker(
            distance_function="iou",
            distance_threshold=spec.max_distance,
            hit_counter_max=spec.max_missed_frames,
            initialization_delay=spec.initialization_delay,
            detection_threshold=spec.keypoint_threshold,
            past_detections_length=0,
            reid_hit_counter_max=spec.reid_frames or None,
        )
        self._distance = PoseDistance(spec, sigmas)
        self._tracker.distance_function = self._distance
        self._reid = ReidDistance(spec)
        if spec.reid_frames:
            self._tracker.reid_distance_function = self._reid
            self._tracker.reid_distance_threshold = ReidDistance.threshold
        self._smoothers: dict[int, KeypointSmoother] = {}
        self.last_frame: int | None = None

    @property
    def live_tracks(self) -> int:
        return len(self._tracker.tracked_objects)

    def track(
        self,
        boxes: NDArray[Any],
        scores: NDArray[Any],
        keypoints: NDArray[Any],
        frame_index: int,
        smoothing: Smoothing = DEFAULT_SMOOTHING,
        frame_size: tuple[float, float] | None = None,
    ) -> tuple[NDArray[Any], NDArray[Any]]:
        """:meth:`update`, and each pose's keypoints smoothed over its track (``[N, K, 3]``, FP32; the raw ones
        for a pose without a track ID, and for a late frame, which changes no state).
        ``frame_size`` (width, height) lets re-identification place a person who left the view at its edge."""
        self._reid.frame_size = frame_size
        late = self.last_frame is not None and frame_index <= self.last_frame
        ids = self.update(boxes, scores, keypoints, frame_index)
        if late:
            return ids, keypoints.astype(np.float32)
        alive = {o.id for o in self._tracker.tracked_objects if o.id is not None}
        for gone in set(self._smoothers) - alive:
            del self._smoothers[gone]  # a track that died: a later one never gets its filter state
        chosen = smoothing.or_defaults(DEFAULT_SMOOTHING).check()
        smoothed = smooth_tracks(
            self._smoothers, ids, boxes, keypoints, frame_index, chosen, self.spec.keypoint_threshold
        )
        return ids, smoothed

    def update(
        self, boxes: NDArray[Any], scores: NDArray[Any], keypoints: NDArray[Any], frame_index: int
    ) -> NDArray[Any]:
        """Track IDs (INT64 ``[N]``, :data:`UNTRACKED` for a detection without one) of a frame's
        ``boxes [N, 4]``, ``scores [N]``, ``keypoints [N, K, 3]`` (the postprocess step's rows)."""
        _check_rows(boxes, scores, keypoints, self.num_keypoints)
        detections = [self._detection(boxes[i], keypoints[i]) for i in range(len(boxes))]
        ids = np.full(len(detections), UNTRACKED, np.int64)
        if self.last_frame is not None and frame_index <= self.last_frame:
            return self._match_only(detections, ids)
        # Norfair starts a new track's hit counter at `period`: on the first frame, past the delay.
        period = self.spec.initialization_delay + 1 if self.last_frame is None else frame_index - self.last_frame
        self.last_frame = frame_index
        position = {id(d): i for i, d in enumerate(detections)}
        for tracked in self._tracker.update(detections or None, period=period):
            row = position.get(id(tracked.last_detection))
            if row is not None and tracked.id is not None:
                ids[row] = tracked.id
        return ids

    def _detection(self, box: NDArray[Any], keypoints: NDArray[Any]) -> Any:
        from norfair.tracker import Detection

        points = np.concatenate([np.asarray(box, np.float64).reshape(2, 2), keypoints[:, :2]])
        # The box corners always update the filter; keypoints only when confident (detection_threshold).
        point_scores = np.concatenate([[1.0, 1.0], keypoints[:, 2]]).astype(np.float64)
        return Detection(points=points, scores=point_scores)

    def _match_only(self, detections: list[Any], ids: NDArray[Any]) -> NDArray[Any]:
        tracks = self._tracker.get_active_objects()
        if not detections or not tracks:
            return ids
        distances = self._distance.get_distances(tracks, detections)
        rows, columns = self._tracker.match_dets_and_objs(distances, self.spec.max_distance)
        for row, column in zip(rows, columns, strict=True):
            if distances[row, column] < self.spec.max_distance:
                ids[row] = tracks[column].id
        return ids


def _check_rows(boxes: NDArray[Any], scores: NDArray[Any], keypoints: NDArray[Any], num_keypoints: int) -> None:
    n = len(boxes)
    if boxes.shape != (n, 4) or scores.shape != (n,) or keypoints.shape != (n, num_keypoints, 3):
        raise TrackingError(
            f"inconsistent detections: BOXES {list(boxes.shape)}, SCORES {list(scores.shape)}, KEYPOINTS "
            f"{list(keypoints.shape)} (expected [N, 4], [N], [N, {num_keypoints}, 3])"
        )


class SequenceStore:
    """The trackers of the open video streams, by correlation ID; thread-safe.

    A stream's state is created at START, dropped at END, and dropped by :meth:`evict_idle` once no
    frame came for ``idle_s`` (Triton's ``max_sequence_idle_microseconds``, after which Triton
    itself refuses the sequence's next request unless it starts anew).
    """

    def __init__(
        self, factory: Callable[[], PoseTracker], idle_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._factory = factory
        self.idle_s = idle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._trackers: dict[int, tuple[PoseTracker, float]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._trackers)

    def __contains__(self, sequence_id: int) -> bool:
        with self._lock:
            return sequence_id in self._trackers

    def open(self, sequence_id: int) -> PoseTracker:
        """A fresh tracker for a sequence that starts (replacing any earlier state under that ID)."""
        tracker = self._factory()
        with self._lock:
            self._trackers[sequence_id] = (tracker, self._clock())
        return tracker

    def get(self, sequence_id: int) -> PoseTracker:
        with self._lock:
            entry = self._trackers.get(sequence_id)
            if entry is None:
                raise TrackingError(
                    f"sequence {sequence_id} has no tracking state: it ended, was idle for more than "
                    f"{self.idle_s:g} s, or the server restarted; start a new sequence (sequence_start)"
                )
            self._trackers[sequence_id] = (entry[0], self._clock())
            return entry[0]

    def close(self, sequence_id: int) -> None:
        with self._lock:
            self._trackers.pop(sequence_id, None)

    def evict_idle(self) -> list[int]:
        """Drop the state of every sequence idle longer than ``idle_s``; return their IDs."""
        deadline = self._clock() - self.idle_s
        with self._lock:
            stale = [key for key, (_, seen) in self._trackers.items() if seen < deadline]
            for key in stale:
                del self._trackers[key]
        return stale


def idle_seconds(sequence_batching: Mapping[str, Any]) -> float:
    """Triton's idle limit of a sequence-batched model config (as JSON); Triton's default is 1 s."""
    micros = int(sequence_batching.get("max_sequence_idle_microseconds") or 1_000_000)
    return max(micros / 1e6, math.ulp(1.0))
