"""Decoding untrusted bytes: every bad input gets a precise InvalidImageError; odd but valid ones decode right."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from posetriton.images import InvalidImageError, check_pixels, decode_image
from tests.inputs import SAMPLE, bad_inputs, encode, exif_rotated_jpeg, photo_rgb, sixteen_bit_png

LIMIT = 50_000_000


@pytest.mark.parametrize("name", list(bad_inputs(b"\xff\xd8\xff" + b"0" * 100)))
def test_bad_inputs_are_refused_with_a_reason(name: str) -> None:
    data, fragment = bad_inputs(SAMPLE.read_bytes())[name]
    with pytest.raises(InvalidImageError, match=fragment):
        decode_image(data, LIMIT)


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = encode(photo_rgb(), "PNG")
    with pytest.raises(InvalidImageError, match="too large: 512x600 = 307200 pixels exceeds the limit of 1000"):
        decode_image(data, 1000)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_formats_decode_to_rgb(fmt: str) -> None:
    rgb = photo_rgb()
    decoded = decode_image(encode(rgb, fmt, **({"quality": 95} if fmt in {"JPEG", "WEBP"} else {})), LIMIT)
    assert decoded.shape == rgb.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - rgb).mean() < 3


def test_exif_orientation_is_applied() -> None:
    rgb = photo_rgb()
    decoded = decode_image(exif_rotated_jpeg(rgb), LIMIT)
    assert decoded.shape == rgb.shape  # upright: 600 high, 512 wide, not the stored 512x600
    assert np.abs(decoded.astype(int) - rgb).mean() < 4


def test_grayscale_rgba_and_16_bit_become_rgb() -> None:
    rgb = photo_rgb()
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    for data in (encode(grey, "JPEG", quality=95), sixteen_bit_png(rgb)):
        decoded = decode_image(data, LIMIT)
        assert decoded.shape == (*grey.shape, 3)
        assert np.abs(decoded[..., 1].astype(int) - grey).mean() < 2  # 16-bit keeps its top byte, not clipped white
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    np.testing.assert_array_equal(decode_image(encode(rgba, "PNG"), LIMIT), rgb)


def test_raw_pixels_are_checked() -> None:
    rgb = photo_rgb()
    assert check_pixels(rgb, LIMIT) is rgb
    with pytest.raises(InvalidImageError, match="uint8"):
        check_pixels(rgb.astype(np.float32), LIMIT)
    with pytest.raises(InvalidImageError, match=r"\[height, width, 3\]"):
        check_pixels(rgb[..., :2], LIMIT)
    with pytest.raises(InvalidImageError, match="no pixels"):
        check_pixels(np.zeros((0, 10, 3), np.uint8), LIMIT)
