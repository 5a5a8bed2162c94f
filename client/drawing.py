"""Draw poses onto images, for people to look at results.

Coordinates from the server refer to the image after its EXIF orientation is applied, so the
image is decoded here exactly as the server decodes it (``posetriton.core.images.decode_image``);
drawing on the raw, unrotated pixels would misplace every pose on phone photos.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from posetriton.core.images import decode_image

from .results import Keypoint, Pose
from .tracking_results import TrackedPose

# Drawing happens after the server accepted the image, so this only guards against absurd files.
DRAW_MAX_PIXELS = 400_000_000

Color = tuple[int, int, int]
BOX_COLOR: Color = (0, 160, 255)
LIMB_COLOR: Color = (255, 255, 255)
LABEL_TEXT_COLOR: Color = (255, 255, 255)
# Keypoint colour runs red -> yellow -> green as confidence rises from the threshold to 1.
LOW_CONF_COLOR: Color = (230, 40, 40)
MID_CONF_COLOR: Color = (240, 210, 0)
HIGH_CONF_COLOR: Color = (40, 200, 60)
# Coordinates are clamped to this range before OpenCV (which wants int32) sees them.
_COORD_LIMIT = 1 << 20


@dataclass(frozen=True)
class _Style:
    """Line widths that stay visible on thumbnails and 4K photos alike."""

    thickness: int
    radius: int
    font_scale: float

    @classmethod
    def for_image(cls, height: int, width: int) -> _Style:
        thickness = max(1, round(min(height, width) / 320))
        return cls(thickness=thickness, radius=thickness + 2, font_scale=max(0.4, thickness / 3))


def load_image_rgb(source: bytes | str | PathLike[str], max_pixels: int = DRAW_MAX_PIXELS) -> NDArray[Any]:
    """Decode to upright ``[H, W, 3]`` uint8 RGB, as the server does. Raises OSError or ValueError."""
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
    return decode_image(data, max_pixels)


def save_image(path: str | PathLike[str], image_rgb: NDArray[Any]) -> None:
    """Write an RGB array; the format follows the file extension."""
    Image.fromarray(image_rgb).save(path, quality=92)


def keypoint_color(conf: float, threshold: float) -> Color:
    """Colour of a keypoint of confidence ``conf``: red at the threshold, yellow halfway, green at 1."""
    span = 1.0 - threshold
    t = 1.0 if span <= 0 else min(1.0, max(0.0, (conf - threshold) / span))
    low, high = (LOW_CONF_COLOR, MID_CONF_COLOR) if t < 0.5 else (MID_CONF_COLOR, HIGH_CONF_COLOR)
    u = t * 2 if t < 0.5 else t * 2 - 1
    r, g, b = (round(a + (c - a) * u) for a, c in zip(low, high, strict=True))
    return (r, g, b)


def draw_poses(
    image_rgb: NDArray[Any],
    poses: Iterable[Pose],
    skeleton: Sequence[tuple[int, int]],
    kpt_threshold: float = 0.5,
) -> NDArray[Any]:
    """A copy of ``image_rgb`` with each pose's box, score, skeleton and keypoints drawn on it.

    Keypoints under ``kpt_threshold`` are left out, and so are the limbs that touch them: the
    network still places invisible keypoints somewhere, and drawing them only adds noise.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got {image_rgb.dtype} {list(image_rgb.shape)}")
    canvas = np.ascontiguousarray(image_rgb).copy()
    style = _Style.for_image(canvas.shape[0], canvas.shape[1])
    for pose in poses:
        _draw_box(canvas, pose, style)
        visible = [_visible_point(point, kpt_threshold) for point in pose.keypoints]
        _draw_limbs(canvas, visible, skeleton, style)
        _draw_keypoints(canvas, pose.keypoints, visible, kpt_threshold, style)
    return canvas


def _pixel(x: float, y: float) -> tuple[int, int]:
    return (
        int(min(_COORD_LIMIT, max(-_COORD_LIMIT, round(x)))),
        int(min(_COORD_LIMIT, max(-_COORD_LIMIT, round(y)))),
    )


def _visible_point(point: Keypoint, threshold: float) -> tuple[int, int] | None:
    x, y, conf = point
    if not (np.isfinite(x) and np.isfinite(y) and conf >= threshold):
        return None
    return _pixel(x, y)


def _draw_box(canvas: NDArray[Any], pose: Pose, style: _Style) -> None:
    x1, y1, x2, y2 = pose.box
    if not all(np.isfinite(v) for v in pose.box):
        return
    top_left, bottom_right = _pixel(x1, y1), _pixel(x2, y2)
    cv2.rectangle(canvas, top_left, bottom_right, BOX_COLOR, style.thickness, cv2.LINE_AA)
    _draw_label(canvas, f"{pose.score:.2f}", top_left, style)


