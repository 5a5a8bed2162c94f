"""Video in, poses with track IDs out: the I/O-free half of ``PoseClient.track`` / ``AsyncPoseClient.track``.

A video is one Triton *sequence* on the ``NAME_track`` ensemble: every frame is a request on one
bidirectional gRPC stream with the same correlation ID (``sequence_id``), the first with
``sequence_start``, and the sequence is closed with ``sequence_end``. The server keeps each
stream's tracker (posetriton.server.tracking) and answers each frame with ``TRACK_IDS`` beside the poses.

How frames are sent:

- The first frame goes alone; once the server has answered it (the sequence exists), up to
  ``max_in_flight`` frames are in flight. A first frame the server refuses is followed by the next
  frame with ``sequence_start`` again.
- Every frame carries its index (``FRAME_INDEX``), so the tracker knows how many frames a live source
  skipped and the order frames were taken in even when pipelined requests overtake one another.
- A *live* source (camera, stream URL) keeps only the newest frame (``feeds``): when all slots are busy, a
  newer frame replaces the older unsent one and the replaced one is counted in ``dropped``. A file is read
  only as slots free up, so every frame is processed.
- At the end (or when the caller stops iterating) the last accepted frame is sent once more with
  ``sequence_end``; the tracker only matches it (it is not newer than the last frame) and frees the
  state. Its result is not reported.

Results come back in frame order. A frame the server refuses (a corrupt image) yields a
:class:`TrackedFrame` with ``error`` and the sequence goes on with its IDs. A broken stream (server
gone) or a sequence the server no longer knows (idle too long, server restarted) raises
:class:`TrackingStreamError`; calling ``track()`` again starts a new sequence (IDs start over).

The session is driven by :func:`track_flow` and :func:`closing_flow`, generators of the steps
:class:`TakeFrame`, :class:`Send` and :class:`NextEvent` that each client performs with its own stream.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from posetriton.core.contract import FRAME_INDEX, SMOOTHED_KEYPOINTS, TRACK_IDS, TRACK_SUFFIX, UNTRACKED, parse_error

from .batching import image_bytes_input
from .errors import DeadlineExceededError, InvalidInputError, PoseClientError, grpc_status
from .inputs import prepare_image
from .results import OUTPUT_NAMES, poses_from_batch
from .steps import Emit, Flow
from .streaming import Frame
from .tracking_results import TimedFrame, TrackedFrame, TrackedPose, TrackingStreamError

# Server messages that mean the sequence is gone: Triton's (idle timeout, or a server that restarted and
# never saw its START) and the tracker step's own.
_SEQUENCE_LOST = ("must specify the START flag", "has no tracking state")
# What a tracked frame's response carries: NAME's outputs, the track IDs and the smoothed keypoints.
TRACK_OUTPUT_NAMES = (*OUTPUT_NAMES, TRACK_IDS, SMOOTHED_KEYPOINTS)
# How long closing waits for the END request's answer before giving up (the idle timeout frees the state).
CLOSE_WAIT_S = 10.0


def track_model(model: str) -> str:
    """The tracking ensemble of a served model: ``NAME_track``."""
    return model if model.endswith(TRACK_SUFFIX) else model + TRACK_SUFFIX


def new_sequence_id() -> int:
    """A random correlation ID from the OS's CSPRNG (Triton's are unsigned 64-bit; 0 means none): another
    client cannot guess a live stream's ID, and the tracker refuses a START on a live one anyway."""
    return secrets.randbelow(2**63 - 1) + 1


# ------------------------------------------------------------------------------------------------ steps
@dataclass(frozen=True)
class TakeFrame:
    """Take the next frame the feed offers: ``(frame or None, frames dropped so far)`` comes back."""


@dataclass(frozen=True)
class Send:
    """Send one request on the video's stream: the keyword arguments of tritonclient's
    ``async_stream_infer`` (the sync client) or of one item of ``stream_infer`` (the aio client)."""

    request: dict[str, Any]


