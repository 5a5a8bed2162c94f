"""The GPU device check: one command on a GPU machine that has torch (CUDA), torchvision, numpy, OpenCV, Pillow and
onnx, and no TensorRT, no Triton and no network. It runs the served ONNX graph itself (no TorchScript: a trace
made with one torch does not load in an older one) through a small ONNX interpreter written in torch ops.

``prepare --out DIR`` (this machine, export environment): the bundle the GPU machine needs, a few MB:
    ``model.onnx``      the exported yolo11n-pose network (uint8 canvas in, TopK candidates out);
    ``photos/``         the test photos, and JPEG variants made from a real photo: chroma subsampling 4:4:4,
                        4:2:2, 4:2:0, progressive, grayscale, CMYK, EXIF orientations 1-8, truncated, 4K;
    ``manifest.json``   letterbox / post-process specs, the batch and candidate sizes, the graph's decode tail,
                        and the interpreter's agreement with ONNX Runtime on this CPU.
``run --bundle DIR [--device cuda|cpu]`` (the GPU machine; ``--device cpu`` is the dry run used by the tests):
    1. nvJPEG + GPU letterbox (the served ``gpu_preprocess`` code) against the CPU step (Pillow + OpenCV) on every
       photo and variant: path taken, geometry, canvas grey-level differences, and how far final keypoints move
       (original-image pixels) when the same FP32 network sees one canvas or the other;
    2. the network in FP16 against FP32, with the decode tail in FP16 and held in FP32 (as the TensorRT build's
       precision constraints do), keypoint deviation in original pixels;
    3. the network on the device (FP32) against ONNX Runtime on the CPU, when onnxruntime is installed;
    4. the Python backend -> network hand-off emulated as the Python backend does it (``__dlpack__`` with a
       stream, then a consumer taking the capsule): the canvas must arrive on the device, same memory, no copy;
    5. the bytes one batch puts in Triton's CUDA memory pool (``--cuda-memory-pool-byte-size``);
    6. images/s of the GPU preprocess at batch 32 and of the interpreted network (not a TensorRT figure).
    Prints a short table (quoted by docs/gpu.md) and the JSON; writes both to ``$OUT`` when set; exits 1 when
    something is broken (geometry, hand-off, interpreter vs ONNX Runtime). Deviations are measured and flagged
    against the bound, not treated as breakage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from posetriton.core.contract import CANDIDATES, CANVAS, LETTERBOX_WIDTH  # noqa: E402
from posetriton.core.processing import Poses, letterbox, postprocess  # noqa: E402
from posetriton.core.spec import LetterboxSpec, PostprocessSpec  # noqa: E402

MODEL = "yolo11n_pose"
KEYPOINT_CONFIDENCE = 0.5
# Bounds the measurements are flagged against (docs/gpu.md): GPU vs CPU preprocess and FP16 vs FP32.
KEYPOINT_BOUND_PX = 1.0
MAX_INTERPRETER_VS_ORT_PX = 0.05  # FP32 interpreter vs ONNX Runtime FP32, final keypoints
MAX_INTERPRETER_VS_ORT_SCORE = 1e-3
EXIF_ORIENTATION_TAG = 0x0112


# ================================================================================================ ONNX on torch


class OnnxTorch:
    """Runs an ONNX graph node by node with torch ops, on any device, in FP32 or FP16 with chosen nodes in FP32.

    Covers the ops of the exported pose graphs (both families). FP16 mode casts every floating tensor a node
    receives to float16, except for nodes in ``fp32_nodes``, whose inputs are cast to float32: the same split
    TensorRT's precision constraints make (torch's FP16 kernels accumulate in FP32 as TensorRT's do, but the
    tactics differ: this measures the precision, not TensorRT's arithmetic).
    """

    def __init__(self, model: Any, device: Any) -> None:
        import torch
        from onnx import numpy_helper

        self.torch, self.device = torch, torch.device(device)
        self.graph = model.graph
        self.inputs = [i.name for i in self.graph.input]
        self.outputs = [o.name for o in self.graph.output]
        self.constants: dict[str, Any] = {}
        self.half_constants: dict[str, Any] = {}
        for init in self.graph.initializer:
            array = numpy_helper.to_array(init)
            tensor = torch.from_numpy(np.array(array))
            if tensor.is_floating_point():
                tensor = tensor.float().to(self.device)
                self.half_constants[init.name] = tensor.half()
            self.constants[init.name] = tensor  # integer constants (shapes, axes) stay on the host
        self.attributes = [
            {"outputs": len(node.output), **{a.name: _attribute(a) for a in node.attribute}} for node in self.graph.node
        ]

    def __call__(self, feeds: dict[str, Any], dtype: Any = None, fp32_nodes: frozenset[str] = frozenset()) -> list:
        torch = self.torch
        dtype = dtype or torch.float32
        values: dict[str, Any] = {name: tensor.to(self.device) for name, tensor in feeds.items()}
        for node, attrs in zip(self.graph.node, self.attributes, strict=True):
            compute = torch.float32 if dtype == torch.float32 or node.name in fp32_nodes else dtype
            args = [self._value(name, values, compute) if name else None for name in node.input]
            outputs = getattr(self, f"op_{node.op_type}")(args, attrs, compute)
            if not isinstance(outputs, (list, tuple)):
                outputs = [outputs]
            for name, value in zip(node.output, outputs, strict=False):
                values[name] = value
        return [values[name] for name in self.outputs]

    def _value(self, name: str, values: dict[str, Any], compute: Any) -> Any:
        if name in values:
            value = values[name]
        elif compute == self.torch.float16 and name in self.half_constants:
            return self.half_constants[name]
        else:
            value = self.constants[name]
        if value.is_floating_point() and value.dtype != compute:
            value = value.to(compute)
        return value

    # ---- helpers
    def _ints(self, tensor: Any) -> list[int]:
        return [int(v) for v in tensor.reshape(-1).tolist()]

    def _together(self, *tensors: Any) -> list[Any]:
        """Operands on one device: the data's, when shape arithmetic on the host meets device tensors."""
        device = next((t.device for t in tensors if t.device.type != "cpu"), None)
        return [t.to(device) if device is not None and t.device != device else t for t in tensors]

    # ---- elementwise
    def op_Add(self, a: list, attrs: dict, c: Any) -> Any:
        x, y = self._together(*a)
        return x + y

    def op_Sub(self, a: list, attrs: dict, c: Any) -> Any:
        x, y = self._together(*a)
        return x - y

    def op_Mul(self, a: list, attrs: dict, c: Any) -> Any:
        x, y = self._together(*a)
        return x * y

    def op_Div(self, a: list, attrs: dict, c: Any) -> Any:
        x, y = self._together(*a)
        if not x.is_floating_point():
            return self.torch.div(x, y, rounding_mode="trunc")
        return x / y

    def op_Sigmoid(self, a: list, attrs: dict, c: Any) -> Any:
        return self.torch.sigmoid(a[0])

    def op_Relu(self, a: list, attrs: dict, c: Any) -> Any:
        return self.torch.relu(a[0])

    def op_Softmax(self, a: list, attrs: dict, c: Any) -> Any:
        return self.torch.softmax(a[0], dim=attrs.get("axis", -1))

    def op_MatMul(self, a: list, attrs: dict, c: Any) -> Any:
        return self.torch.matmul(*self._together(*a))

    def op_Cast(self, a: list, attrs: dict, c: Any) -> Any:
        torch = self.torch
        to = {1: c, 2: torch.uint8, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: c}
        return a[0].to(to[attrs["to"]])

    # ---- layout
    def op_Shape(self, a: list, attrs: dict, c: Any) -> Any:
        shape = list(a[0].shape)[attrs.get("start", 0) : attrs.get("end")]
        return self.torch.tensor(shape, dtype=self.torch.int64)

    def op_Reshape(self, a: list, attrs: dict, c: Any) -> Any:
        shape = self._ints(a[1])
        if not attrs.get("allowzero", 0):
            shape = [a[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return a[0].reshape(shape)

    def op_Transpose(self, a: list, attrs: dict, c: Any) -> Any:
        perm = attrs.get("perm") or list(reversed(range(a[0].dim())))
        return a[0].permute(*perm)

    def op_Concat(self, a: list, attrs: dict, c: Any) -> Any:
        return self.torch.cat(self._together(*a), dim=attrs["axis"])

    def op_Unsqueeze(self, a: list, attrs: dict, c: Any) -> Any:
        out = a[0]
        rank = out.dim() + len(self._ints(a[1]))
        for axis in sorted(v % rank for v in self._ints(a[1])):
            out = out.unsqueeze(axis)
        return out

    def op_Squeeze(self, a: list, attrs: dict, c: Any) -> Any:
        if len(a) < 2 or a[1] is None:
            return a[0].squeeze()
        out = a[0]
        for axis in sorted((v % out.dim() for v in self._ints(a[1])), reverse=True):
            out = out.squeeze(axis)
        return out

    def op_Split(self, a: list, attrs: dict, c: Any) -> Any:
        axis = attrs.get("axis", 0)
        if len(a) > 1 and a[1] is not None:
            sizes = self._ints(a[1])
        else:
            parts = attrs.get("num_outputs", attrs["outputs"])
            sizes = [math.ceil(a[0].shape[axis] / parts)] * parts
        return list(self.torch.split(a[0], sizes, dim=axis))

    def op_Slice(self, a: list, attrs: dict, c: Any) -> Any:
        data = a[0]
        starts, ends = self._ints(a[1]), self._ints(a[2])
        axes = self._ints(a[3]) if len(a) > 3 and a[3] is not None else list(range(len(starts)))
        steps = self._ints(a[4]) if len(a) > 4 and a[4] is not None else [1] * len(starts)
        index = [slice(None)] * data.dim()
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            if step < 1:
                raise NotImplementedError("Slice with a negative step")
            size = data.shape[axis]
            index[axis] = slice(max(-size, min(start, size)), max(-size, min(end, size)), step)
        return data[tuple(index)]

    def op_Gather(self, a: list, attrs: dict, c: Any) -> Any:
        data, indices = a[0], a[1]
        axis = attrs.get("axis", 0) % data.dim()
        flat = indices.reshape(-1).to(data.device) % data.shape[axis]
        out = data.index_select(axis, flat)
        return out.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))

    def op_GatherND(self, a: list, attrs: dict, c: Any) -> Any:
        data, indices = a[0], a[1].to(a[0].device)
        batch = attrs.get("batch_dims", 0)
        batch_shape = data.shape[:batch]
        count = int(np.prod(batch_shape)) if batch else 1
        flat_data = data.reshape(count, *data.shape[batch:])
        flat_index = indices.reshape(count, *indices.shape[batch:])
        depth = flat_index.shape[-1]
        rows = self.torch.arange(count, device=data.device).view(count, *([1] * (flat_index.dim() - 2)))
        picked = flat_data[(rows.expand(flat_index.shape[:-1]), *(flat_index[..., i] for i in range(depth)))]
        return picked.reshape((*batch_shape, *picked.shape[1:]))

    def op_TopK(self, a: list, attrs: dict, c: Any) -> Any:
        k = self._ints(a[1])[0]
        values, indices = self.torch.topk(
            a[0], k, dim=attrs.get("axis", -1), largest=bool(attrs.get("largest", 1)), sorted=True
        )
        return [values, indices]

    # ---- convolution, pooling, resize
    def _pads(self, x: Any, pads: list[int], value: float = 0.0) -> tuple[Any, list[int]]:
        half = len(pads) // 2
        begin, end = pads[:half], pads[half:]
        if begin == end:
            return x, begin
        padding: list[int] = []
        for b, e in zip(reversed(begin), reversed(end), strict=True):
            padding += [b, e]
        return self.torch.nn.functional.pad(x, padding, value=value), [0] * half

    def op_Conv(self, a: list, attrs: dict, c: Any) -> Any:
        x, weight = a[0], a[1]
        bias = a[2] if len(a) > 2 else None
        x, pads = self._pads(x, attrs.get("pads", [0, 0, 0, 0]))
        return self.torch.nn.functional.conv2d(
            x, weight, bias, attrs.get("strides", [1, 1]), pads, attrs.get("dilations", [1, 1]), attrs.get("group", 1)
        )

    def op_ConvTranspose(self, a: list, attrs: dict, c: Any) -> Any:
        pads = attrs.get("pads", [0, 0, 0, 0])
        if pads[:2] != pads[2:]:
            raise NotImplementedError("ConvTranspose with asymmetric pads")
        return self.torch.nn.functional.conv_transpose2d(
            a[0], a[1], a[2] if len(a) > 2 else None, attrs.get("strides", [1, 1]), pads[:2],
            attrs.get("output_padding", [0, 0]), attrs.get("group", 1), attrs.get("dilations", [1, 1]),
        )  # fmt: skip

    def op_MaxPool(self, a: list, attrs: dict, c: Any) -> Any:
        x, pads = self._pads(a[0], attrs.get("pads", [0, 0, 0, 0]), value=-math.inf)
        return self.torch.nn.functional.max_pool2d(
            x, attrs["kernel_shape"], attrs.get("strides", [1, 1]), pads, attrs.get("dilations", [1, 1]),
            ceil_mode=bool(attrs.get("ceil_mode", 0)),
        )  # fmt: skip

    def op_Resize(self, a: list, attrs: dict, c: Any) -> Any:
        x = a[0]
        if attrs.get("mode", "nearest") != "nearest":
            raise NotImplementedError(f"Resize mode {attrs.get('mode')}")
        if len(a) > 3 and a[3] is not None and a[3].numel():
            size = self._ints(a[3])[2:]
        else:
            scales = [float(v) for v in a[2].reshape(-1).tolist()][2:]
            size = [math.floor(dim * s) for dim, s in zip(x.shape[2:], scales, strict=True)]
        # nearest with asymmetric coordinates and floor rounding: what interpolate("nearest") computes
        return self.torch.nn.functional.interpolate(x, size=size, mode="nearest")


