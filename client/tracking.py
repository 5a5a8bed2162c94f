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
- A *live* source (camera, stream URL) is read in a thread that keeps only the newest frame: when
  all slots are busy, a newer frame replaces the older unsent one and the replaced one is counted in
  ``dropped``. A file is read only as slots free up, so every frame is processed.
- At the end (or when the caller stops iterating) the last accepted frame is sent once more with
  ``sequence_end``; the tracker only matches it (it is not newer than the last frame) and frees the
  state. Its result is not reported.

Results come back in frame order. A frame the server refuses (a corrupt image) yields a
:class:`TrackedFrame` with ``error`` and the sequence goes on with its IDs. A broken stream (server
gone) or a sequence the server no longer knows (idle too long, server restarted) raises
:class:`TrackingStreamError`; calling ``track()`` again starts a new sequence (IDs start over).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray

# tritonclient's stream callbacks drop the request ID of a failed response (the server sends it), so a
# refused frame could not be told from the others in flight: the drivers below use tritonclient's request
# builder and the client's gRPC stub directly and read the responses themselves.
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import InferenceServerException

from posetriton.core.contract import (
    FRAME_INDEX,
    SMOOTHED_KEYPOINTS,
    TRACK_IDS,
    TRACK_SUFFIX,
    UNTRACKED,
    ContractError,
    Smoothing,
    parse_error,
)

from .errors import DeadlineExceededError, InvalidInputError, PoseClientError, grpc_status
from .inputs import ImageInput, prepare_image
from .results import OUTPUT_NAMES, Keypoint, Pose, poses_from_batch
from .streaming import Frame, as_frames

__all__ = [
    "FRAME_INDEX",
    "TRACK_IDS",
    "TRACK_SUFFIX",
    "LiveFeed",
    "TimedFrame",
    "TrackSession",
    "TrackedFrame",
    "TrackedPose",
    "TrackingStreamError",
]

# Server messages that mean the sequence is gone: Triton's (idle timeout, or a server that restarted and
# never saw its START) and the tracker step's own.
_SEQUENCE_LOST = ("must specify the START flag", "has no tracking state")


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


# What a tracked frame's response carries: NAME's outputs, the track IDs and the smoothed keypoints.
TRACK_OUTPUT_NAMES = (*OUTPUT_NAMES, TRACK_IDS, SMOOTHED_KEYPOINTS)


def track_parameters(base: dict[str, Any], smoothing: Smoothing | None) -> dict[str, Any]:
    """The request parameters of a tracked video: the thresholds' and the smoothing's (checked once here)."""
    try:
        return {**base, **(smoothing or Smoothing()).check().to_parameters()}
    except ContractError as exc:
        raise ValueError(str(exc)) from None


def track_model(model: str) -> str:
    """The tracking ensemble of a served model: ``NAME_track``."""
    return model if model.endswith(TRACK_SUFFIX) else model + TRACK_SUFFIX


def new_sequence_id() -> int:
    """A random correlation ID from the OS's CSPRNG (Triton's are unsigned 64-bit; 0 means none): another
    client cannot guess a live stream's ID, and the tracker refuses a START on a live one anyway."""
    return secrets.randbelow(2**63 - 1) + 1


@dataclass
class _Sent:
    frame: Frame
    data: bytes
    sent_at: float
    dropped: int
    closing: bool = False


