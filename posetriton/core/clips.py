"""Short videos made from still photos, with each frame's geometry known: for tracking tests, benchmark and demo.

Two kinds of shot:

- :func:`camera_path`: a virtual camera pans and zooms over one photo along key windows; people
  leave the view and come back when the path says so.
- :func:`slide`: people cut from photos walk across a plain background along key positions:
  past each other (the later one in front), or out of the frame and back.

Each :class:`ClipFrame` keeps, per photo shown, the scale and offset that map photo pixels to frame
pixels, so boxes found once on the still photo give every frame's ground truth
(:meth:`ClipFrame.ground_truth`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

SAMPLE_PHOTOS = ("grace_hopper.jpg", "astronaut.webp")
# (x, y, width) of a camera window in photo pixels; its height follows the frame's aspect ratio.
Window = tuple[float, float, float]


@dataclass(frozen=True)
class Placement:
    """Photo ``source`` drawn in the frame: ``frame = photo * scale + offset`` (per axis)."""

    source: int
    scale: tuple[float, float]
    offset: tuple[float, float]
    # The frame rectangle the photo was pasted into (it hides what is behind it); None for a camera view.
    covers: tuple[float, float, float, float] | None = None

    def map_boxes(self, boxes: NDArray[Any]) -> NDArray[Any]:
        """Photo-pixel boxes ``[N, 4]`` (xyxy) in frame pixels."""
        sx, sy = self.scale
        ox, oy = self.offset
        return np.asarray(boxes, np.float64) * [sx, sy, sx, sy] + [ox, oy, ox, oy]


@dataclass(frozen=True)
class ClipFrame:
    rgb: NDArray[np.uint8]
    placements: tuple[Placement, ...]

    def ground_truth(
        self, photo_boxes: Sequence[NDArray[Any]], min_visible: float = 0.6, occluders: bool = True
    ) -> list[tuple[int, int, NDArray[Any]]]:
        """``(source, person, box)`` of each person at least ``min_visible`` in view (and, with ``occluders``,
        not hidden that much behind a photo drawn after theirs); ``photo_boxes[source]`` are the people
        found on the still photo."""
        height, width = self.rgb.shape[:2]
        found = []
        for order, placement in enumerate(self.placements):
            for person, box in enumerate(placement.map_boxes(photo_boxes[placement.source])):
                area = _area(box)
                visible = _clip(box, width, height)
                fraction = _area(visible) / area if area > 0 else 0.0
                if occluders and area > 0:
                    for later in self.placements[order + 1 :]:
                        if later.covers is not None:
                            cover = _clip(np.asarray(later.covers), width, height)
                            fraction -= _area(_intersection(visible, cover)) / area
                if fraction >= min_visible:
                    found.append((placement.source, person, np.asarray(box)))
        return found


def _area(box: NDArray[Any]) -> float:
    return float(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0))


def _clip(box: NDArray[Any], width: int, height: int) -> NDArray[Any]:
    return np.clip(box, [0, 0, 0, 0], [width, height, width, height])


def _intersection(a: NDArray[Any], b: NDArray[Any]) -> NDArray[Any]:
    return np.array([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])


def camera_path(
    photo: NDArray[np.uint8], windows: Sequence[Window], steps: int, size: tuple[int, int] = (640, 480)
) -> list[ClipFrame]:
    """Frames of a camera moving over ``photo`` from window to window, ``steps`` frames per leg.

    Parts of a window outside the photo are filled grey (114), so a window may leave the photo.
    """
    frames = []
    for leg in range(len(windows) - 1):
        for step in range(steps):
            t = step / steps
            x, y, w = (a + (b - a) * t for a, b in zip(windows[leg], windows[leg + 1], strict=True))
            frames.append(_view(photo, x, y, w, size))
    frames.append(_view(photo, *windows[-1], size))
    return frames


def _view(photo: NDArray[np.uint8], x: float, y: float, w: float, size: tuple[int, int]) -> ClipFrame:
    width, height = size
    scale = width / w
    matrix = np.array([[scale, 0, -x * scale], [0, scale, -y * scale]], np.float64)
    rgb = cv2.warpAffine(
        photo, matrix, (width, height), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_CONSTANT, borderValue=(114,) * 3
    )
    return ClipFrame(np.ascontiguousarray(rgb), (Placement(0, (scale, scale), (-x * scale, -y * scale)),))


@dataclass(frozen=True)
class Walker:
    """A person cut from a photo (``crop`` = x1, y1, x2, y2) shown ``height`` px tall with its top at ``top``,
    its left edge moving through ``xs`` (one value per key frame; beyond the frame edges it is out of view)."""

    photo: NDArray[np.uint8]
    crop: tuple[int, int, int, int]
    xs: tuple[float, ...]
    top: int
    height: int


def slide(walkers: Sequence[Walker], steps: int, size: tuple[int, int] = (640, 480)) -> list[ClipFrame]:
    """Walkers pasted on a grey background, moving linearly between key frames (``steps`` frames per leg);
    a later walker is drawn in front of an earlier one."""
    width, height = size
    cuts = [_cut(w.photo, w.crop, w.height) for w in walkers]
    legs = len(walkers[0].xs) - 1
    clip = []
    for i in range(legs * steps + 1):
        leg, t = min(i // steps, legs - 1), (i - min(i // steps, legs - 1) * steps) / steps
        canvas = np.full((height, width, 3), 114, np.uint8)
        placements = []
        for source, (walker, (image, scale)) in enumerate(zip(walkers, cuts, strict=True)):
            left = round(walker.xs[leg] + (walker.xs[leg + 1] - walker.xs[leg]) * t)
            _paste(canvas, image, left, walker.top)
            x1, y1 = walker.crop[:2]
            covers = (float(left), float(walker.top), float(left + image.shape[1]), float(walker.top + image.shape[0]))
            offset = (left - x1 * scale, walker.top - y1 * scale)
            placements.append(Placement(source, (scale, scale), offset, covers))
        clip.append(ClipFrame(canvas, tuple(placements)))
    return clip


def crossing_clip(first: NDArray[np.uint8], second: NDArray[np.uint8], steps: int = 24) -> list[ClipFrame]:
    """Two whole photos of one person each, 640x480: they cross (the second in front) and cross back."""
    return slide(
        [
            Walker(first, (0, 0, first.shape[1], first.shape[0]), (0, 380, 0), 40, 260),
            Walker(second, (0, 0, second.shape[1], second.shape[0]), (380, -20, 380), 170, 300),
        ],
        steps,
    )


def sample_clip(samples: Path) -> list[ClipFrame]:
    """:func:`crossing_clip` of the two sample photos of the repository (``samples/``): 49 frames."""
    first, second = (np.asarray(Image.open(samples / name).convert("RGB")) for name in SAMPLE_PHOTOS)
    return crossing_clip(first, second)


def _paste(canvas: NDArray[np.uint8], image: NDArray[np.uint8], left: int, top: int) -> None:
    """Paste ``image`` with its top-left corner at (left, top), cut at the canvas edges."""
    height, width = canvas.shape[:2]
    x1, y1 = max(left, 0), max(top, 0)
    x2, y2 = min(left + image.shape[1], width), min(top + image.shape[0], height)
    if x2 > x1 and y2 > y1:
        canvas[y1:y2, x1:x2] = image[y1 - top : y2 - top, x1 - left : x2 - left]


def _cut(photo: NDArray[np.uint8], crop: tuple[int, int, int, int], height: int) -> tuple[NDArray[np.uint8], float]:
    x1, y1, x2, y2 = crop
    part = photo[y1:y2, x1:x2]
    scale = height / part.shape[0]
    resized = cv2.resize(part, (max(1, round(part.shape[1] * scale)), height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(resized), scale


@dataclass(frozen=True)
class TrackScore:
    """How well track IDs followed the people of a clip.

    ``switches`` is MOT's IDSW: times a person's matched track ID differs from the one matched before.
    ``ids`` holds each person's matched ID per frame (None: out of view or not matched).
    """

    switches: int
    matched: int  # person-frames matched to a tracked detection
    visible: int  # person-frames in view
    ids: dict[tuple[int, int], list[int | None]]

    @property
    def coverage(self) -> float:
        return self.matched / self.visible if self.visible else 1.0


def score_tracks(
    frames: Sequence[ClipFrame],
    photo_boxes: Sequence[NDArray[Any]],
    track_ids: Sequence[Sequence[int | None]],
    boxes: Sequence[NDArray[Any]],
    min_iou: float = 0.5,
) -> TrackScore:
    """Match each frame's tracked detections (``boxes``, ``track_ids``) to its ground truth by IoU, greedily."""
    from posetriton.server.tracking import box_iou

    ids: dict[tuple[int, int], list[int | None]] = {}
    matched = visible = 0
    for number, (frame, frame_ids, found) in enumerate(zip(frames, track_ids, boxes, strict=True)):
        truth = frame.ground_truth(photo_boxes)
        visible += len(truth)
        assigned: dict[tuple[int, int], int | None] = {}
        if truth and len(found):
            iou = box_iou(np.stack([box for _, _, box in truth]), np.asarray(found, np.float64).reshape(-1, 4))
            while iou.size and iou.max() >= min_iou:
                t, d = np.unravel_index(int(iou.argmax()), iou.shape)
                assigned[truth[t][:2]] = frame_ids[d]
                iou[t, :], iou[:, d] = -1, -1
        matched += sum(1 for value in assigned.values() if value is not None)
        for source, person, _ in truth:
            ids.setdefault((source, person), [None] * number)
        for key, seen in ids.items():
            seen.append(assigned.get(key))
    switches = 0
    for seen in ids.values():
        known = [value for value in seen if value is not None]
        switches += sum(1 for a, b in itertools.pairwise(known) if a != b)
    return TrackScore(switches, matched, visible, ids)