def _attribute(attribute: Any) -> Any:
    from onnx import helper

    return helper.get_attribute_value(attribute).decode() if attribute.type == 3 else (
        helper.get_attribute_value(attribute)
    )  # fmt: skip


# ================================================================================================ prepare


def prepare(out: Path, onnx_path: Path | None) -> dict[str, Any]:
    """Export environment: the bundle (network, photos, JPEG variants, manifest), checked against ONNX Runtime."""
    import onnx
    import onnxruntime as ort
    import torch

    from build_engines.tensorrt_engine import decode_tail, onnx_graph_nodes
    from posetriton.core.images import decode_image
    from posetriton.server.repository import load_catalog

    served = load_catalog(ROOT / "build_engines" / "models.toml")[MODEL]
    out.mkdir(parents=True, exist_ok=True)
    source = onnx_path or _cached_onnx()
    shutil.copyfile(source, out / "model.onnx")
    photos = _default_photos()
    (out / "photos").mkdir(exist_ok=True)
    for path in photos:
        shutil.copyfile(path, out / "photos" / path.name)
    variants = write_jpeg_variants(out / "variants", _photo(photos, "bus.jpg"), _photo(photos, "zidane.jpg"))

    model = onnx.load(str(out / "model.onnx"))
    interpreter = OnnxTorch(model, "cpu")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    spec, post = served.letterbox, served.postprocess
    agreement = []
    for path in photos:
        canvas, transform = letterbox(decode_image(path.read_bytes(), spec.max_pixels), spec)
        expected = session.run([CANDIDATES], {CANVAS: canvas[None]})[0][0]
        with torch.no_grad():
            got = interpreter({CANVAS: torch.from_numpy(canvas[None])})[0][0].float().numpy()
        agreement.append({"photo": path.name, **compare(postprocess(expected, transform, post),
                                                         postprocess(got, transform, post))})  # fmt: skip
    manifest = {
        "model": MODEL,
        "onnx_source": str(source),
        "photos": [p.name for p in photos],
        "variants": variants,
        "letterbox": spec.to_parameters(),
        "postprocess": post.to_parameters(),
        "max_batch_size": served.tuning.max_batch_size,
        "num_candidates": served.num_candidates,
        "decode_tail": decode_tail(onnx_graph_nodes(model)),
        "interpreter_vs_onnxruntime_cpu": agreement,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_jpeg_variants(folder: Path, portrait: Path, landscape: Path) -> list[dict[str, Any]]:
    """JPEGs a phone or a camera sends, from real photos: what nvJPEG and libjpeg may decode differently."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    image = Image.open(portrait).convert("RGB")
    variants = []

    def save(name: str, picture: Any, **options: Any) -> Path:
        path = folder / f"{name}.jpg"
        picture.save(path, "JPEG", **options)
        return path

    for name, subsampling in (("444", 0), ("422", 1), ("420", 2)):
        save(name, image, quality=90, subsampling=subsampling)
        variants.append({"name": name, "file": f"{name}.jpg", "kind": f"chroma {name[0]}:{name[1]}:{name[2]}"})
    save("progressive", image, quality=90, subsampling=2, progressive=True)
    variants.append({"name": "progressive", "file": "progressive.jpg", "kind": "progressive 4:2:0"})
    save("grayscale", image.convert("L"), quality=90)
    variants.append({"name": "grayscale", "file": "grayscale.jpg", "kind": "grayscale"})
    save("cmyk", image.convert("CMYK"), quality=90)
    variants.append({"name": "cmyk", "file": "cmyk.jpg", "kind": "CMYK (CPU path by design)"})
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = orientation
        name = f"exif{orientation}"
        save(name, image, quality=90, subsampling=2, exif=exif.tobytes())
        variants.append({"name": name, "file": f"{name}.jpg", "kind": f"EXIF orientation {orientation}"})
    whole = (folder / "420.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) * 6 // 10])
    variants.append({"name": "truncated", "file": "truncated.jpg", "kind": "truncated at 60 %"})
    big = Image.open(landscape).convert("RGB").resize((3840, 2160), Image.Resampling.BICUBIC)
    save("4k", big, quality=90, subsampling=2)
    variants.append({"name": "4k", "file": "4k.jpg", "kind": "4K 3840x2160 4:2:0"})
    return variants


def _photo(photos: Sequence[Path], name: str) -> Path:
    return next((p for p in photos if p.name == name), photos[0])


def _default_photos() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")
    assets = Path(next(iter(spec.submodule_search_locations))) / "assets" if spec else None
    photos = [ROOT / "samples" / "grace_hopper.jpg", ROOT / "samples" / "astronaut.webp"]
    if assets is not None:
        photos += [assets / "bus.jpg", assets / "zidane.jpg"]
    return [p for p in photos if p.is_file()]


def _cached_onnx() -> Path:
    for candidate in (
        ROOT / "triton_models" / f"{MODEL}_network" / "1" / "model.onnx",
        ROOT / ".cache" / "tests" / "repository" / f"{MODEL}_network" / "1" / "model.onnx",
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no exported {MODEL} ONNX: run `make models` (or pass --onnx)")


# ================================================================================================ run


def compare(reference: Poses, other: Poses) -> dict[str, Any]:
    """Matched detections and keypoint / score deviation (original pixels, keypoints of confidence > 0.5)."""
    from build_engines.quantize import AccuracyLimits, compare_poses

    result = compare_poses(reference, other, AccuracyLimits(keypoint_confidence=KEYPOINT_CONFIDENCE))
    errors = result["keypoint_errors"]
    return {
        "detections": [result["reference_detections"], result["other_detections"]],
        "matched": result["matched"],
        "keypoints": len(errors),
        "keypoint_error_p50_px": round(float(np.median(errors)), 4) if errors else 0.0,
        "keypoint_error_max_px": round(max(errors, default=0.0), 4),
        "score_error_max": round(max(result["score_errors"], default=0.0), 6),
    }


def pool_bytes(max_batch_size: int, input_size: int, num_candidates: int, candidate_width: int) -> dict[str, int]:
    """What one full batch puts through Triton's CUDA memory pool on the GPU path (docs/gpu.md sizes the pool)."""
    canvas = max_batch_size * input_size * input_size * 3  # uint8 [B, S, S, 3]
    return {
        "canvas_uint8": canvas,
        "letterbox_fp64": max_batch_size * LETTERBOX_WIDTH * 8,
        "candidates_fp32": max_batch_size * num_candidates * candidate_width * 4,
        # the preprocess output in the pool, the gathered input batch of each of the two network instances
        # (gpu_network_instances), and one batch in flight behind them
        "suggested_pool": 5 * canvas,
    }


QUICK_VARIANTS = ("420", "exif6", "cmyk", "truncated")  # --quick: one of each kind of path


def run(bundle: Path, device_name: str = "cuda", seconds: float = 2.0, quick: bool = False) -> dict[str, Any]:
    import onnx
    import torch

    from posetriton.core.images import InvalidImageError, decode_image
    from posetriton.server.steps import gpu_preprocess as gp

    started = time.perf_counter()
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for a dry run")
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = LetterboxSpec.from_parameters(manifest["letterbox"])
    post = PostprocessSpec.from_parameters(manifest["postprocess"])
    model = onnx.load(str(bundle / "model.onnx"))
    network = OnnxTorch(model, device)
    tail = frozenset(manifest["decode_tail"])
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run, no nvJPEG)",
        "versions": _versions(),
        "checks": {},
        "failures": [],
        "over_bound": [],
    }
    failures, over_bound = report["failures"], report["over_bound"]

    def infer(canvas: np.ndarray | Any, dtype: Any = torch.float32, fp32: frozenset[str] = frozenset()) -> np.ndarray:
        batch = canvas if isinstance(canvas, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(canvas))
        with torch.no_grad():
            return network({CANVAS: batch[None] if batch.dim() == 3 else batch}, dtype, fp32)[0].float().cpu().numpy()

    # 1. nvJPEG + GPU letterbox against the CPU step, photo by photo
    items = [(name, bundle / "photos" / name, "photo") for name in manifest["photos"]]
    items += [
        (v["name"], bundle / "variants" / v["file"], v["kind"])
        for v in manifest["variants"]
        if not quick or v["name"] in QUICK_VARIANTS
    ]
    rows = []
    for name, path, kind in items:
        data = path.read_bytes()
        row: dict[str, Any] = {"image": name, "kind": kind}
        try:
            cpu_canvas, cpu_transform = letterbox(decode_image(data, spec.max_pixels), spec)
        except InvalidImageError as exc:
            cpu_canvas, row["cpu"] = None, f"refused: {exc}"
        (result,) = gp.preprocess_requests([[data]], spec, device, torch_decode=True)
        if isinstance(result, Exception):
            row["gpu"] = f"refused: {result}"
            if cpu_canvas is not None:
                failures.append(f"{name}: the GPU path refuses an image the CPU step serves: {result}")
            rows.append(row)
            continue
        row["path"] = result.paths[0]
        if cpu_canvas is None:
            failures.append(f"{name}: the GPU path serves an image the CPU step refuses ({row['cpu']})")
            rows.append(row)
            continue
        gpu_canvas = result.canvases[0]
        gpu_array = gpu_canvas.cpu().numpy() if isinstance(gpu_canvas, torch.Tensor) else gpu_canvas
        diff = np.abs(gpu_array.astype(np.int16) - cpu_canvas.astype(np.int16))
        row.update(
            same_geometry=result.transforms[0] == cpu_transform,
            canvas_mean_diff=round(float(diff.mean()), 4),
            canvas_p999_diff=float(np.percentile(diff, 99.9)),
            canvas_max_diff=int(diff.max()),
        )
        row.update(compare(postprocess(infer(cpu_canvas)[0], cpu_transform, post),
                           postprocess(infer(gpu_canvas)[0], result.transforms[0], post)))  # fmt: skip
        if not row["same_geometry"]:
            failures.append(f"{name}: letterbox geometry differs from the CPU step")
        if row["keypoint_error_max_px"] > KEYPOINT_BOUND_PX or row["matched"] != max(row["detections"]):
            over_bound.append(
                f"{name}: GPU vs CPU preprocess moves keypoints by {row['keypoint_error_max_px']} px "
                f"(bound {KEYPOINT_BOUND_PX}), detections {row['detections']}, matched {row['matched']}"
            )
        rows.append(row)
    report["checks"]["gpu_vs_cpu_preprocess"] = rows

    # 2. FP16 against FP32, decode tail in FP16 or held in FP32
    precision_rows = []
    precision_images = [*items[: len(manifest["photos"])], ("4k", bundle / "variants" / "4k.jpg", "4K")]
    for name, path, _ in [item for item in precision_images if not quick or item[0] == "bus.jpg"]:
        canvas, transform = letterbox(decode_image(path.read_bytes(), spec.max_pixels), spec)
        reference = postprocess(infer(canvas)[0], transform, post)
        row = {"image": name}
        for label, fp32 in (("fp16", frozenset()), ("fp16_fp32_tail", tail)):
            if device.type == "cpu" and not _cpu_half_supported():
                row[label] = "skipped: no FP16 kernels on this CPU build"
                continue
            row[label] = compare(reference, postprocess(infer(canvas, torch.float16, fp32)[0], transform, post))
        precision_rows.append(row)
        tail_row = row["fp16_fp32_tail"]
        if isinstance(tail_row, dict) and tail_row["keypoint_error_max_px"] > KEYPOINT_BOUND_PX:
            over_bound.append(f"{name}: FP16 (tail in FP32) moves keypoints by {tail_row['keypoint_error_max_px']} px")
    report["checks"]["fp16_vs_fp32"] = precision_rows

    # 3. the network on the device against ONNX Runtime (CPU)
    try:
        import onnxruntime as ort
    except ImportError:
        report["checks"]["network_vs_onnxruntime"] = "skipped: onnxruntime not installed"
    else:
        session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
        parity = []
        for name in manifest["photos"]:
            data = (bundle / "photos" / name).read_bytes()
            canvas, transform = letterbox(decode_image(data, spec.max_pixels), spec)
            expected = session.run([CANDIDATES], {CANVAS: canvas[None]})[0][0]
            row = {"image": name, **compare(postprocess(expected, transform, post),
                                            postprocess(infer(canvas)[0], transform, post))}  # fmt: skip
            parity.append(row)
            if (
                row["keypoint_error_max_px"] > MAX_INTERPRETER_VS_ORT_PX
                or row["score_error_max"] > MAX_INTERPRETER_VS_ORT_SCORE
                or row["matched"] != max(row["detections"])
            ):
                failures.append(f"{name}: the network on {device} departs from ONNX Runtime: {row}")
        report["checks"]["network_vs_onnxruntime"] = parity

    # 4. the hand-off: the canvas leaves the preprocess step as the torch tensor and arrives without a copy
    blobs = [(bundle / "photos" / name).read_bytes() for name in manifest["photos"]]
    (prepared,) = gp.preprocess_requests([blobs], spec, device, torch_decode=True)
    report["checks"]["handoff"] = handoff(prepared.canvases, device)
    if not report["checks"]["handoff"]["zero_copy"]:
        failures.append(f"hand-off copied or moved the canvas: {report['checks']['handoff']}")

    # 5. the CUDA memory pool
    width = int(model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value)
    report["pool_bytes"] = pool_bytes(manifest["max_batch_size"], spec.input_size, manifest["num_candidates"], width)

    # 6. throughput
    if seconds > 0:
        batch32 = [blobs[i % len(blobs)] for i in range(32)]
        big = [(bundle / "variants" / "4k.jpg").read_bytes()] * 32
        canvas = torch.zeros((32, spec.input_size, spec.input_size, 3), dtype=torch.uint8, device=device)
        report["throughput_images_per_s"] = {
            "gpu_preprocess_photos_batch32": _rate(
                lambda: gp.preprocess_requests([batch32], spec, device, torch_decode=True), 32, seconds, device
            ),
            "gpu_preprocess_4k_batch32": _rate(
                lambda: gp.preprocess_requests([big], spec, device, torch_decode=True), 32, seconds, device
            ),
            "network_interpreted_fp16_tail_fp32_batch32": _rate(
                lambda: infer(canvas, torch.float16, tail), 32, seconds, device
            ) if device.type == "cuda" else "skipped on CPU",
        }  # fmt: skip
    report["passed"] = not failures
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def handoff(canvases: Any, device: Any) -> dict[str, Any]:
    """What the Python backend does with ``Tensor.from_dlpack(name, tensor)`` (python_backend ``pb_tensor.cc``): ask
    the tensor for a capsule on its own proxy stream, synchronise that stream, then take the memory. A consumer
    (torch stands in for the backend) must see the same device memory: no copy, no trip to the host."""
    import torch

    if device.type == "cuda":
        proxy = torch.cuda.Stream(device)  # Triton's proxy stream: a stream of its own, not the producer's
        capsule = canvases.__dlpack__(stream=proxy.cuda_stream)
        proxy.synchronize()
    else:
        capsule = canvases.__dlpack__()
    received = torch.from_dlpack(capsule)
    return {
        "producer": f"{canvases.device} {tuple(canvases.shape)} {canvases.dtype}",
        "dlpack_device": list(canvases.__dlpack_device__()),
        "consumer_device": str(received.device),
        "same_memory": received.data_ptr() == canvases.data_ptr(),
        "contiguous": bool(received.is_contiguous()),
        "zero_copy": received.data_ptr() == canvases.data_ptr() and received.device == canvases.device,
    }


