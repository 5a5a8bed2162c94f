"""The asyncio pose client (``tritonclient.grpc.aio``): the surface of :class:`PoseClient`, awaited.

One client holds one gRPC channel; any number of ``predict`` coroutines may run on it at once
(``asyncio.gather``), and :meth:`AsyncPoseClient.stream` keeps a bounded number in flight. Use
one client per event loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from os import PathLike
from types import TracebackType
from typing import Any, TypeVar, overload

import tritonclient.grpc.aio as aiogrpcclient
from tritonclient.utils import InferenceServerException

from posetriton.core.contract import Smoothing, Thresholds

from ._core import (
    DEFAULT_IN_FLIGHT,
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT_S,
    ClientCore,
    Deadline,
    Request,
    RetryHook,
    RetryPolicy,
    loaded_models_index,
    ready_ensembles,
    served_models_hint,
)
from .errors import (
    AccessDeniedError,
    InvalidInputError,
    ModelNotReadyError,
    PoseClientError,
    ServerUnavailableError,
)
from .inputs import DEFAULT_URL, ArrayEncoding, ImageInput, request_parameters
from .results import FailedImage, ImagePoses, ImageResult, ModelMetadata
from .shm import RELEASE_POLL_S, RELEASE_WAIT_S, Region, RegionPool, destroy, still_in_use
from .streaming import Frame, StreamItem, as_frames, progress_bar
from .tracking import TrackedFrame, TrackSession, track_async, track_parameters

T = TypeVar("T")
_END = object()


class AsyncPoseClient(ClientCore):
    """Asyncio twin of :class:`~posetriton.client.PoseClient` (same arguments, same results, same errors).

    Use as ``async with AsyncPoseClient(...) as client:`` so the channel (and any shared memory
    regions) are released.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model: str = DEFAULT_MODEL,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        retry: RetryPolicy | int | None = None,
        ssl: bool = False,
        root_certificates: str | PathLike[str] | None = None,
        private_key: str | PathLike[str] | None = None,
        certificate_chain: str | PathLike[str] | None = None,
        headers: Mapping[str, str] | None = None,
        array_encoding: ArrayEncoding = "raw",
        shared_memory: bool = False,
        on_retry: RetryHook | None = None,
    ) -> None:
        super().__init__(
            url, model, timeout_s, retry=retry, headers=headers, array_encoding=array_encoding,
            shared_memory=shared_memory, on_retry=on_retry,
        )  # fmt: skip
        self._client: Any = aiogrpcclient.InferenceServerClient(
            self.url,
            ssl=ssl,
            root_certificates=None if root_certificates is None else str(root_certificates),
            private_key=None if private_key is None else str(private_key),
            certificate_chain=None if certificate_chain is None else str(certificate_chain),
            channel_args=self.channel_args(),
        )
        self._regions = RegionPool()

    async def __aenter__(self) -> AsyncPoseClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for region in self._regions.drain():
            await self._release(region)
        await self._client.close()

    # --- health and discovery ----------------------------------------------------------------

    async def is_server_live(self) -> bool:
        return bool(await self._call(lambda: self._client.is_server_live(**self._health())))

    async def is_server_ready(self) -> bool:
        return bool(await self._call(lambda: self._client.is_server_ready(**self._health())))

    async def is_model_ready(self, model: str | None = None) -> bool:
        name = model or self.model
        return bool(await self._call(lambda: self._client.is_model_ready(name, **self._health()), model=name))

    async def check_ready(self, model: str | None = None) -> None:
        name = model or self.model
        if not await self.is_server_live():
            raise ServerUnavailableError(f"Triton at {self.url} answers but is not live")
        if not await self.is_model_ready(name):
            raise ModelNotReadyError(f"model {name!r} is not ready on {self.url}; {await self._served_models_hint()}")

    async def model_metadata(self, model: str | None = None) -> ModelMetadata:
        name = model or self.model
        response = await self._call(
            lambda: self._client.get_model_config(name, as_json=True, **self._health()), model=name
        )
        return self._metadata_from(name, response)

    async def ready_models(self) -> list[str]:
        try:
            index = await self._call(lambda: self._client.get_model_repository_index(as_json=True, **self._health()))
        except AccessDeniedError:  # a restricted repository API: statistics list the loaded models too
            stats = await self._call(lambda: self._client.get_inference_statistics(as_json=True, **self._health()))
            index = loaded_models_index(stats)
        return ready_ensembles(index)

    async def list_models(self) -> list[ModelMetadata]:
        found = []
        for name in await self.ready_models():
            try:
                meta = await self.model_metadata(name)
            except ServerUnavailableError:
                raise
            except PoseClientError:
                continue
            if meta.is_pose_model:
                found.append(meta)
        return found

    # --- inference ---------------------------------------------------------------------------

    @overload
    async def predict(
        self, image: list[ImageInput] | tuple[ImageInput, ...], *, conf: float | None = ...,
        iou: float | None = ..., max_det: int | None = ..., thresholds: Thresholds | None = ...,
        timeout_s: float | None = ...,
    ) -> list[ImagePoses]: ...  # fmt: skip

    @overload
    async def predict(
        self, image: ImageInput, *, conf: float | None = ..., iou: float | None = ...,
        max_det: int | None = ..., thresholds: Thresholds | None = ..., timeout_s: float | None = ...,
    ) -> ImagePoses: ...  # fmt: skip

    async def predict(
        self,
        image: ImageInput | list[ImageInput] | tuple[ImageInput, ...],
        *,
        conf: float | None = None,
        iou: float | None = None,
        max_det: int | None = None,
        thresholds: Thresholds | None = None,
        timeout_s: float | None = None,
    ) -> ImagePoses | list[ImagePoses]:
        if isinstance(image, (list, tuple)):
            return await self.predict_batch(
                image, conf=conf, iou=iou, max_det=max_det, thresholds=thresholds, timeout_s=timeout_s
            )
        return (
            await self.predict_batch(
                [image], conf=conf, iou=iou, max_det=max_det, thresholds=thresholds, timeout_s=timeout_s
            )
        )[0]

    async def predict_batch(
        self,
        images: Sequence[ImageInput],
        *,
        conf: float | None = None,
        iou: float | None = None,
        max_det: int | None = None,
        thresholds: Thresholds | None = None,
        timeout_s: float | None = None,
    ) -> list[ImagePoses]:
        """As :meth:`PoseClient.predict_batch`; the requests of one call (one per input kind) run concurrently."""
        parameters = request_parameters(conf, iou, max_det, thresholds)
        prepared = self._prepare(images)
        if not prepared:
            return []
        timeout = timeout_s or self.timeout_s
        requests = self._plan(prepared)
        outputs = await asyncio.gather(*(self._infer(request, parameters, timeout) for request in requests))
        return self._assemble(len(prepared), list(zip(requests, outputs, strict=True)))

    async def stream(
        self,
        frames: Iterable[Frame | ImageInput],
        *,
        in_flight: int = DEFAULT_IN_FLIGHT,
        conf: float | None = None,
        iou: float | None = None,
        max_det: int | None = None,
        thresholds: Thresholds | None = None,
        timeout_s: float | None = None,
        progress: bool = False,
        total: int | None = None,
    ) -> AsyncIterator[StreamItem]:
        """Each frame its own request, at most ``in_flight`` on the channel at once; results yielded in order.

        Frames are pulled from ``frames`` in a worker thread (video decoding does not stall the
        event loop) only as slots free up. A refused frame yields a :class:`FailedImage`.
        """
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        chosen = Thresholds.from_parameters(request_parameters(conf, iou, max_det, thresholds))
        bar = progress_bar(progress, total, self.model)
        source = as_frames(frames)
        pending: deque[tuple[Frame, asyncio.Task[ImageResult]]] = deque()
        try:
            while True:
                frame = await asyncio.to_thread(next, source, _END)
                if not isinstance(frame, Frame):
                    break
                task = asyncio.ensure_future(self._predict_frame(frame, chosen, timeout_s))
                pending.append((frame, task))
                if len(pending) >= in_flight:
                    yield await self._finish(pending.popleft(), bar)
            while pending:
                yield await self._finish(pending.popleft(), bar)
        finally:
            for _, task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*(task for _, task in pending), return_exceptions=True)
            if bar is not None:
                bar.close()

    @staticmethod
    async def _finish(entry: tuple[Frame, asyncio.Task[ImageResult]], bar: Any) -> StreamItem:
        frame, task = entry
        item = StreamItem(frame, await task)
        if bar is not None:
            bar.update(1)
        return item

    async def _predict_frame(self, frame: Frame, thresholds: Thresholds, timeout_s: float | None) -> ImageResult:
        try:
            result = await self.predict(frame.image, thresholds=thresholds, timeout_s=timeout_s)
        except InvalidInputError as exc:
            if exc.index is None:
                raise
            return FailedImage(frame.name, exc.reason)
        return result.renamed(frame.name)

    # --- video tracking (NAME_track) ---------------------------------------------------------

    def track(
        self,
        frames: Iterable[Frame | ImageInput] | AsyncIterable[Frame | ImageInput],
        *,
        live: bool = False,
        max_in_flight: int = DEFAULT_IN_FLIGHT,
        conf: float | None = None,
        iou: float | None = None,
        max_det: int | None = None,
        thresholds: Thresholds | None = None,
        sequence_id: int | None = None,
        timeout_s: float | None = None,
        smoothed: bool = True,
        smoothing: Smoothing | None = None,
    ) -> AsyncIterator[TrackedFrame]:
        """As :meth:`PoseClient.track`, as an async iterator: ``async for result in client.track(frames)``.

        ``frames`` may also be an async iterable (frames arriving from elsewhere, e.g. a web socket);
        with ``live=True`` a frame that arrives while every slot is busy replaces the unsent one.
        """
        parameters = track_parameters(request_parameters(conf, iou, max_det, thresholds), smoothing)
        session = TrackSession(
            self.model, max_in_flight=max_in_flight, parameters=parameters, sequence_id=sequence_id, url=self.url,
            frame_timeout_s=timeout_s or self.timeout_s, smoothed=smoothed,
        )  # fmt: skip
        return track_async(
            self._client, self.headers, frames, session, live=live, timeout_s=timeout_s or self.timeout_s
        )

    # --- plumbing ----------------------------------------------------------------------------

    def _health(self) -> dict[str, Any]:
        return {"headers": self.headers, "client_timeout": self._health_timeout()}

    async def _infer(self, request: Request, parameters: dict[str, Any], timeout: float) -> dict[str, Any]:
        region = await self._region(request.nbytes()) if self.shared_memory else None
        try:
            tensor = request.tensor(region)
            deadline = Deadline(timeout)
            result = await self._call(
                lambda: self._client.infer(
                    request.model, [tensor], client_timeout=deadline.remaining(), timeout=deadline.server_timeout_us(),
                    headers=self.headers, parameters=parameters or None,
                ),
                model=request.model, timeout_s=timeout, request=request, deadline=deadline,
            )  # fmt: skip
        finally:
            if region is not None:
                self._regions.give_back(region)
        return self._outputs(result, request.model)

    async def _region(self, nbytes: int) -> Region:
        region, created, replaced = self._regions.take(nbytes)
        if replaced is not None:
            await self._release(replaced)
        if not created:
            return region
        try:
            register = self._client.register_system_shared_memory
            await self._call(lambda: register(region.name, region.key, region.size, **self._health()))
        except PoseClientError:
            self._regions.forget(region)
            raise
        return region

    async def _release(self, region: Region) -> None:
        """Unregister a region once the server no longer holds it, then unlink it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELEASE_WAIT_S
        while True:
            try:
                await self._client.unregister_system_shared_memory(region.name, **self._health())
                break
            except InferenceServerException as exc:  # a server gone: the region is freed all the same
                if not still_in_use(exc) or loop.time() > deadline:
                    break
                await asyncio.sleep(RELEASE_POLL_S)
        destroy(region)

    async def _call(
        self, operation: Callable[[], Awaitable[T]], *, model: str | None = None, timeout_s: float | None = None,
        request: Request | None = None, deadline: Deadline | None = None,
    ) -> T:  # fmt: skip
        attempt = 1
        while True:
            try:
                return self._answered(await operation())
            except InferenceServerException as exc:
                error = self._error(exc, model, timeout_s, request)
                delay = self._should_retry(error, attempt, deadline)
                if delay is None:
                    raise error from exc
            await asyncio.sleep(delay)
            attempt += 1

    async def _served_models_hint(self) -> str:
        try:
            return served_models_hint(await self.ready_models())
        except PoseClientError:
            return served_models_hint(None)
