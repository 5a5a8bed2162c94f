"""Real-time tracking streams: how many 15 fps streams of 640 px frames this machine serves with p95 latency < 250 ms.

Starts its own Triton (CPU configuration, free ports) with ``NAME_track`` for each model, then for
1, 2, 3... concurrent streams sends each stream's frames at 15 fps as a live source
(``AsyncPoseClient.track(..., live=True)``: a frame that finds every slot busy replaces the unsent
one and counts as dropped). A level is sustained when the p95 frame latency is under the limit
and under 5 % of the frames were dropped. The frames are a 640x480 clip of two people crossing,
made from the sample photos (posetriton.clips), JPEG-encoded by the client.

The tracking step's own cost per frame is read from Triton's statistics of ``NAME_tracker``
(compute time per request, tensors in and out included) and measured offline on the same
detections (``PoseTracker.update`` alone). Example::

    .venv/bin/python benchmarks/tracking.py --repository triton_models --models yolo11n_pose yolo_nas_pose_n \\
        --seconds 10 --json results/tracking.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from posetriton.client import AsyncPoseClient, PoseClient, TrackedFrame
from posetriton.clips import sample_clip
from posetriton.contract import TRACKER_SUFFIX
from posetriton.launcher import ServerOptions, TritonServer, free_port
from posetriton.tracking import PoseTracker, TrackerSpec

ROOT = Path(__file__).resolve().parent.parent
FPS = 15.0
P95_LIMIT_MS = 250.0
MAX_DROPPED = 0.05


async def paced(frames: list[np.ndarray], seconds: float, offset: float) -> AsyncIterator[np.ndarray]:
    """Frames at FPS for ``seconds``, like a camera; ``offset`` staggers the streams' first frames."""
    await asyncio.sleep(offset)
    started = time.monotonic()
    for i in range(int(seconds * FPS)):
        delay = started + i / FPS - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield frames[i % len(frames)]


async def run_level(url: str, model: str, streams: int, frames: list[np.ndarray], seconds: float) -> dict[str, Any]:
    async with AsyncPoseClient(url, model=model) as client:

        async def one(k: int) -> list[TrackedFrame]:
            source = paced(frames, seconds, k / (FPS * streams))
            return [r async for r in client.track(source, live=True, max_in_flight=2)]

        results = await asyncio.gather(*(one(k) for k in range(streams)))
    offered = int(seconds * FPS) * streams
    answered = [r for stream in results for r in stream]
    latencies = sorted(r.latency_s * 1e3 for r in answered)
    dropped = sum(stream[-1].dropped for stream in results if stream)
    failed = sum(not r.ok for r in answered)
    p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("inf")
    return {
        "streams": streams,
        "frames_offered": offered,
        "frames_answered": len(answered),
        "dropped_fraction": dropped / offered,
        "p50_ms": statistics.median(latencies) if latencies else None,
        "p95_ms": p95,
        "failed": failed,
        "detections_per_frame": statistics.fmean(len(r.poses) for r in answered) if answered else 0.0,
        "sustained": p95 < P95_LIMIT_MS and dropped / offered < MAX_DROPPED and failed == 0,
    }


STAT_KEYS = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def tracker_stats(url: str, model: str) -> dict[str, tuple[int, int]]:
    """(count, total ns) per phase of NAME_tracker, from Triton's statistics."""
    with grpcclient.InferenceServerClient(url) as triton:
        (stats,) = triton.get_inference_statistics(model + TRACKER_SUFFIX, as_json=True)["model_stats"]
    inference = stats["inference_stats"]
    return {key: (int(inference[key].get("count", 0)), int(inference[key].get("ns", 0))) for key in STAT_KEYS}


def tracker_step_cost(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Mean microseconds per request of each phase between two statistics reads."""
    count = max(after["success"][0] - before["success"][0], 1)
    return {key: (after[key][1] - before[key][1]) / count / 1e3 for key in STAT_KEYS[1:]}


def offline_tracker_cost(url: str, model: str, frames: list[np.ndarray]) -> float:
    """Microseconds per frame of PoseTracker.update alone, on the model's detections of the clip."""
    with PoseClient(url, model=model) as client:
        detections = [client.predict(frame).as_arrays() for frame in frames]
    tracker = PoseTracker(TrackerSpec(), detections[0].keypoints.shape[1] if len(detections[0].boxes) else 17)
    started = time.perf_counter()
    rounds = 5
    for r in range(rounds):
        for i, d in enumerate(detections):
            tracker.update(d.boxes, d.scores, d.keypoints, r * len(detections) + i)
    return (time.perf_counter() - started) / (rounds * len(detections)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--models", nargs="+", default=["yolo11n_pose", "yolo_nas_pose_n"])
    parser.add_argument("--config-name", default="cpu")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load level")
    parser.add_argument("--max-streams", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    frames = [frame.rgb for frame in sample_clip(ROOT / "samples")]
    options = ServerOptions(
        repository=args.repository, config_name=args.config_name, http_port=free_port(), grpc_port=free_port(),
        metrics_port=free_port(), models=[f"{m}_track" for m in args.models] + [f"{m}_pixels" for m in args.models],
    )  # fmt: skip
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "fps": FPS,
        "frame": "640x480 JPEG",
        "p95_limit_ms": P95_LIMIT_MS,
        "models": {},
    }
    with TritonServer(options) as server:
        for model in args.models:
            asyncio.run(run_level(server.grpc_url, model, 1, frames, 2.0))  # warm up
            before = tracker_stats(server.grpc_url, model)
            levels = []
            for streams in range(1, args.max_streams + 1):
                level = asyncio.run(run_level(server.grpc_url, model, streams, frames, args.seconds))
                levels.append(level)
                print(f"{model}: {json.dumps(level)}", flush=True)
                if not level["sustained"]:
                    break
            report["models"][model] = {
                "levels": levels,
                "max_streams": max((lv["streams"] for lv in levels if lv["sustained"]), default=0),
                "tracker_step_us": tracker_step_cost(before, tracker_stats(server.grpc_url, model)),
                "tracker_offline_us_per_frame": offline_tracker_cost(server.grpc_url, model, frames),
            }
    print("\n| model | real-time streams (15 fps, p95 < 250 ms) | p95 at that level | tracker step per frame |")
    print("|---|---|---|---|")
    for model, entry in report["models"].items():
        best = [lv for lv in entry["levels"] if lv["sustained"]]
        p95 = f"{best[-1]['p95_ms']:.0f} ms" if best else "-"
        step = entry["tracker_step_us"]["compute_infer"]
        alone = entry["tracker_offline_us_per_frame"]
        print(f"| {model} | {entry['max_streams']} | {p95} | {step:.0f} µs ({alone:.0f} µs alone) |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
