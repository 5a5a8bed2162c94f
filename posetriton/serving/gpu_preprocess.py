"""GPU preprocess step: JPEG decode with nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``) and the letterbox
in torch ops on the GPU, behind the same ``NAME_preprocess`` tensors as the CPU step (``preprocess.py``).

Selected with ``--model-config-name=gpu_nvjpeg`` (``NAME_preprocess/configs/gpu_nvjpeg.pbtxt``, KIND_GPU, model
file ``gpu_model.py``). Needs torch + torchvision with CUDA (``requirements/gpu.txt``).

Geometry is the shared numpy letterbox's (:func:`posetriton.processing.letterbox`): the same resized size
(``round`` half-to-even of ``side * scale``, at least 1 px), the same pad placement (Ultralytics' centred
``round(d - 0.1)`` or bottom-right), pad value, channel order and ``/255``, and the same
:class:`~posetriton.processing.LetterboxTransform`. The resize is :func:`resize_linear_cv2`, which
reproduces ``cv2.resize(INTER_LINEAR)`` exactly: the same half-pixel-centre sampling and edge clamping, and
OpenCV's 11-bit fixed-point weights and rounding, in integer torch ops (a float ``interpolate`` would differ by
1 grey level on about 10 % of pixels). JPEG decoding differs between nvJPEG and libjpeg
(Pillow, the CPU path) by the IDCT's rounding, typically 1-2 grey levels. Everything that is not a JPEG
Pillow/nvJPEG handles alike (PNG, WebP, BMP, GIF, CMYK JPEGs, anything nvJPEG rejects) takes the CPU path:
:func:`posetriton.images.decode_image` + the numpy letterbox, so error messages are those of the CPU step.

:func:`letterbox_torch` and :func:`apply_exif_orientation` are pure functions with a ``device`` argument, so the
geometry is tested on CPU against the numpy letterbox (tests/test_gpu_preprocess.py). Pillow
(:mod:`posetriton.images`) is imported only where encoded images are handled, so those functions need only
torch, numpy and OpenCV.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from posetriton.processing import LetterboxTransform, letterbox, letterbox_geometry
from posetriton.spec import LetterboxSpec

try:  # only inside Triton's Python-backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - tests and the device check import the pure functions
    pb_utils = None

JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION_TAG = 0x0112
# Pillow modes of JPEGs nvJPEG decodes to RGB exactly as Pillow does; CMYK/YCCK go to the CPU path.
GPU_JPEG_MODES = ("RGB", "L")
RESIZE_COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE (11 fractional bits)


def letterbox_torch(
    image: torch.Tensor, spec: LetterboxSpec, device: torch.device | str | None = None
) -> tuple[torch.Tensor, LetterboxTransform]:
    """``[3, H, W]`` uint8 RGB -> letterboxed ``[3, S, S]`` uint8 RGB canvas on ``device`` (default: the image's)."""
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a [3, H, W] uint8 tensor, got {list(image.shape)} {image.dtype}")
    if device is not None:
        image = image.to(device, non_blocking=True)
    height, width = int(image.shape[1]), int(image.shape[2])
    new_w, new_h, transform = letterbox_geometry(height, width, spec)
    if (new_w, new_h) != (width, height):
        image = resize_linear_cv2(image, new_h, new_w)
    size = spec.input_size
    canvas = torch.full((3, size, size), spec.pad_value, dtype=torch.uint8, device=image.device)
    top, left = transform.pad_y, transform.pad_x
    canvas[:, top : top + new_h, left : left + new_w] = image
    return canvas, transform


def _cv2_linear_coefficients(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """cv2's INTER_LINEAR taps along one axis: ``(index0, index1, weight0, weight1)``, weights in 1/2048.

    As ``cv::resize`` computes them: half-pixel centres in float32, source index clamped at both edges (weight 0
    on the clamped side), weights rounded to 11-bit fixed point (``INTER_RESIZE_COEF_BITS``).
    """
    scale = 1.0 / (dst / src)
    position = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    index = np.floor(position).astype(np.int64)
    fraction = (position - index).astype(np.float32)
    low, high = index < 0, index >= src - 1
    fraction[low | high] = 0.0
    index[low] = 0
    index[high] = src - 1
    weight1 = np.rint(fraction.astype(np.float64) * RESIZE_COEF_SCALE).astype(np.int32)
    weight0 = np.rint((np.float32(1.0) - fraction).astype(np.float64) * RESIZE_COEF_SCALE).astype(np.int32)
    return index, np.minimum(index + 1, src - 1), weight0, weight1


def resize_linear_cv2(image: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    """``[C, H, W]`` uint8 -> ``[C, new_h, new_w]`` uint8, emulating ``cv2.resize(INTER_LINEAR)`` in integer ops.

    Horizontal pass in int32 with 11-bit weights, vertical pass with OpenCV's SIMD rounding
    (``((b0 * (S0 >> 4)) >> 16 + (b1 * (S1 >> 4)) >> 16 + 2) >> 2``). On the test photos this equals OpenCV's
    output on every downscale and differs by 1 grey level on ~0.04% of pixels of upscales (OpenCV's scalar tail
    and IPP paths round differently). ``torch.nn.functional.interpolate(bilinear)`` in float would differ by 1
    on ~10% of pixels, which moved served keypoints by up to 3.5 px on 1280-px photos.
    """
    _, height, width = image.shape
    device = image.device
    x0, x1, a0, a1 = (torch.from_numpy(v).to(device) for v in _cv2_linear_coefficients(width, new_w))
    y0, y1, b0, b1 = (torch.from_numpy(v).to(device) for v in _cv2_linear_coefficients(height, new_h))
    pixels = image.to(torch.int32)
    rows = pixels[:, :, x0] * a0 + pixels[:, :, x1] * a1  # [C, H, new_w], value * 2048
    top, bottom = rows[:, y0, :] >> 4, rows[:, y1, :] >> 4
    b0, b1 = b0[:, None], b1[:, None]
    out = (((b0 * top) >> 16) + ((b1 * bottom) >> 16) + 2) >> 2
    return out.clamp_(0, 255).to(torch.uint8)


def to_network_input_torch(canvases: torch.Tensor, spec: LetterboxSpec) -> torch.Tensor:
    """``[B, 3, S, S]`` uint8 RGB canvases -> network input float32 in [0, 1] (BGR flipped when the spec says so)."""
    if spec.channel_order == "BGR":
        canvases = canvases.flip(1)
    return canvases.float().div_(255.0).contiguous()


def apply_exif_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Make a ``[C, H, W]`` image upright for EXIF orientation 1-8, as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def jpeg_header(data: bytes, max_pixels: int) -> tuple[int, int, int] | None:
    """``(width, height, exif_orientation)`` of a JPEG the GPU path can decode; None sends it to the CPU path.

    Reads only the header (Pillow, lazy), so the decompression-bomb limit is enforced before any decoding, as
    on the CPU path.
    """
    if not data.startswith(JPEG_MAGIC):
        return None
    from PIL import Image

    try:
        opened = Image.open(io.BytesIO(data), formats=("JPEG",))
    except Exception:
        return None
    if opened.mode not in GPU_JPEG_MODES:
        return None
    width, height = opened.size
    if width < 1 or height < 1 or width * height > max_pixels:
        return None  # the CPU path refuses it with the standard message
    try:
        orientation = int(opened.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except Exception:
        orientation = 1
    return width, height, orientation


def preprocess_batch(
    items: Sequence[bytes | np.ndarray],
    spec: LetterboxSpec,
    device: torch.device | str = "cuda",
    *,
    torch_decode: bool | None = None,
) -> tuple[torch.Tensor, list[LetterboxTransform], list[str]]:
    """Encoded images (bytes) or raw ``[H, W, 3]`` uint8 RGB arrays -> ``[B, 3, S, S]`` float32 on ``device``.

    JPEGs are decoded by nvJPEG in one batched call when ``device`` is CUDA; everything else is decoded on the
    CPU. ``torch_decode`` (default: whether ``device`` is CUDA) forces the torchvision decode + torch letterbox
    path on any device, which lets the whole GPU code path run on CPU in tests. Returns the network input, one
    transform per item and the path each item took (``gpu``/``cpu``/``pixels``). Raises
    :class:`~posetriton.images.InvalidImageError` naming the item that cannot be used.
    """
    from posetriton.images import InvalidImageError, check_pixels

    device = torch.device(device)
    if torch_decode is None:
        torch_decode = device.type == "cuda"
    canvases: list[torch.Tensor | None] = [None] * len(items)
    transforms: list[LetterboxTransform | None] = [None] * len(items)
    paths = ["cpu"] * len(items)
    jpegs: list[tuple[int, bytes, int]] = []
    for index, item in enumerate(items):
        try:
            if isinstance(item, np.ndarray):
                pixels = check_pixels(item, spec.max_pixels)
                tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
                canvases[index], transforms[index] = letterbox_torch(tensor, spec, device)
                paths[index] = "pixels"
                continue
            header = jpeg_header(item, spec.max_pixels) if torch_decode else None
            if header is not None:
                jpegs.append((index, item, header[2]))
                continue
            canvases[index], transforms[index] = _cpu_path(item, spec, device)
        except InvalidImageError as exc:
            raise InvalidImageError(_where(index, len(items)) + str(exc)) from None
    for (index, data, orientation), decoded in zip(jpegs, _decode_jpegs([d for _, d, _ in jpegs], device), strict=True):
        try:
            if decoded is None:  # nvJPEG refused it: the CPU path decides (and names the problem)
                canvases[index], transforms[index] = _cpu_path(data, spec, device)
                continue
            canvases[index], transforms[index] = letterbox_torch(apply_exif_orientation(decoded, orientation), spec)
            paths[index] = "gpu"
        except InvalidImageError as exc:
            raise InvalidImageError(_where(index, len(items)) + str(exc)) from None
    batch = torch.stack([c for c in canvases if c is not None])
    return to_network_input_torch(batch, spec), [t for t in transforms if t is not None], paths


def _where(index: int, count: int) -> str:
    return f"image {index} of {count}: " if count > 1 else ""


def _cpu_path(data: bytes, spec: LetterboxSpec, device: torch.device) -> tuple[torch.Tensor, LetterboxTransform]:
    from posetriton.images import decode_image

    canvas, transform = letterbox(decode_image(data, spec.max_pixels), spec)
    return torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))).to(device), transform


def _decode_jpegs(blobs: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """nvJPEG: one batched call, else one by one; an item nvJPEG cannot decode comes back as None."""
    if not blobs:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
    try:
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        return list(decoded)
    except RuntimeError:
        results: list[torch.Tensor | None] = []
        for tensor in encoded:
            try:
                results.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                results.append(None)
        return results


class TritonPythonModel:  # pragma: no cover - runs inside Triton on a GPU (see docs/gpu.md)
    def initialize(self, args: dict[str, str]) -> None:
        from posetriton.serving.triton_utils import model_parameters

        config = json.loads(args["model_config"])
        self.spec = LetterboxSpec.from_parameters(model_parameters(config))
        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device("cuda", int(args.get("model_instance_device_id", 0)))
        else:
            self.device = torch.device("cpu")

    def execute(self, requests: list[Any]) -> list[Any]:
        from posetriton.images import InvalidImageError
        from posetriton.serving.triton_utils import invalid_argument

        responses = []
        for request in requests:
            try:
                items = self._items(request)
                images, transforms, _ = preprocess_batch(items, self.spec, self.device)
            except InvalidImageError as exc:
                responses.append(invalid_argument(str(exc)))
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor.from_dlpack("images", torch.utils.dlpack.to_dlpack(images)),
                        pb_utils.Tensor("letterbox", np.stack([t.to_array() for t in transforms])),
                    ]
                )
            )
        return responses

    def _items(self, request: Any) -> list[bytes | np.ndarray]:
        from posetriton.images import InvalidImageError

        encoded = pb_utils.get_input_tensor_by_name(request, "IMAGE")
        if encoded is not None:
            return [item if isinstance(item, bytes) else bytes(item) for item in encoded.as_numpy().reshape(-1)]
        pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS")
        if pixels is None:
            raise InvalidImageError("the request carries neither IMAGE (encoded bytes) nor PIXELS (raw RGB)")
        return list(pixels.as_numpy())