def _cpu_half_supported() -> bool:
    import torch

    try:
        torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3).half(), torch.ones(1, 1, 1, 1).half())
    except RuntimeError:
        return False
    return True


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "cv2", "PIL", "onnx", "onnxruntime"):
        try:
            versions[name] = str(__import__(name).__version__)
        except ImportError:
            versions[name] = "absent"
    return versions


def _rate(step: Callable[[], Any], images_per_step: int, seconds: float, device: Any) -> float:
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    sync()
    return round(images_per_step * count / (time.perf_counter() - start), 1)


# ================================================================================================ report


def table(report: dict[str, Any]) -> str:
    """The short table docs/gpu.md quotes."""
    lines = [f"device: {report['device']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    lines += ["| image | kind | path | geometry | canvas mean / p99.9 / max | keypoints max / p50 px | matched |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["checks"]["gpu_vs_cpu_preprocess"]:
        if "same_geometry" not in row:
            lines.append(f"| {row['image']} | {row['kind']} | cpu: {row.get('cpu', 'ok')} | gpu: "
                         f"{row.get('gpu', row.get('path'))} | | | |")  # fmt: skip
            continue
        lines.append(
            f"| {row['image']} | {row['kind']} | {row['path']} | {'same' if row['same_geometry'] else 'DIFFERS'} | "
            f"{row['canvas_mean_diff']} / {row['canvas_p999_diff']:g} / {row['canvas_max_diff']} | "
            f"{row['keypoint_error_max_px']} / {row['keypoint_error_p50_px']} | "
            f"{row['matched']} of {row['detections']} |"
        )
    lines += ["", "| image | FP16 keypoints max / p50 px | FP16 + FP32 decode tail max / p50 px |", "|---|---|---|"]
    for row in report["checks"]["fp16_vs_fp32"]:
        cells = [
            f"{c['keypoint_error_max_px']} / {c['keypoint_error_p50_px']}" if isinstance(c, dict) else c
            for c in (row["fp16"], row["fp16_fp32_tail"])
        ]
        lines.append(f"| {row['image']} | {cells[0]} | {cells[1]} |")
    handed = report["checks"]["handoff"]
    lines += ["", f"hand-off: {handed['producer']} -> {handed['consumer_device']}, zero copy: {handed['zero_copy']}"]
    pool = report["pool_bytes"]
    lines.append(
        f"CUDA pool per batch: canvas {pool['canvas_uint8']:,} B, letterbox {pool['letterbox_fp64']:,} B, "
        f"candidates {pool['candidates_fp32']:,} B; suggested --cuda-memory-pool-byte-size=0:{pool['suggested_pool']}"
    )
    if "throughput_images_per_s" in report:
        lines.append("images/s: " + ", ".join(f"{k} {v}" for k, v in report["throughput_images_per_s"].items()))
    lines.append(f"passed: {report['passed']}; failures: {report['failures'] or 'none'}")
    lines.append(f"over the {KEYPOINT_BOUND_PX} px bound: {report['over_bound'] or 'none'}; {report['seconds']} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="export environment: write the bundle for the GPU machine")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "device_check")
    p.add_argument("--onnx", type=Path, default=None, help=f"the exported {MODEL} model.onnx")
    r = sub.add_parser("run", help="the GPU machine: the checks, the table and the JSON")
    r.add_argument("--bundle", type=Path, default=ROOT / "build" / "device_check")
    r.add_argument("--device", default="cuda", help="cpu: a dry run of the same checks without a GPU")
    r.add_argument("--seconds", type=float, default=2.0, help="timing window per throughput figure; 0 skips them")
    r.add_argument("--quick", action="store_true", help=f"photos + variants {', '.join(QUICK_VARIANTS)} only")
    args = parser.parse_args()

    if args.command == "prepare":
        print(json.dumps(prepare(args.out, args.onnx), indent=2))
        return
    report = run(args.bundle, args.device, args.seconds, args.quick)
    text, summary = json.dumps(report, indent=2), table(report)
    print(summary)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_device_check.json").write_text(text + "\n")
        Path(os.environ["OUT"], "gpu_device_check.md").write_text(summary + "\n")
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
