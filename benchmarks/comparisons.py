"""Like-for-like comparisons with what a user would run instead, all computed in one run of this script.

1. *Served vs the upstream library's own* ``predict()`` (super-gradients for YOLO-NAS Pose, Ultralytics for the
   Ultralytics models; run by benchmarks/reference_predict.py in the export environment, before any server
   starts): the same photo files, the same precision (bf16: OpenVINO's bf16 hint on the served side,
   ``torch.autocast("cpu", dtype=torch.bfloat16)`` on the reference side) and the same number of images in
   flight. Served: N client threads, one photo per request, Triton batches them. Reference: one ``predict()``
   call on a list of N photo paths (the library's own batching). Decoding is inside the timing on both sides.
2. *Payload*: bytes per request for the encoded photo (``NAME``), its raw uint8 pixels (``NAME_pixels``), the
   uint8 canvas (``NAME_network``) and the float32 tensor the network took before, at the photos' own sizes and
   at 1080p and 4K resamplings of a real photo.
3. *Client-side preprocessing* (the common Ultralytics-guide pattern): the client decodes and letterboxes,
   sends the uint8 canvas to ``NAME_network`` and runs NMS itself; throughput, latency and bytes both ways.
4. *Cost vs resolution* (VGA, 1080p, 4K resamplings) and 5. *vs people per image* (real photos tiled 1x1,
   2x2, 3x3), one request at a time.

Throughput numbers need a quiet machine; the JSON records the CPU and whether it has native bf16.

    python benchmarks/comparisons.py --repository triton_models --model yolo_nas_pose_n --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openvino as ov
import tritonclient.grpc as grpcclient
from PIL import Image

from posetriton.client import image_bytes_input
from posetriton.core.contract import CANDIDATES, CANVAS, NUM_DETECTIONS, OUTPUTS
from posetriton.core.images import decode_image
from posetriton.core.processing import LetterboxTransform, letterbox, postprocess
from posetriton.server.launcher import ServerOptions, TritonServer, free_port
from posetriton.server.repository import CPU_CONFIGS, ServedModel, load_catalog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.lean_path import cpu_model, default_photos, emit_json  # noqa: E402

EXPORT_PYTHON = ROOT / ".venv-export" / "bin" / "python"
# One client thread per request in flight, each with its own connection; a request is (client, index) -> result.
Call = Callable[[grpcclient.InferenceServerClient, int], object]


def log(message: str) -> None:
    """Progress on stderr (stdout is the JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def native_bf16() -> bool:
    """Whether the CPU has bf16 instructions (without them bf16 is emulated or falls back to f32)."""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def openvino_precision(xml: Path, precision: str) -> str:
    """The inference precision OpenVINO's CPU plugin actually uses for a requested hint."""
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    return compiled.get_property("INFERENCE_PRECISION_HINT").to_string()


def drive(url: str, call: Call, in_flight: int, seconds: float, warmup: int = 2) -> dict[str, float]:
    """``in_flight`` threads calling back to back for ``seconds``: images/s and median latency."""
    latencies: list[float] = []
    start: list[float] = []
    barrier = threading.Barrier(in_flight, action=lambda: start.append(time.perf_counter()))

    def worker(thread: int) -> float:
        with grpcclient.InferenceServerClient(url) as client:
            for i in range(warmup):
                call(client, thread + i * in_flight)
            barrier.wait()
            done = 0
            while time.perf_counter() < start[0] + seconds:
                begin = time.perf_counter()
                call(client, thread + done * in_flight)
                latencies.append(time.perf_counter() - begin)
                done += 1
            return time.perf_counter()

    with ThreadPoolExecutor(in_flight) as pool:
        ends = list(pool.map(worker, range(in_flight)))
    return {"images_per_s": len(latencies) / (max(ends) - start[0]), "p50_ms": 1000 * statistics.median(latencies)}


def served_call(model: str, photos: list[bytes]) -> Call:
    """The ensemble: one encoded photo per request, poses back."""

    def call(client: grpcclient.InferenceServerClient, i: int) -> object:
        return client.infer(model, [image_bytes_input([photos[i % len(photos)]])])

    return call


def network_candidates(
    client: grpcclient.InferenceServerClient, model: ServedModel, data: bytes
) -> tuple[np.ndarray, LetterboxTransform]:
    """Decode and letterbox on the client, send the uint8 canvas to NAME_network; its candidates come back."""
    canvas, transform = letterbox(decode_image(data, model.letterbox.max_pixels), model.letterbox)
    tensor = grpcclient.InferInput(CANVAS, [1, *canvas.shape], "UINT8")
    tensor.set_data_from_numpy(canvas[None])
    return client.infer(model.step("network"), [tensor]).as_numpy(CANDIDATES), transform


def client_side_call(model: ServedModel, photos: list[bytes]) -> Call:
    """The Ultralytics-guide pattern: preprocessing and NMS on the client, only the network on the server."""

    def call(client: grpcclient.InferenceServerClient, i: int) -> object:
        candidates, transform = network_candidates(client, model, photos[i % len(photos)])
        return postprocess(candidates[0], transform, model.postprocess)

    return call


def people(url: str, model: str, photos: list[bytes]) -> list[int]:
    with grpcclient.InferenceServerClient(url) as client:
        call = served_call(model, photos)
        return [int(call(client, i).as_numpy(NUM_DETECTIONS)[0, 0]) for i in range(len(photos))]  # type: ignore[attr-defined]


def response_bytes(url: str, model: str, photos: list[bytes]) -> float:
    with grpcclient.InferenceServerClient(url) as client:
        results = [served_call(model, photos)(client, i) for i in range(len(photos))]
    return statistics.mean(sum(r.as_numpy(name).nbytes for name in OUTPUTS) for r in results)  # type: ignore[attr-defined]


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def resampled(photo: Path, longest: int) -> bytes:
    image = Image.open(photo).convert("RGB")
    scale = longest / max(image.size)
    return jpeg(image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS))


