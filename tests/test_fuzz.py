"""Fuzzing the preprocessing with hypothesis: random and mutated bytes, random shapes.

Whatever arrives, decoding either returns an upright HxWx3 uint8 image within the pixel limit
or raises InvalidImageError — never another exception, never an allocation past the limit.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posetriton.images import InvalidImageError, check_pixels, decode_image
from posetriton.processing import letterbox, to_network_input
from posetriton.spec import LetterboxSpec
from tests.inputs import encode, photo_rgb, png_header_only

LIMIT = 4_000_000
SPEC = LetterboxSpec(max_pixels=LIMIT)
SMALL = photo_rgb()[::4, ::4]
SEEDS = [encode(SMALL, "JPEG", quality=80), encode(SMALL, "PNG"), encode(SMALL, "WEBP"), encode(SMALL, "BMP"),
         encode(SMALL, "GIF"), png_header_only(3000, 3000)]  # fmt: skip
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_decodes_or_refuses(data: bytes) -> None:
    try:
        image = decode_image(data, LIMIT)
    except InvalidImageError as exc:
        assert str(exc)  # a reason, always
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert 0 < image.shape[0] * image.shape[1] <= LIMIT
    canvas, _ = letterbox(image, SPEC)
    assert to_network_input(canvas[None], SPEC).shape == (1, 3, 640, 640)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    check_decodes_or_refuses(data)


@FUZZ
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=12),
    cut=st.one_of(st.none(), st.integers(1, 10**6)),
)
def test_mutated_real_images(seed: bytes, edits: list[tuple[int, int]], cut: int | None) -> None:
    """Real encodings with flipped bytes (headers, dimensions, chunk lengths) and truncations."""
    data = bytearray(seed)
    for position, value in edits:
        data[position % len(data)] = value
    check_decodes_or_refuses(bytes(data[:cut] if cut else data))


@FUZZ
@given(
    height=st.integers(0, 3000),
    width=st.integers(0, 3000),
    channels=st.integers(1, 5),
    dtype=st.sampled_from([np.uint8, np.uint16, np.float32]),
)
def test_raw_pixel_shapes(height: int, width: int, channels: int, dtype: type) -> None:
    pixels = np.zeros((height, width, channels), dtype)
    try:
        checked = check_pixels(pixels, LIMIT)
    except InvalidImageError:
        assert dtype is not np.uint8 or channels != 3 or height * width == 0 or height * width > LIMIT
        return
    assert checked.shape == (height, width, 3) and 0 < height * width <= LIMIT
    assert letterbox(checked, SPEC)[0].shape == (640, 640, 3)
