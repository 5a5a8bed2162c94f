"""Live camera mode: frames arrive over a WebSocket faster than the server may answer; latency must not grow.

The WebSocket reader puts each frame into a :class:`LatestFrame` mailbox, which holds one frame:
a newer frame replaces one not yet taken (newest wins) and the replaced one is counted as dropped.
A :class:`CameraEngine` takes frames from it, gets their poses and emits one message per frame it
finished. The browser keeps at most a couple of frames unanswered, so the mailbox rarely
overflows; it is what bounds latency when a client sends faster than that.

Two engines share this interface: :class:`PerFrameEngine` sends each frame as its own request
(poses without identities); :class:`TrackingEngine` streams frames to the server-side tracker
when the served model has a ``NAME_track`` ensemble (poses with ``track_id``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from posetriton.client import AsyncPoseClient, Frame, InvalidInputError, PoseClientError
from posetriton.client.inputs import sdk_arguments

Message = dict[str, Any]
# The request parameters of a connection by wire name, checked (posetriton.ui.limits.checked_parameters).
Parameters = dict[str, int | float]
Emit = Callable[[Message], Awaitable[None]]
# Before a new tracking sequence after the server failed one (a restart, an unreachable server).
RESTART_PAUSE_S = 0.5


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

    def put_back(self, frame: CameraFrame) -> None:
        """Return a taken frame unused (for the next sequence); a newer one already waiting wins over it."""
        if self._frame is None:
            self._frame = frame
            self._changed.set()
        else:
            self.dropped += 1

    def close(self) -> None:
        self._closed = True
        self._changed.set()

    @property
    def closed(self) -> bool:
        return self._closed


class CameraEngine(Protocol):
    """Turns the frames of one camera connection into result messages until the mailbox closes."""

    tracking: bool

    async def run(self, frames: LatestFrame, parameters: Callable[[], Parameters], emit: Emit) -> None: ...


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

    async def run(self, frames: LatestFrame, parameters: Callable[[], Parameters], emit: Emit) -> None:
        await asyncio.gather(*(self._worker(frames, parameters, emit) for _ in range(self.in_flight)))

    async def _worker(self, frames: LatestFrame, parameters: Callable[[], Parameters], emit: Emit) -> None:
        while (frame := await frames.get()) is not None:
            try:  # the tracker's own parameters do not apply here: sdk_arguments leaves them out
                poses = await self.client.predict(frame.data, **sdk_arguments(parameters()))
            except InvalidInputError as exc:  # this frame (or these parameters) refused; the next may pass
                await emit(error_message(frame, exc.reason, frames.dropped))
                continue
            except PoseClientError as exc:  # server gone or model unloaded: say so, keep serving the camera
                await emit(error_message(frame, str(exc), frames.dropped))
                continue
            detections = [pose.to_dict() for pose in poses.poses]
            await emit(result_message(frame, detections, poses.width, poses.height, frames.dropped))


class TrackingEngine:
    """Frames stream to the server-side tracker (the ``NAME_track`` ensemble) as one sequence; poses carry ``track_id``.

    The SDK's ``track(..., live=True)`` keeps ``in_flight`` frames on the stream and replaces a frame
    still unsent by a newer one (its drops add to the mailbox's). Request parameters belong to a sequence:
    when the page changes them, the sequence ends and a new one starts (track IDs start over). A
    sequence the server lost (restart, idle timeout) is reported and a new one started the same way.
    """

    tracking = True

    def __init__(self, client: AsyncPoseClient, in_flight: int = 2, smoothed: bool = True) -> None:
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        self.client = client
        self.in_flight = in_flight
        self.smoothed = smoothed  # keypoints smoothed over each track by the server (else the raw ones)

    async def run(self, frames: LatestFrame, parameters: Callable[[], Parameters], emit: Emit) -> None:
        dropped_before = 0  # by the SDK in earlier sequences of this connection
        while not frames.closed:
            chosen = parameters()
            received: dict[int, CameraFrame] = {}
            results = self.client.track(
                self._sequence(frames, parameters, chosen, received), live=True, max_in_flight=self.in_flight,
                smoothed=self.smoothed, **sdk_arguments(chosen, tracking=True),
            )  # fmt: skip
            dropped_here = 0
            try:
                async for result in results:
                    seq = int(result.name)
                    frame = received.pop(seq, None)
                    for older in [s for s in received if s < seq]:  # results come in frame order: these were dropped
                        del received[older]
                    if frame is None:
                        continue
                    dropped_here = result.dropped
                    dropped = frames.dropped + dropped_before + dropped_here
                    if result.error is not None:
                        await emit(error_message(frame, result.error, dropped))
                        continue
                    detections = [pose.to_dict() for pose in result.poses]
                    await emit(result_message(frame, detections, result.width or 0, result.height or 0, dropped))
            except PoseClientError as exc:  # the server lost the sequence, or is gone: say so, start a new one
                await emit({"type": "notice", "error": f"{exc}; tracking starts over"})
                await asyncio.sleep(RESTART_PAUSE_S)
            finally:
                dropped_before += dropped_here

    @staticmethod
    async def _sequence(
        frames: LatestFrame, parameters: Callable[[], Parameters], chosen: Parameters, received: dict[int, CameraFrame]
    ) -> AsyncIterator[Frame]:
        """The frames of one sequence: until the connection closes or the request parameters change."""
        while (frame := await frames.get()) is not None:
            if parameters() != chosen:  # changed while waiting: this frame opens the next sequence
                frames.put_back(frame)
                return
            received[frame.seq] = frame
            yield Frame(image=frame.data, name=str(frame.seq), index=frame.seq)
