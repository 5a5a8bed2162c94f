"""Frames of a video to track: a camera or stream URL (live), or a video file, each stamped with its time."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from .streaming import video_frames, video_info
from .tracking_results import TimedFrame


def live_frames(source: int | str, *, keep_rgb: bool = True) -> Iterator[TimedFrame]:
    """Frames of a camera (index) or a stream URL (RTSP, HTTP), as RGB arrays stamped with their capture time.

    Frames are JPEG-encoded only when sent, so the ones a busy server skips cost no encoding.
    """
    import cv2

    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        capture.release()
        raise ValueError(f"{source}: OpenCV cannot open this camera or stream")
    started = time.monotonic()
    try:
        index = 0
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            rgb = np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.uint8)
            yield TimedFrame(
                image=rgb, name=f"{source}#{index}", index=index, rgb=rgb if keep_rgb else None,
                timestamp=time.monotonic() - started,
            )  # fmt: skip
            index += 1
    finally:
        capture.release()


def video_file_frames(path: str, *, keep_rgb: bool = False) -> Iterator[TimedFrame]:
    """Every frame of a video file, stamped with its time in the video (index / fps)."""
    fps = video_info(path).fps
    for frame in video_frames(path, keep_rgb=keep_rgb):
        yield TimedFrame(frame.image, frame.name, frame.index, frame.rgb, timestamp=frame.index / fps)


def is_live_source(source: str) -> bool:
    """A camera index (``0``) or a URL (``rtsp://``, ``http://``...) is live; anything else is a file."""
    return source.isdigit() or "://" in source
