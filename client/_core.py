"""What the synchronous and the asyncio clients share: options, retries, request planning, results.

Neither client does any I/O here; each one only says how to call tritonclient (directly or
with ``await``), so the two behave the same by construction.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from posetriton.core.contract import IMAGE, PIXELS, PIXELS_SUFFIX, STEP_SUFFIXES, TRACK_SUFFIX

from .errors import PoseClientError, ServerBusyError, translate
from .inputs import ARRAY_ENCODINGS, ArrayEncoding, ImageInput, PreparedImage, parse_grpc_url, prepare_image
from .results import OUTPUT_NAMES, ImagePoses, ModelMetadata, poses_from_batch
from .shm import Region, bytes_tensor_size

DEFAULT_MODEL = "yolo11n_pose"
# CPU inference of a full batch of large photos can take tens of seconds; health calls are quick.
DEFAULT_TIMEOUT_S = 120.0
HEALTH_TIMEOUT_S = 30.0
# Requests in flight when streaming: the server is compute-bound beyond a few (docs/client.md).
DEFAULT_IN_FLIGHT = 4
# NAME_track and its step take video streams (PoseClient.track), not predict(): not listed among the models.
# NAME_track serves video (track()), not predict(); its tracker step is a step like the others.
TRACKING_SUFFIXES = (TRACK_SUFFIX,)
_MAX_MESSAGE_BYTES = 2**31 - 1
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient failures (gRPC ``UNAVAILABLE``: a server down, or up but busy) with exponential
    backoff, within the call's deadline.

    ``attempts`` counts every try, the first included (1 = never retry). The pause before
    retry ``n`` (0-based) is ``min(max_backoff_s, initial_backoff_s * multiplier ** n)``, less
    a random part of up to ``jitter`` of it so that many clients do not retry in step: the default
    ``jitter=1`` is "full jitter" (a pause drawn uniformly up to the backoff), which spreads the retries of
    clients refused together by a busy server. A retry whose pause would end past the call's deadline is not
    made. Errors that another try cannot fix (a refused image, an unknown model, a deadline) are raised at once.

    Busy answers (:class:`ServerBusyError`: the server is up and refusing work) are also throttled per client,
    as gRPC's retry throttling (gRFC A6) does: each one costs a token of ``busy_tokens``, each answered call
    earns ``busy_token_ratio`` back, and a busy answer is retried only while more than half of the tokens are
    left. So a client that meets a saturated server stops multiplying its own load (every refused try has
    already cost the server a decode), while it still retries a passing burst. A server that is down or
    restarting costs no tokens: those retries go on until the deadline.
    """

    attempts: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 1.0
    busy_tokens: float = 10.0
    busy_token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"invalid backoff settings: {self}")
        if self.busy_tokens <= 0 or self.busy_token_ratio <= 0:
            raise ValueError(f"busy_tokens and busy_token_ratio must be positive: {self}")

    def delay(self, retry: int) -> float:
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return base * (1.0 - self.jitter * random.random())


NO_RETRY = RetryPolicy(attempts=1)


