"""Decode untrusted image bytes (or check raw pixels) into HWC uint8 RGB, or say exactly what is wrong.

Pillow parses every header (format, size, mode, EXIF orientation), so the pixel limit is enforced before
any decoder runs. JPEG, PNG and still WebP images in the modes listed below are then decoded by OpenCV, which
gives the same pixels as Pillow (the same libjpeg-turbo and libwebp; ``tests/test_images.py`` checks every
listed mode, ``benchmarks/decode.py`` measures the gain) in less time. Everything else, and any image OpenCV
refuses, goes through Pillow, which also writes every error message.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Formats a client may send; anything else is refused before a decoder runs.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

# Pillow's own bomb check must never fire before ours; we enforce the limit from the header.
Image.MAX_IMAGE_PIXELS = None

# Format -> Pillow modes whose OpenCV decode equals Pillow's, pixel for pixel. Left to Pillow: CMYK JPEG (OpenCV
# converts Adobe CMYK differently), GIF (OpenCV cannot read it), BMP (its many variants are not verified),
# animated WebP and interlaced PNG (not verified).
_OPENCV_MODES = {
    "JPEG": frozenset({"RGB", "L"}),
    "PNG": frozenset({"RGB", "RGBA", "L", "LA", "P", "1", "I;16"}),
    "WEBP": frozenset({"RGB", "RGBA"}),
}
# Where Pillow may find a PNG's orientation, possibly after the pixel data; a PNG naming none has none.
_PNG_ORIENTATION_SOURCES = (b"eXIf", b"Raw profile type exif", b"XML:com.adobe.xmp")
# OpenCV >= 4.11 converts to RGB inside libjpeg-turbo; older builds decode BGR and swap afterwards.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
# libjpeg's DCT scaling factors, largest first.
_REDUCED_FLAGS = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}
# EXIF orientation -> the transposition that makes the stored pixels upright, as ImageOps.exif_transpose
# (tests/test_images.py checks all eight).
_UPRIGHT: dict[int, Callable[[npt.NDArray[Any]], npt.NDArray[Any]]] = {
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: cv2.transpose,
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.rotate(cv2.flip(a, 1), cv2.ROTATE_90_CLOCKWISE),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


class InvalidImageError(ValueError):
    """The input is not an image the service can use; the message says why."""


def warm_up_samples(side: int = 16) -> list[bytes]:
    """A tiny image in every accepted format Pillow can write here. Decoding each once at start-up loads its
    Pillow plugin and OpenCV's codec (10-20 ms each on first use, measured), which the first requests to a new
    server instance would otherwise pay."""
    gradient = np.linspace(0, 255, side * side * 3, dtype=np.uint8).reshape(side, side, 3)
    samples = []
    for image_format in ACCEPTED_FORMATS:
        buffer = io.BytesIO()
        try:
            Image.fromarray(gradient).save(buffer, format=image_format)
        except (OSError, KeyError, ValueError):  # no encoder for it in this Pillow build: nothing to warm
            continue
        samples.append(buffer.getvalue())
    return samples


def decode_image(data: bytes, max_pixels: int) -> npt.NDArray[np.uint8]:
    """Decode encoded image bytes to an ``[H, W, 3]`` uint8 RGB array, upright per EXIF orientation."""
    return _decode(data, _open(data, max_pixels))


def decode_image_reduced(data: bytes, max_pixels: int, min_side: int) -> tuple[npt.NDArray[np.uint8], tuple[int, int]]:
    """Like :func:`decode_image`, but a JPEG whose longest side is at least ``2 * min_side`` is decoded smaller.

    libjpeg's DCT scaling (1/2, 1/4 or 1/8: the smallest whose longest side stays ``>= min_side``) skips
    most of the decode work; the pixels are close to, not equal to, a full decode followed by a resize.
    Returns the upright pixels and the ``(width, height)`` of the upright full-size image, so coordinates
    found in the pixels can be mapped back to the photo the client sent.
    """
    opened = _open(data, max_pixels)
    width, height = opened.size
    scale = next((s for s in _REDUCED_FLAGS if max(width, height) >= s * min_side), 1)
    reduced = _decode_with_opencv(data, opened, scale) if scale > 1 and opened.format == "JPEG" else None
    if reduced is not None:
        return reduced, (height, width) if _orientation(data, opened) in {5, 6, 7, 8} else (width, height)
    pixels = _decode(data, opened)  # not a colour or grey JPEG, or too small: decoded as decode_image does
    return pixels, (pixels.shape[1], pixels.shape[0])


def declared_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` an encoded image's header declares, read without decoding any pixel (the per-image
    limit is enforced here too), so a request's decode budget is known before its first decode."""
    return _open(data, max_pixels).size


