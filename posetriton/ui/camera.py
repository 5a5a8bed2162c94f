"""Live camera mode: frames arrive over a WebSocket faster than the server may answer; latency must not grow.

The WebSocket reader puts each frame into a :class:`LatestFrame` mailbox, which holds one frame:
a newer frame replaces one not yet taken (newest wins) and the replaced one is counted as dropped.
A :class:`CameraEngine` takes frames from it, gets their poses and emits one message per frame it
finished. The browser keeps at most a couple of frames unanswered, so the mailbox rarely
overflows; it is what bounds latency when a client sends faster than that.

Two engines share this interface: :class:`PerFrameEngine` sends each frame as its own request
(poses without identities); a tracking engine streams frames to the server-side tracker when
the served model has a ``NAME_track`` ensemble (poses with ``track_id``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from posetriton.client import AsyncPoseClient, InvalidInputError, PoseClientError
from posetriton.contract import Thresholds

Message = dict[str, Any]
Emit = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class CameraFrame:
    """One encoded frame from the browser; ``seq`` counts the frames of the connection from 0."""

    seq: int
    data: bytes
    received: float  # time.perf_counter() when it arrived


class LatestFrame:
    """A one-frame mailbox between the WebSocket reader and the engine: newest wins, replaced frames are dropped."""

    def __init__(self) -> None:
        self._frame: CameraFrame | None = None
        self._changed = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def put(self, frame: CameraFrame) -> None:
        if self._frame is not None:
            self.dropped += 1
        self._frame = frame
        self._changed.set()

    async def get(self) -> CameraFrame | None:
        """The newest frame not yet taken, waiting for one; None once closed."""
        while self._frame is None:
            if self._closed:
                return None
            self._changed.clear()
            await self._changed.wait()
        frame, self._frame = self._frame, None
        return frame

    def close(self) -> None:
        self._closed = True
        self._changed.set()


class CameraEngine(Protocol):
    """Turns the frames of one camera connection into result messages until the mailbox closes."""

    tracking: bool

    async def run(self, frames: LatestFrame, thresholds: Callable[[], Thresholds], emit: Emit) -> None: ...


def result_message(frame: CameraFrame, detections: list[Message], width: int, height: int, dropped: int) -> Message:
    return {
        "type": "result",
        "seq": frame.seq,
        "width": width,
        "height": height,
        "detections": detections,
        "latency_ms": round((time.perf_counter() - frame.received) * 1000, 1),
        "dropped": dropped,
    }


def error_message(frame: CameraFrame, error: str, dropped: int) -> Message:
    return {"type": "error", "seq": frame.seq, "error": error, "dropped": dropped}


class PerFrameEngine:
    """Each frame is its own request to the ensemble; ``in_flight`` requests at most at once."""

    tracking = False

    def __init__(self, client: AsyncPoseClient, in_flight: int = 1) -> None:
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        self.client = client
        self.in_flight = in_flight

    async def run(self, frames: LatestFrame, thresholds: Callable[[], Thresholds], emit: Emit) -> None:
        await asyncio.gather(*(self._worker(frames, thresholds, emit) for _ in range(self.in_flight)))

    async def _worker(self, frames: LatestFrame, thresholds: Callable[[], Thresholds], emit: Emit) -> None:
        while (frame := await frames.get()) is not None:
            limits = thresholds()
            try:
                poses = await self.client.predict(frame.data, conf=limits.conf, iou=limits.iou, max_det=limits.max_det)
            except InvalidInputError as exc:  # this frame (or these thresholds) refused; the next may pass
                await emit(error_message(frame, exc.reason, frames.dropped))
                continue
            except PoseClientError as exc:  # server gone or model unloaded: say so, keep serving the camera
                await emit(error_message(frame, str(exc), frames.dropped))
                continue
            detections = [pose.to_dict() for pose in poses.poses]
            await emit(result_message(frame, detections, poses.width, poses.height, frames.dropped))