class TrackSession:
    """The bookkeeping of one video on one stream: which request to send next, and results in order.

    It performs no I/O: the drivers below send what :meth:`request` returns on the stream, hand every
    response to :meth:`receive`, and take finished frames from :meth:`ready`.
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

    def request(self, frame: Frame, dropped: int = 0) -> Any:
        """The ``ModelInferRequest`` carrying ``frame``; None when the client refused the frame itself (its
        failed result is queued in order all the same)."""
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

    def closing_request(self) -> Any:
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

    def _send(self, request_id: int, sent: _Sent, *, start: bool, end: bool) -> Any:
        self._in_flight[request_id] = sent
        image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
        batch = np.empty((1, 1), dtype=object)
        batch[0, 0] = sent.data
        image.set_data_from_numpy(batch)
        index = grpcclient.InferInput(FRAME_INDEX, [1, 1], "INT64")
        index.set_data_from_numpy(np.array([[sent.frame.index]], np.int64))
        return _get_inference_request(
            model_name=self.model,
            inputs=[image, index],
            model_version="",
            request_id=str(request_id),
            outputs=[grpcclient.InferRequestedOutput(name) for name in TRACK_OUTPUT_NAMES],
            sequence_id=self.sequence_id,
            sequence_start=start,
            sequence_end=end,
            priority=0,
            timeout=self.frame_timeout_us,
            parameters=self.parameters or None,
        )

    def receive(self, response: Any) -> None:
        """One ``ModelStreamInferResponse``: a frame's result or its error.

        Raises :class:`TrackingStreamError` when the server no longer knows the sequence.
        """
        request_id = int(response.infer_response.id or -1)
        sent = self._in_flight.pop(request_id, None)
        if sent is None:
            raise PoseClientError(f"the stream answered request {response.infer_response.id!r}, which was not sent")
        latency = time.monotonic() - sent.sent_at
        if response.error_message:
            if any(text in response.error_message for text in _SEQUENCE_LOST):
                raise self.lost(response.error_message)
            if self._start_pending:
                self._start_pending = False  # the next frame starts the sequence instead
            failed = _failed(sent.frame, response.error_message, sent.dropped, latency)
            self._done[request_id] = None if sent.closing else failed
            return
        if self._start_pending:
            self._start_pending, self.started = False, True
        if sent.closing:
            self._done[request_id] = None
            return
        self._last_good = sent
        result = grpcclient.InferResult(response.infer_response)
        outputs = {name: result.as_numpy(name) for name in TRACK_OUTPUT_NAMES}
        missing = [name for name, array in outputs.items() if array is None]
        if missing:
            raise PoseClientError(f"model {self.model!r} returned no {', '.join(missing)}; is it a tracking ensemble?")
        self._done[request_id] = _tracked(sent, outputs, latency, self.keypoint_names, self.smoothed)

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


class LiveFeed:
    """Frames of a live source, read in a thread that keeps only the newest unsent one.

    ``take()`` returns the newest frame not yet taken (or None). A frame replaced before it was taken
    is counted in ``dropped``. ``on_frame`` is called (from the reader thread) when a frame arrives
    or the source ends, so a sender waiting for either can wake up.
    """

    def __init__(self, frames: Iterable[Frame | ImageInput], on_frame: Callable[[], None] = lambda: None) -> None:
        self._source = as_frames(frames)
        self._on_frame = on_frame
        self._lock = threading.Lock()
        self._latest: Frame | None = None
        self.dropped = 0
        self.finished = False
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="posetriton-live-feed", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for frame in self._source:
                with self._lock:
                    if self._latest is not None:
                        self.dropped += 1
                    self._latest = frame
                self._on_frame()
                if self._stop.is_set():
                    break
        except BaseException as exc:  # reported to the sender, which raises it in the caller's thread
            self.error = exc
        finally:
            with self._lock:
                self.finished = True
            self._on_frame()

    def take(self) -> tuple[Frame | None, int]:
        """(the newest untaken frame or None, frames dropped so far)."""
        with self._lock:
            frame, self._latest = self._latest, None
            return frame, self.dropped

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return self.finished and self._latest is None

    def stop(self) -> None:
        self._stop.set()


class FileFeed:
    """Frames of a file (or any finite iterable), pulled one at a time when a slot is free: none dropped."""

    dropped = 0
    error: BaseException | None = None

    def __init__(self, frames: Iterable[Frame | ImageInput]) -> None:
        self._source = as_frames(frames)
        self.exhausted = False

    def take(self) -> tuple[Frame | None, int]:
        frame = next(self._source, None)
        self.exhausted = frame is None
        return frame, 0

    def stop(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()


class AsyncLiveFeed:
    """:class:`LiveFeed` for an async iterable of frames (e.g. frames arriving over a web socket)."""

    def __init__(self, frames: AsyncIterable[Frame | ImageInput], on_frame: Callable[[], None]) -> None:
        self._on_frame = on_frame
        self._latest: Frame | None = None
        self.dropped = 0
        self.finished = False
        self.error: BaseException | None = None
        self._task = asyncio.ensure_future(self._read(frames))

    async def _read(self, frames: AsyncIterable[Frame | ImageInput]) -> None:
        try:
            index = 0
            async for item in frames:
                if self._latest is not None:
                    self.dropped += 1
                self._latest = _as_frame(item, index)
                index += 1
                self._on_frame()
        except Exception as exc:  # reported to the sender
            self.error = exc
        finally:
            self.finished = True
            self._on_frame()

    def take(self) -> tuple[Frame | None, int]:
        frame, self._latest = self._latest, None
        return frame, self.dropped

    @property
    def exhausted(self) -> bool:
        return self.finished and self._latest is None

    def stop(self) -> None:
        self._task.cancel()


class AsyncFileFeed:
    """:class:`FileFeed` for an async iterable: every frame, pulled when a slot is free."""

    dropped = 0
    error: BaseException | None = None

    def __init__(self, frames: AsyncIterable[Frame | ImageInput]) -> None:
        self._source = aiter(frames)
        self._index = 0
        self.exhausted = False

    async def take(self) -> tuple[Frame | None, int]:
        item = await anext(self._source, None)
        self.exhausted = item is None
        if item is None:
            return None, 0
        self._index += 1
        return _as_frame(item, self._index - 1), 0

    def stop(self) -> None:
        pass


def _as_frame(item: Frame | ImageInput, index: int) -> Frame:
    """One item of an async source as a frame, named as :func:`as_frames` names them."""
    if isinstance(item, Frame):
        return item
    name = str(Path(item)) if isinstance(item, (str, PathLike)) else f"<image {index}>"
    return Frame(image=item, name=name, index=index)


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
    from .streaming import video_frames, video_info

    fps = video_info(path).fps
    for frame in video_frames(path, keep_rgb=keep_rgb):
        yield TimedFrame(frame.image, frame.name, frame.index, frame.rgb, timestamp=frame.index / fps)


def is_live_source(source: str) -> bool:
    """A camera index (``0``) or a URL (``rtsp://``, ``http://``...) is live; anything else is a file."""
    return source.isdigit() or "://" in source


# ------------------------------------------------------------------------------------------- stream drivers
# Events the drivers wait on: ("response", ModelStreamInferResponse), ("failed", grpc error), ("closed", None)
# when the server ends the stream, ("frame", None) when a live source has a new frame.
_END = object()
# How long closing waits for the END request's answer before giving up (the idle timeout frees the state).
CLOSE_WAIT_S = 10.0


def _handle(session: TrackSession, kind: str, payload: Any) -> None:
    if kind == "response":
        session.receive(payload)
    elif kind == "failed":
        raise session.stream_failed(InferenceServerException(msg=payload.details(), status=str(payload.code())))
    elif kind == "closed":
        raise session.lost("the server closed the stream")


def _deadline(session: TrackSession, timeout_s: float) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"Triton at {session.url} sent no answer for {timeout_s:g} s with {session.in_flight} frame(s) in flight"
    )


