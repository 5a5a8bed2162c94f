"""Decode untrusted image bytes (or check raw pixels) into HWC uint8 RGB, or say exactly what is wrong."""

from __future__ import annotations

import io
import warnings

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats a client may send; anything else is refused before a decoder runs.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

# Pillow's own bomb check must never fire before ours; we enforce the limit from the header.
Image.MAX_IMAGE_PIXELS = None


class InvalidImageError(ValueError):
    """The input is not an image the service can use; the message says why."""


def decode_image(data: bytes, max_pixels: int) -> npt.NDArray[np.uint8]:
    """Decode encoded image bytes to an ``[H, W, 3]`` uint8 RGB array, upright per EXIF orientation."""
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
    try:
        opened.load()
        upright = ImageOps.exif_transpose(opened)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImageError(f"corrupt or truncated {opened.format} data ({width}x{height}): {exc}") from None
    return _to_rgb_array(upright)


def check_pixels(pixels: npt.NDArray[np.uint8], max_pixels: int) -> npt.NDArray[np.uint8]:
    """Validate a raw ``[H, W, 3]`` uint8 RGB array sent by a client."""
    if pixels.dtype != np.uint8:
        raise InvalidImageError(f"raw pixels must be uint8, got {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidImageError(f"raw pixels must have shape [height, width, 3] (RGB), got {list(pixels.shape)}")
    _check_dimensions(pixels.shape[1], pixels.shape[0], max_pixels, "raw pixel array")
    return pixels


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
