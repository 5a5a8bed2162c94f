"""What tracking a video gives back: poses with track IDs, frame by frame, and the error of a lost sequence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import PoseClientError
from .results import Keypoint, Pose
from .streaming import Frame


class TrackingStreamError(PoseClientError):
    """The video's stream or sequence ended on the server's side; ``frames_done`` frames were answered.

    Call ``track()`` again with the remaining frames to go on with a new sequence (track IDs start over).
    """

    def __init__(self, message: str, frames_done: int, status: str | None = None) -> None:
        super().__init__(message, status)
        self.frames_done = frames_done


@dataclass(frozen=True)
class TrackedPose(Pose):
    """A :class:`Pose` with the ID of the person's track in this video (``None`` when not tracked).

    ``keypoints`` are the server's smoothed ones (filtered over the track's frames, see
    posetriton.server.tracking.KeypointSmoother) unless the video was tracked with ``smoothed=False``;
    ``raw_keypoints`` are the frame's own detection either way.
    """

    track_id: int | None = None
    raw_keypoints: tuple[Keypoint, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "raw_keypoints", tuple(Keypoint(*map(float, p)) for p in self.raw_keypoints))

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "track_id": self.track_id}


@dataclass(frozen=True)
class TimedFrame(Frame):
    """A :class:`Frame` with its time in seconds: into the video for a file, since capture began for a live source."""

    timestamp: float | None = None


@dataclass(frozen=True)
class TrackedFrame:
    """One frame's result, in frame order: poses with track IDs, or the ``error`` that refused the frame.

    ``dropped`` counts the frames a live source produced that were replaced before they could be
    sent, up to this one; ``latency_s`` is the time from sending the frame to its answer.
    """

    index: int
    name: str
    timestamp: float | None
    width: int | None
    height: int | None
    poses: list[TrackedPose]
    dropped: int
    latency_s: float
    error: str | None = None
    frame: Frame | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def track_ids(self) -> list[int | None]:
        return [pose.track_id for pose in self.poses]

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "frame": self.index,
            "timestamp": None if self.timestamp is None else round(self.timestamp, 4),
            "image": self.name,
            "width": self.width,
            "height": self.height,
            "detections": [pose.to_dict() for pose in self.poses],
            "dropped": self.dropped,
            "latency_ms": round(self.latency_s * 1e3, 2),
        }
        if self.error is not None:
            row["error"] = self.error
        return row
