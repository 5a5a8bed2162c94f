"""The synchronous pose client, over Triton's gRPC API (``tritonclient.grpc``).

Every call is a flow of ``_core.ClientCore`` (the logic, shared with the asyncio client); this module only
performs its steps: tritonclient calls, ``time.sleep``, a thread pool for streams, and one bidirectional
stream per tracked video. See ``posetriton.client.inputs`` for what each kind of input becomes on the wire.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar, cast, overload

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from posetriton.core.contract import Smoothing, Thresholds

from ._core import DEFAULT_IN_FLIGHT, DEFAULT_MODEL, DEFAULT_TIMEOUT_S, HEALTH_TIMEOUT_S, ClientCore, documented
from .errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelNotReadyError,
    PoseClientError,
    ServerUnavailableError,
)
from .feeds import FileFeed, LiveFeed
from .inputs import DEFAULT_URL, EncodedImage, ImageInput, ImageSource, encode_image, parse_grpc_url, request_parameters
from .results import ImagePoses, ModelMetadata
from .retry import RetryPolicy
from .steps import Call, Emit, Finish, Flow, NextFrame, Pause, Start, Stepper, Together
from .streaming import Frame, StreamItem
from .tracking_results import TrackedFrame
from .tracking_session import NextEvent, Send, StreamEvent, TakeFrame, TrackSession, closing_flow, track_flow

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_URL",
    "HEALTH_TIMEOUT_S",
    "DeadlineExceededError",
    "EncodedImage",
    "ImageSource",
    "InvalidInputError",
    "ModelNotReadyError",
    "PoseClient",
    "PoseClientError",
    "RetryPolicy",
    "ServerUnavailableError",
    "encode_image",
    "parse_grpc_url",
    "request_parameters",
]

R = TypeVar("R")
Perform = Callable[[Any], Any]  # performs the steps of a tracked video


@documented
class PoseClient(ClientCore):
    """Pose estimation through a Triton server, synchronously; thread-safe: one instance can serve many threads.

    The arguments and what every call does are :class:`~posetriton.client._core.ClientCore`'s.
    """

    def _connect(self) -> Any:
        return grpcclient.InferenceServerClient(self.url, **self._channel)

    def __enter__(self) -> PoseClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._run(self._close_flow())

    def is_server_live(self) -> bool:
        return self._run(self._is_server_live_flow())

    def is_server_ready(self) -> bool:
        return self._run(self._is_server_ready_flow())

    def is_model_ready(self, model: str | None = None) -> bool:
        return self._run(self._is_model_ready_flow(model))

    def check_ready(self, model: str | None = None) -> None:
        self._run(self._check_ready_flow(model))

    def model_metadata(self, model: str | None = None) -> ModelMetadata:
        return self._run(self._model_metadata_flow(model))

    def ready_models(self) -> list[str]:
        return self._run(self._ready_models_flow())

    def list_models(self) -> list[ModelMetadata]:
        return self._run(self._list_models_flow())

    @overload
    def predict(
        self, image: list[ImageInput] | tuple[ImageInput, ...], *, thresholds: Thresholds | None = ...,
        timeout_s: float | None = ..., **parameters: float | int | None,
    ) -> list[ImagePoses]: ...  # fmt: skip

    @overload
    def predict(
        self, image: ImageInput, *, thresholds: Thresholds | None = ..., timeout_s: float | None = ...,
        **parameters: float | int | None,
    ) -> ImagePoses: ...  # fmt: skip

    def predict(
        self, image: ImageInput | list[ImageInput] | tuple[ImageInput, ...], *, thresholds: Thresholds | None = None,
        timeout_s: float | None = None, **parameters: float | int | None,
    ) -> ImagePoses | list[ImagePoses]:  # fmt: skip
        return self._run(self._predict_flow(image, self._parameters(parameters, thresholds), timeout_s))

    def predict_batch(
        self, images: Sequence[ImageInput], *, thresholds: Thresholds | None = None, timeout_s: float | None = None,
        **parameters: float | int | None,
    ) -> list[ImagePoses]:  # fmt: skip
        return self._run(self._predict_batch_flow(images, self._parameters(parameters, thresholds), timeout_s))

    def stream(
        self, frames: Iterable[Frame | ImageInput], *, in_flight: int = DEFAULT_IN_FLIGHT,
        thresholds: Thresholds | None = None, timeout_s: float | None = None, progress: bool = False,
        total: int | None = None, **parameters: float | int | None,
    ) -> Iterator[StreamItem]:  # fmt: skip
        def items() -> Iterator[StreamItem]:  # checks the parameters at the first item, as a generator would
            chosen = self._parameters(parameters, thresholds)
            flow = self._stream_flow(
                frames, chosen, in_flight=in_flight, timeout_s=timeout_s, progress=progress, total=total
            )
            yield from self._emitted(flow, workers=in_flight)

        return items()

    def track(
        self, frames: Iterable[Frame | ImageInput], *, live: bool = False, max_in_flight: int = DEFAULT_IN_FLIGHT,
        thresholds: Thresholds | None = None, sequence_id: int | None = None, timeout_s: float | None = None,
        smoothed: bool = True, smoothing: Smoothing | None = None, **parameters: float | int | None,
    ) -> Iterator[TrackedFrame]:  # fmt: skip
        chosen = self._parameters(parameters, thresholds, smoothing, tracked=True)
        session = self._track_session(
            chosen, max_in_flight=max_in_flight, sequence_id=sequence_id, timeout_s=timeout_s, smoothed=smoothed
        )
        return self._tracked(frames, session, live=live, timeout_s=timeout_s or self.timeout_s)

    # --- the driver: performs the flows' steps ------------------------------------------------------------

    def _run(self, flow: Flow[R], perform: Perform | None = None) -> R:
        """Run a flow that emits nothing to its end; its result."""
        steps = self._emitted(flow, perform=perform)
        try:
            item = next(steps)
        except StopIteration as done:
            return cast(R, done.value)
        steps.close()
        raise AssertionError(f"{flow!r} emitted {item!r}: iterate over it instead")

    def _emitted(self, flow: Flow[R], workers: int = 1, perform: Perform | None = None) -> Generator[Any, None, R]:
        """Perform a flow's steps, yielding what it emits; then its result. ``perform`` takes the steps of a
        tracked video; ``workers`` is the size of the thread pool that runs started flows (a stream's)."""
        stepper = Stepper(flow)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="posetriton-stream")
        started: list[Future[Any]] = []
        try:
            for step in stepper:
                with stepper.performing():  # an Emit is performed by handing its item to the caller
                    stepper.reply(
                        (yield step.item) if isinstance(step, Emit) else self._perform(step, pool, started, perform)
                    )
            return stepper.result
        finally:
            stepper.close()
            for future in started:
                future.cancel()
            pool.shutdown(wait=True)

    def _perform(self, step: Any, pool: ThreadPoolExecutor, started: list[Future[Any]], perform: Perform | None) -> Any:
        if isinstance(step, Call):
            return getattr(self._client, step.method)(*step.args, **step.kwargs)
        if isinstance(step, Pause):
            return time.sleep(step.seconds)
        if isinstance(step, Together):
            return [self._run(flow) for flow in step.flows]
        if isinstance(step, NextFrame):
            return next(step.source, None)
        if isinstance(step, Start):
            started.append(pool.submit(self._run, step.flow))
            return started[-1]
        if isinstance(step, Finish):
            return step.handle.result()
        assert perform is not None, f"no performer for {step!r}"
        return perform(step)

    def _tracked(
        self, frames: Iterable[Frame | ImageInput], session: TrackSession, *, live: bool, timeout_s: float
    ) -> Iterator[TrackedFrame]:
        """One video on its own stream: tritonclient's sync client holds one stream at a time, so each video
        opens its own client (channel); its callback turns responses into events."""
        events: queue.Queue[StreamEvent] = queue.Queue()
        feed = LiveFeed(frames, lambda: events.put(StreamEvent())) if live else FileFeed(frames)
        stream = self._connect()

        def perform(step: Any) -> Any:
            if isinstance(step, TakeFrame):
                return feed.take()
            if isinstance(step, Send):
                # A stream that already failed refuses the request; its failure is the next event.
                with contextlib.suppress(InferenceServerException):
                    stream.async_stream_infer(**step.request)
                return None
            try:
                return events.get(timeout=step.timeout_s) if isinstance(step, NextEvent) else None
            except queue.Empty:
                return None

        try:
            stream.start_stream(lambda result, error: events.put(StreamEvent(result, error)), headers=self.headers)
            yield from self._emitted(track_flow(session, feed, timeout_s), perform=perform)
        finally:
            feed.stop()
            with contextlib.suppress(InferenceServerException, PoseClientError):
                self._run(closing_flow(session), perform)
            stream.stop_stream(cancel_requests=True)
            stream.close()
