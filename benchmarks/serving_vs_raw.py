"""Served ensemble (JPEG in, poses out) vs the raw OpenVINO network at its best, same model and photos.

Raw side: the model's IR with several requests in flight (AsyncInferQueue, THROUGHPUT hint,
one image per request), on photos decoded and letterboxed beforehand. Served side: a real
Triton on 127.0.0.1 fed encoded photos by an asyncio gRPC client with 1 and 4 requests in
flight. Both at the same precision, on the same cores, one after the other.

    python benchmarks/serving_vs_raw.py --repository triton_models --model yolo11n_pose --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpcaio

from posetriton.client import image_bytes_input
from posetriton.images import decode_image
from posetriton.launcher import ServerOptions, TritonServer
from posetriton.openvino_runtime import OpenVinoRunner
from posetriton.processing import letterbox, to_network_input
from posetriton.repository import CPU_CONFIGS, load_catalog

ROOT = Path(__file__).resolve().parent.parent


def default_photos() -> list[Path]:
    photos = sorted((ROOT / "samples").glob("*.jp*g")) + sorted((ROOT / "samples").glob("*.webp"))
    photos += sorted(ROOT.glob(".venv-export/lib/python3*/site-packages/ultralytics/assets/*.jpg"))
    return photos


def raw_throughput(xml: Path, precision: str, inputs: list[np.ndarray], seconds: float) -> dict[str, float]:
    runner = OpenVinoRunner(xml, precision=precision, performance_hint="THROUGHPUT")  # type: ignore[arg-type]
    latencies: list[float] = []
    started: dict[int, float] = {}

    def done(_request: object, index: int) -> None:
        latencies.append(time.perf_counter() - started.pop(index))

    runner.queue.set_callback(done)
    for i in range(runner.num_requests * 2):  # warm-up
        runner.queue.start_async({0: inputs[i % len(inputs)][None]}, userdata=-1 - i)
        started[-1 - i] = time.perf_counter()
    runner.queue.wait_all()
    latencies.clear()
    count, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        started[count] = time.perf_counter()
        runner.queue.start_async({0: inputs[count % len(inputs)][None]}, userdata=count)
        count += 1
    runner.queue.wait_all()
    elapsed = time.perf_counter() - begin
    return {
        "images_per_s": count / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "in_flight": runner.num_requests,
    }


def raw_single_request_ms(xml: Path, precision: str, inputs: list[np.ndarray], rounds: int = 30) -> float:
    """p50 of one synchronous request on all cores (LATENCY hint): the floor for served latency at concurrency 1."""
    runner = OpenVinoRunner(xml, precision=precision, performance_hint="LATENCY")  # type: ignore[arg-type]
    runner.infer(inputs[0][None])
    times = []
    for i in range(rounds):
        start = time.perf_counter()
        runner.infer(inputs[i % len(inputs)][None])
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


async def served_throughput(url: str, model: str, photos: list[bytes], concurrency: int, seconds: float) -> dict:
    client = grpcaio.InferenceServerClient(url)
    latencies: list[float] = []

    async def worker(offset: int, deadline: float) -> int:
        done = 0
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await client.infer(model, [image_bytes_input([photos[(offset + done) % len(photos)]])])
            latencies.append(time.perf_counter() - start)
            done += 1
        return done

    await asyncio.gather(*(worker(i, time.perf_counter() + 2) for i in range(concurrency)))  # warm-up
    latencies.clear()
    begin = time.perf_counter()
    counts = await asyncio.gather(*(worker(i, begin + seconds) for i in range(concurrency)))
    elapsed = time.perf_counter() - begin
    await client.close()
    return {"images_per_s": sum(counts) / elapsed, "p50_ms": 1000 * statistics.median(latencies)}


def decode_and_letterbox_ms(model_name: str, photos: list[bytes]) -> float:
    spec = load_catalog(ROOT / "build_engines" / "models.toml")[model_name].letterbox
    begin = time.perf_counter()
    rounds = 5
    for _ in range(rounds):
        for data in photos:
            canvas, _ = letterbox(decode_image(data, spec.max_pixels), spec)
            to_network_input(canvas[None], spec)
    return 1000 * (time.perf_counter() - begin) / (rounds * len(photos))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--model", default="yolo11n_pose")
    parser.add_argument("--config-name", default="cpu", choices=sorted(CPU_CONFIGS))
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--photos", type=Path, nargs="+", default=None)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    photo_paths = args.photos or default_photos()
    encoded = [p.read_bytes() for p in photo_paths]
    spec = load_catalog(ROOT / "build_engines" / "models.toml")[args.model].letterbox
    inputs = [to_network_input(letterbox(decode_image(d, spec.max_pixels), spec)[0][None], spec)[0] for d in encoded]
    precision = CPU_CONFIGS[args.config_name]
    xml = args.repository / f"{args.model}_network" / "1" / "model.xml"

    results: dict = {
        "model": args.model,
        "precision": precision,
        "photos": [p.name for p in photo_paths],
        "machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "decode_letterbox_ms_per_photo": decode_and_letterbox_ms(args.model, encoded),
    }
    results["raw_openvino"] = raw_throughput(xml, precision, inputs, args.seconds)
    results["raw_single_request_p50_ms"] = raw_single_request_ms(xml, precision, inputs)
    options = ServerOptions(repository=args.repository, config_name=args.config_name, http_port=18500,
                            grpc_port=18501, metrics_port=18502, models=[args.model])  # fmt: skip
    with TritonServer(options) as server:
        for concurrency in args.concurrency:
            served = asyncio.run(served_throughput(server.grpc_url, args.model, encoded, concurrency, args.seconds))
            served["ratio_to_raw"] = served["images_per_s"] / results["raw_openvino"]["images_per_s"]
            if concurrency == 1:  # what serving adds beyond the network and the photo's own decode + letterbox
                served["overhead_ms"] = (
                    served["p50_ms"] - results["raw_single_request_p50_ms"] - results["decode_letterbox_ms_per_photo"]
                )
            results[f"served_concurrency_{concurrency}"] = served
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