def track_sync(
    triton: Any, headers: dict[str, str], frames: Iterable[Frame | ImageInput], session: TrackSession, *,
    live: bool, timeout_s: float,
) -> Iterator[TrackedFrame]:  # fmt: skip
    """Run one video over a bidirectional stream of a ``tritonclient.grpc.InferenceServerClient``."""
    import grpc

    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    requests: queue.Queue[Any] = queue.Queue()
    feed: LiveFeed | FileFeed = LiveFeed(frames, lambda: events.put(("frame", None))) if live else FileFeed(frames)
    call = triton._client_stub.ModelStreamInfer(iter(requests.get, _END), metadata=triton._get_metadata(headers))

    def read() -> None:
        try:
            for response in call:
                events.put(("response", response))
            events.put(("closed", None))
        except grpc.RpcError as exc:
            events.put(("failed", exc))

    threading.Thread(target=read, name="posetriton-track-stream", daemon=True).start()

    def next_event(timeout: float | None) -> tuple[str, Any]:
        try:
            return events.get(timeout=timeout)
        except queue.Empty:
            raise _deadline(session, timeout_s) from None

    try:
        while True:
            while session.can_send():
                frame, dropped = feed.take()
                if frame is None:
                    break
                request = session.request(frame, dropped)
                if request is not None:
                    requests.put(request)
            yield from session.ready()
            if feed.error is not None:
                raise feed.error
            if feed.exhausted and session.in_flight == 0:
                break
            _handle(session, *next_event(timeout_s if session.in_flight else None))
    finally:
        feed.stop()
        closing = session.closing_request()
        if closing is not None:
            requests.put(closing)
            deadline = time.monotonic() + CLOSE_WAIT_S
            with contextlib.suppress(PoseClientError):
                while session.in_flight and (left := deadline - time.monotonic()) > 0:
                    _handle(session, *next_event(left))
        requests.put(_END)
        call.cancel()


