"""Client throughput: the sync client vs the asyncio client with N requests in flight, and shared memory vs gRPC.

Starts its own Triton (posetriton.server.launcher, CPU configuration, free ports) on a repository
holding yolo11n_pose, sends the sample photos one image per request, and prints a Markdown
table (and optionally JSON). Example::

    .venv/bin/python benchmarks/client_throughput.py --repository triton_models --requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from posetriton.client import AsyncPoseClient, PoseClient
from posetriton.server.launcher import ServerOptions, TritonServer, free_port

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = [ROOT / "samples" / "grace_hopper.jpg", ROOT / "samples" / "astronaut.webp"]


def _row(name: str, in_flight: int, payload: str, latencies: list[float], wall: float) -> dict[str, Any]:
    return {
        "client": name,
        "in_flight": in_flight,
        "payload": payload,
        "requests": len(latencies),
        "images_per_s": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "mean_ms": 1000 * statistics.fmean(latencies),
    }


def run_sync(client: PoseClient, images: list[Any], requests: int) -> tuple[list[float], float]:
    latencies = []
    started = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        client.predict(images[i % len(images)])
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - started


async def run_async(
    client: AsyncPoseClient, images: list[Any], requests: int, in_flight: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = iter(range(requests))

    async def worker() -> None:
        for i in queue:
            t = time.perf_counter()
            await client.predict(images[i % len(images)])
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return latencies, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--model", default="yolo11n_pose")
    parser.add_argument("--requests", type=int, default=32, help="Requests per configuration (after 4 warm-up).")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args()

    encoded = [path.read_bytes() for path in PHOTOS]
    pixels = [np.asarray(Image.open(path).convert("RGB")) for path in PHOTOS]
    options = ServerOptions(
        repository=args.repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        models=[args.model, f"{args.model}_pixels"],
    )  # fmt: skip
    # Configurations run interleaved, a slice of each per round, so load from elsewhere on a shared
    # machine falls on all of them alike.
    rounds = 4
    per_round = max(1, args.requests // rounds)
    loop = asyncio.new_event_loop()
    with TritonServer(options) as server:
        url = server.grpc_url
        sync_plain = PoseClient(url, args.model)
        sync_shm = PoseClient(url, args.model, shared_memory=True, headers=server.shared_memory_headers)

        async def open_async(shared_memory: bool) -> AsyncPoseClient:  # a gRPC aio channel belongs to its loop
            return AsyncPoseClient(url, args.model, shared_memory=shared_memory, headers=server.shared_memory_headers)

        async_plain = loop.run_until_complete(open_async(False))
        async_shm = loop.run_until_complete(open_async(True))
        configs: list[tuple[str, int, str, Callable[[int], tuple[list[float], float]]]] = []
        for label, client in (("sync", sync_plain), ("sync + shm", sync_shm)):
            for payload, images in (("JPEG/WebP bytes", encoded), ("raw RGB pixels", pixels)):
                configs.append((label, 1, payload, lambda n, c=client, i=images: run_sync(c, i, n)))
        for label, aclient in (("async", async_plain), ("async + shm", async_shm)):
            for in_flight in args.in_flight:
                if label.endswith("shm") and in_flight not in (1, max(args.in_flight)):
                    continue
                configs.append((
                    label, in_flight, "JPEG/WebP bytes",
                    lambda n, c=aclient, k=in_flight: loop.run_until_complete(run_async(c, encoded, n, k)),
                ))  # fmt: skip
        measured: dict[int, tuple[list[float], float]] = {i: ([], 0.0) for i in range(len(configs))}
        for _, _, _, run in configs:
            run(4)  # warm-up: connections, shm regions, server caches
        for _ in range(rounds):
            for index, (_, _, _, run) in enumerate(configs):
                latencies, wall = run(per_round)
                measured[index] = (measured[index][0] + latencies, measured[index][1] + wall)
        sync_plain.close()
        sync_shm.close()
        loop.run_until_complete(async_plain.close())
        loop.run_until_complete(async_shm.close())
    loop.close()
    rows = [
        _row(label, in_flight, payload, *measured[index])
        for index, (label, in_flight, payload, _) in enumerate(configs)
    ]

    machine = platform.processor() or platform.machine()
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"# {args.model}, {args.requests} requests per row, one image per request; {machine}, load {load}")
    print("| client | in flight | payload | images/s | p50 latency (ms) | mean latency (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['client']} | {r['in_flight']} | {r['payload']} | {r['images_per_s']:.1f} | "
            f"{r['p50_ms']:.0f} | {r['mean_ms']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