@dataclass(frozen=True)
class NextEvent:
    """Wait up to ``timeout_s`` (None: without end) for a :class:`StreamEvent`; None comes back on timeout."""

    timeout_s: float | None


@dataclass(frozen=True)
class StreamEvent:
    """What the stream (or the feed) said: a response (``result``), a frame's refusal (``error`` without a gRPC
    status), the stream's failure (``error`` with one), its end (``closed``), or nothing but a wake-up (a live
    frame arrived)."""

    result: Any = None
    error: InferenceServerException | None = None
    closed: bool = False


class FeedState(Protocol):
    """What the flow reads of a feed (:mod:`~posetriton.client.feeds`); taking frames is a step."""

    @property
    def error(self) -> BaseException | None: ...

    @property
    def exhausted(self) -> bool: ...


# ------------------------------------------------------------------------------------------------ session
@dataclass
class _Sent:
    frame: Frame
    data: bytes
    sent_at: float
    dropped: int
    closing: bool = False


@dataclass
class _Refusal:
    """A refusal the stream answered without naming its request (tritonclient's public stream API drops the ID
    of a failed response): one of ``candidates``, the requests then in flight and not answered since."""

    message: str
    arrived_at: float
    candidates: set[int]


class TrackSession:
    """The bookkeeping of one video on one stream: which request to send next, and results in order.

    It performs no I/O: the flows below send what :meth:`request` returns on the stream, hand every
    event to :meth:`receive`, and take finished frames from :meth:`ready`.
    """

    def __init__(
        self,
        model: str,
        *,
        max_in_flight: int,
        parameters: dict[str, Any],
        sequence_id: int | None = None,
        keypoint_names: tuple[str, ...] = (),
        url: str = "",
        frame_timeout_s: float | None = None,
        smoothed: bool = True,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.model = track_model(model)
        self.max_in_flight = max_in_flight
        self.parameters = parameters
        self.sequence_id = sequence_id or new_sequence_id()
        self.keypoint_names = keypoint_names
        self.url = url
        # Each frame's deadline on the server (Triton's request timeout): a frame that waited longer in a step's
        # queue is dropped uncomputed and comes back with an error, the video going on.
        self.frame_timeout_us = int(frame_timeout_s * 1e6) if frame_timeout_s else None
        self.smoothed = smoothed  # poses carry the smoothed keypoints (else the raw ones)
        self.started = False  # the server acknowledged a START
        self._start_pending = False
        self._next_id = 0
        self._in_flight: dict[int, _Sent] = {}
        self._refusals: list[_Refusal] = []
        self._done: dict[int, TrackedFrame | None] = {}
        self._next_out = 0
        self._last_good: _Sent | None = None
        self.frames_done = 0
        self.closed = False

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def can_send(self) -> bool:
        return not self.closed and not self._start_pending and self.in_flight < self.max_in_flight

    def request(self, frame: Frame, dropped: int = 0) -> dict[str, Any] | None:
        """The request carrying ``frame``; None when the client refused the frame itself (its failed result is
        queued in order all the same)."""
        request_id = self._next_id
        self._next_id += 1
        try:
            # Arrays travel as JPEG: the tracking ensemble takes encoded images only.
            prepared = prepare_image(frame.image, frame.index, "jpeg", name=frame.name)
        except InvalidInputError as exc:
            self._done[request_id] = _failed(frame, str(exc.reason), dropped, 0.0)
            return None
        assert prepared.data is not None
        sent = _Sent(frame, prepared.data, time.monotonic(), dropped)
        start = not self.started
        self._start_pending = start
        return self._send(request_id, sent, start=start, end=False)

    def closing_request(self) -> dict[str, Any] | None:
        """The END request: the last accepted frame again (the tracker matches it without a state change);
        None when there is no sequence to end (never started, or already lost)."""
        if self.closed:
            return None
        self.closed = True
        if self._last_good is None or not self.started:
            return None
        request_id = self._next_id
        self._next_id += 1
        last = self._last_good
        closing = _Sent(last.frame, last.data, time.monotonic(), last.dropped, closing=True)
        return self._send(request_id, closing, start=False, end=True)

    def _send(self, request_id: int, sent: _Sent, *, start: bool, end: bool) -> dict[str, Any]:
        self._in_flight[request_id] = sent
        index = grpcclient.InferInput(FRAME_INDEX, [1, 1], "INT64")
        index.set_data_from_numpy(np.array([[sent.frame.index]], np.int64))
        return {
            "model_name": self.model,
            "inputs": [image_bytes_input([sent.data]), index],
            "outputs": [grpcclient.InferRequestedOutput(name) for name in TRACK_OUTPUT_NAMES],
            "request_id": str(request_id),
            "sequence_id": self.sequence_id,
            "sequence_start": start,
            "sequence_end": end,
            "timeout": self.frame_timeout_us,
            "parameters": self.parameters or None,
        }

    def receive(self, event: StreamEvent) -> None:
        """One event of the stream: a frame's result or refusal, or the stream's failure or end.

        Raises :class:`TrackingStreamError` when the stream broke or the server no longer knows the sequence.
        """
        if event.closed:
            raise self.lost("the server closed the stream")
        if event.error is not None:
            if event.error.status() is not None:  # a gRPC status: the stream itself failed
                raise self.stream_failed(event.error)
            self._refused(str(event.error.message() or event.error))
        elif event.result is not None:
            self._answered(event.result)

    def _refused(self, message: str) -> None:
        if any(text in message for text in _SEQUENCE_LOST):
            raise self.lost(message)
        if self._start_pending:
            self._start_pending = False  # the next frame starts the sequence instead
        candidates = set(self._in_flight)
        if not candidates:
            raise PoseClientError(f"the stream refused a request that was not sent: {message}")
        self._refusals.append(_Refusal(message, time.monotonic(), candidates))
        self._match_refusals()

    def _answered(self, result: Any) -> None:
        response_id = result.get_response().id
        request_id = int(response_id or -1)
        sent = self._in_flight.pop(request_id, None)
        if sent is None:
            raise PoseClientError(f"the stream answered request {response_id!r}, which was not sent")
        for refusal in self._refusals:
            refusal.candidates.discard(request_id)
        self._match_refusals()
        latency = time.monotonic() - sent.sent_at
        if self._start_pending:
            self._start_pending, self.started = False, True
        if sent.closing:
            self._done[request_id] = None
            return
        self._last_good = sent
        outputs = {name: result.as_numpy(name) for name in TRACK_OUTPUT_NAMES}
        missing = [name for name, array in outputs.items() if array is None]
        if missing:
            raise PoseClientError(f"model {self.model!r} returned no {', '.join(missing)}; is it a tracking ensemble?")
        self._done[request_id] = _tracked(sent, outputs, latency, self.keypoint_names, self.smoothed)

    def _match_refusals(self) -> None:
        """Give refusals their frames once that is certain: a refusal with one candidate left, or as many
        refusals as candidates among them (every one of those requests was refused: oldest first)."""
        while self._refusals:
            single = next((r for r in self._refusals if len(r.candidates) == 1), None)
            if single is not None:
                self._assign(single, min(single.candidates))
                continue
            candidates = set().union(*(r.candidates for r in self._refusals))
            if len(candidates) != len(self._refusals):
                return
            for refusal, request_id in zip(list(self._refusals), sorted(candidates), strict=True):
                self._assign(refusal, request_id)

    def _assign(self, refusal: _Refusal, request_id: int) -> None:
        self._refusals.remove(refusal)
        for other in self._refusals:
            other.candidates.discard(request_id)
        sent = self._in_flight.pop(request_id)
        failed = _failed(sent.frame, refusal.message, sent.dropped, refusal.arrived_at - sent.sent_at)
        self._done[request_id] = None if sent.closing else failed

    def ready(self) -> Iterator[TrackedFrame]:
        """Finished frames, in the order they were sent (closing requests are skipped)."""
        while self._next_out in self._done:
            item = self._done.pop(self._next_out)
            self._next_out += 1
            if item is not None:
                self.frames_done += 1
                yield item

    def lost(self, reason: str, status: str | None = None) -> TrackingStreamError:
        """The error for a stream or sequence that ended on the server's side."""
        self.closed = True
        return TrackingStreamError(
            f"the tracking sequence {self.sequence_id} on {self.model!r} at {self.url} ended after "
            f"{self.frames_done} frame(s): {parse_error(reason).reason}; the server's track state for this "
            "video is gone: call track() again to go on with a new sequence (track IDs start over)",
            self.frames_done,
            status,
        )

    def stream_failed(self, exc: InferenceServerException) -> TrackingStreamError:
        status = grpc_status(exc)
        reason = str(exc.message() or exc)
        if status == "UNAVAILABLE":
            reason = f"the connection to the server was lost, it stopped or restarted ({reason})"
        return self.lost(reason, status or None)

    def no_answer(self, timeout_s: float) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"Triton at {self.url} sent no answer for {timeout_s:g} s with {self.in_flight} frame(s) in flight"
        )