def check_pixels(pixels: npt.NDArray[np.uint8], max_pixels: int) -> npt.NDArray[np.uint8]:
    """Validate a raw ``[H, W, 3]`` uint8 RGB array sent by a client."""
    if pixels.dtype != np.uint8:
        raise InvalidImageError(f"raw pixels must be uint8, got {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidImageError(f"raw pixels must have shape [height, width, 3] (RGB), got {list(pixels.shape)}")
    _check_dimensions(pixels.shape[1], pixels.shape[0], max_pixels, "raw pixel array")
    return pixels


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only and enforce the pixel limit; no pixel data is decoded yet."""
    if len(data) == 0:
        raise InvalidImageError("empty image: 0 bytes received")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opened = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidImageError(
            f"not a recognised image ({len(data)} bytes starting {data[:8]!r}); "
            f"accepted formats: {', '.join(ACCEPTED_FORMATS)}"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"unreadable {_format_hint(data)} header: {exc}") from None
    width, height = opened.size
    _check_dimensions(width, height, max_pixels, opened.format or "image")
    return opened


def _decode(data: bytes, opened: Image.Image) -> npt.NDArray[np.uint8]:
    pixels = _decode_with_opencv(data, opened, scale=1)
    return pixels if pixels is not None else _decode_with_pillow(data, opened)


def _orientation(data: bytes, opened: Image.Image) -> int | None:
    """EXIF orientation as ImageOps.exif_transpose reads it (EXIF, else XMP); None when only Pillow can tell."""
    if opened.format == "PNG":
        return None if any(source in data for source in _PNG_ORIENTATION_SOURCES) else 1
    try:
        return int(opened.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # malformed EXIF: the Pillow path decides what to say about it
        return None


def _decode_with_opencv(data: bytes, opened: Image.Image, scale: int) -> npt.NDArray[np.uint8] | None:
    """OpenCV's decode (a JPEG at 1/scale), upright; None where Pillow must decode or explain."""
    if opened.mode not in _OPENCV_MODES.get(opened.format or "", ()):
        return None
    if opened.info.get("interlace") or getattr(opened, "n_frames", 1) != 1:
        return None
    orientation = _orientation(data, opened)
    if orientation is None:
        return None
    flags = _REDUCED_FLAGS.get(scale, cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION
    buffer = np.frombuffer(data, np.uint8)
    try:
        if _IMREAD_RGB is not None:
            pixels = cv2.imdecode(buffer, flags | _IMREAD_RGB)
        else:
            bgr = cv2.imdecode(buffer, flags)
            pixels = None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    except cv2.error:
        return None
    width, height = opened.size
    # Truncated or corrupt data: OpenCV returns None; Pillow gives the reason.
    if pixels is None or pixels.shape != (-(-height // scale), -(-width // scale), 3):
        return None
    upright = _UPRIGHT.get(orientation)
    return np.asarray(pixels if upright is None else upright(pixels), dtype=np.uint8)


def _decode_with_pillow(data: bytes, opened: Image.Image) -> npt.NDArray[np.uint8]:
    if opened.format in _OPENCV_MODES:
        opened = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)  # as it was before the OpenCV attempt
    width, height = opened.size
    try:
        opened.load()
        upright = ImageOps.exif_transpose(opened)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImageError(f"corrupt or truncated {opened.format} data ({width}x{height}): {exc}") from None
    return _to_rgb_array(upright)


def _check_dimensions(width: int, height: int, max_pixels: int, what: str) -> None:
    if width < 1 or height < 1:
        raise InvalidImageError(f"{what} has no pixels: {width}x{height}")
    if width * height > max_pixels:
        raise InvalidImageError(
            f"{what} too large: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )


def _to_rgb_array(image: Image.Image) -> npt.NDArray[np.uint8]:
    if image.mode in {"I;16", "I;16L", "I;16B", "I;16N", "I"}:
        # 16-bit (or 32-bit integer) grey: keep the top byte, as OpenCV does, instead of
        # Pillow's clipping at 255 which turns most 16-bit photos white.
        grey = np.asarray(image)
        shift = 8 if image.mode.startswith("I;16") or grey.max(initial=0) <= 0xFFFF else 24
        grey = (grey.astype(np.uint32) >> shift).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if image.mode == "F":
        raise InvalidImageError("floating-point images are not supported; send 8-bit or 16-bit images")
    if image.mode != "RGB":
        image = image.convert("RGB")  # grey, palette, CMYK, alpha dropped as super-gradients does
    return np.asarray(image)


def _format_hint(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return "image"
