"""Served ensemble vs what a user would write instead: one Python process doing the same work in-process.

*In-process pipeline*: the project's own decode, letterbox, OpenVINO and NMS functions in one process; OpenVINO
at its best for throughput (THROUGHPUT hint, an AsyncInferQueue with the optimal number of requests, all cores)
and, for single-request latency, the LATENCY hint. *Served*: the whole ensemble (encoded photo in, poses out)
through a real Triton on 127.0.0.1, driven by an asyncio gRPC client. *Raw network*: the IR alone on
pre-letterboxed canvases (the previous table's baseline). Same photos, same precision, same cores, one after the
other in one run. Also prints the bytes per image that cross each step.

    python benchmarks/lean_path.py --repository triton_models --model yolo11n_pose --config-name cpu --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import openvino as ov
import tritonclient.grpc.aio as grpcaio

from posetriton.client import image_bytes_input
from posetriton.contract import OUTPUTS, candidate_width
from posetriton.images import decode_image
from posetriton.launcher import ServerOptions, TritonServer, free_port
from posetriton.openvino_runtime import OpenVinoRunner, cpu_threads
from posetriton.processing import letterbox, postprocess
from posetriton.repository import CPU_CONFIGS, ServedModel, load_catalog

ROOT = Path(__file__).resolve().parent.parent
# Before this change every image crossed preprocess -> network as float32 [3, 640, 640] and network ->
# postprocess as all 8400 anchors x 56 float32 (see docs/benchmarks.md, "Bytes per image").
BEFORE_NETWORK_IN = 3 * 640 * 640 * 4
BEFORE_NETWORK_OUT = 8400 * 56 * 4


def default_photos() -> list[Path]:
    photos = sorted((ROOT / "samples").glob("*.jp*g")) + sorted((ROOT / "samples").glob("*.webp"))
    photos += sorted(ROOT.glob(".venv-export/lib/python3*/site-packages/ultralytics/assets/*.jpg"))
    return photos


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "")
    bf16 = "native bf16 (avx512_bf16/amx)" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no native bf16"
    return f"{fields.get('Model name', '?').strip()}, {cpu_threads()} cores, {bf16}"


class InProcessPipeline:
    """decode -> letterbox -> OpenVINO -> NMS -> map back, in one process, ``in_flight`` images at a time."""

    def __init__(self, model: ServedModel, xml: Path, precision: str, hint: str) -> None:
        self.model = model
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint}
        self.compiled = ov.Core().compile_model(str(xml), "CPU", config)
        self.optimal = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    def prepare(self, data: bytes) -> tuple[np.ndarray, object]:
        canvas, transform = letterbox(decode_image(data, self.model.letterbox.max_pixels), self.model.letterbox)
        return canvas[None], transform

    def finish(self, candidates: np.ndarray, transform: object) -> int:
        return len(postprocess(candidates[0], transform, self.model.postprocess))  # type: ignore[arg-type]

    def single(self, data: bytes) -> int:
        canvas, transform = self.prepare(data)
        candidates = self.compiled({0: canvas})[self.compiled.output(0)]
        return self.finish(np.asarray(candidates), transform)

    def throughput(self, photos: list[bytes], in_flight: int, seconds: float) -> dict[str, float]:
        """Images/s with ``in_flight`` requests in the AsyncInferQueue; decode and NMS run on this thread."""
        queue = ov.AsyncInferQueue(self.compiled, in_flight)
        finished: list[tuple[np.ndarray, object]] = []
        lock = threading.Lock()

        def done(request: ov.InferRequest, transform: object) -> None:
            with lock:
                finished.append((request.get_output_tensor(0).data.copy(), transform))

        queue.set_callback(done)
        count = 0

        def drain() -> None:
            with lock:
                ready = finished[:]
                finished.clear()
            for candidates, transform in ready:
                self.finish(candidates, transform)

        for warm in range(in_flight * 2):
            canvas, transform = self.prepare(photos[warm % len(photos)])
            queue.start_async({0: canvas}, userdata=transform)
        queue.wait_all()
        drain()
        begin = time.perf_counter()
        while time.perf_counter() - begin < seconds:
            canvas, transform = self.prepare(photos[count % len(photos)])
            queue.start_async({0: canvas}, userdata=transform)  # blocks while every request is busy
            count += 1
            drain()
        queue.wait_all()
        drain()
        return {"images_per_s": count / (time.perf_counter() - begin)}


def raw_network_throughput(xml: Path, precision: str, canvases: list[np.ndarray], seconds: float) -> float:
    runner = OpenVinoRunner(xml, precision=precision, performance_hint="THROUGHPUT")  # type: ignore[arg-type]
    assert runner.throughput is not None
    queue = runner.throughput.queue
    queue.set_callback(lambda _request, _index: None)
    for i in range(runner.num_requests * 2):
        queue.start_async({0: canvases[i % len(canvases)]})
    queue.wait_all()
    count, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        queue.start_async({0: canvases[count % len(canvases)]})
        count += 1
    queue.wait_all()
    return count / (time.perf_counter() - begin)


async def served_throughput(url: str, model: str, photos: list[bytes], concurrency: int, seconds: float) -> dict:
    client = grpcaio.InferenceServerClient(url)
    latencies: list[float] = []
    response_bytes: list[int] = []

    async def worker(offset: int, deadline: float) -> int:
        done = 0
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            result = await client.infer(model, [image_bytes_input([photos[(offset + done) % len(photos)]])])
            latencies.append(time.perf_counter() - start)
            response_bytes.append(sum(result.as_numpy(name).nbytes for name in OUTPUTS))
            done += 1
        return done

    await asyncio.gather(*(worker(i, time.perf_counter() + 2) for i in range(concurrency)))  # warm-up
    latencies.clear()
    begin = time.perf_counter()
    counts = await asyncio.gather(*(worker(i, begin + seconds) for i in range(concurrency)))
    elapsed = time.perf_counter() - begin
    await client.close()
    return {
        "images_per_s": sum(counts) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "response_bytes_mean": statistics.mean(response_bytes),
    }


async def served_single_ms(url: str, model: str, data: bytes, rounds: int) -> float:
    client = grpcaio.InferenceServerClient(url)
    await client.infer(model, [image_bytes_input([data])])
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await client.infer(model, [image_bytes_input([data])])
        times.append(time.perf_counter() - start)
    await client.close()
    return 1000 * statistics.median(times)


def step_times(url: str, model: str) -> dict[str, dict[str, int]]:
    """Cumulative (count, ns) per phase of each step, from Triton's own statistics."""
    import tritonclient.grpc as grpcclient

    phases = ("queue", "compute_input", "compute_infer", "compute_output")
    totals = {}
    with grpcclient.InferenceServerClient(url) as client:
        for role in ("preprocess", "network", "postprocess"):
            (stats,) = client.get_inference_statistics(f"{model}_{role}", as_json=True)["model_stats"]
            inference = stats["inference_stats"]
            totals[role] = {
                "requests": int(inference["success"].get("count", 0)),
                "executions": int(stats.get("execution_count", 0)),
                **{phase: int(inference[phase].get("ns", 0)) for phase in phases},
            }
    return totals


