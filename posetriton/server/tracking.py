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
(``posetriton.server.steps.track``), the tests and the benchmark share this code; only :class:`PoseTracker`
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

from posetriton.core.contract import (  # noqa: F401  (re-exported: the tracking names live in the contract)
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
    # Re-identification of a person who was hidden or out of view (see Reidentifier): a lost track is kept this
    # many frames after it would have died, for a new track that reappears where it could be.
    reid_frames: int = 30
    # ... within this many person heights of where it was last seen or where the motion model puts it now,
    reid_max_offset: float = 1.5
    # ... with a box height within this factor of its own, and a pose shape this close (RMS, see pose_shape).
    reid_max_scale: float = 1.5
    reid_max_shape: float = 0.25
    # ... and clothes of the same colours (Hellinger distance of box_colours; the frame's pixels are the tracker's).
    reid_max_colour: float = 0.45
    # ... waiting up to this many frames for a returning person to be seen as fully as before.
    reid_wait: int = 30

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

        if (
            self.reid_frames < 0 or self.reid_wait < 0 or self.reid_max_offset <= 0 or self.reid_max_scale < 1
            or self.reid_max_shape <= 0 or not 0 < self.reid_max_colour <= 1
        ):  # fmt: skip
            raise TrackingError(
                "track.reid_frames and reid_wait must be >= 0, reid_max_offset > 0, reid_max_scale >= 1, "
                f"reid_max_shape > 0 and reid_max_colour in (0, 1], got {self.reid_frames}, {self.reid_wait}, "
                f"{self.reid_max_offset}, {self.reid_max_scale}, {self.reid_max_shape}, {self.reid_max_colour}"
            )

    def to_parameters(self) -> dict[str, str]:
        return _to_prefixed(self, "track.")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> TrackerSpec:
        return cls(**_from_prefixed(cls, parameters, "track."))


def _to_prefixed(settings: Any, prefix: str) -> dict[str, str]:
    """A settings dataclass as model-config parameters ``PREFIXNAME``."""
    return {f"{prefix}{f.name}": str(getattr(settings, f.name)) for f in fields(settings)}


def _from_prefixed(cls: Any, parameters: Mapping[str, str], prefix: str) -> dict[str, Any]:
    """The fields of a settings dataclass found among model-config parameters ``PREFIXNAME`` (int or float)."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        raw = parameters.get(f"{prefix}{f.name}")
        if raw is not None:
            values[f.name] = int(raw) if f.type in ("int", int) else float(raw)
    return values


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


# Bins per RGB channel of the appearance descriptor (8 x 8 x 8 = 512 colours).
COLOUR_BINS = 8


def box_colours(canvas: NDArray[np.uint8], letterbox: NDArray[Any], boxes: NDArray[Any]) -> NDArray[Any]:
    """A colour descriptor per person: the normalised RGB histogram (``COLOUR_BINS`` per channel) of the inner
    part of each box (``[N, 4]``, original-image pixels), read from the letterboxed ``canvas [S, S, 3]`` that
    the network saw (``letterbox``: scale_x, scale_y, pad_x, pad_y, ...) -> ``[N, COLOUR_BINS**3]``.

    The inner part (the box's middle 60 % across, 20-90 % down) holds more clothes than background."""
    scale_x, scale_y, pad_x, pad_y = (float(v) for v in letterbox[:4])
    size = canvas.shape[0]
    out = np.zeros((len(boxes), COLOUR_BINS**3))
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float64)):
        w, h = x2 - x1, y2 - y1
        left, right = (x1 + 0.2 * w) * scale_x + pad_x, (x2 - 0.2 * w) * scale_x + pad_x
        top, bottom = (y1 + 0.2 * h) * scale_y + pad_y, (y2 - 0.1 * h) * scale_y + pad_y
        c1, c2 = int(np.clip(left, 0, size)), int(np.clip(right, 0, size))
        r1, r2 = int(np.clip(top, 0, size)), int(np.clip(bottom, 0, size))
        patch = canvas[r1:r2, c1:c2]
        if patch.size == 0:
            continue
        step = max(1, int(max(patch.shape[:2]) // 48))  # about 48 x 48 samples: the colours, not the detail
        bins = (patch[::step, ::step].reshape(-1, 3).astype(np.int64) * COLOUR_BINS) // 256
        index = (bins[:, 0] * COLOUR_BINS + bins[:, 1]) * COLOUR_BINS + bins[:, 2]
        histogram = np.bincount(index, minlength=COLOUR_BINS**3).astype(np.float64)
        out[i] = histogram / histogram.sum()
    return out


def colour_distance(a: NDArray[Any] | None, b: NDArray[Any] | None) -> float:
    """Hellinger distance of two colour descriptors (0 same, 1 disjoint); 0 when either is unknown."""
    if a is None or b is None or not a.any() or not b.any():
        return 0.0
    return float(np.sqrt(max(0.0, 1.0 - np.sum(np.sqrt(a * b)))))


@dataclass
class _Sighting:
    """What re-identification keeps of a track: its last box and velocity, and its best recent pose."""

    box: NDArray[Any]
    velocity: NDArray[Any]  # of the box centre, pixels per frame (Kalman)
    frame: int
    pose: NDArray[Any]  # [K, 2] of the latest well-seen detection
    visible: NDArray[Any]  # [K] bool
    most_visible: int  # the track's largest count of visible keypoints so far
    aspect: float  # width / height of the box of ``pose``: a partly hidden person's box is narrower or shorter
    colours: NDArray[Any] | None  # box_colours of that detection (None: the frame's pixels were not given)
    widest: float  # the track's widest box aspect so far (a pose is kept only from a box about that wide)


# Lost tracks a stream remembers for re-identification, the most recent first: each new track is compared with
# every one of them, so this bounds a frame's cost (and a stream's memory: a sighting holds a colour histogram).
REID_MAX_LOST = 64


class Reidentifier:
    """Track IDs that survive occlusion: a new track that is a lost one back gets the lost track's ID.

    A track is *lost* once a frame has no detection for it; it is remembered for ``max_missed_frames
    + reid_frames`` frames. A new track that could be a lost one back, i.e. it appears within
    ``reid_max_offset`` person heights of where that person was last seen or of where their last
    velocity carries them (clamped into the frame: who left the view comes back where they left),
    with a box height within ``reid_max_scale`` of theirs, is held without an ID (:data:`UNTRACKED`)
    for up to ``reid_wait`` frames, until it shows as many keypoints and as wide a box as that
    person's best recent pose did (or a clear match sooner). Then the pose shapes (:func:`shape_distance`,
    within ``reid_max_shape``) and the colours of the box (:func:`colour_distance`, within
    ``reid_max_colour``) decide: it takes the lost ID, or (someone else appearing there) keeps its own.
    Keypoint geometry alone does not tell two people apart (measured: two portraits' face-and-shoulder
    shapes differ by 0.10-0.16, less than one person half hidden from herself); colours do (0.58 against
    at most 0.32 for the same person half hidden, with 8 bins; 4 bins did not separate them).
    """

    def __init__(self, spec: TrackerSpec) -> None:
        self.spec = spec
        self.frame_size: tuple[float, float] | None = None
        self._seen: dict[int, _Sighting] = {}  # by output ID
        self._alias: dict[int, int] = {}  # Norfair ID -> output ID
        self._pending: dict[int, int] = {}  # Norfair ID of a held new track -> frames held
        self._owner: dict[int, int] = {}  # output ID -> the Norfair track that carries it now

    def output_id(self, norfair_id: int) -> int:
        """The ID a Norfair track is reported with (:data:`UNTRACKED` while held or superseded)."""
        output = self._alias.get(norfair_id)
        if output is None or self._owner.get(output, norfair_id) != norfair_id:
            return UNTRACKED
        return output

    @property
    def remembered(self) -> set[int]:
        """Output IDs of the tracks seen in view or lost but still remembered."""
        return set(self._seen)

    def assign(
        self, tracks: Sequence[tuple[int, Any]], frame: int, colours: NDArray[Any] | None = None
    ) -> dict[int, int]:
        """``{row: output ID}`` for this frame's tracked detections (``(row, Norfair TrackedObject)`` pairs);
        ``colours``: :func:`box_colours` of the frame's detections, by row."""
        spec = self.spec
        forget = frame - spec.max_missed_frames - spec.reid_frames
        self._seen = {i: s for i, s in self._seen.items() if s.frame >= forget}
        here = {o.id for _, o in tracks}
        self._alias = {n: i for n, i in self._alias.items() if i in self._seen or n in here}
        self._owner = {i: n for i, n in self._owner.items() if i in self._seen}
        self._pending = {n: held for n, held in self._pending.items() if n in here}  # a held track that vanished
        present = {self.output_id(o.id) for _, o in tracks}
        lost = {i: s for i, s in self._seen.items() if s.frame < frame and i not in present}
        if len(lost) > REID_MAX_LOST:  # a crowd (or a hostile client) losing many at once: keep the latest
            kept = sorted(lost, key=lambda i: lost[i].frame)[-REID_MAX_LOST:]
            for forgotten in set(lost) - set(kept):
                del self._seen[forgotten]
            lost = {i: lost[i] for i in kept}
        out: dict[int, int] = {}
        for row, obj in tracks:
            box, keypoints = obj.last_detection.points[:2].reshape(4), obj.last_detection.points[2:]
            visible = obj.last_detection.scores[2:] >= spec.keypoint_threshold
            colour = None if colours is None else colours[row]
            if obj.id not in self._alias:
                decision = self._decide(obj.id, box, keypoints, visible, colour, lost, frame)
                if decision is None:
                    continue  # held: no ID yet
                self._alias[obj.id] = decision
                self._owner[decision] = obj.id  # the lost track, should it match again, no longer reports it
                lost.pop(decision, None)
            output = self.output_id(obj.id)
            if output != UNTRACKED:
                self._remember(output, box, keypoints, visible, colour, obj, frame)
                out[row] = output
        return out

    def _decide(
        self, new_id: int, box: NDArray[Any], keypoints: NDArray[Any], visible: NDArray[Any],
        colours: NDArray[Any] | None, lost: dict[int, _Sighting], frame: int,
    ) -> int | None:  # fmt: skip
        """The ID a new track gets: a lost one's, its own, or None while it is held."""
        candidates = [(i, s) for i, s in lost.items() if self._near(box, s, frame)]
        if not candidates:
            self._pending.pop(new_id, None)
            return new_id
        scored = [
            (
                max(
                    shape_distance(keypoints, visible, s.pose, s.visible) / self.spec.reid_max_shape,
                    colour_distance(colours, s.colours) / self.spec.reid_max_colour,
                ),
                i,
            )
            for i, s in candidates
        ]
        distance, best = min(scored)  # in units of the limits: 1 at the limit
        shared = int((visible & lost[best].visible).sum())
        if distance <= 0.5 and shared >= 6:
            decided = best  # clearly them, even if not fully back in view yet
        else:
            held = self._pending.get(new_id, 0)
            unlike = any(visible.sum() < 0.8 * c.most_visible or _aspect(box) < 0.85 * c.aspect for _, c in candidates)
            if held < self.spec.reid_wait and unlike:  # not fully back in view yet: wait
                self._pending[new_id] = held + 1
                return None
            decided = best if distance <= 1.0 else new_id
        self._pending.pop(new_id, None)
        return decided

    def _near(self, box: NDArray[Any], seen: _Sighting, frame: int) -> bool:
        height = max(seen.box[3] - seen.box[1], 1.0)
        scale = max(box[3] - box[1], 1.0) / height
        if not 1 / self.spec.reid_max_scale <= scale <= self.spec.reid_max_scale:
            return False
        centre, last = (box[:2] + box[2:]) / 2, (seen.box[:2] + seen.box[2:]) / 2
        predicted = last + seen.velocity * (frame - seen.frame)
        if self.frame_size is not None:
            predicted = np.clip(predicted, 0.0, self.frame_size)
        offset = min(np.linalg.norm(centre - last), np.linalg.norm(centre - predicted)) / height
        return bool(offset <= self.spec.reid_max_offset)

    def _remember(
        self, output: int, box: NDArray[Any], keypoints: NDArray[Any], visible: NDArray[Any],
        colours: NDArray[Any] | None, obj: Any, frame: int,
    ) -> None:  # fmt: skip
        velocity = obj.estimate_velocity[:2].mean(axis=0)
        before = self._seen.get(output)
        most = max(int(visible.sum()), before.most_visible if before else 0)
        aspect = _aspect(box)
        widest = max(aspect, before.widest if before else 0.0)
        if before is not None and (visible.sum() < 0.8 * most or aspect < 0.85 * widest):
            # partly hidden now: keep the better pose
            kept = (before.pose, before.visible, most, before.aspect, before.colours, widest)
            self._seen[output] = _Sighting(box, velocity, frame, *kept)
        else:
            seen = (keypoints.copy(), visible, most, aspect, colours, widest)
            self._seen[output] = _Sighting(box, velocity, frame, *seen)


def _aspect(box: NDArray[Any]) -> float:
    return float(max(box[2] - box[0], 1.0) / max(box[3] - box[1], 1.0))


# ------------------------------------------------------------------------------------------------ smoothing
DEFAULT_SMOOTHING = Smoothing(min_cutoff=0.02, beta=20.0)  # chosen in docs/benchmarks.md (keypoint smoothing)
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
        return self.current(keypoints)

    def current(self, keypoints: NDArray[Any]) -> NDArray[Any]:
        """``keypoints`` ``[K, 3]`` with the filtered position of every keypoint the filter has seen (no update)."""
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
        )
        self._distance = PoseDistance(spec, sigmas)
        self._tracker.distance_function = self._distance
        # Norfair's own re-identification offers a new track to the lost ones in its first frame only, when a
        # person coming back into view shows a sliver of themselves: ours waits until they are seen.
        self._reid = Reidentifier(spec)
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
        colours: NDArray[Any] | None = None,
    ) -> tuple[NDArray[Any], NDArray[Any]]:
        """:meth:`update`, and each pose's keypoints smoothed over its track (``[N, K, 3]``, FP32; the raw ones
        for a pose without a track ID). A late frame (one that overtook another inside the server: with several
        frames in flight, the steps before this one may finish them out of order) changes no state and gets its
        tracks' latest filtered keypoints, which is where a video expects them, rather than its raw ones.
        ``frame_size`` (width, height) lets re-identification place a person who left the view at its edge;
        ``colours`` (:func:`box_colours` of the detections) let it tell a returning person from someone else."""
        self._reid.frame_size = frame_size
        late = self.last_frame is not None and frame_index <= self.last_frame
        ids = self.update(boxes, scores, keypoints, frame_index, colours)
        if late:
            latest = keypoints.astype(np.float32)
            for row, track_id in enumerate(ids.tolist()):
                if track_id in self._smoothers:
                    latest[row] = self._smoothers[track_id].current(keypoints[row])
            return ids, latest
        for gone in set(self._smoothers) - self._reid.remembered:
            del self._smoothers[gone]  # a track that died: a later one never gets its filter state
        chosen = smoothing.or_defaults(DEFAULT_SMOOTHING).check()
        smoothed = smooth_tracks(
            self._smoothers, ids, boxes, keypoints, frame_index, chosen, self.spec.keypoint_threshold
        )
        return ids, smoothed

    def update(
        self,
        boxes: NDArray[Any],
        scores: NDArray[Any],
        keypoints: NDArray[Any],
        frame_index: int,
        colours: NDArray[Any] | None = None,
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
        tracks = []
        for tracked in self._tracker.update(detections or None, period=period):
            row = position.get(id(tracked.last_detection))
            if row is not None and tracked.id is not None:
                tracks.append((row, tracked))
        for row, track_id in self._reid.assign(tracks, frame_index, colours).items():
            ids[row] = track_id
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
                ids[row] = self._reid.output_id(tracks[column].id)
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

    def start(self, sequence_id: int, tracker: PoseTracker, max_sequences: int) -> None:
        """Keep ``tracker`` as the state of a sequence that starts. A START on a correlation ID that is still
        open is refused (it would silently take over that stream's tracks), and so is a stream over the cap."""
        with self._lock:
            if sequence_id in self._trackers:
                raise TrackingError(
                    f"sequence {sequence_id} is already open: a START on a live correlation ID is refused; end it "
                    "first (sequence_end) or use a new random ID"
                )
            if len(self._trackers) >= max_sequences:
                raise TrackerFull(
                    f"the tracker holds {len(self._trackers)} open streams, its limit; retry once one ends or idles"
                )
            self._trackers[sequence_id] = (tracker, self._clock())

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


# ------------------------------------------------------------------------------------ public-endpoint limits
# The tracker step is callable directly by any client: these keep one request's and one stream's cost bounded
# and a stream's state its own (docs/reliability.md, sequences).


class TrackerFull(TrackingError):
    """Every stream slot of the tracker instance is taken: a new sequence is refused until one ends or idles."""


@dataclass(frozen=True)
class StreamLimits:
    """Caps of one tracker instance; they travel as ``limit.NAME`` parameters of the tracker step's config."""

    # Detection rows a frame may carry: what the postprocess step can produce (the family's max_det_limit).
    max_rows: int = 1000
    # Poses tracked per frame, highest scores first (the postprocess rows are score-ordered); the rest of a
    # frame's poses come back UNTRACKED. The family's max_det.
    max_tracked: int = 300
    # Live tracks per stream (Norfair's tracked and initializing objects); the weakest go first.
    max_tracks: int = 600
    # Open streams per tracker instance.
    max_sequences: int = 1024

    def __post_init__(self) -> None:
        if min(self.max_rows, self.max_tracked, self.max_tracks, self.max_sequences) < 1:
            raise TrackingError(f"stream limits must be positive, got {self}")
        if self.max_tracks < self.max_tracked:
            raise TrackingError(f"limit.max_tracks ({self.max_tracks}) must be at least limit.max_tracked")

    def to_parameters(self) -> dict[str, str]:
        return _to_prefixed(self, "limit.")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> StreamLimits:
        return cls(**_from_prefixed(cls, parameters, "limit."))


def cap_live_tracks(tracker: PoseTracker, max_tracks: int) -> int:
    """Drop a stream's weakest tracks (lowest Norfair hit counter, then the youngest) beyond ``max_tracks``,
    so the next frame's distance matrix stays bounded. Returns how many were dropped."""
    objects = tracker._tracker.tracked_objects
    excess = len(objects) - max_tracks
    if excess <= 0:
        return 0
    ranked = sorted(range(len(objects)), key=lambda i: (objects[i].hit_counter, -i))
    dropped = set(ranked[:excess])
    tracker._tracker.tracked_objects = [o for i, o in enumerate(objects) if i not in dropped]
    return excess