# --------------------------------------------------------------------------------- keypoint ground truth
def noisy_still(
    photo: NDArray[np.uint8], window: Window, frames: int, noise: float = 6.0, seed: int = 0,
    size: tuple[int, int] = (640, 480),
) -> list[ClipFrame]:  # fmt: skip
    """A still camera on ``window`` whose every frame has its own sensor noise (Gaussian, ``noise`` grey levels):
    every true keypoint stands still, so whatever the detected keypoints move is the detector's jitter."""
    rng = np.random.default_rng(seed)
    (view,) = camera_path(photo, [window], 1, size)
    clip = []
    for _ in range(frames):
        noisy = np.clip(view.rgb + rng.normal(0.0, noise, view.rgb.shape), 0, 255).astype(np.uint8)
        clip.append(ClipFrame(noisy, view.placements))
    return clip


def to_photo(placement: Placement, points: NDArray[Any]) -> NDArray[Any]:
    """Frame-pixel points ``[..., 2]`` in the photo's pixels (the inverse of the placement)."""
    return (np.asarray(points, np.float64) - placement.offset) / placement.scale


def to_frame(placement: Placement, points: NDArray[Any]) -> NDArray[Any]:
    """Photo-pixel points ``[..., 2]`` in the frame's pixels."""
    return np.asarray(points, np.float64) * placement.scale + placement.offset