def mosaic(photos: list[Path], side: int, tile: int = 640) -> bytes:
    canvas = Image.new("RGB", (side * tile, side * tile))
    for i in range(side * side):
        image = Image.open(photos[i % len(photos)]).convert("RGB")
        image.thumbnail((tile, tile))
        canvas.paste(image, ((i % side) * tile, (i // side) * tile))
    return jpeg(canvas)


def payload(data: bytes, model: ServedModel) -> dict[str, int | str]:
    """Bytes of the input tensor per one-image request on each route (gRPC framing adds about 100 bytes)."""
    size = model.letterbox.input_size
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return {
        "size": f"{width}x{height}",
        "encoded": len(data) + 4,  # a BYTES element travels with a 4-byte length prefix
        "pixels_uint8": width * height * 3,  # NAME_pixels
        "canvas_uint8": size * size * 3,  # NAME_network now
        "tensor_float32": size * size * 3 * 4,  # NAME_network before; what most guides send
    }


def reference_weights(repository: Path, model: str) -> Path | None:
    """The weights the repository's network was exported from (its export report), if it names them."""
    report = repository / f"{model}_network" / "export_report.json"
    if not report.is_file():
        return None
    files = json.loads(report.read_text()).get("files", {})
    weights = files.get("checkpoint") or files.get("weights")
    return Path(weights) if weights else None


def reference_predict(model: ServedModel, weights: Path, photos: list[Path], args: argparse.Namespace) -> dict:
    kind = model.source.get("kind")
    command = [str(EXPORT_PYTHON), str(ROOT / "benchmarks" / "reference_predict.py"), "--library", str(kind),
               "--weights", str(weights), "--seconds", str(args.seconds), "--in-flight", *map(str, args.in_flight),
               "--precision", *CPU_CONFIGS.values()]  # fmt: skip
    if kind == "super_gradients":
        command += ["--variant", model.source["variant"]]
    log(f"reference: {kind} predict() in the export environment (bf16 without native support is slow)")
    done = subprocess.run([*command, "--", *map(str, photos)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"reference predict() failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _kb(value: float) -> str:
    return f"{value / 1000:,.0f} KB"


def _rate(entry: dict | None) -> str:
    return f"{entry['images_per_s']:.1f} img/s, p50 {entry['p50_ms']:.0f} ms" if entry else "–"


def render_markdown(runs: list[dict]) -> str:
    """The docs tables from one or more ``--json`` outputs (one per model), so no number is copied by hand."""
    header = "| | " + " | ".join(r["model"] for r in runs) + " |\n|---|" + "---|" * len(runs)
    first = runs[0]
    ran = ", ".join(f"{hint} hint ran {actual}" for hint, actual in first["openvino_precision"].items())
    lines = [
        f"`{first['command']}` (and the same per model), {first['date']}, {first['machine']}; OpenVINO: {ran}.",
        "",
        "Served vs the library's own `predict()` (images/s; N in flight: served = N client threads, one photo per "
        "request; predict() = one call on a list of N photos):",
        "",
        header,
    ]
    for key in first.get("served_vs_reference", {}):
        precision, n = key.split("_in_flight_")
        cells = []
        for run in runs:
            row = run.get("served_vs_reference", {}).get(key)
            if not row:
                cells.append("–")
            elif row.get("reference_error"):
                cells.append(f"served {row['served_images_per_s']:.1f}; predict() failed: {row['reference_error']}")
            else:
                cells.append(
                    f"{row['served_images_per_s']:.1f} vs {row['reference_images_per_s']:.2f} "
                    f"(**{row['served_over_reference']:.1f}x**)"
                )
        native = "" if precision == "f32" or first["bf16_native"] else " (CPU without bf16: not bf16 speed)"
        lines.append(f"| {precision}{native}, {n} in flight | " + " | ".join(cells) + " |")
    reference_names = {"super_gradients": "super-gradients", "ultralytics": "Ultralytics"}
    libraries = [r.get("reference_predict", {}).get("library") for r in runs]
    cells = [f"{reference_names[lib]} `predict()`" if lib in reference_names else "–" for lib in libraries]
    lines.append("| reference | " + " | ".join(cells) + " |")
    cells = [{True: "yes", False: "**no**", None: "–"}[r.get("people_same_as_reference")] for r in runs]
    lines.append("| same people per photo as the reference (f32) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Bytes per one-image request (input tensor; gRPC adds about 100 bytes):",
        "",
        "| image | size | encoded (`NAME`) | uint8 pixels (`NAME_pixels`) | uint8 canvas (`NAME_network`) "
        "| float32 tensor |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in first["payload_bytes_per_request"].items():
        lines.append(
            f"| {name} | {entry['size']} | {_kb(entry['encoded'])} | {_kb(entry['pixels_uint8'])} | "
            f"{_kb(entry['canvas_uint8'])} | {_kb(entry['tensor_float32'])} |"
        )
    lines += [
        "",
        "Client-side preprocessing (decode, letterbox, NMS on the client; uint8 canvas to `NAME_network`), f32:",
        "",
        header,
    ]
    for key in [k for k in first["client_side_preprocessing"] if k.startswith("in_flight_")]:
        cells = [
            f"{_rate(r['client_side_preprocessing'][key])} (served ensemble "
            f"{r['client_side_preprocessing'][key]['served_ensemble_images_per_s']:.1f} img/s)"
            for r in runs
        ]
        lines.append(f"| {key.removeprefix('in_flight_')} in flight | " + " | ".join(cells) + " |")
    cells = []
    for run in runs:
        side = run["client_side_preprocessing"]
        cells.append(
            f"sends {_kb(side['request_bytes']['canvas_uint8'])} (float32: {_kb(side['request_bytes']['if_float32'])}),"
            f" receives {_kb(side['response_bytes']['candidates'])} (ensemble: "
            f"{side['response_bytes']['served_ensemble_mean'] / 1000:,.1f} KB)"
        )
    lines.append("| bytes per request | " + " | ".join(cells) + " |")
    lines += ["", "Cost vs input resolution (one request at a time, f32):", "", header]
    for label in first["resolution"]:
        size = _kb(first["resolution"][label]["bytes"])
        lines.append(f"| {label} ({size} JPEG) | " + " | ".join(_rate(r["resolution"][label]) for r in runs) + " |")
    lines += ["", "Cost vs people per image (real photos tiled, 640 px tiles; one request at a time, f32):", "", header]
    for label in first["people_per_image"]:
        cells = [
            f"{_rate(r['people_per_image'][label])} ({r['people_per_image'][label]['people']} found)" for r in runs
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", type=Path, nargs="+", help="only print the markdown tables of these --json files")
    parser.add_argument("--model", default="yolo_nas_pose_n")
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="weights for the reference predict(): a super-gradients checkpoint or an Ultralytics .pt "
        "(default: the file the repository's export report names)",
    )
    parser.add_argument("--seconds", type=float, default=8, help="per measurement (resolution/people: half)")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--photos", type=Path, nargs="+", default=None)
    parser.add_argument("--skip-reference", action="store_true", help="no predict() comparison")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.render:
        print(render_markdown([json.loads(path.read_text()) for path in args.render]), end="")
        return

    model = load_catalog(ROOT / "build_engines" / "models.toml")[args.model]
    photos = args.photos or default_photos()
    encoded = [p.read_bytes() for p in photos]
    bus = next((p for p in photos if p.name == "bus.jpg"), photos[0])
    xml = args.repository / f"{args.model}_network" / "1" / "model.xml"
    bf16_native = native_bf16()
    results: dict = {
        "model": args.model,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "benchmarks/comparisons.py", *sys.argv[1:]]),
        "machine": cpu_model(),
        "bf16_native": bf16_native,
        "openvino_precision": {p: openvino_precision(xml, p) for p in CPU_CONFIGS.values()},
        "photos": [p.name for p in photos],
        "in_flight_means": {
            "served": "N client threads, one photo per request (Triton's dynamic batcher groups them)",
            "reference": "one predict() call on a list of N photo paths (the library's own batching)",
        },
    }
    if not bf16_native:
        results["bf16_note"] = (
            "This CPU has no native bf16 (no avx512_bf16/amx_bf16): bf16 rows are not bf16 speed. OpenVINO runs "
            "the precision reported in openvino_precision; torch autocast emulates bf16."
        )
    results["payload_bytes_per_request"] = {
        **{p.name: payload(d, model) for p, d in zip(photos, encoded, strict=True)},
        f"1080p ({bus.name} resampled)": payload(resampled(bus, 1920), model),
        f"4K ({bus.name} resampled)": payload(resampled(bus, 3840), model),
    }

    reference: dict | None = None
    weights = args.checkpoint or reference_weights(args.repository, args.model)
    if args.skip_reference:
        pass
    elif weights is None:
        results["reference_skipped"] = "no --checkpoint and the export report names no weights"
    else:
        reference = reference_predict(model, weights, photos, args)
        results["reference_predict"] = {"weights": weights.name, **reference}

    served: dict = {}
    for config, precision in CPU_CONFIGS.items():
        options = ServerOptions(repository=args.repository, config_name=config, http_port=free_port(),
                                grpc_port=free_port(), metrics_port=free_port(), models=[args.model])  # fmt: skip
        log(f"served: starting Triton with --model-config-name {config}")
        with TritonServer(options) as server:
            url = server.grpc_url
            served[precision] = {
                "config": config,
                "people": dict(zip(results["photos"], people(url, args.model, encoded), strict=True)),
                **{
                    f"in_flight_{n}": drive(url, served_call(args.model, encoded), n, args.seconds)
                    for n in args.in_flight
                },
            }
            if config != "cpu":
                continue
            log("client-side preprocessing, then cost vs resolution and vs people")
            size = model.letterbox.input_size
            with grpcclient.InferenceServerClient(url) as client:
                candidates = network_candidates(client, model, encoded[0])[0]
            results["client_side_preprocessing"] = {
                "request_bytes": {"canvas_uint8": size * size * 3, "if_float32": size * size * 3 * 4},
                "response_bytes": {
                    "candidates": candidates.nbytes,
                    "candidates_shape": list(candidates.shape),
                    "served_ensemble_mean": response_bytes(url, args.model, encoded),
                },
                **{
                    f"in_flight_{n}": {
                        **drive(url, client_side_call(model, encoded), n, args.seconds),
                        "served_ensemble_images_per_s": served[precision][f"in_flight_{n}"]["images_per_s"],
                    }
                    for n in args.in_flight
                },
            }
            results["resolution"] = {}
            for label, longest in (("VGA", 640), ("1080p", 1920), ("4K", 3840)):
                data = resampled(bus, longest)
                results["resolution"][label] = {
                    "bytes": len(data),
                    **drive(url, served_call(args.model, [data]), 1, args.seconds / 2),
                }
            results["people_per_image"] = {}
            for side in (1, 2, 3):
                data = mosaic(photos, side)
                results["people_per_image"][f"{side}x{side} mosaic"] = {
                    "people": people(url, args.model, [data])[0],
                    **drive(url, served_call(args.model, [data]), 1, args.seconds / 2),
                }
    results["served"] = served

    if reference is not None:
        ratios: dict = {}
        for precision in CPU_CONFIGS.values():
            for n in args.in_flight:
                key = f"{precision}_in_flight_{n}"
                ref, ours = reference.get(key, {}), served[precision][f"in_flight_{n}"]
                theirs = ref.get("images_per_s")
                ratios[key] = {
                    "served_images_per_s": ours["images_per_s"],
                    "reference_images_per_s": theirs,
                    "served_over_reference": ours["images_per_s"] / theirs if theirs else None,
                    **({"reference_error": ref["error"]} if "error" in ref else {}),
                    **({"bf16_native": bf16_native} if precision == "bf16" else {}),
                }
        results["served_vs_reference"] = ratios
        # Sanity check: both sides see the same people (with the same weights and default thresholds).
        counted = reference.get("f32_in_flight_1", {}).get("people")  # counted at one photo per call
        results["people_same_as_reference"] = None if counted is None else served["f32"]["people"] == counted

    emit_json(results, args.json)


if __name__ == "__main__":
    main()
