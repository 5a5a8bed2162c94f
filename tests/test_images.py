"""Decoding untrusted bytes: every bad input gets a precise InvalidImageError; odd but valid ones decode right."""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from posetriton.core import images
from posetriton.core.images import InvalidImageError, check_pixels, decode_image, decode_image_reduced
from tests.inputs import SAMPLE, bad_inputs, encode, exif_rotated_jpeg, photo_rgb, png_header_only, sixteen_bit_png

LIMIT = 50_000_000
SMALL_RGB = photo_rgb()[::4, ::4]


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


# --- Which decoder runs: OpenCV for colour and grey JPEGs, Pillow for the rest; same pixels either way. ---


def pillow_reference(data: bytes) -> np.ndarray:
    """What decode_image returned when Pillow decoded everything: the oracle for the faster path."""
    return images._decode_with_pillow(data, images._open(data, LIMIT))


def orientation_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def with_orientation(rgb: np.ndarray, orientation: int, **options: object) -> bytes:
    return encode(rgb, "JPEG", quality=90, exif=orientation_exif(orientation), **options)


def resized_jpeg(path: Path, longest: int, **options: object) -> bytes:
    image = Image.open(path).convert("RGB")
    scale = longest / max(image.size)
    resized = image.resize((round(image.width * scale), round(image.height * scale)))
    return encode(resized, "JPEG", quality=90, **options)


def test_decode_equals_pillow_on_real_photos(photo_paths: list[Path]) -> None:
    blobs = {path.name: path.read_bytes() for path in photo_paths}
    blobs["bus_4k.jpg"] = resized_jpeg(photo_paths[2], 3840)
    blobs["bus_progressive.jpg"] = resized_jpeg(photo_paths[2], 1080, progressive=True)
    blobs["bus_444.jpg"] = resized_jpeg(photo_paths[2], 1080, subsampling=0)
    blobs["bus_grey.jpg"] = encode(Image.open(photo_paths[2]).convert("L"), "JPEG")
    for name, data in blobs.items():
        np.testing.assert_array_equal(decode_image(data, LIMIT), pillow_reference(data), err_msg=name)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(orientation: int) -> None:
    data = with_orientation(photo_rgb(), orientation)
    np.testing.assert_array_equal(decode_image(data, LIMIT), pillow_reference(data))


