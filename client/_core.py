"""What the synchronous and the asyncio clients share: settings, and every flow of a call, written once.

Each public call of :class:`PoseClient` / :class:`AsyncPoseClient` is a flow here (a generator of
:mod:`~posetriton.client.steps` that does no I/O): retries with backoff and the busy budget, deadlines,
shared memory regions, model discovery, batching, streaming with N in flight and tracking sessions. The
two clients only perform the steps, one with ``tritonclient.grpc``, the other with ``tritonclient.grpc.aio``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from os import PathLike
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from posetriton.core.contract import (
    REQUEST_PARAMETER_NAMES,
    THRESHOLD_NAMES,
    ContractError,
    Smoothing,
    Thresholds,
    request_parameters,
)

from .batching import Request, assemble, image_bytes_input, pixels_model, plan_requests, response_outputs
from .discovery import TRACKING_SUFFIXES, loaded_models_index, ready_ensembles, served_models_hint
from .errors import (
    AccessDeniedError,
    InvalidInputError,
    ModelNotReadyError,
    PoseClientError,
    ServerBusyError,
    ServerUnavailableError,
    translate,
)
from .inputs import (
    ARRAY_ENCODINGS,
    DEFAULT_URL,
    ArrayEncoding,
    ImageInput,
    PreparedImage,
    parse_grpc_url,
    prepare_image,
)
from .results import FailedImage, ImagePoses, ImageResult, MetadataError, ModelMetadata
from .retry import NO_RETRY, QUEUE_SHARE, Deadline, RetryBudget, RetryHook, RetryPolicy
from .shm import RELEASE_POLL_S, RELEASE_WAIT_S, Region, RegionPool, destroy, still_in_use
from .steps import Call, Emit, Finish, Flow, NextFrame, Pause, Start, Together
from .streaming import Frame, StreamItem, as_frames, progress_bar
from .tracking_session import TrackSession

__all__ = [  # the names other modules and the tests take from here
    "DEFAULT_IN_FLIGHT",
    "DEFAULT_MODEL",
    "DEFAULT_TIMEOUT_S",
    "HEALTH_TIMEOUT_S",
    "NO_RETRY",
    "QUEUE_SHARE",
    "TRACKING_SUFFIXES",
    "ClientCore",
    "Deadline",
    "Request",
    "RetryHook",
    "RetryPolicy",
    "image_bytes_input",
    "loaded_models_index",
    "ready_ensembles",
    "served_models_hint",
]

DEFAULT_MODEL = "yolo11n_pose"
# CPU inference of a full batch of large photos can take tens of seconds; health calls are quick.
DEFAULT_TIMEOUT_S = 120.0
HEALTH_TIMEOUT_S = 30.0
# Requests in flight when streaming: the server is compute-bound beyond a few (docs/client.md).
DEFAULT_IN_FLIGHT = 4
_MAX_MESSAGE_BYTES = 2**31 - 1
T = TypeVar("T")


class ClientCore:
    """Pose estimation through a Triton server; use as a context manager so the gRPC channel is closed.

    ``timeout_s`` is the deadline of each inference request (per call with ``timeout_s=``), its retries
    and their pauses included; the server receives it too and drops the request uncomputed once it has
    passed. ``retry`` retries ``UNAVAILABLE`` (a server down, or busy: :class:`ServerBusyError`) with
    exponential backoff and full jitter within that deadline (a :class:`RetryPolicy`, or an attempt count;
    default 3 attempts). ``ssl`` with ``root_certificates`` / ``private_key`` /
    ``certificate_chain`` (PEM file paths) opens a TLS channel; ``headers`` travel with every
    call. ``shared_memory=True`` passes inputs through system shared memory (server on the same
    host only).
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
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if array_encoding not in ARRAY_ENCODINGS:
            raise ValueError(f"array_encoding must be one of {ARRAY_ENCODINGS}, got {array_encoding!r}")
        self.url = parse_grpc_url(url)
        self.model = model
        self.timeout_s = timeout_s
        if retry is None:
            retry = RetryPolicy()
        self.retry = RetryPolicy(attempts=retry) if isinstance(retry, int) else retry
        self._busy_budget = RetryBudget(self.retry)
        self.headers = dict(headers or {})
        self.array_encoding: ArrayEncoding = array_encoding
        self.shared_memory = shared_memory
        self.on_retry = on_retry
        self._metadata: dict[str, ModelMetadata] = {}
        self._regions = RegionPool()
        # What opens a tritonclient client on this server; the sync client opens one more per video (one stream each).
        self._channel: dict[str, Any] = {
            "ssl": ssl, "root_certificates": _path(root_certificates), "private_key": _path(private_key),
            "certificate_chain": _path(certificate_chain), "channel_args": self.channel_args(),
        }  # fmt: skip
        self._client: Any = self._connect()

    def _connect(self) -> Any:
        """A tritonclient ``InferenceServerClient`` (sync or aio) on :attr:`url`."""
        raise NotImplementedError

    @staticmethod
    def channel_args() -> list[tuple[str, Any]]:
        """tritonclient's defaults, plus reconnection attempts at most 2 s apart (gRPC's default grows to 120 s),
        so that retries meet a server as soon as it comes back."""
        keepalive = grpcclient.KeepAliveOptions()
        return [
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]

    @property
    def pixels_model(self) -> str:
        """The ensemble that takes raw pixels: ``NAME_pixels``."""
        return pixels_model(self.model)

    # --- the flows of the public calls (each client runs them: ``close()`` runs _close_flow()...) ------------

    def _close_flow(self) -> Flow[None]:
        """Unregister and free the shared memory regions (if any), then close the channel."""
        for region in self._regions.drain():
            yield from self._release(region)
        yield Call("close")

    def _is_server_live_flow(self) -> Flow[bool]:
        """Whether the server answers as live."""
        return bool((yield from self._retried(lambda: self._health_call("is_server_live"))))

    def _is_server_ready_flow(self) -> Flow[bool]:
        """Whether the server answers as ready."""
        return bool((yield from self._retried(lambda: self._health_call("is_server_ready"))))

    def _is_model_ready_flow(self, model: str | None = None) -> Flow[bool]:
        """Whether ``model`` (the client's by default) is loaded and ready."""
        name = model or self.model
        return bool((yield from self._retried(lambda: self._health_call("is_model_ready", name), model=name)))

    def _check_ready_flow(self, model: str | None = None) -> Flow[None]:
        """Raise ServerUnavailableError, or ModelNotReadyError naming the models served, unless requests can work."""
        name = model or self.model
        if not (yield from self._is_server_live_flow()):
            raise ServerUnavailableError(f"Triton at {self.url} answers but is not live")
        if not (yield from self._is_model_ready_flow(name)):
            hint = yield from self._served_models_hint()
            raise ModelNotReadyError(f"model {name!r} is not ready on {self.url}; {hint}")

    def _model_metadata_flow(self, model: str | None = None) -> Flow[ModelMetadata]:
        """Keypoint names, skeleton, batch limit and the other facts the ensemble's config parameters carry."""
        name = model or self.model
        config = lambda: self._health_call("get_model_config", name, as_json=True)  # noqa: E731
        response = yield from self._retried(config, model=name)
        try:
            meta = ModelMetadata.from_config(response["config"])
        except (MetadataError, KeyError, TypeError, ValueError) as exc:
            raise PoseClientError(f"cannot read the configuration of model {name!r}: {exc}") from exc
        self._metadata[name] = meta
        return meta

    def _ready_models_flow(self) -> Flow[list[str]]:
        """Names of the models ready on the server, without the steps of the ensembles."""
        try:
            index = yield from self._retried(lambda: self._health_call("get_model_repository_index", as_json=True))
        except AccessDeniedError:  # a restricted repository API: statistics list the loaded models too
            stats = yield from self._retried(lambda: self._health_call("get_inference_statistics", as_json=True))
            index = loaded_models_index(stats)
        return ready_ensembles(index)

    def _list_models_flow(self) -> Flow[list[ModelMetadata]]:
        """The pose models the server offers: ready ensembles whose config carries keypoint names (and skeleton)."""
        found = []
        for name in (yield from self._ready_models_flow()):
            try:
                meta = yield from self._model_metadata_flow(name)
            except ServerUnavailableError:
                raise
            except PoseClientError:
                continue  # unloaded meanwhile, or a config that is not a pose model's
            if meta.is_pose_model:
                found.append(meta)
        return found

    def _predict_flow(
        self, image: ImageInput | list[ImageInput] | tuple[ImageInput, ...], parameters: Mapping[str, int | float],
        timeout_s: float | None,
    ) -> Flow[ImagePoses | list[ImagePoses]]:  # fmt: skip
        """Poses in one image. (A list or tuple is passed to :meth:`predict_batch`, as earlier versions did.)"""
        if isinstance(image, (list, tuple)):
            return (yield from self._predict_batch_flow(image, parameters, timeout_s))
        return (yield from self._predict_batch_flow([image], parameters, timeout_s))[0]

    def _predict_batch_flow(
        self, images: Sequence[ImageInput], parameters: Mapping[str, int | float], timeout_s: float | None = None
    ) -> Flow[list[ImagePoses]]:
        """Poses for every image, in input order.

        Encoded images (paths, bytes) go in one request to the model; numpy arrays (raw) in one
        request per shape to ``NAME_pixels`` (the asyncio client sends them concurrently). Each request
        must fit the model's max_batch_size. If any image is refused the whole call raises InvalidInputError
        naming it (``index``).
        """
        prepared = self._prepare(images)
        if not prepared:
            return []
        timeout = timeout_s or self.timeout_s
        requests = plan_requests(self.model, prepared)
        outputs = yield Together(tuple(self._infer(request, parameters, timeout) for request in requests))
        return assemble(self.model, len(prepared), list(zip(requests, outputs, strict=True)), self._metadata)

    def _stream_flow(
        self, frames: Iterable[Frame | ImageInput], parameters: Mapping[str, int | float], *, in_flight: int,
        timeout_s: float | None, progress: bool, total: int | None,
    ) -> Flow[None]:  # fmt: skip
        """Send each frame as its own request, at most ``in_flight`` at a time, and yield results in order.

        A frame the server refuses yields a :class:`FailedImage`; other errors stop the stream. Frames are
        read from ``frames`` only as slots free up (under asyncio in a worker thread, so that video decoding
        does not stall the event loop). ``progress`` shows a tqdm bar.
        """
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        bar = progress_bar(progress, total, self.model)
        source = as_frames(frames)
        pending: deque[tuple[Frame, Any]] = deque()
        try:
            while (frame := (yield NextFrame(source))) is not None:
                pending.append((frame, (yield Start(self._predict_frame(frame, parameters, timeout_s)))))
                if len(pending) >= in_flight:
                    yield from self._emit_result(*pending.popleft(), bar)
            while pending:
                yield from self._emit_result(*pending.popleft(), bar)
        finally:
            if bar is not None:
                bar.close()

    def _track_session(
        self, parameters: Mapping[str, int | float], *, max_in_flight: int, sequence_id: int | None,
        timeout_s: float | None, smoothed: bool,
    ) -> TrackSession:  # fmt: skip
        """Poses with track IDs for each frame of one video, in frame order (``posetriton.client.tracking``).

        The frames travel on one bidirectional gRPC stream to ``NAME_track`` as one sequence
        (``sequence_id``, random by default), at most ``max_in_flight`` at a time. ``live=True``
        (a camera or stream) reads the source in a thread and sends only the newest frame when a
        slot frees up, counting the others in ``TrackedFrame.dropped``; otherwise every frame is sent.
        ``frames`` may also be an async iterable with the asyncio client (frames arriving from elsewhere,
        e.g. a web socket). A refused frame yields a ``TrackedFrame`` with ``error``; a lost stream or
        sequence raises ``TrackingStreamError`` (call ``track()`` again to go on with a new sequence). Each
        pose's ``keypoints`` are smoothed over its track by the server (``smoothing`` overrides the filter's
        defaults); ``smoothed=False`` gives the raw ones (``raw_keypoints`` holds them either way).
        """
        return TrackSession(
            self.model, max_in_flight=max_in_flight, parameters=dict(parameters), sequence_id=sequence_id,
            url=self.url, frame_timeout_s=timeout_s or self.timeout_s, smoothed=smoothed,
        )  # fmt: skip

    # --- request parameters -----------------------------------------------------------------------------

    @staticmethod
    def _parameters(
        values: Mapping[str, float | int | None], thresholds: Thresholds | None, smoothing: Smoothing | None = None,
        *, tracked: bool = False,
    ) -> dict[str, int | float]:  # fmt: skip
        """The request parameters of a call (keyword arguments by wire name over the groups), checked by their one
        declaration (posetriton.core.contract) before anything is sent: ContractError, a ValueError, names an
        unknown or bad one. Only a tracked video takes the smoothing's. The model's ``max_det`` limit is left to
        the server, whose answer names it (the client does not read the model's configuration for each call)."""
        accepted = REQUEST_PARAMETER_NAMES if tracked else THRESHOLD_NAMES
        unknown = sorted(set(values) - set(accepted))
        if unknown:
            raise ContractError(f"unknown request parameter(s) {unknown}; accepted: {list(accepted)}")
        by_name: dict[str, Any] = dict(values)
        return request_parameters(thresholds, smoothing, **by_name)

    # --- the steps of those flows ------------------------------------------------------------------------

    def _health_call(self, method: str, *args: Any, **kwargs: Any) -> Call:
        return Call(method, args, {**kwargs, "headers": self.headers, "client_timeout": self._health_timeout()})

    def _health_timeout(self) -> float:
        return min(self.timeout_s, HEALTH_TIMEOUT_S)

    def _retried(
        self, call: Callable[[], Call], *, model: str | None = None, timeout_s: float | None = None,
        request: Request | None = None, deadline: Deadline | None = None,
    ) -> Flow[Any]:  # fmt: skip
        """One RPC, retrying transient failures per the retry policy; PoseClientError otherwise. ``call`` makes
        each attempt's call anew (its gRPC deadline is what is left of the call's)."""
        attempt = 1
        while True:
            try:
                return self._answered((yield call()))
            except InferenceServerException as exc:
                error = self._error(exc, model, timeout_s, request)
                delay = self._should_retry(error, attempt, deadline)
                if delay is None:
                    raise error from exc
            yield Pause(delay)
            attempt += 1

    def _answered(self, result: T) -> T:
        """A call the server answered (its result passes through): it earns back part of the busy budget."""
        self._busy_budget.earn()
        return result

    def _error(
        self, exc: InferenceServerException, model: str | None = None, timeout_s: float | None = None,
        request: Request | None = None,
    ) -> PoseClientError:  # fmt: skip
        return translate(
            exc,
            url=self.url,
            model=model or self.model,
            timeout_s=timeout_s or self.timeout_s,
            names=request.names if request else (),
            indices=request.indices if request else (),
        )

    def _should_retry(self, error: PoseClientError, attempt: int, deadline: Deadline | None = None) -> float | None:
        """The pause before another try of a call whose try number ``attempt`` (1-based) failed, or None
        (also when the pause would end past the call's ``deadline``)."""
        if isinstance(error, ServerBusyError) and not self._busy_budget.spend():
            return None
        if not error.transient or attempt >= self.retry.attempts:
            return None
        delay = self.retry.delay(attempt - 1)
        if deadline is not None and delay >= deadline.remaining():
            return None
        if self.on_retry is not None:
            self.on_retry(attempt, error, delay)
        return delay

    def _prepare(self, images: Sequence[ImageInput]) -> list[PreparedImage]:
        if isinstance(images, (str, bytes, bytearray, memoryview, np.ndarray)) or not isinstance(images, Sequence):
            raise TypeError("predict_batch() takes a list of images; use predict() for a single image")
        return [prepare_image(image, index, self.array_encoding) for index, image in enumerate(images)]

    def _infer(self, request: Request, parameters: Mapping[str, int | float], timeout: float) -> Flow[Any]:
        region = (yield from self._region(request.nbytes())) if self.shared_memory else None
        try:
            tensor = request.tensor(region)
            deadline = Deadline(timeout)
            result = yield from self._retried(
                lambda: Call("infer", (request.model, [tensor]), {
                    "client_timeout": deadline.remaining(), "timeout": deadline.server_timeout_us(),
                    "headers": self.headers, "parameters": dict(parameters) or None,
                }),
                model=request.model, timeout_s=timeout, request=request, deadline=deadline,
            )  # fmt: skip
        finally:
            if region is not None:
                self._regions.give_back(region)
        return response_outputs(result, request.model)

    def _region(self, nbytes: int) -> Flow[Region]:
        """A registered shared memory region of at least ``nbytes``, from the pool or newly registered."""
        region, created, replaced = self._regions.take(nbytes)
        if replaced is not None:
            yield from self._release(replaced)
        if not created:
            return region
        try:
            yield from self._retried(
                lambda: self._health_call("register_system_shared_memory", region.name, region.key, region.size)
            )
        except PoseClientError:
            self._regions.forget(region)
            raise
        return region

    def _release(self, region: Region) -> Flow[None]:
        """Unregister a region once the server no longer holds it, then unlink it."""
        deadline = time.monotonic() + RELEASE_WAIT_S
        while True:
            try:
                yield self._health_call("unregister_system_shared_memory", region.name)
                break
            except InferenceServerException as exc:  # a server gone: the region is freed all the same
                if not still_in_use(exc) or time.monotonic() > deadline:
                    break
            yield Pause(RELEASE_POLL_S)
        destroy(region)

    def _predict_frame(self, frame: Frame, parameters: Mapping[str, int | float], timeout_s: float | None) -> Flow[Any]:
        try:
            (result,) = yield from self._predict_batch_flow([frame.image], parameters, timeout_s)
        except InvalidInputError as exc:
            if exc.index is None:  # the request itself (a threshold) was refused: every frame would fail
                raise
            return FailedImage(frame.name, exc.reason)
        return result.renamed(frame.name)

    @staticmethod
    def _emit_result(frame: Frame, handle: Any, bar: Any) -> Flow[None]:
        result: ImageResult = yield Finish(handle)
        if bar is not None:
            bar.update(1)
        yield Emit(StreamItem(frame, result))

    def _served_models_hint(self) -> Flow[str]:
        """Name the ready models, so a typo in --model is obvious; best effort only."""
        try:
            return served_models_hint((yield from self._ready_models_flow()))
        except PoseClientError:
            return served_models_hint(None)


# Each public call of the clients and the flow (or session) whose docstring documents it.
DOCUMENTED_BY = {
    "close": "_close_flow", "is_server_live": "_is_server_live_flow", "is_server_ready": "_is_server_ready_flow",
    "is_model_ready": "_is_model_ready_flow", "check_ready": "_check_ready_flow",
    "model_metadata": "_model_metadata_flow", "ready_models": "_ready_models_flow",
    "list_models": "_list_models_flow", "predict": "_predict_flow", "predict_batch": "_predict_batch_flow",
    "stream": "_stream_flow", "track": "_track_session",
}  # fmt: skip
C = TypeVar("C", bound=type)


def documented(cls: C) -> C:
    """Give a client's public calls the docstrings of the flows they run, written once here."""
    for name, flow in DOCUMENTED_BY.items():
        getattr(cls, name).__doc__ = getattr(ClientCore, flow).__doc__
    return cls


def _path(value: str | PathLike[str] | None) -> str | None:
    return None if value is None else str(value)
