"""GPU preprocess step: JPEG decode with nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``) and the letterbox
in torch ops on the GPU, behind the same ``NAME_preprocess`` tensors as the CPU step (``preprocess.py``):
``canvas`` uint8 ``[B, S, S, 3]`` (letterboxed, decoded RGB order; the network graph does channel order,
transpose and /255) and ``letterbox`` FP64 ``[B, 6]``.

Selected with ``--model-config-name=gpu_nvjpeg`` (``NAME_preprocess/configs/gpu_nvjpeg.pbtxt``, KIND_GPU, model
file ``gpu_model.py``). Needs torch + torchvision with CUDA (``requirements/gpu.txt``).

One ``execute`` call decodes the JPEGs of all its requests in one batched nvJPEG call and letterboxes them into
one device tensor; each response gets its slice, handed to Triton as the torch tensor itself
(``pb_utils.Tensor.from_dlpack(name, tensor)``): the Python backend then asks the tensor for its DLPack capsule on
its own CUDA stream and synchronises, and the canvas stays on the GPU (a capsule made beforehand skips that
stream hand-shake). Failures stay per request:

* a bad image fails its request with INVALID_ARGUMENT (the CPU step's messages);
* any other error on the GPU path (out of memory, nvJPEG internals) sends that request through the CPU decode
  and letterbox instead (its canvas then leaves from host memory), and the other requests are unaffected;
* a sticky CUDA error (the context is unusable: every later CUDA call fails) makes the stub exit, so the model
  does not stay READY while failing: the stub watchdog (``posetriton.server.watchdog``) reloads the model with a fresh
  stub and CUDA context, and if that fails too the model is not ready and the pod's readiness probe fails.

Geometry is the shared numpy letterbox's (:func:`posetriton.core.processing.letterbox`): the same resized size, pad
placement, pad value and :class:`~posetriton.core.processing.LetterboxTransform`. The resize is
:func:`resize_linear_cv2`, which reproduces ``cv2.resize(INTER_LINEAR)`` exactly in integer torch ops (a float
``interpolate`` would differ by 1 grey level on about 10 % of pixels). JPEG decoding differs between nvJPEG and
libjpeg (Pillow, the CPU path) by IDCT rounding and chroma upsampling (see docs/gpu.md). Everything that is not
a JPEG Pillow/nvJPEG handles alike (PNG, WebP, BMP, GIF, CMYK JPEGs, anything nvJPEG rejects) takes the CPU
path: :func:`posetriton.core.images.decode_image` + the numpy letterbox.

The functions take a ``device`` argument, so the whole path runs on CPU in tests (tests/test_gpu_preprocess.py).
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from posetriton.core.contract import CANVAS, IMAGE, LETTERBOX, PIXELS, image_error
from posetriton.core.processing import LetterboxTransform, letterbox, letterbox_geometry
from posetriton.core.spec import LetterboxSpec

try:  # only inside Triton's Python-backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - tests and the device check import the pure functions
    pb_utils = None

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"  # EOI; nvJPEG may decode a truncated file that Pillow (the CPU step) refuses
EXIF_ORIENTATION_TAG = 0x0112
# Pillow modes of JPEGs nvJPEG decodes to RGB exactly as Pillow does; CMYK/YCCK go to the CPU path.
GPU_JPEG_MODES = ("RGB", "L")
RESIZE_COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE (11 fractional bits)
CUDA_FAULT_EXIT_CODE = 75  # the stub exits with this after a sticky CUDA error (see the module docstring)

Item = bytes | np.ndarray


class CudaFault(RuntimeError):
    """The CUDA context is unusable (a sticky error): only a new process can use the GPU again."""


# ------------------------------------------------------------------------------------------------ geometry


def letterbox_torch(
    image: torch.Tensor, spec: LetterboxSpec, device: torch.device | str | None = None
) -> tuple[torch.Tensor, LetterboxTransform]:
    """``[3, H, W]`` uint8 RGB -> letterboxed ``[S, S, 3]`` uint8 RGB canvas on ``device`` (default: the image's)."""
    target_device = torch.device(device) if device is not None else image.device
    canvas = torch.empty((spec.input_size, spec.input_size, 3), dtype=torch.uint8, device=target_device)
    return canvas, letterbox_into(canvas, image, spec)


def letterbox_into(canvas: torch.Tensor, image: torch.Tensor, spec: LetterboxSpec) -> LetterboxTransform:
    """Letterbox ``[3, H, W]`` uint8 RGB straight into ``canvas`` (``[S, S, 3]``, e.g. one row of the batch)."""
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a [3, H, W] uint8 tensor, got {list(image.shape)} {image.dtype}")
    image = image.to(canvas.device, non_blocking=True)
    height, width = int(image.shape[1]), int(image.shape[2])
    new_w, new_h, transform = letterbox_geometry(height, width, spec)
    if (new_w, new_h) != (width, height):
        image = resize_linear_cv2(image, new_h, new_w)
    canvas.fill_(spec.pad_value)
    top, left = transform.pad_y, transform.pad_x
    canvas[top : top + new_h, left : left + new_w] = image.permute(1, 2, 0)
    return transform


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
    if not data.startswith(JPEG_MAGIC) or not data.rstrip(b"\x00").endswith(JPEG_END):
        return None  # not a JPEG, or one without its end marker (truncated): the CPU path decides
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


# ------------------------------------------------------------------------------------------------ decoding


def decode_jpegs(blobs: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """nvJPEG: one batched call, else one by one; an item that cannot be decoded this way comes back as None.

    torchvision raises RuntimeError for a JPEG nvJPEG rejects and for its own internal failures alike, so both
    send the item to the CPU path; :func:`preprocess_requests` checks afterwards that the CUDA context survived.
    """
    if not blobs:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        results: list[torch.Tensor | None] = []
        for tensor in encoded:
            try:
                results.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                results.append(None)
        return results


def cuda_context_usable(device: torch.device) -> bool:
    """False after a sticky CUDA error: synchronising and one tiny kernel fail from then on."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return bool(torch.ones(1, device=device).add_(1).item() == 2)
    except Exception:
        return False


@dataclass
class Prepared:
    """One request's preprocess outputs: canvases ``[n, S, S, 3]`` uint8 and one transform per image."""

    canvases: torch.Tensor | np.ndarray  # a device tensor (GPU path) or a host array (CPU fallback)
    transforms: list[LetterboxTransform]
    paths: list[str]  # per image: "gpu", "cpu" or "pixels"; "fallback" when the request left the GPU path

    def letterbox_array(self) -> np.ndarray:
        return np.stack([t.to_array() for t in self.transforms])


def preprocess_requests(
    requests: Sequence[Sequence[Item]],
    spec: LetterboxSpec,
    device: torch.device | str = "cuda",
    *,
    torch_decode: bool | None = None,
    decode: Callable[[list[bytes], torch.device], list[torch.Tensor | None]] = decode_jpegs,
    context_usable: Callable[[torch.device], bool] = cuda_context_usable,
) -> list[Prepared | Exception]:
    """Preprocess every request of one ``execute`` call: per request a :class:`Prepared`, or the
    :class:`~posetriton.core.images.InvalidImageError` that refuses it.

    Items are encoded images (bytes) or ``[H, W, 3]`` uint8 RGB arrays. The JPEGs of all requests are decoded in
    one batched nvJPEG call when ``device`` is CUDA (``torch_decode`` forces that path on any device, so tests run
    it on CPU) and every image is letterboxed into one ``[N, S, S, 3]`` tensor on ``device``. A request whose GPU
    path fails for any other reason is redone on the CPU; :class:`CudaFault` is raised when the CUDA context is
    no longer usable. ``decode`` and ``context_usable`` are replaceable for tests.
    """
    from posetriton.core.images import InvalidImageError, check_pixels

    device = torch.device(device)
    if torch_decode is None:
        torch_decode = device.type == "cuda"
    results: list[Prepared | Exception | None] = [None] * len(requests)
    # 1. classify every item; a bad raw-pixel array or a header over the pixel limit fails its request here
    plans: list[list[tuple[str, Any]]] = []
    for r, items in enumerate(requests):
        plan: list[tuple[str, Any]] = []
        for i, item in enumerate(items):
            try:
                if isinstance(item, np.ndarray):
                    plan.append(("pixels", check_pixels(item, spec.max_pixels)))
                    continue
                header = jpeg_header(item, spec.max_pixels) if torch_decode else None
                plan.append(("gpu", (item, header[2])) if header is not None else ("cpu", item))
            except InvalidImageError as exc:
                results[r] = InvalidImageError(image_error(i, len(items), str(exc)))
                break
        plans.append(plan)
    # 2. one nvJPEG batch for every JPEG of the requests still standing
    jpeg_slots = [(r, i) for r, plan in enumerate(plans) if results[r] is None for i, (kind, _) in enumerate(plan)
                  if kind == "gpu"]  # fmt: skip
    try:
        decoded = decode([plans[r][i][1][0] for r, i in jpeg_slots], device)
    except Exception:
        decoded = [None] * len(jpeg_slots)  # every JPEG takes the CPU decode
    if any(d is None for d in decoded):  # nvJPEG refused something: make sure it was not the context dying
        _raise_if_fault(device, context_usable)
    decoded_at = dict(zip(jpeg_slots, decoded, strict=True))
    # 3. letterbox into one batch tensor; each request owns a slice of it
    total = sum(len(plan) for r, plan in enumerate(plans) if results[r] is None)
    size = spec.input_size
    try:
        batch = torch.empty((total, size, size, 3), dtype=torch.uint8, device=device) if total else None
    except Exception:  # out of device memory for the batch: every request takes the CPU path
        _raise_if_fault(device, context_usable)
        batch = None
    start = 0
    for r, plan in enumerate(plans):
        if results[r] is not None:
            continue
        rows = batch[start : start + len(plan)] if batch is not None else None
        start += len(plan)
        try:
            if rows is None:
                raise RuntimeError("no device batch")
            results[r] = _letterbox_request(plan, rows, spec, {i: decoded_at.get((r, i)) for i in range(len(plan))})
        except InvalidImageError as exc:
            results[r] = exc
        except Exception:
            _raise_if_fault(device, context_usable)
            try:
                results[r] = _cpu_request(requests[r], spec)
            except Exception as exc:  # the CPU path failed too: this request fails alone (INTERNAL)
                results[r] = exc
    return [result for result in results if result is not None]


def _letterbox_request(
    plan: list[tuple[str, Any]], rows: Any, spec: LetterboxSpec, decoded: dict[int, torch.Tensor | None]
) -> Prepared:
    from posetriton.core.images import InvalidImageError

    transforms, paths = [], []
    for i, (kind, value) in enumerate(plan):
        try:
            if kind == "pixels":
                image = torch.from_numpy(np.ascontiguousarray(value)).to(rows.device, non_blocking=True)
                transforms.append(letterbox_into(rows[i], image.permute(2, 0, 1), spec))
            elif kind == "gpu" and decoded[i] is not None:
                transforms.append(letterbox_into(rows[i], apply_exif_orientation(decoded[i], value[1]), spec))
            else:  # not a JPEG nvJPEG handles alike, or nvJPEG refused it: the CPU path decides
                canvas, transform = _cpu_letterbox(value[0] if kind == "gpu" else value, spec)
                rows[i].copy_(torch.from_numpy(canvas), non_blocking=False)
                transforms.append(transform)
                kind = "cpu"
        except InvalidImageError as exc:
            raise InvalidImageError(image_error(i, len(plan), str(exc))) from None
        paths.append(kind)
    return Prepared(rows, transforms, paths)


def _cpu_letterbox(data: bytes, spec: LetterboxSpec) -> tuple[np.ndarray, LetterboxTransform]:
    from posetriton.core.images import decode_image

    return letterbox(decode_image(data, spec.max_pixels), spec)


def _cpu_request(items: Sequence[Item], spec: LetterboxSpec) -> Prepared | Exception:
    """The CPU step's decode and letterbox for one request (host memory), after its GPU path failed."""
    from posetriton.core.images import InvalidImageError, check_pixels

    canvases, transforms = [], []
    for i, item in enumerate(items):
        try:
            if isinstance(item, np.ndarray):
                canvas, transform = letterbox(check_pixels(item, spec.max_pixels), spec)
            else:
                canvas, transform = _cpu_letterbox(item, spec)
        except InvalidImageError as exc:
            return InvalidImageError(image_error(i, len(items), str(exc)))
        canvases.append(canvas)
        transforms.append(transform)
    return Prepared(np.stack(canvases), transforms, ["fallback"] * len(items))


def _raise_if_fault(device: torch.device, context_usable: Callable[[torch.device], bool]) -> None:
    if not context_usable(device):
        raise CudaFault(f"the CUDA context on {device} is unusable after an error (sticky CUDA error)")


def preprocess_batch(
    items: Sequence[Item], spec: LetterboxSpec, device: torch.device | str = "cuda", *, torch_decode: bool | None = None
) -> tuple[torch.Tensor, list[LetterboxTransform], list[str]]:
    """One request's items -> ``[B, S, S, 3]`` uint8 canvases on ``device``, transforms and per-item paths.

    Raises :class:`~posetriton.core.images.InvalidImageError` naming the item that cannot be used.
    """
    (result,) = preprocess_requests([items], spec, device, torch_decode=torch_decode)
    if isinstance(result, Exception):
        raise result
    canvases = result.canvases
    tensor = torch.from_numpy(canvases).to(device) if isinstance(canvases, np.ndarray) else canvases
    return tensor, result.transforms, result.paths


# ------------------------------------------------------------------------------------------------ the model


def canvas_output(canvases: torch.Tensor | np.ndarray) -> Any:
    """The ``canvas`` output tensor: a device tensor is handed over as the torch tensor (not a DLPack capsule),
    so the Python backend synchronises on its stream and the data stays on the GPU; a host array is copied."""
    if isinstance(canvases, np.ndarray):
        return pb_utils.Tensor(CANVAS, canvases)
    return pb_utils.Tensor.from_dlpack(CANVAS, canvases)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from posetriton.server.steps.triton_utils import model_parameters

        config = json.loads(args["model_config"])
        self.spec = LetterboxSpec.from_parameters(model_parameters(config))
        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device("cuda", int(args.get("model_instance_device_id", 0)))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.exit: Callable[[int], Any] = os._exit  # replaceable in tests

    def execute(self, requests: list[Any]) -> list[Any]:
        from posetriton.core.images import InvalidImageError
        from posetriton.server.steps.triton_utils import internal_error, invalid_argument

        items: list[list[Item] | Exception] = []
        for request in requests:
            try:
                items.append(self._items(request))
            except InvalidImageError as exc:
                items.append(exc)
        valid = [entry for entry in items if not isinstance(entry, Exception)]
        try:
            try:
                prepared = iter(preprocess_requests(valid, self.spec, self.device))
            except CudaFault:
                raise
            except Exception as exc:  # unforeseen: fail this call's requests, and the stub if CUDA is gone
                if not cuda_context_usable(self.device):
                    raise CudaFault(f"the CUDA context on {self.device} is unusable after: {exc}") from exc
                return [internal_error(f"preprocess failed: {exc}") for _ in requests]
        except CudaFault as exc:
            print(f"posetriton gpu_preprocess: {exc}; exiting so a fresh process takes over", file=sys.stderr)
            sys.stderr.flush()
            self.exit(CUDA_FAULT_EXIT_CODE)
            return [internal_error(str(exc)) for _ in requests]  # reached only when exit is replaced (tests)
        responses = []
        for entry in items:
            result = entry if isinstance(entry, Exception) else next(prepared)
            if isinstance(result, InvalidImageError):
                responses.append(invalid_argument(str(result)))
                continue
            if isinstance(result, Exception):
                responses.append(internal_error(f"preprocess failed: {result}"))
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        canvas_output(result.canvases),
                        pb_utils.Tensor(LETTERBOX, result.letterbox_array()),
                    ]
                )
            )
        return responses

    def _items(self, request: Any) -> list[Item]:
        from posetriton.core.images import InvalidImageError

        encoded = pb_utils.get_input_tensor_by_name(request, IMAGE)
        if encoded is not None:
            return [item if isinstance(item, bytes) else bytes(item) for item in encoded.as_numpy().reshape(-1)]
        pixels = pb_utils.get_input_tensor_by_name(request, PIXELS)
        if pixels is None:
            raise InvalidImageError("the request carries neither IMAGE (encoded bytes) nor PIXELS (raw RGB)")
        return list(pixels.as_numpy())