def test_opencv_without_rgb_output_gives_the_same_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCV < 4.11 has no IMREAD_COLOR_RGB: it decodes BGR and swaps."""
    data = exif_rotated_jpeg(photo_rgb())
    monkeypatch.setattr(images, "_IMREAD_RGB", None)
    np.testing.assert_array_equal(decode_image(data, LIMIT), pillow_reference(data))
    assert decode_image_reduced(resized_jpeg(SAMPLE, 1280), LIMIT, 640)[0].shape == (640, 546, 3)


def with_chunk_after_header(png: bytes, kind: bytes, payload: bytes) -> bytes:
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return png[:33] + chunk + png[33:]  # signature (8) + IHDR (25)


@functools.cache
def mode_cases() -> dict[str, bytes]:
    """One image per format and mode a client may send; OpenCV decodes some, Pillow the others."""
    rgb = photo_rgb()
    image = Image.fromarray(rgb)
    rgba = image.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(image.size))
    deep = rgb.astype(np.uint16) * 257 + (np.arange(rgb.size).reshape(rgb.shape) % 251).astype(np.uint16)
    png = encode(image, "PNG")
    return {
        "png RGB": png,
        "png RGBA": encode(rgba, "PNG"),
        "png L": encode(image.convert("L"), "PNG"),
        "png LA": encode(rgba.convert("LA"), "PNG"),
        "png P": encode(image.convert("P"), "PNG"),
        "png P 4-bit": encode(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", bits=4),
        "png P transparency": encode(image.convert("P"), "PNG", transparency=bytes(range(256))),
        "png 1-bit": encode(image.convert("1"), "PNG"),
        "png 16-bit grey": sixteen_bit_png(rgb),
        "png 16-bit RGB": cv2.imencode(".png", deep[..., ::-1])[1].tobytes(),
        "png 16-bit RGBA": cv2.imencode(".png", np.dstack([deep[..., ::-1], deep[..., :1]]))[1].tobytes(),
        "png gamma": with_chunk_after_header(png, b"gAMA", struct.pack(">I", 20000)),
        "png EXIF orientation": encode(image, "PNG", exif=orientation_exif(6)),
        "webp lossy": encode(image, "WEBP", quality=90),
        "webp lossless": encode(image, "WEBP", lossless=True),
        "webp alpha": encode(rgba, "WEBP", quality=90),
        "webp EXIF orientation": encode(image, "WEBP", quality=90, exif=orientation_exif(6)),
        "webp animated": encode(
            image, "WEBP", save_all=True, append_images=[image.transpose(Image.Transpose.ROTATE_180)]
        ),
        "jpeg CMYK": encode(image.convert("CMYK"), "JPEG", quality=95),
        "bmp": encode(image, "BMP"),
        "gif": encode(image, "GIF"),
    }


# Left to Pillow on purpose (see posetriton/core/images.py); everything else in mode_cases() goes through OpenCV.
PILLOW_DECODES = {"png EXIF orientation", "webp animated", "jpeg CMYK", "bmp", "gif"}


@pytest.mark.parametrize("name", list(mode_cases()))
def test_every_format_and_mode_decodes_as_with_pillow(name: str) -> None:
    data = mode_cases()[name]
    decoded = decode_image(data, LIMIT)
    np.testing.assert_array_equal(decoded, pillow_reference(data))
    assert decoded.shape == ((512, 600, 3) if "orientation" in name else (600, 512, 3))
    by_opencv = images._decode_with_opencv(data, images._open(data, LIMIT), scale=1) is not None
    assert by_opencv == (name not in PILLOW_DECODES)


SEEDS = [encode(SMALL_RGB, "JPEG", quality=85), encode(SMALL_RGB, "JPEG", quality=85, progressive=True),
         encode(Image.fromarray(SMALL_RGB).convert("L"), "JPEG"), exif_rotated_jpeg(SMALL_RGB),
         encode(SMALL_RGB, "PNG"), encode(SMALL_RGB, "WEBP"), encode(SMALL_RGB, "WEBP", lossless=True)]  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(1, 10**6)),
)
def test_damaged_images_decode_as_with_pillow(seed: bytes, edits: list[tuple[int, int]], cut: int | None) -> None:
    """Same error, or same pixels. One known exception: when every row decoded but the bytes after them are
    garbage, Pillow refuses the whole image ("broken data stream") and OpenCV keeps the rows; they are the rows
    Pillow itself decoded."""
    data = bytearray(seed)
    for position, value in edits:
        data[position % len(data)] = value
    data = data[:cut] if cut else data
    try:
        expected = images._decode_with_pillow(bytes(data), images._open(bytes(data), LIMIT))
    except InvalidImageError as pillow_error:
        if "broken data stream" not in str(pillow_error):
            with pytest.raises(InvalidImageError) as ours:
                decode_image(bytes(data), LIMIT)
            assert str(ours.value) == str(pillow_error)
            return
        try:
            decoded = decode_image(bytes(data), LIMIT)
        except InvalidImageError as ours:
            assert str(ours) == str(pillow_error)
            return
        ImageFile.LOAD_TRUNCATED_IMAGES = True  # Pillow's rows up to the failure
        try:
            expected = images._decode_with_pillow(bytes(data), images._open(bytes(data), LIMIT))
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        np.testing.assert_array_equal(decoded, expected)
        return
    np.testing.assert_array_equal(decode_image(bytes(data), LIMIT), expected)


# --- Opt-in reduced-size JPEG decode (libjpeg DCT scaling). ---


@pytest.mark.parametrize(
    ("longest", "expected_longest"),
    [(1279, 1279), (1280, 640), (1920, 960), (2559, 1280), (2560, 640), (3840, 960), (5120, 640)],
)
def test_reduced_decode_picks_the_smallest_scale_above_the_network_size(longest: int, expected_longest: int) -> None:
    data = resized_jpeg(SAMPLE, longest)
    full = decode_image(data, LIMIT)
    reduced, original = decode_image_reduced(data, LIMIT, 640)
    assert original == (full.shape[1], full.shape[0])
    assert max(reduced.shape[:2]) == expected_longest and reduced.dtype == np.uint8 and reduced.shape[2] == 3
    # The same picture, only smaller: close to the full decode shrunk with an area filter.
    shrunk = cv2.resize(full, (reduced.shape[1], reduced.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(shrunk.astype(int) - reduced).mean() < 3


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_reduced_decode_is_upright_and_reports_the_upright_size(orientation: int) -> None:
    stored = np.asarray(Image.open(io.BytesIO(resized_jpeg(SAMPLE, 2560))).convert("RGB"))
    data = with_orientation(stored, orientation)
    full = decode_image(data, LIMIT)
    reduced, original = decode_image_reduced(data, LIMIT, 640)
    assert original == (full.shape[1], full.shape[0])
    assert reduced.shape == (-(-full.shape[0] // 4), -(-full.shape[1] // 4), 3)  # libjpeg rounds up
    shrunk = cv2.resize(full, (reduced.shape[1], reduced.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(shrunk.astype(int) - reduced).mean() < 3


def test_reduced_decode_leaves_small_photos_and_other_formats_alone() -> None:
    for data in (SAMPLE.read_bytes(), encode(np.asarray(Image.open(io.BytesIO(resized_jpeg(SAMPLE, 2560)))), "PNG")):
        pixels, original = decode_image_reduced(data, LIMIT, 640)
        np.testing.assert_array_equal(pixels, decode_image(data, LIMIT))
        assert original == (pixels.shape[1], pixels.shape[0])
    grey = encode(Image.open(io.BytesIO(resized_jpeg(SAMPLE, 2560))).convert("L"), "JPEG")
    assert decode_image_reduced(grey, LIMIT, 640)[0].shape == (640, 547, 3)


def test_reduced_decode_checks_the_pixel_limit_before_decoding() -> None:
    """A JPEG whose header claims 40000 x 30000 pixels but carries a small image's data: refused unread."""
    data = bytearray(encode(SMALL_RGB, "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (30_000).to_bytes(2, "big") + (40_000).to_bytes(2, "big")
    for decode in (lambda: decode_image(bytes(data), LIMIT), lambda: decode_image_reduced(bytes(data), LIMIT, 640)):
        with pytest.raises(InvalidImageError, match="too large: 40000x30000 = 1200000000 pixels"):
            decode()
    with pytest.raises(InvalidImageError, match="too large"):
        decode_image_reduced(png_header_only(100_000, 100_000), LIMIT, 640)


def test_warm_up_samples_cover_the_accepted_formats_and_decode_to_their_pixels() -> None:
    from posetriton.core.images import ACCEPTED_FORMATS, declared_size, warm_up_samples

    samples = warm_up_samples(side=16)
    formats = {Image.open(io.BytesIO(sample)).format for sample in samples}
    assert formats == set(ACCEPTED_FORMATS), "every decoder the preprocess step serves is warmed at start-up"
    for sample in samples:
        assert declared_size(sample, 10**6) == (16, 16)
        assert decode_image(sample, 10**6).shape == (16, 16, 3)
