"""Fuzzing the preprocessing with hypothesis (random and mutated bytes, random shapes), then mutated real
images through the running server.

Whatever arrives, decoding either returns an upright HxWx3 uint8 image within the pixel limit
or raises InvalidImageError — never another exception, never an allocation past the limit. Through
the server, every answer is a result or INVALID_ARGUMENT, and valid requests batched with the
mutated ones are unaffected (docs/reliability.md records a run).
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posetriton.core.images import InvalidImageError, check_pixels, decode_image
from posetriton.core.processing import letterbox, to_network_input
from posetriton.core.spec import LetterboxSpec
from posetriton.server.launcher import TritonServer
from tests.conftest import UL_MODEL, model_stats
from tests.inputs import encode, photo_rgb, png_header_only
from tests.triton_requests import Detections, assert_same, image_input, split

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


# --- through the running server ---------------------------------------------------------------

SERVER_CASES = 48  # mutated inputs, each sent beside a valid request so that they share batches
DEADLINE_S = 60.0


def declare_huge_size(data: bytes) -> bytes:
    """The same bytes with a header that declares an enormous image (JPEG SOF, PNG IHDR, WebP VP8 frame)."""
    out = bytearray(data)
    if data.startswith(b"\xff\xd8"):
        sof = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and 0xC0 <= data[i + 1] <= 0xC2)
        out[sof + 5 : sof + 9] = b"\xff\xff\xff\xff"  # height, width = 65535
    elif data.startswith(b"\x89PNG"):
        out[16:24] = struct.pack(">II", 1_000_000, 1_000_000)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))  # a valid CRC: only the size is wrong
    elif data[8:16] == b"WEBPVP8 ":
        out[26:30] = b"\xff\x3f\xff\x3f"  # width, height = 16383 (14 bits each)
    else:
        raise ValueError("not a JPEG, PNG or lossy WebP")
    return bytes(out)


def server_mutations(seeds: dict[str, bytes], count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Truncations, bit flips, random header bytes and huge declared sizes of real encodings, reproducibly."""
    rng = np.random.default_rng(seed)
    cases = [(f"{name} huge size", declare_huge_size(data)) for name, data in seeds.items()]
    while len(cases) < count:
        name, data = list(seeds.items())[len(cases) % len(seeds)]
        mutated = bytearray(data)
        kind = ("truncated", "bit flips", "header bytes")[len(cases) // len(seeds) % 3]
        if kind == "truncated":
            mutated = mutated[: int(rng.integers(1, len(data)))]
        elif kind == "bit flips":
            for position in rng.integers(0, len(data), int(rng.integers(1, 16))):
                mutated[position] ^= 1 << int(rng.integers(0, 8))
        else:
            for position in rng.integers(0, min(64, len(data)), int(rng.integers(1, 6))):
                mutated[position] = int(rng.integers(0, 256))
        cases.append((f"{name} {kind}", bytes(mutated)))
    return cases


def _infer(url: str, data: bytes) -> Detections | str:
    """The result, or the gRPC status name of the error (DEADLINE_EXCEEDED if the server hung)."""
    with grpcclient.InferenceServerClient(url) as client:
        try:
            return split(client.infer(UL_MODEL, [image_input([data])], client_timeout=DEADLINE_S))[0]
        except grpcclient.InferenceServerException as exc:
            return str(exc.status()).removeprefix("StatusCode.")


def _executions(url: str) -> tuple[int, int]:
    """(images, executions) of the step that decodes (on the CPU the network step) so far: fewer executions means
    batched requests."""
    with grpcclient.InferenceServerClient(url) as client:
        (stats,) = client.get_inference_statistics(f"{UL_MODEL}_network", as_json=True)["model_stats"]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def test_mutated_real_images_through_the_server(
    server: TritonServer, photo_paths: list[Path], bounds_for: Callable[[str, bytes], dict[str, float]]
) -> None:
    """Mutated real JPEG, PNG and WebP bytes sent to the running ensemble, four at a time beside four valid
    requests (so that dynamic batching mixes them): every answer is a result or INVALID_ARGUMENT, never
    INTERNAL or a hang; the valid requests get exactly their own result; the server stays ready."""
    photos = {p.name: p for p in photo_paths}
    jpeg = photos["grace_hopper.jpg"]
    seeds = {"jpeg": jpeg.read_bytes(), "webp": photos["astronaut.webp"].read_bytes(),
             "png": encode(photo_rgb(jpeg)[::2, ::2], "PNG")}  # fmt: skip
    cases = server_mutations(seeds, SERVER_CASES)
    valid = photos["bus.jpg"].read_bytes()
    expected = _infer(server.grpc_url, valid)
    bounds = bounds_for(UL_MODEL, valid)
    assert isinstance(expected, Detections) and len(expected.scores) >= 1
    model_stats(server.grpc_url, f"{UL_MODEL}_network")  # settled: earlier tests' requests all counted
    before = _executions(server.grpc_url)
    outcomes: Counter[str] = Counter()
    with ThreadPoolExecutor(8) as pool:
        for first in range(0, len(cases), 4):
            group = cases[first : first + 4]
            fuzzed = [pool.submit(_infer, server.grpc_url, data) for _, data in group]
            companions = [pool.submit(_infer, server.grpc_url, valid) for _ in group]
            for (name, _), future in zip(group, fuzzed, strict=True):
                answer = future.result(timeout=DEADLINE_S + 30)
                assert isinstance(answer, Detections) or answer == "INVALID_ARGUMENT", f"{name}: {answer}"
                outcomes["result" if isinstance(answer, Detections) else "INVALID_ARGUMENT"] += 1
                outcomes[f"{name.split()[0]} {'decoded' if isinstance(answer, Detections) else 'refused'}"] += 1
            for future in companions:
                answer = future.result(timeout=DEADLINE_S + 30)
                assert isinstance(answer, Detections), f"a valid request beside mutated ones failed: {answer}"
                assert_same(answer, expected, bounds)
    model_stats(server.grpc_url, f"{UL_MODEL}_network")
    after = _executions(server.grpc_url)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_ready() and client.is_model_ready(UL_MODEL)
    images, executions = after[0] - before[0], after[1] - before[1]
    print(f"\nfuzz through the server: {len(cases)} mutated inputs, {dict(sorted(outcomes.items()))}; "
          f"the network step took {images} images in {executions} executions")  # fmt: skip
    assert executions < images, "dynamic batching put several requests in one execution"
    assert outcomes["INVALID_ARGUMENT"] >= len(seeds), "at least the huge declared sizes are refused"
    assert outcomes["result"] + outcomes["INVALID_ARGUMENT"] == len(cases)