def step_profile(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Mean ms per request of each phase of each step between two :func:`step_times` readings."""
    profile = {}
    for role, totals in after.items():
        requests = max(totals["requests"] - before[role]["requests"], 1)
        profile[role] = {
            phase: (value - before[role][phase]) / requests / 1e6
            for phase, value in totals.items()
            if phase not in ("requests", "executions")
        }
        profile[role]["images_per_execution"] = requests / max(totals["executions"] - before[role]["executions"], 1)
    return profile


def network_single_ms(pipeline: InProcessPipeline, canvases: list[np.ndarray], rounds: int) -> float:
    times = []
    for i in range(rounds * len(canvases)):
        start = time.perf_counter()
        pipeline.compiled({0: canvases[i % len(canvases)]})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def single_ms(pipeline: InProcessPipeline, data: bytes, rounds: int) -> float:
    pipeline.single(data)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        pipeline.single(data)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--model", default="yolo11n_pose")
    parser.add_argument("--config-name", default="cpu", choices=sorted(CPU_CONFIGS))
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=20, help="Single requests per photo for the c=1 medians.")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--photos", type=Path, nargs="+", default=None)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    model = load_catalog(ROOT / "build_engines" / "models.toml")[args.model]
    photo_paths = args.photos or default_photos()
    encoded = [p.read_bytes() for p in photo_paths]
    precision = CPU_CONFIGS[args.config_name]
    xml = args.repository / f"{args.model}_network" / "1" / "model.xml"
    canvases = [letterbox(decode_image(d, model.letterbox.max_pixels), model.letterbox)[0][None] for d in encoded]
    k = model.num_candidates
    results: dict = {
        "model": args.model,
        "precision": precision,
        "machine": cpu_model(),
        "photos": [p.name for p in photo_paths],
        "bytes_per_image": {
            "input_jpeg_mean": int(statistics.mean(len(d) for d in encoded)),
            "network_in": {"before": BEFORE_NETWORK_IN, "after": canvases[0][0].nbytes},
            "network_out": {"before": BEFORE_NETWORK_OUT, "after": k * candidate_width(17) * 4},
        },
    }
    throughput = InProcessPipeline(model, xml, precision, "THROUGHPUT")
    latency = InProcessPipeline(model, xml, precision, "LATENCY")
    results["in_process"] = {
        "optimal_requests": throughput.optimal,
        **{f"in_flight_{n}": throughput.throughput(encoded, n, args.seconds) for n in args.in_flight},
        "single_p50_ms": {
            p.name: single_ms(latency, d, args.rounds) for p, d in zip(photo_paths, encoded, strict=True)
        },
        # The network call alone (LATENCY), to hold against the network step's compute_infer in the profile.
        "network_single_p50_ms": network_single_ms(latency, canvases, args.rounds),
    }
    del throughput, latency
    results["raw_network_images_per_s"] = raw_network_throughput(xml, precision, canvases, args.seconds)

    options = ServerOptions(repository=args.repository, config_name=args.config_name, http_port=free_port(),
                            grpc_port=free_port(), metrics_port=free_port(), models=[args.model])  # fmt: skip
    served: dict = {}
    with TritonServer(options) as server:
        before = step_times(server.grpc_url, args.model)
        served["single_p50_ms"] = {
            p.name: asyncio.run(served_single_ms(server.grpc_url, args.model, d, args.rounds))
            for p, d in zip(photo_paths, encoded, strict=True)
        }
        after = step_times(server.grpc_url, args.model)
        served["profile_c1_ms"] = step_profile(before, after)
        for n in args.in_flight:
            served[f"in_flight_{n}"] = asyncio.run(
                served_throughput(server.grpc_url, args.model, encoded, n, args.seconds)
            )
            before, after = after, step_times(server.grpc_url, args.model)
            served[f"in_flight_{n}"]["profile_ms"] = step_profile(before, after)
    results["served"] = served
    inproc = results["in_process"]
    results["summary"] = {
        **{
            f"served_over_in_process_{n}": served[f"in_flight_{n}"]["images_per_s"]
            / inproc[f"in_flight_{n}"]["images_per_s"]
            for n in args.in_flight
        },
        **{
            f"served_over_raw_network_{n}": served[f"in_flight_{n}"]["images_per_s"]
            / results["raw_network_images_per_s"]
            for n in args.in_flight
        },
        "overhead_c1_ms": {p: served["single_p50_ms"][p] - inproc["single_p50_ms"][p] for p in served["single_p50_ms"]},
    }
    results["summary"]["overhead_c1_ms_median"] = statistics.median(results["summary"]["overhead_c1_ms"].values())
    results["bytes_per_image"]["response_mean"] = served[f"in_flight_{args.in_flight[0]}"]["response_bytes_mean"]
    results["pid"] = os.getpid()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