def occluder(width: int, height: int, colour: tuple[int, int, int] = (70, 80, 60)) -> NDArray[np.uint8]:
    """A plain block (a pillar, a wall) to slide in front of people: a :class:`Walker` photo."""
    return np.full((height, width, 3), colour, np.uint8)


@dataclass(frozen=True)
class KeypointScore:
    """How close a clip's keypoints (one variant: raw or smoothed) stay to the ground truth, in frame pixels.

    ``jitter_px``: mean frame-to-frame movement of a keypoint, in photo coordinates (where the truth
    stands still) scaled to frame pixels; ``error_px``: mean distance to the true keypoint; ``oks``:
    mean COCO OKS against the truth; ``along_px``: mean signed error along ``direction`` (a pan's
    motion in the frame), whose difference between two variants is the lag one adds.
    """

    jitter_px: float
    error_px: float
    oks: float
    along_px: float
    matched: int  # person-frames matched to a detection


def score_keypoints(
    frames: Sequence[ClipFrame],
    truth_boxes: NDArray[Any],
    truth_keypoints: NDArray[Any],
    boxes: Sequence[NDArray[Any]],
    keypoints: Sequence[NDArray[Any]],
    direction: tuple[float, float] = (0.0, 0.0),
    min_conf: float = 0.5,
) -> KeypointScore:
    """Score one variant's keypoints (``keypoints[t] [N, K, 3]`` of the detections ``boxes[t] [N, 4]``) against
    the photo's true people (``truth_boxes [P, 4]``, ``truth_keypoints [P, K, 3]``, photo pixels) on a clip of
    one photo (:func:`camera_path`, :func:`noisy_still`). A keypoint counts where the truth and the
    detection both are confident (``min_conf``); a person's detection is the one with the best box IoU."""
    from posetriton.server.tracking import COCO_SIGMAS, box_iou

    k = truth_keypoints.shape[1]
    sigmas = COCO_SIGMAS if k == len(COCO_SIGMAS) else np.full(k, COCO_SIGMAS.mean())
    unit = np.asarray(direction, np.float64)
    unit = unit / np.linalg.norm(unit) if np.linalg.norm(unit) > 0 else unit
    steps: list[float] = []
    errors: list[float] = []
    along: list[float] = []
    oks: list[float] = []
    previous: dict[int, NDArray[Any]] = {}
    for frame, found, points in zip(frames, boxes, keypoints, strict=True):
        (placement,) = frame.placements
        current: dict[int, NDArray[Any]] = {}
        if len(found):
            iou = box_iou(placement.map_boxes(truth_boxes), np.asarray(found, np.float64).reshape(-1, 4))
            for person in range(len(truth_boxes)):
                best = int(iou[person].argmax())
                if iou[person, best] < 0.5:
                    continue
                seen = (truth_keypoints[person, :, 2] >= min_conf) & (points[best][:, 2] >= min_conf)
                true_xy = to_frame(placement, truth_keypoints[person, :, :2])
                offset = points[best][:, :2] - true_xy
                errors += np.linalg.norm(offset[seen], axis=1).tolist()
                along += (offset[seen] @ unit).tolist()
                box = placement.map_boxes(truth_boxes[person : person + 1])[0]
                area = max((box[2] - box[0]) * (box[3] - box[1]), 1.0)
                similarity = np.exp(-np.sum(offset**2, axis=1) / (2 * area * (2 * sigmas) ** 2))
                if seen.any():
                    oks.append(float(similarity[seen].mean()))
                photo_xy = np.where(seen[:, None], to_photo(placement, points[best][:, :2]), np.nan)
                current[person] = photo_xy
                if person in previous:
                    moved = np.linalg.norm(photo_xy - previous[person], axis=1) * placement.scale[0]
                    steps += moved[np.isfinite(moved)].tolist()
        previous = current
    mean = lambda values: float(np.mean(values)) if values else math.nan  # noqa: E731
    return KeypointScore(mean(steps), mean(errors), mean(oks), mean(along), len(oks))