async def track_async(
    triton: Any, headers: dict[str, str], frames: Iterable[Frame | ImageInput] | AsyncIterable[Frame | ImageInput],
    session: TrackSession, *,
    live: bool, timeout_s: float,
) -> AsyncIterator[TrackedFrame]:  # fmt: skip
    """Run one video over a bidirectional stream of a ``tritonclient.grpc.aio.InferenceServerClient``."""
    import grpc

    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    requests: asyncio.Queue[Any] = asyncio.Queue()

    def frame_arrived() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(events.put_nowait, ("frame", None))

    feed: LiveFeed | FileFeed | AsyncLiveFeed | AsyncFileFeed
    if isinstance(frames, AsyncIterable):
        feed = AsyncLiveFeed(frames, lambda: events.put_nowait(("frame", None))) if live else AsyncFileFeed(frames)
    else:
        feed = LiveFeed(frames, frame_arrived) if live else FileFeed(frames)

    async def take() -> tuple[Frame | None, int]:
        if isinstance(feed, AsyncFileFeed):
            return await feed.take()
        return feed.take() if live else await asyncio.to_thread(feed.take)

    async def outgoing() -> AsyncIterator[Any]:
        while (request := await requests.get()) is not _END:
            yield request

    call = triton._client_stub.ModelStreamInfer(outgoing(), metadata=triton._get_metadata(headers))

    async def read() -> None:
        try:
            async for response in call:
                events.put_nowait(("response", response))
            events.put_nowait(("closed", None))
        except grpc.RpcError as exc:
            events.put_nowait(("failed", exc))

    reader = asyncio.ensure_future(read())

    async def next_event(timeout: float | None) -> tuple[str, Any]:
        try:
            return await asyncio.wait_for(events.get(), timeout)
        except asyncio.TimeoutError:
            raise _deadline(session, timeout_s) from None

    try:
        while True:
            while session.can_send():
                frame, dropped = await take()
                if frame is None:
                    break
                request = session.request(frame, dropped)
                if request is not None:
                    requests.put_nowait(request)
            for item in session.ready():
                yield item
            if feed.error is not None:
                raise feed.error
            if feed.exhausted and session.in_flight == 0:
                break
            _handle(session, *await next_event(timeout_s if session.in_flight else None))
    finally:
        feed.stop()
        closing = session.closing_request()
        if closing is not None:
            requests.put_nowait(closing)
            deadline = loop.time() + CLOSE_WAIT_S
            with contextlib.suppress(PoseClientError):
                while session.in_flight and (left := deadline - loop.time()) > 0:
                    _handle(session, *await next_event(left))
        requests.put_nowait(_END)
        call.cancel()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


# ------------------------------------------------------------------------------------------------ drawing
def track_color(track_id: int) -> tuple[int, int, int]:
    """A colour per track ID, far apart for neighbouring IDs (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((track_id * 0.618033988749895) % 1.0, 0.85, 1.0)
    return (round(r * 255), round(g * 255), round(b * 255))


def draw_tracks(
    image_rgb: NDArray[Any], poses: Sequence[TrackedPose], skeleton: Sequence[tuple[int, int]], kpt_threshold: float
) -> NDArray[Any]:
    """The poses drawn as :func:`posetriton.client.drawing.draw_poses` draws them, each box then redrawn in its
    track's colour with the track ID on a tag (untracked poses keep the default colour)."""
    import cv2

    from .drawing import _Style, draw_poses

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
