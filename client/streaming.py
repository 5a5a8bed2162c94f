"""Frames to stream through the server: the images of a directory, or the frames of a video.

Video frames are decoded client-side with OpenCV and sent as JPEG (quality 95): a 1080p frame
is ~0.3 MB instead of 6 MB of raw pixels. ``PoseClient.stream`` / ``AsyncPoseClient.stream``
send them with a bounded number of requests in flight and yield the results in order.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .inputs import JPEG_QUALITY, ImageInput
from .results import ImageResult

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})


@dataclass(frozen=True)
class Frame:
    """One image to send: ``image`` is what travels (a path, bytes, an array...), ``name`` what results report.

    ``rgb`` holds the decoded ``[H, W, 3]`` RGB pixels of a video frame when they were kept
    (``video_frames(..., keep_rgb=True)``), e.g. to draw on them.
    """

    image: ImageInput
    name: str
    index: int
    rgb: NDArray[np.uint8] | None = None


@dataclass(frozen=True)
class StreamItem:
    """A frame and its result (:class:`ImagePoses`, or :class:`FailedImage` when the server refused it)."""

    frame: Frame
    result: ImageResult


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    width: int
    height: int
    frame_count: int  # as the container states it; 0 when unknown


def is_video(path: str | PathLike[str]) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def directory_images(directory: str | PathLike[str]) -> list[Path]:
    """The image files directly in ``directory`` (by extension), sorted by name."""
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def video_info(path: str | PathLike[str]) -> VideoInfo:
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise ValueError(f"{path}: OpenCV cannot open this video")
        return VideoInfo(
            fps=float(capture.get(cv2.CAP_PROP_FPS)) or 25.0,
            width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            frame_count=max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT))),
        )
    finally:
        capture.release()


def video_frames(
    path: str | PathLike[str],
    *,
    keep_rgb: bool = False,
    stride: int = 1,
    max_frames: int | None = None,
    jpeg_quality: int = JPEG_QUALITY,
) -> Iterator[Frame]:
    """Decode a video with OpenCV and yield every ``stride``-th frame as JPEG bytes, named ``PATH#INDEX``.

    Raises ValueError when OpenCV cannot open the file. Decoding is lazy: a frame is read when
    the consumer asks for it, so memory stays bounded by what is in flight.
    """
    import cv2

    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise ValueError(f"{path}: OpenCV cannot open this video")
    try:
        index = yielded = 0
        while max_frames is None or yielded < max_frames:
            ok, bgr = capture.read()
            if not ok:
                break
            if index % stride == 0:
                encoded_ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
                if not encoded_ok:
                    raise ValueError(f"{path}: frame {index} could not be encoded as JPEG")
                rgb = np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.uint8) if keep_rgb else None
                yield Frame(image=buffer.tobytes(), name=f"{path}#{index}", index=index, rgb=rgb)
                yielded += 1
            index += 1
    finally:
        capture.release()


def frames_from(path: str | PathLike[str], *, keep_rgb: bool = False) -> Iterator[Frame]:
    """A directory's images (sent as the files are), a video's frames, or one image file."""
    source = Path(path)
    if source.is_dir():
        for index, image in enumerate(directory_images(source)):
            yield Frame(image=image, name=str(image), index=index)
    elif is_video(source):
        yield from video_frames(source, keep_rgb=keep_rgb)
    else:
        yield Frame(image=source, name=str(source), index=0)


def as_frames(images: Iterable[Frame | ImageInput]) -> Iterator[Frame]:
    """Wrap plain inputs as frames (named like :func:`prepare_image` names them); frames pass through."""
    for index, image in enumerate(images):
        if isinstance(image, Frame):
            yield image
        elif isinstance(image, (str, PathLike)):
            yield Frame(image=image, name=str(Path(image)), index=index)
        else:
            yield Frame(image=image, name=f"<image {index}>", index=index)


def progress_bar(enabled: bool, total: int | None, description: str) -> Any:
    """A tqdm bar on stderr, or None when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # optional: the stream works the same without it
        return None
    return tqdm(total=total, desc=description, unit="img", file=sys.stderr, dynamic_ncols=True)
