"""Turn what a caller passes (a path, bytes, a numpy array, a PIL image) into what travels to the server.

* ``str`` / ``PathLike``: the file is read and sent **encoded**, as it is on disk (JPEG, PNG,
  WebP, BMP, GIF), to the ``NAME`` ensemble (input ``IMAGE``); the server decodes it and applies
  the EXIF orientation.
* ``bytes``: sent as they are, like a file.
* ``numpy.ndarray``: ``[H, W, 3]`` uint8 **RGB**. By default sent **raw** to the ``NAME_pixels``
  ensemble (input ``PIXELS`` UINT8 ``[B, H, W, 3]``); arrays of one call that share a shape go
  in one request. With ``array_encoding="jpeg"`` or ``"png"`` they are encoded client-side with
  OpenCV instead and sent like a file (smaller on the wire, JPEG is lossy).
* ``PIL.Image.Image``: converted to RGB and treated as an array. No EXIF rotation is applied
  (the pixels are sent as they are); use ``PIL.ImageOps.exif_transpose`` first if you need it.

Encoded images are sent unread: the server reports each image's upright size with its result.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from posetriton.core.contract import ParameterGroup, Smoothing, Thresholds, parameter_groups
from posetriton.core.contract import request_parameters as core_request_parameters

from .errors import InvalidInputError

DEFAULT_URL = "127.0.0.1:8001"

ImageInput = str | PathLike[str] | bytes | bytearray | memoryview | NDArray[Any] | Image.Image
ImageSource = bytes | str | PathLike[str]  # the encoded inputs (kept for compatibility)
ArrayEncoding = Literal["raw", "jpeg", "png"]
ARRAY_ENCODINGS: tuple[ArrayEncoding, ...] = ("raw", "jpeg", "png")

_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")
JPEG_QUALITY = 95


@dataclass(frozen=True)
class PreparedImage:
    """An image ready to send: either encoded bytes (``data``) or raw RGB ``pixels``."""

    name: str
    data: bytes | None = None
    pixels: NDArray[np.uint8] | None = None

    @property
    def raw(self) -> bool:
        return self.pixels is not None

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes) if self.pixels is not None else len(self.data or b"")


# The name the client used before arrays were accepted.
EncodedImage = PreparedImage


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


def prepare_image(
    source: ImageInput, index: int = 0, array_encoding: ArrayEncoding = "raw", name: str | None = None
) -> PreparedImage:
    """Ready one input for sending; InvalidInputError (naming the image) when it cannot be used."""
    if isinstance(source, Image.Image):
        try:
            source = np.asarray(source.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"cannot read the PIL image: {exc}", index=index, image=name) from exc
    if isinstance(source, np.ndarray):
        return _prepare_array(source, index, array_encoding, name or f"<image {index}>")
    if isinstance(source, (str, PathLike, bytes, bytearray, memoryview)):
        prepared = encode_image(source, index)
        return prepared if name is None else PreparedImage(name, prepared.data)
    raise TypeError(f"image {index}: expected a path, bytes, a numpy array or a PIL image, got {type(source).__name__}")


def encode_image(source: ImageSource | bytearray | memoryview, index: int = 0) -> PreparedImage:
    """Read a file (or take bytes as they are); InvalidInputError names the image that cannot be read."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, data = f"<image {index}>", bytes(source)
    else:
        name = str(Path(source))
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"cannot read the file: {exc.strerror or exc}", index=index, image=name) from exc
    return PreparedImage(name=name, data=data)


def _prepare_array(array: NDArray[Any], index: int, encoding: ArrayEncoding, name: str) -> PreparedImage:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise InvalidInputError(
            f"arrays must be [height, width, 3] uint8 RGB, got {array.dtype} {list(array.shape)}",
            index=index,
            image=name,
        )
    height, width = int(array.shape[0]), int(array.shape[1])
    if height < 1 or width < 1:
        raise InvalidInputError(f"array has no pixels: {width}x{height}", index=index, image=name)
    if encoding == "raw":
        return PreparedImage(name=name, pixels=np.ascontiguousarray(array))
    return PreparedImage(name=name, data=encode_rgb(array, encoding))


def encode_rgb(array: NDArray[Any], encoding: Literal["jpeg", "png"] = "jpeg", quality: int = JPEG_QUALITY) -> bytes:
    """Encode an ``[H, W, 3]`` uint8 RGB array with OpenCV (JPEG at ``quality``, or lossless PNG)."""
    import cv2  # OpenCV is a core dependency, but only arrays sent encoded need it

    bgr = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if encoding == "jpeg" else []
    ok, buffer = cv2.imencode(".jpg" if encoding == "jpeg" else ".png", bgr, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {list(array.shape)} array as {encoding}")
    return bytes(buffer.tobytes())


def request_parameters(
    conf: float | None = None, iou: float | None = None, max_det: int | None = None,
    thresholds: Thresholds | None = None, max_det_limit: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Deprecated: :func:`posetriton.core.contract.request_parameters`, which takes every request parameter by its
    wire name, is the one validation. Kept, with its old keywords, for the SDK methods that still call it."""
    return core_request_parameters(thresholds, limits={"max_det": max_det_limit}, conf=conf, iou=iou, max_det=max_det)


# The parameter groups the SDK's methods take as objects; any other group's values go by wire name (``**parameters``).
_SDK_KEYWORDS: dict[type[ParameterGroup], str] = {Thresholds: "thresholds", Smoothing: "smoothing"}


def sdk_arguments(parameters: Mapping[str, int | float], *, tracking: bool = False) -> dict[str, Any]:
    """The SDK keyword arguments that send ``parameters`` (by wire name, checked) to ``NAME`` (with ``tracking``, to
    ``NAME_track``): ``thresholds=Thresholds(...)`` and so on; a parameter the ensemble does not read is left out."""
    arguments: dict[str, Any] = {}
    for group in parameter_groups(tracking=tracking):
        keyword = _SDK_KEYWORDS.get(group)
        if keyword is not None:
            arguments[keyword] = group.from_parameters(parameters)
        else:
            arguments.update(
                {d.name: parameters[d.name] for d in group.declarations().values() if d.name in parameters}
            )
    return arguments