def _failed(frame: Frame, message: str, dropped: int, latency: float) -> TrackedFrame:
    reason = parse_error(message).reason
    return TrackedFrame(
        frame.index, frame.name, _timestamp(frame), None, None, [], dropped, latency, error=reason, frame=frame
    )


def _timestamp(frame: Frame) -> float | None:
    return frame.timestamp if isinstance(frame, TimedFrame) else None


def _tracked(
    sent: _Sent, outputs: dict[str, NDArray[Any]], latency: float, keypoint_names: tuple[str, ...], smoothed: bool
) -> TrackedFrame:
    (poses,) = poses_from_batch([sent.frame.name], outputs, keypoint_names)
    ids = outputs[TRACK_IDS].reshape(-1)
    filtered = outputs[SMOOTHED_KEYPOINTS].reshape(-1, *outputs[SMOOTHED_KEYPOINTS].shape[-2:])
    tracked = [
        TrackedPose(
            box=pose.box,
            score=pose.score,
            keypoints=filtered[i] if smoothed else pose.keypoints,
            keypoint_names=pose.keypoint_names,
            track_id=None if int(ids[i]) == UNTRACKED else int(ids[i]),
            raw_keypoints=pose.keypoints,
        )
        for i, pose in enumerate(poses.poses)
    ]
    frame = sent.frame
    return TrackedFrame(
        frame.index, frame.name, _timestamp(frame), poses.width, poses.height, tracked, sent.dropped, latency,
        frame=frame,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ flows
def track_flow(session: TrackSession, feed: FeedState, timeout_s: float) -> Flow[None]:
    """Send frames while slots are free, emit finished frames in order, wait for the stream: until the feed is
    exhausted and every frame answered. ``timeout_s`` bounds each wait while frames are in flight."""
    while True:
        while session.can_send():
            frame, dropped = yield TakeFrame()
            if frame is None:
                break
            request = session.request(frame, dropped)
            if request is not None:
                yield Send(request)
        for item in session.ready():
            yield Emit(item)
        if feed.error is not None:
            raise feed.error
        if feed.exhausted and session.in_flight == 0:
            return
        wait = timeout_s if session.in_flight else None
        event = yield NextEvent(wait)
        if event is None:
            raise session.no_answer(timeout_s)
        session.receive(event)


def closing_flow(session: TrackSession) -> Flow[None]:
    """End the sequence (the drivers run it when the video ends or the caller stops iterating): the END request,
    then its answer awaited up to :data:`CLOSE_WAIT_S`; failures here change nothing for the caller."""
    closing = session.closing_request()
    if closing is None:
        return
    yield Send(closing)
    deadline = time.monotonic() + CLOSE_WAIT_S
    with contextlib.suppress(PoseClientError):
        while session.in_flight and (left := deadline - time.monotonic()) > 0:
            event = yield NextEvent(left)
            if event is None:
                return
            session.receive(event)
