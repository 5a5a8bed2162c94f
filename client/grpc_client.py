"""A small typed client for the pose ensembles, over Triton's gRPC API.

Images travel encoded (JPEG/PNG/WebP bytes as read from disk) in one request per call: the
server decodes them, so the client never needs the pixels. The client only reads each image's
header, for the width and height the JSON results report.

Every ``tritonclient`` exception is turned into one of the :class:`PoseClientError` subclasses
below, with a message written for the person at the terminal; the original exception stays
attached as ``__cause__`` for debugging.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from tritonclient.utils import InferenceServerException

from .results import OUTPUT_NAMES, ImagePoses, MetadataError, ModelMetadata, poses_from_batch

DEFAULT_URL = "127.0.0.1:8001"
DEFAULT_MODEL = "yolo11n_pose"
# CPU inference of a full batch of large photos can take tens of seconds; health calls are quick.
DEFAULT_TIMEOUT_S = 120.0
HEALTH_TIMEOUT_S = 30.0

ImageSource = bytes | str | PathLike[str]

# EXIF orientations 5-8 rotate by 90 degrees: the server's upright image has width and height swapped.
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# The server prefixes its messages; the client reports the image by name instead.
_ENSEMBLE_PREFIX = re.compile(r"^(\[request id: [^\]]*\] )?(in ensemble '[^']*', )?")
_IMAGE_INDEX = re.compile(r"^image (\d+) of (\d+): ")
# Messages about the request as a whole (thresholds, batch size) rather than about one image.
_REQUEST_LEVEL = re.compile(r"^((conf|iou|max_det) must|(unknown )?request parameter|inference request batch-size)")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")
# Model steps that are loaded with an ensemble but are not meant to be called directly.
_STEP_SUFFIXES = ("_preprocess", "_network", "_postprocess")


class PoseClientError(Exception):
    """Base of every error this client raises about the server or the inputs; ``str()`` is a one-line message."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # The gRPC status name (e.g. "UNAVAILABLE") when the error came from the server.
        self.status = status


class ServerUnavailableError(PoseClientError):
    """Nothing answers at the URL, or the server is not live."""


class ModelNotReadyError(PoseClientError):
    """The server answers but does not serve the requested model (unknown, not loaded, or still loading)."""


class DeadlineExceededError(PoseClientError):
    """The server did not answer within the client's timeout."""


class InvalidInputError(PoseClientError):
    """An image (or the request) was refused; ``index``/``image`` say which image when known.

    ``reason`` is the explanation without the server's prefixes; ``server_message`` is the
    server's text unchanged (``None`` when the client refused the image before sending it).
    """

    def __init__(
        self,
        reason: str,
        *,
        index: int | None = None,
        image: str | None = None,
        server_message: str | None = None,
        status: str | None = None,
    ) -> None:
        super().__init__(f"{image}: {reason}" if image else reason, status)
        self.reason = reason
        self.index = index
        self.image = image
        self.server_message = server_message


@dataclass(frozen=True)
class EncodedImage:
    """An image ready to send: its encoded bytes and its upright size, read from the header only."""

    name: str
    data: bytes
    width: int
    height: int


def parse_grpc_url(url: str) -> str:
    """Return ``HOST:PORT`` as tritonclient wants it, accepting an optional ``grpc://`` prefix.

    Raises ValueError for anything else: tritonclient would otherwise quietly dial port 443
    for a bare host, or fail later with an opaque resolver message.
    """
    text = url.strip()
    scheme, separator, rest = text.partition("://")
    if separator:
        if scheme.lower() != "grpc":
            raise ValueError(
                f"{url!r} is a {scheme}:// URL; give Triton's gRPC address as HOST:PORT, e.g. {DEFAULT_URL}"
            )
        text = rest.rstrip("/")
    match = _HOST_PORT.fullmatch(text)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"{url!r} is not a gRPC address; expected HOST:PORT, e.g. {DEFAULT_URL}")
    return text