class RetryBudget:
    """The busy-answer token bucket of one client (:class:`RetryPolicy`); thread-safe, shared by its calls."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.max_tokens, self.ratio = policy.busy_tokens, policy.busy_token_ratio
        self.tokens = self.max_tokens
        self._lock = threading.Lock()

    def spend(self) -> bool:
        """A busy answer: take a token; whether it may still be retried."""
        with self._lock:
            self.tokens = max(0.0, self.tokens - 1.0)
            return self.tokens > self.max_tokens / 2

    def earn(self) -> None:
        """An answered call."""
        with self._lock:
            self.tokens = min(self.max_tokens, self.tokens + self.ratio)


# The share of what is left of a call's deadline that the server may spend queueing the request (Triton's
# per-request timeout, checked in each step's queue); the rest is left for computing it. Without it a request
# could wait in the network step's queue up to the whole deadline, then be computed for nobody.
QUEUE_SHARE = 0.3


class Deadline:
    """The end of one call, attempts and pauses included: each attempt gets what is left of it as its gRPC
    deadline, and the server gets a share of it (:data:`QUEUE_SHARE`, Triton's request ``timeout``), so that
    a request that could no longer be answered in time is dropped from the server's queues uncomputed."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self.end = clock() + seconds

    def remaining(self) -> float:
        return max(self.end - self._clock(), 0.0)

    def server_timeout_us(self) -> int:
        """The longest the server may queue the request, in microseconds, for Triton's per-request timeout (at
        least 1: 0 would mean none)."""
        return max(int(self.remaining() * QUEUE_SHARE * 1e6), 1)


# Called before each retry with (attempt that failed, 1-based; the error; seconds until the next try).
RetryHook = Callable[[int, PoseClientError, float], None]


@dataclass(frozen=True)
class Request:
    """One inference request of a call: the images it carries and their positions in the call."""

    model: str
    indices: tuple[int, ...]
    images: tuple[PreparedImage, ...]

    @property
    def raw(self) -> bool:
        return self.images[0].raw

    @property
    def input_name(self) -> str:
        return PIXELS if self.raw else IMAGE

    @property
    def names(self) -> list[str]:
        return [image.name for image in self.images]

    def nbytes(self) -> int:
        if self.raw:
            return sum(image.nbytes for image in self.images)
        return bytes_tensor_size([image.data or b"" for image in self.images])

    def tensor(self, region: Region | None = None) -> grpcclient.InferInput:
        """The input tensor, holding the data or (with ``region``) pointing at it in shared memory."""
        if self.raw:
            first = self.images[0].pixels
            assert first is not None
            shape = [len(self.images), *first.shape]
            tensor = grpcclient.InferInput(PIXELS, shape, "UINT8")
            pixels = [image.pixels for image in self.images if image.pixels is not None]
            if region is None:
                tensor.set_data_from_numpy(np.stack(pixels))
            else:
                size = region.write_array(np.stack(pixels))
                tensor.set_shared_memory(region.name, size)
            return tensor
        data = [image.data or b"" for image in self.images]
        if region is None:
            return image_bytes_input(data)
        tensor = grpcclient.InferInput(IMAGE, [len(data), 1], "BYTES")
        tensor.set_shared_memory(region.name, region.write_bytes_tensor(data))
        return tensor


def image_bytes_input(data: Sequence[bytes]) -> grpcclient.InferInput:
    """The ``IMAGE`` input of a pose ensemble: encoded images as a BYTES tensor ``[B, 1]``."""
    tensor = grpcclient.InferInput(IMAGE, [len(data), 1], "BYTES")
    batch = np.empty((len(data), 1), dtype=object)
    batch[:, 0] = list(data)
    tensor.set_data_from_numpy(batch)
    return tensor


class ClientCore:
    """Settings and the I/O-free half of a pose client."""

    def __init__(
        self,
        url: str,
        model: str,
        timeout_s: float,
        *,
        retry: RetryPolicy | int | None,
        headers: Mapping[str, str] | None,
        array_encoding: ArrayEncoding,
        shared_memory: bool,
        on_retry: RetryHook | None,
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
        return self.model if self.model.endswith(PIXELS_SUFFIX) else self.model + PIXELS_SUFFIX

    def _health_timeout(self) -> float:
        return min(self.timeout_s, HEALTH_TIMEOUT_S)

    def _prepare(self, images: Sequence[ImageInput]) -> list[PreparedImage]:
        if isinstance(images, (str, bytes, bytearray, memoryview, np.ndarray)) or not isinstance(images, Sequence):
            raise TypeError("predict_batch() takes a list of images; use predict() for a single image")
        return [prepare_image(image, index, self.array_encoding) for index, image in enumerate(images)]

    def _plan(self, prepared: Sequence[PreparedImage]) -> list[Request]:
        """Encoded images in one request to NAME; arrays in one request to NAME_pixels per distinct shape."""
        groups: dict[tuple[int, ...] | None, list[int]] = {}
        for index, image in enumerate(prepared):
            key = tuple(image.pixels.shape) if image.pixels is not None else None
            groups.setdefault(key, []).append(index)
        return [
            Request(
                self.model if key is None else self.pixels_model,
                tuple(indices),
                tuple(prepared[i] for i in indices),
            )
            for key, indices in groups.items()
        ]

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

    def _answered(self, result: T) -> T:
        """A call the server answered (its result passes through): it earns back part of the busy budget."""
        self._busy_budget.earn()
        return result

    def _outputs(self, result: Any, model: str) -> dict[str, NDArray[Any]]:
        outputs: dict[str, NDArray[Any]] = {}
        for name in OUTPUT_NAMES:
            array = result.as_numpy(name)
            if array is None:
                raise PoseClientError(f"model {model!r} returned no {name} output; is it a pose ensemble?")
            outputs[name] = array
        return outputs

    def _assemble(self, size: int, answered: Sequence[tuple[Request, dict[str, NDArray[Any]]]]) -> list[ImagePoses]:
        results: list[ImagePoses | None] = [None] * size
        for request, outputs in answered:
            meta = self._metadata.get(request.model) or self._metadata.get(self.model)
            names = meta.keypoint_names if meta is not None else ()
            found = poses_from_batch(request.names, outputs, names)
            for index, poses in zip(request.indices, found, strict=True):
                results[index] = poses
        assert all(result is not None for result in results)
        return [result for result in results if result is not None]

    def _metadata_from(self, model: str, response: Mapping[str, Any]) -> ModelMetadata:
        from .results import MetadataError

        try:
            meta = ModelMetadata.from_config(response["config"])
        except (MetadataError, KeyError, TypeError, ValueError) as exc:
            raise PoseClientError(f"cannot read the configuration of model {model!r}: {exc}") from exc
        self._metadata[model] = meta
        return meta


def ready_ensembles(index: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the READY models in a repository index, without the steps of the ensembles."""
    entries = index.get("models", []) if isinstance(index, Mapping) else index
    return sorted(
        str(entry.get("name"))
        for entry in entries
        if entry.get("state") == "READY" and not str(entry.get("name")).endswith(STEP_SUFFIXES + TRACKING_SUFFIXES)
    )


def loaded_models_index(statistics: Mapping[str, Any]) -> list[dict[str, str]]:
    """A repository index built from the statistics of every loaded model, for servers that restrict the
    model-repository API to their own tooling (posetriton's do); statistics stay open to clients."""
    return [{"name": str(s.get("name")), "state": "READY"} for s in statistics.get("model_stats", [])]


def served_models_hint(names: Sequence[str] | None) -> str:
    if names is None:
        return "could not list the models it serves"
    return f"models ready there: {', '.join(names)}" if names else "it has no models ready"
