"""The asyncio pose client (``tritonclient.grpc.aio``): the surface of :class:`PoseClient`, awaited.

Every call is a flow of ``_core.ClientCore`` (the logic, shared with the sync client); this module only
performs its steps: awaited tritonclient calls, ``asyncio.sleep``, tasks for concurrent requests, and
``stream_infer`` for tracked videos. One client holds one gRPC channel; any number of ``predict``
coroutines may run on it at once (``asyncio.gather``). Use one client per event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar, overload

import grpc
import tritonclient.grpc.aio as aiogrpcclient
from tritonclient.utils import InferenceServerException

from posetriton.core.contract import Smoothing, Thresholds

from ._core import DEFAULT_IN_FLIGHT, ClientCore, documented
from .errors import PoseClientError
from .feeds import AsyncFileFeed, AsyncLiveFeed, FileFeed, LiveFeed
from .inputs import ImageInput
from .results import ImagePoses, ModelMetadata
from .steps import Call, Emit, Finish, Flow, NextFrame, Pause, Start, Stepper, Together
from .streaming import Frame, StreamItem
from .tracking_results import TrackedFrame
from .tracking_session import NextEvent, Send, StreamEvent, TakeFrame, TrackSession, closing_flow, track_flow

R = TypeVar("R")
Perform = Callable[[Any], Awaitable[Any]]  # performs the steps of a tracked video


@documented
class AsyncPoseClient(ClientCore):
    """Asyncio twin of :class:`~posetriton.client.PoseClient` (same arguments, same results, same errors).

    Use as ``async with AsyncPoseClient(...) as client:`` so the channel (and any shared memory
    regions) are released.
    """

    def _connect(self) -> Any:
        return aiogrpcclient.InferenceServerClient(self.url, **self._channel)

    async def __aenter__(self) -> AsyncPoseClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._run(self._close_flow())

    async def is_server_live(self) -> bool:
        return await self._run(self._is_server_live_flow())

    async def is_server_ready(self) -> bool:
        return await self._run(self._is_server_ready_flow())

    async def is_model_ready(self, model: str | None = None) -> bool:
        return await self._run(self._is_model_ready_flow(model))

    async def check_ready(self, model: str | None = None) -> None:
        await self._run(self._check_ready_flow(model))

    async def model_metadata(self, model: str | None = None) -> ModelMetadata:
        return await self._run(self._model_metadata_flow(model))

    async def ready_models(self) -> list[str]:
        return await self._run(self._ready_models_flow())

    async def list_models(self) -> list[ModelMetadata]:
        return await self._run(self._list_models_flow())

    @overload
    async def predict(
        self, image: list[ImageInput] | tuple[ImageInput, ...], *, thresholds: Thresholds | None = ...,
        timeout_s: float | None = ..., **parameters: float | int | None,
    ) -> list[ImagePoses]: ...  # fmt: skip

    @overload
    async def predict(
        self, image: ImageInput, *, thresholds: Thresholds | None = ..., timeout_s: float | None = ...,
        **parameters: float | int | None,
    ) -> ImagePoses: ...  # fmt: skip

    async def predict(
        self, image: ImageInput | list[ImageInput] | tuple[ImageInput, ...], *, thresholds: Thresholds | None = None,
        timeout_s: float | None = None, **parameters: float | int | None,
    ) -> ImagePoses | list[ImagePoses]:  # fmt: skip
        return await self._run(self._predict_flow(image, self._parameters(parameters, thresholds), timeout_s))

    async def predict_batch(
        self, images: Sequence[ImageInput], *, thresholds: Thresholds | None = None, timeout_s: float | None = None,
        **parameters: float | int | None,
    ) -> list[ImagePoses]:  # fmt: skip
        return await self._run(self._predict_batch_flow(images, self._parameters(parameters, thresholds), timeout_s))

    async def stream(
        self, frames: Iterable[Frame | ImageInput], *, in_flight: int = DEFAULT_IN_FLIGHT,
        thresholds: Thresholds | None = None, timeout_s: float | None = None, progress: bool = False,
        total: int | None = None, **parameters: float | int | None,
    ) -> AsyncIterator[StreamItem]:  # fmt: skip
        chosen = self._parameters(parameters, thresholds)
        flow = self._stream_flow(
            frames, chosen, in_flight=in_flight, timeout_s=timeout_s, progress=progress, total=total
        )
        async for item in self._emitted(flow):
            yield item

    def track(
        self, frames: Iterable[Frame | ImageInput] | AsyncIterable[Frame | ImageInput], *, live: bool = False,
        max_in_flight: int = DEFAULT_IN_FLIGHT, thresholds: Thresholds | None = None, sequence_id: int | None = None,
        timeout_s: float | None = None, smoothed: bool = True, smoothing: Smoothing | None = None,
        **parameters: float | int | None,
    ) -> AsyncIterator[TrackedFrame]:  # fmt: skip
        chosen = self._parameters(parameters, thresholds, smoothing, tracked=True)
        session = self._track_session(
            chosen, max_in_flight=max_in_flight, sequence_id=sequence_id, timeout_s=timeout_s, smoothed=smoothed
        )
        return self._tracked(frames, session, live=live, timeout_s=timeout_s or self.timeout_s)

    # --- the driver: performs the flows' steps ------------------------------------------------------------

    async def _run(self, flow: Flow[R], perform: Perform | None = None) -> R:
        """Run a flow that emits nothing to its end; its result."""
        result: list[R] = []
        async for item in self._emitted(flow, perform, result):
            raise AssertionError(f"{flow!r} emitted {item!r}: iterate over it instead")
        return result[0]

    async def _emitted(
        self, flow: Flow[R], perform: Perform | None = None, result: list[R] | None = None
    ) -> AsyncIterator[Any]:
        """Perform a flow's steps, yielding what it emits; its result is appended to ``result`` (an async
        generator returns none). ``perform`` takes the steps of a tracked video."""
        stepper = Stepper(flow)
        started: list[asyncio.Task[Any]] = []
        try:
            for step in stepper:
                with stepper.performing():  # an Emit is performed by handing its item to the caller
                    stepper.reply(
                        (yield step.item) if isinstance(step, Emit) else await self._perform(step, started, perform)
                    )
            if result is not None:
                result.append(stepper.result)
        finally:
            stepper.close()
            pending = [task for task in started if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _perform(self, step: Any, started: list[asyncio.Task[Any]], perform: Perform | None) -> Any:
        if isinstance(step, Call):
            return await getattr(self._client, step.method)(*step.args, **step.kwargs)
        if isinstance(step, Pause):
            return await asyncio.sleep(step.seconds)
        if isinstance(step, Together):  # the requests of one call run concurrently
            return await asyncio.gather(*(self._run(flow) for flow in step.flows))
        if isinstance(step, NextFrame):  # a worker thread: decoding a video must not stall the loop
            return await asyncio.to_thread(next, step.source, None)
        if isinstance(step, Start):
            started.append(asyncio.ensure_future(self._run(step.flow)))
            return started[-1]
        if isinstance(step, Finish):
            return await step.handle
        assert perform is not None, f"no performer for {step!r}"
        return await perform(step)

    async def _tracked(
        self, frames: Iterable[Frame | ImageInput] | AsyncIterable[Frame | ImageInput], session: TrackSession, *,
        live: bool, timeout_s: float,
    ) -> AsyncIterator[TrackedFrame]:  # fmt: skip
        """One video on one ``stream_infer`` call: requests go through a queue, a task reads the responses."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        requests: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def frame_arrived() -> None:  # from a reader thread (LiveFeed)
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(events.put_nowait, StreamEvent())

        feed: LiveFeed | FileFeed | AsyncLiveFeed | AsyncFileFeed
        if isinstance(frames, AsyncIterable):
            feed = AsyncLiveFeed(frames, lambda: events.put_nowait(StreamEvent())) if live else AsyncFileFeed(frames)
        else:
            feed = LiveFeed(frames, frame_arrived) if live else FileFeed(frames)

        async def outgoing() -> AsyncIterator[dict[str, Any]]:
            while (request := await requests.get()) is not None:
                yield request

        responses = self._client.stream_infer(outgoing(), headers=self.headers)

        async def read() -> None:
            try:
                async for result, error in responses:
                    events.put_nowait(StreamEvent(result, error))
                events.put_nowait(StreamEvent(closed=True))
            except grpc.RpcError as exc:  # the stream failed: an error with its gRPC status
                failure = InferenceServerException(msg=exc.details(), status=str(exc.code()))
                events.put_nowait(StreamEvent(error=failure))

        reader = asyncio.ensure_future(read())

        async def perform(step: Any) -> Any:
            if isinstance(step, TakeFrame):
                if isinstance(feed, AsyncFileFeed):
                    return await feed.take()
                return feed.take() if live else await asyncio.to_thread(feed.take)
            if isinstance(step, Send):
                return requests.put_nowait(step.request)
            try:
                return await asyncio.wait_for(events.get(), step.timeout_s) if isinstance(step, NextEvent) else None
            except asyncio.TimeoutError:
                return None

        try:
            async for item in self._emitted(track_flow(session, feed, timeout_s), perform):
                yield item
        finally:
            feed.stop()
            with contextlib.suppress(PoseClientError):
                await self._run(closing_flow(session), perform)
            requests.put_nowait(None)
            responses.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
