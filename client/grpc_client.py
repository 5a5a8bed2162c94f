"""The synchronous pose client, over Triton's gRPC API (``tritonclient.grpc``).

See ``posetriton.client.inputs`` for what each kind of input becomes on the wire, and
``posetriton.client.aio_client`` for the asyncio client with the same surface.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from os import PathLike
from types import TracebackType
from typing import Any, TypeVar, overload

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from posetriton.core.contract import Smoothing, Thresholds

from ._core import (
    DEFAULT_IN_FLIGHT,
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT_S,
    HEALTH_TIMEOUT_S,
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
    DeadlineExceededError,
    InvalidInputError,
    ModelNotReadyError,
    PoseClientError,
    ServerUnavailableError,
)
from .inputs import (
    DEFAULT_URL,
    ArrayEncoding,
    EncodedImage,
    ImageInput,
    ImageSource,
    encode_image,
    parse_grpc_url,
    request_parameters,
)
from .results import FailedImage, ImagePoses, ImageResult, ModelMetadata
from .shm import RELEASE_POLL_S, RELEASE_WAIT_S, Region, RegionPool, destroy, still_in_use
from .streaming import Frame, StreamItem, as_frames, progress_bar
from .tracking import TrackedFrame, TrackSession, track_parameters, track_sync

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

T = TypeVar("T")


class PoseClient(ClientCore):
    """Pose estimation through a Triton server; use as a context manager so the gRPC channel is closed.

    ``timeout_s`` is the deadline of each inference request (per call with ``timeout_s=``), its retries
    and their pauses included; the server receives it too and drops the request uncomputed once it has
    passed. ``retry`` retries ``UNAVAILABLE`` (a server down, or busy: :class:`ServerBusyError`) with
    exponential backoff and full jitter within that deadline (a :class:`RetryPolicy`, or an attempt count;
    default 3 attempts). ``ssl`` with ``root_certificates`` / ``private_key`` /
    ``certificate_chain`` (PEM file paths) opens a TLS channel; ``headers`` travel with every
    call. ``shared_memory=True`` passes inputs through system shared memory (server on the same
    host only). The client is thread-safe: one instance can serve many threads.
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
        self._client: Any = grpcclient.InferenceServerClient(
            self.url,
            ssl=ssl,
            root_certificates=_path(root_certificates),
            private_key=_path(private_key),
            certificate_chain=_path(certificate_chain),
            channel_args=self.channel_args(),
        )
        self._regions = RegionPool()

    def __enter__(self) -> PoseClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Unregister and free the shared memory regions (if any), then close the channel."""
        for region in self._regions.drain():
            self._release(region)
        self._client.close()

    # --- health and discovery ----------------------------------------------------------------

    def is_server_live(self) -> bool:
        return bool(self._call(lambda: self._client.is_server_live(**self._health())))

    def is_server_ready(self) -> bool:
        return bool(self._call(lambda: self._client.is_server_ready(**self._health())))

    def is_model_ready(self, model: str | None = None) -> bool:
        name = model or self.model
        return bool(self._call(lambda: self._client.is_model_ready(name, **self._health()), model=name))

    def check_ready(self, model: str | None = None) -> None:
        """Raise ServerUnavailableError, or ModelNotReadyError naming the models served, unless requests can work."""
        name = model or self.model
        if not self.is_server_live():
            raise ServerUnavailableError(f"Triton at {self.url} answers but is not live")
        if not self.is_model_ready(name):
            raise ModelNotReadyError(f"model {name!r} is not ready on {self.url}; {self._served_models_hint()}")

    def model_metadata(self, model: str | None = None) -> ModelMetadata:
        """Keypoint names, skeleton, batch limit and the other facts the ensemble's config parameters carry."""
        name = model or self.model
        response = self._call(lambda: self._client.get_model_config(name, as_json=True, **self._health()), model=name)
        return self._metadata_from(name, response)

    def ready_models(self) -> list[str]:
        """Names of the models ready on the server, without the steps of the ensembles."""
        try:
            index = self._call(lambda: self._client.get_model_repository_index(as_json=True, **self._health()))
        except AccessDeniedError:  # a restricted repository API: statistics list the loaded models too
            stats = self._call(lambda: self._client.get_inference_statistics(as_json=True, **self._health()))
            index = loaded_models_index(stats)
        return ready_ensembles(index)

    def list_models(self) -> list[ModelMetadata]:
        """The pose models the server offers: ready ensembles whose config carries keypoint names (and skeleton)."""
        found = []
        for name in self.ready_models():
            try:
                meta = self.model_metadata(name)
            except (ModelNotReadyError, PoseClientError) as exc:
                if isinstance(exc, ServerUnavailableError):
                    raise
                continue  # unloaded meanwhile, or a config that is not a pose model's
            if meta.is_pose_model:
                found.append(meta)
        return found

    # --- inference ---------------------------------------------------------------------------

    @overload
    def predict(
        self, image: list[ImageInput] | tuple[ImageInput, ...], *, conf: float | None = ...,
        iou: float | None = ..., max_det: int | None = ..., thresholds: Thresholds | None = ...,
        timeout_s: float | None = ...,
    ) -> list[ImagePoses]: ...  # fmt: skip

    @overload
    def predict(
        self, image: ImageInput, *, conf: float | None = ..., iou: float | None = ...,
        max_det: int | None = ..., thresholds: Thresholds | None = ..., timeout_s: float | None = ...,
    ) -> ImagePoses: ...  # fmt: skip

    def predict(
        self,
        image: ImageInput | list[ImageInput] | tuple[ImageInput, ...],
        *,
        conf: float | None = None,
        iou: float | None = None,
        max_det: int | None = None,
        thresholds: Thresholds | None = None,
        timeout_s: float | None = None,
    ) -> ImagePoses | list[ImagePoses]:
        """Poses in one image. (A list or tuple is passed to :meth:`predict_batch`, as earlier versions did.)"""
        if isinstance(image, (list, tuple)):
            return self.predict_batch(
                image, conf=conf, iou=iou, max_det=max_det, thresholds=thresholds, timeout_s=timeout_s
            )
        return self.predict_batch(
            [image], conf=conf, iou=iou, max_det=max_det, thresholds=thresholds, timeout_s=timeout_s
        )[0]

    def predict_batch(
        self,
        images: Sequence[ImageInput],
        *,
        conf: float | None = None,
        iou: float | None = None,
        max_det: int | None = None,
        thresholds: Thresholds | None = None,
        timeout_s: float | None = None,
    ) -> list[ImagePoses]:
        """Poses for every image, in input order.

        Encoded images (paths, bytes) go in one request to the model; numpy arrays (raw) in one
        request per shape to ``NAME_pixels``. Each request must fit the model's max_batch_size.
        If any image is refused the whole call raises InvalidInputError naming it (``index``).
        """
        parameters = request_parameters(conf, iou, max_det, thresholds)
        prepared = self._prepare(images)
        if not prepared:
            return []
        timeout = timeout_s or self.timeout_s
        answered = [(request, self._infer(request, parameters, timeout)) for request in self._plan(prepared)]
        return self._assemble(len(prepared), answered)

    def stream(
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
    ) -> Iterator[StreamItem]:
        """Send each frame as its own request, at most ``in_flight`` at a time (threads), and yield results in order.

        A frame the server refuses yields a :class:`FailedImage`; other errors stop the stream.
        Frames are read from ``frames`` only as slots free up. ``progress`` shows a tqdm bar.
        """
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        chosen = Thresholds.from_parameters(request_parameters(conf, iou, max_det, thresholds))
        bar = progress_bar(progress, total, self.model)
        pending: deque[tuple[Frame, Future[ImageResult]]] = deque()
        pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="posetriton-stream")

        def one(frame: Frame) -> ImageResult:
            return self._predict_frame(frame, chosen, timeout_s)

        try:
            for frame in as_frames(frames):
                pending.append((frame, pool.submit(one, frame)))
                if len(pending) >= in_flight:
                    yield self._finish(pending.popleft(), bar)
            while pending:
                yield self._finish(pending.popleft(), bar)
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            if bar is not None:
                bar.close()

    @staticmethod
    def _finish(entry: tuple[Frame, Future[ImageResult]], bar: Any) -> StreamItem:
        frame, future = entry
        item = StreamItem(frame, future.result())
        if bar is not None:
            bar.update(1)
        return item

    def _predict_frame(self, frame: Frame, thresholds: Thresholds, timeout_s: float | None) -> ImageResult:
        try:
            result = self.predict(frame.image, thresholds=thresholds, timeout_s=timeout_s)
        except InvalidInputError as exc:
            if exc.index is None:  # the request itself (a threshold) was refused: every frame would fail
                raise
            return FailedImage(frame.name, exc.reason)
        return result.renamed(frame.name)

    # --- video tracking (NAME_track) ---------------------------------------------------------

    def track(
        self,
        frames: Iterable[Frame | ImageInput],
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
    ) -> Iterator[TrackedFrame]:
        """Poses with track IDs for each frame of one video, in frame order (``posetriton.client.tracking``).

        The frames travel on one bidirectional gRPC stream to ``NAME_track`` as one sequence
        (``sequence_id``, random by default), at most ``max_in_flight`` at a time. ``live=True``
        (a camera or stream) reads the source in a thread and sends only the newest frame when a
        slot frees up, counting the others in ``TrackedFrame.dropped``; otherwise every frame is sent.
        A refused frame yields a ``TrackedFrame`` with ``error``; a lost stream or sequence raises
        ``TrackingStreamError`` (call ``track()`` again to go on with a new sequence). Each pose's
        ``keypoints`` are smoothed over its track by the server (``smoothing`` overrides the filter's
        defaults); ``smoothed=False`` gives the raw ones (``raw_keypoints`` holds them either way).
        """
        parameters = track_parameters(request_parameters(conf, iou, max_det, thresholds), smoothing)
        session = TrackSession(
            self.model, max_in_flight=max_in_flight, parameters=parameters, sequence_id=sequence_id, url=self.url,
            frame_timeout_s=timeout_s or self.timeout_s, smoothed=smoothed,
        )  # fmt: skip
        return track_sync(self._client, self.headers, frames, session, live=live, timeout_s=timeout_s or self.timeout_s)

    # --- plumbing ----------------------------------------------------------------------------

    def _health(self) -> dict[str, Any]:
        return {"headers": self.headers, "client_timeout": self._health_timeout()}

    def _infer(self, request: Request, parameters: dict[str, Any], timeout: float) -> dict[str, Any]:
        region = self._region(request.nbytes()) if self.shared_memory else None
        try:
            tensor = request.tensor(region)
            deadline = Deadline(timeout)
            result = self._call(
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

    def _region(self, nbytes: int) -> Region:
        region, created, replaced = self._regions.take(nbytes)
        if replaced is not None:
            self._release(replaced)
        if not created:
            return region
        try:
            self._call(
                lambda: self._client.register_system_shared_memory(
                    region.name, region.key, region.size, **self._health()
                )
            )
        except PoseClientError:
            self._regions.forget(region)
            raise
        return region

    def _release(self, region: Region) -> None:
        """Unregister a region once the server no longer holds it, then unlink it."""
        deadline = time.monotonic() + RELEASE_WAIT_S
        while True:
            try:
                self._client.unregister_system_shared_memory(region.name, **self._health())
                break
            except InferenceServerException as exc:  # a server gone: the region is freed all the same
                if not still_in_use(exc) or time.monotonic() > deadline:
                    break
                time.sleep(RELEASE_POLL_S)
        destroy(region)

    def _call(
        self, operation: Callable[[], T], *, model: str | None = None, timeout_s: float | None = None,
        request: Request | None = None, deadline: Deadline | None = None,
    ) -> T:  # fmt: skip
        """Run one RPC, retrying transient failures per the retry policy; raise PoseClientError otherwise."""
        attempt = 1
        while True:
            try:
                return self._answered(operation())
            except InferenceServerException as exc:
                error = self._error(exc, model, timeout_s, request)
                delay = self._should_retry(error, attempt, deadline)
                if delay is None:
                    raise error from exc
            time.sleep(delay)
            attempt += 1

    def _served_models_hint(self) -> str:
        """Name the ready models, so a typo in --model is obvious; best effort only."""
        try:
            return served_models_hint(self.ready_models())
        except PoseClientError:
            return served_models_hint(None)


def _path(value: str | PathLike[str] | None) -> str | None:
    return None if value is None else str(value)