def _draw_label(canvas: NDArray[Any], text: str, anchor: tuple[int, int], style: _Style) -> None:
    """Score on a filled tag above the box's top-left corner (inside the box when there is no room above)."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    text_thickness = max(1, style.thickness // 2)
    (text_w, text_h), baseline = cv2.getTextSize(text, font, style.font_scale, text_thickness)
    pad = style.thickness
    x = max(0, anchor[0])
    top = anchor[1] - text_h - baseline - 2 * pad
    if top < 0:
        top = max(0, anchor[1])
    bottom = top + text_h + baseline + 2 * pad
    cv2.rectangle(canvas, (x, top), (x + text_w + 2 * pad, bottom), BOX_COLOR, cv2.FILLED)
    origin = (x + pad, bottom - baseline - pad)
    cv2.putText(canvas, text, origin, font, style.font_scale, LABEL_TEXT_COLOR, text_thickness, cv2.LINE_AA)


def _draw_limbs(
    canvas: NDArray[Any],
    visible: Sequence[tuple[int, int] | None],
    skeleton: Sequence[tuple[int, int]],
    style: _Style,
) -> None:
    for i, j in skeleton:
        if not (0 <= i < len(visible) and 0 <= j < len(visible)):
            continue
        start, end = visible[i], visible[j]
        if start is not None and end is not None:
            cv2.line(canvas, start, end, LIMB_COLOR, style.thickness, cv2.LINE_AA)


def _draw_keypoints(
    canvas: NDArray[Any],
    keypoints: Sequence[Keypoint],
    visible: Sequence[tuple[int, int] | None],
    threshold: float,
    style: _Style,
) -> None:
    for point, center in zip(keypoints, visible, strict=True):
        if center is not None:
            cv2.circle(canvas, center, style.radius, keypoint_color(point[2], threshold), cv2.FILLED, cv2.LINE_AA)


class VideoSink:
    """An annotated video written with OpenCV (``mp4v`` in an .mp4 container); frames are RGB arrays."""

    def __init__(self, path: str | PathLike[str], fps: float, width: int, height: int) -> None:
        self.path = Path(path)
        self.size = (width, height)
        fourcc = cv2.VideoWriter.fourcc(*"mp4v")
        self._writer = cv2.VideoWriter(str(self.path), fourcc, fps if fps > 0 else 25.0, self.size)
        if not self._writer.isOpened():
            raise OSError(f"OpenCV cannot write a video to {self.path}")
        self.frames = 0

    def write(self, image_rgb: NDArray[Any]) -> None:
        if (image_rgb.shape[1], image_rgb.shape[0]) != self.size:
            image_rgb = cv2.resize(image_rgb, self.size)
        self._writer.write(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        self._writer.release()

    def __enter__(self) -> VideoSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track_color(track_id: int) -> tuple[int, int, int]:
    """A colour per track ID, far apart for neighbouring IDs (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((track_id * 0.618033988749895) % 1.0, 0.85, 1.0)
    return (round(r * 255), round(g * 255), round(b * 255))


def draw_tracks(
    image_rgb: NDArray[Any], poses: Sequence[TrackedPose], skeleton: Sequence[tuple[int, int]], kpt_threshold: float
) -> NDArray[Any]:
    """The poses drawn as :func:`draw_poses` draws them, each box then redrawn in its
    track's colour with the track ID on a tag (untracked poses keep the default colour)."""
    canvas = draw_poses(image_rgb, poses, skeleton, kpt_threshold)
    style = _Style.for_image(canvas.shape[0], canvas.shape[1])
    font, text_thickness = cv2.FONT_HERSHEY_SIMPLEX, max(1, style.thickness // 2)
    for pose in poses:
        if pose.track_id is None or not all(np.isfinite(v) for v in pose.box):
            continue
        color = track_color(pose.track_id)
        x1, y1, x2, y2 = (round(v) for v in pose.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, style.thickness + 1, cv2.LINE_AA)
        text = f"ID {pose.track_id}"
        (width, height), baseline = cv2.getTextSize(text, font, style.font_scale, text_thickness)
        pad = style.thickness
        top = min(max(0, y2 - height - baseline - 2 * pad), canvas.shape[0] - 1)
        cv2.rectangle(canvas, (x1, top), (x1 + width + 2 * pad, y2), color, cv2.FILLED)
        origin = (x1 + pad, y2 - baseline - pad)
        cv2.putText(canvas, text, origin, font, style.font_scale, (0, 0, 0), text_thickness, cv2.LINE_AA)
    return canvas
