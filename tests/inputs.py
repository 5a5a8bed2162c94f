"""Odd and hostile inputs, made at run time from real photos (nothing binary is stored in the repo)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "grace_hopper.jpg"


def photo_rgb(path: Path = SAMPLE) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def encode(image: Image.Image | np.ndarray, fmt: str, **options: object) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but carries one tiny IDAT (never decoded that far)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def decompression_bomb(side: int = 12_000) -> bytes:
    """A real, fully valid greyscale PNG of side x side pixels that compresses to a few hundred KB."""
    return encode(Image.new("L", (side, side), 0), "PNG", optimize=True)


def exif_rotated_jpeg(rgb: np.ndarray) -> bytes:
    """The photo stored rotated 90 degrees clockwise with EXIF orientation 8 (rotate 90 CCW to display)."""
    stored = Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = 8
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def sixteen_bit_png(rgb: np.ndarray) -> bytes:
    grey = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257
    return encode(Image.fromarray(grey), "PNG")  # uint16 -> mode I;16


def bad_inputs(photo: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, a fragment the error message must contain)."""
    return {
        "empty": (b"", "empty image"),
        "truncated_jpeg": (photo[: len(photo) // 3], "truncated"),
        "text_as_image": (b"<html><body>this is not a photo</body></html>", "not a recognised image"),
        "zero_pixels": (png_header_only(0, 480), "PNG"),
        "enormous_dimensions": (png_header_only(100_000, 100_000), "too large"),
        "decompression_bomb": (decompression_bomb(), "too large"),
    }