def encode_image(source: ImageSource, index: int = 0) -> EncodedImage:
    """Read a file (or take bytes as they are) and its upright size; InvalidInputError names the image."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, data = f"<image {index}>", bytes(source)
    else:
        name = str(Path(source))
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"cannot read the file: {exc.strerror or exc}", index=index, image=name) from exc
    try:
        width, height = upright_size(data)
    except ValueError as exc:
        raise InvalidInputError(str(exc), index=index, image=name) from exc
    return EncodedImage(name=name, data=data, width=width, height=height)


def upright_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of the image once turned upright per its EXIF orientation, from the header alone.

    The server applies the EXIF orientation before detecting, so its coordinates refer to the
    upright image; this must agree with it without decoding the pixels.
    """
    if not data:
        raise ValueError("empty image: 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError(f"not a recognised image ({len(data)} bytes starting {data[:8]!r})") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"unreadable image header: {exc}") from None
    with image:
        width, height = image.size
        if _orientation(image) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
    return width, height


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block: the server will judge the image, not the client
        return 1


def request_parameters(conf: float | None, iou: float | None, max_det: int | None) -> dict[str, Any]:
    """The per-request thresholds to send; omitted ones keep the model's defaults. ValueError when out of range."""
    parameters: dict[str, Any] = {}
    for key, value in (("conf", conf), ("iou", iou)):
        if value is None:
            continue
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{key} must be in [0, 1], got {value}")
        parameters[key] = float(value)
    if max_det is not None:
        if isinstance(max_det, bool) or int(max_det) != max_det or max_det < 1:
            raise ValueError(f"max_det must be a positive integer, got {max_det!r}")
        parameters["max_det"] = int(max_det)
    return parameters


class PoseClient:
    """Pose estimation through a Triton server; use as a context manager so the gRPC channel is closed."""

    def __init__(
        self, url: str = DEFAULT_URL, model: str = DEFAULT_MODEL, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.url = parse_grpc_url(url)
        self.model = model
        self.timeout_s = timeout_s
        self._client: Any = grpcclient.InferenceServerClient(self.url)

    def __enter__(self) -> PoseClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def check_ready(self) -> None:
        """Raise ServerUnavailableError, or ModelNotReadyError naming the models served, unless requests can work."""
        health_timeout = min(self.timeout_s, HEALTH_TIMEOUT_S)
        with self._translated_errors():
            if not self._client.is_server_live(client_timeout=health_timeout):
                raise ServerUnavailableError(f"Triton at {self.url} answers but is not live")
            ready = bool(self._client.is_model_ready(self.model, client_timeout=health_timeout))
        if not ready:
            raise ModelNotReadyError(f"model {self.model!r} is not ready on {self.url}; {self._served_models_hint()}")

    def model_metadata(self) -> ModelMetadata:
        """Keypoint names, skeleton, batch limit and the other facts the ensemble's config parameters carry."""
        with self._translated_errors():
            response = self._client.get_model_config(
                self.model, as_json=True, client_timeout=min(self.timeout_s, HEALTH_TIMEOUT_S)
            )
        try:
            return ModelMetadata.from_config(response["config"])
        except (MetadataError, KeyError, TypeError, ValueError) as exc:
            raise PoseClientError(f"cannot read the configuration of model {self.model!r}: {exc}") from exc

    def predict(
        self,
        images: Sequence[ImageSource],
        conf: float | None = None,
        iou: float | None = None,
        max_det: int | None = None,
    ) -> list[ImagePoses]:
        """Poses for every image, in input order, from one request (so the batch must fit the model's max_batch_size).

        ``str``/``Path`` items are read from disk; ``bytes`` are sent as they are. Thresholds left
        as ``None`` keep the model's defaults. If any image is refused the whole call raises
        InvalidInputError naming it (``index``); retry the others separately to keep their results.
        """
        if isinstance(images, (str, bytes, PathLike)):
            raise TypeError("predict() takes a sequence of images; wrap a single image in a list")
        parameters = request_parameters(conf, iou, max_det)
        if not images:
            return []
        encoded = [encode_image(source, index) for index, source in enumerate(images)]
        outputs = self._infer(encoded, parameters)
        return poses_from_batch([(e.name, e.width, e.height) for e in encoded], outputs)

    def _infer(self, encoded: Sequence[EncodedImage], parameters: dict[str, Any]) -> dict[str, NDArray[Any]]:
        batch = np.empty((len(encoded), 1), dtype=object)
        batch[:, 0] = [e.data for e in encoded]
        tensor = grpcclient.InferInput("IMAGE", list(batch.shape), "BYTES")
        tensor.set_data_from_numpy(batch)
        with self._translated_errors(encoded):
            result = self._client.infer(
                self.model, [tensor], client_timeout=self.timeout_s, parameters=parameters or None
            )
        outputs: dict[str, NDArray[Any]] = {}
        for name in OUTPUT_NAMES:
            array = result.as_numpy(name)
            if array is None:
                raise PoseClientError(f"model {self.model!r} returned no {name} output; is it a pose ensemble?")
            outputs[name] = array
        return outputs

    @contextmanager
    def _translated_errors(self, encoded: Sequence[EncodedImage] = ()) -> Iterator[None]:
        try:
            yield
        except InferenceServerException as exc:
            raise self._translate(exc, encoded) from exc

    def _translate(self, exc: InferenceServerException, encoded: Sequence[EncodedImage]) -> PoseClientError:
        """Map a gRPC status to the error hierarchy, with a message that says what to do about it."""
        status = str(exc.status() or "").removeprefix("StatusCode.")
        message = str(exc.message() or exc)
        if status == "INVALID_ARGUMENT":
            return _invalid_input(message, encoded, status)
        if status == "NOT_FOUND" or (status == "UNAVAILABLE" and "model" in message.lower()):
            return ModelNotReadyError(f"model {self.model!r} is not served at {self.url}: {message}", status)
        if status == "UNAVAILABLE":
            return ServerUnavailableError(
                f"cannot reach Triton's gRPC endpoint at {self.url} ({message}); "
                "is the server running (posetriton serve) and is this its gRPC port?",
                status,
            )
        if status == "DEADLINE_EXCEEDED":
            return DeadlineExceededError(
                f"Triton at {self.url} did not answer within {self.timeout_s:g} s; "
                "raise the timeout or send smaller batches",
                status,
            )
        return PoseClientError(f"Triton at {self.url} failed the request ({status or 'no status'}): {message}", status)

    def _served_models_hint(self) -> str:
        """Name the ready models, so a typo in --model is obvious; best effort only."""
        try:
            index = self._client.get_model_repository_index(as_json=True, client_timeout=HEALTH_TIMEOUT_S)
        except InferenceServerException:
            return "could not list the models it serves"
        names = sorted(
            str(entry.get("name"))
            for entry in index.get("models", [])
            if entry.get("state") == "READY" and not str(entry.get("name")).endswith(_STEP_SUFFIXES)
        )
        return f"models ready there: {', '.join(names)}" if names else "it has no models ready"


def _invalid_input(message: str, encoded: Sequence[EncodedImage], status: str) -> InvalidInputError:
    """Name the refused image: the server says "image I of N: ..." for batches and nothing for a single image.

    ``index`` stays None when the request itself was refused (a threshold, the batch size), so
    a caller does not blame, or retry, the images.
    """
    reason = _ENSEMBLE_PREFIX.sub("", message)
    index: int | None = None
    match = _IMAGE_INDEX.match(reason)
    if match is not None:
        index, reason = int(match.group(1)), reason[match.end() :]
    elif len(encoded) == 1 and not _REQUEST_LEVEL.match(reason):
        index = 0
    image = encoded[index].name if index is not None and 0 <= index < len(encoded) else None
    return InvalidInputError(reason, index=index, image=image, server_message=message, status=status)
