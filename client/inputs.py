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

Only the header of encoded images is read, for the upright width and height the results report.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from .errors import InvalidInputError

DEFAULT_URL = "127.0.0.1:8001"

ImageInput = str | PathLike[str] | bytes | bytearray | memoryview | NDArray[Any] | Image.Image
ImageSource = bytes | str | PathLike[str]  # the encoded inputs (kept for compatibility)
ArrayEncoding = Literal["raw", "jpeg", "png"]
ARRAY_ENCODINGS: tuple[ArrayEncoding, ...] = ("raw", "jpeg", "png")

# EXIF orientations 5-8 rotate by 90 degrees: the server's upright image has width and height swapped.
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")
JPEG_QUALITY = 95


@dataclass(frozen=True)
class PreparedImage:
    """An image ready to send: either encoded bytes (``data``) or raw RGB ``pixels``, with its upright size."""

    name: str
    width: int
    height: int
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
        return prepared if name is None else PreparedImage(name, prepared.width, prepared.height, prepared.data)
    raise TypeError(f"image {index}: expected a path, bytes, a numpy array or a PIL image, got {type(source).__name__}")


def encode_image(source: ImageSource | bytearray | memoryview, index: int = 0) -> PreparedImage:
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
    return PreparedImage(name=name, width=width, height=height, data=data)


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
        return PreparedImage(name=name, width=width, height=height, pixels=np.ascontiguousarray(array))
    return PreparedImage(name=name, width=width, height=height, data=encode_rgb(array, encoding))


def encode_rgb(array: NDArray[Any], encoding: Literal["jpeg", "png"] = "jpeg", quality: int = JPEG_QUALITY) -> bytes:
    """Encode an ``[H, W, 3]`` uint8 RGB array with OpenCV (JPEG at ``quality``, or lossless PNG)."""
    import cv2  # OpenCV is a core dependency, but only arrays sent encoded need it

    bgr = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if encoding == "jpeg" else []
    ok, buffer = cv2.imencode(".jpg" if encoding == "jpeg" else ".png", bgr, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {list(array.shape)} array as {encoding}")
    return bytes(buffer.tobytes())


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
