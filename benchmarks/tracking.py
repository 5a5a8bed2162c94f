"""Real-time tracking streams: how many 15 fps streams of 640 px frames this machine serves with p95 latency < 250 ms.

Starts its own Triton (CPU configuration, free ports) with ``NAME_track`` for each model, then for
1, 2, 3... concurrent streams sends each stream's frames at 15 fps as a live source
(``AsyncPoseClient.track(..., live=True)``: a frame that finds every slot busy replaces the unsent
one and counts as dropped). A level is sustained when the p95 frame latency is under the limit
and under 5 % of the frames were dropped. The frames are a 640x480 clip of two people crossing,
made from the sample photos (posetriton.core.clips), JPEG-encoded by the client.

The tracking step's own cost per frame is read from Triton's statistics of ``NAME_tracker``
(compute time per request, tensors in and out included) and measured offline on the same
detections (``PoseTracker.update`` alone). Example::

    .venv/bin/python benchmarks/tracking.py --repository triton_models --models yolo11n_pose yolo_nas_pose_n \\
        --seconds 10 --json results/tracking.json

``--keypoints`` measures the keypoint smoothing instead: clips of the sample photos with known geometry
(a still camera with sensor noise: every true keypoint stands still; a steady pan: a known
trajectory) go through ``NAME_track`` once, then the server's own smoothing code
(``posetriton.server.tracking.smooth_tracks``) is replayed on the raw keypoints and track IDs for a grid of
``smooth_min_cutoff`` x ``smooth_beta``: jitter, error and OKS against the truth, lag on the pan, and the
cost per frame; a table, and the trade-off plot (``--plot``)::

    .venv/bin/python benchmarks/tracking.py --keypoints --models yolo11n_pose --plot docs/img/smoothing.png
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
from numpy.typing import NDArray

from posetriton.client import AsyncPoseClient, PoseClient, TrackedFrame
from posetriton.client.inputs import encode_rgb
from posetriton.core.clips import ClipFrame, Window, camera_path, noisy_still, sample_clip, score_keypoints
from posetriton.core.contract import TRACKER_SUFFIX, UNTRACKED, Smoothing
from posetriton.server.launcher import ServerOptions, TritonServer, free_port
from posetriton.server.tracking import DEFAULT_SMOOTHING, KeypointSmoother, PoseTracker, TrackerSpec, smooth_tracks

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


# ------------------------------------------------------------------------------------------ keypoint smoothing
MIN_CUTOFFS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
BETAS = (0.0, 1.0, 2.0, 5.0, 20.0)
STILL_FRAMES, PAN_FRAMES = 60, 45
TRAIL_MAGNIFY = 10


def smoothing_clips(samples: Path) -> dict[str, tuple[list[ClipFrame], tuple[float, float], NDArray[Any], Window]]:
    """(frames, the truth's direction of motion in the frame, photo, the unshaken first window) per clip."""
    from PIL import Image

    clips: dict[str, tuple[list[ClipFrame], tuple[float, float], NDArray[Any], Window]] = {}
    for name in ("grace_hopper.jpg", "astronaut.webp"):
        photo = np.asarray(Image.open(samples / name).convert("RGB"))
        h, w = photo.shape[:2]
        view = (-0.2 * w, -0.05 * h, 1.4 * w)
        clips[f"still {name}"] = (noisy_still(photo, view, STILL_FRAMES), (0.0, 0.0), photo, view)
        # The camera pans right by 0.3 of the photo over the clip: the people move left in the frame.
        pan = camera_path(photo, [view, (view[0] + 0.3 * w, view[1], view[2])], PAN_FRAMES)
        clips[f"pan {name}"] = (pan, (-1.0, 0.0), photo, view)
    return clips


def measure_smoothing(url: str, model: str, samples: Path) -> dict[str, Any]:
    """Raw vs smoothed keypoints on the clips, for each point of the parameter grid, and the tracker step's cost."""
    clips = smoothing_clips(samples)
    served: dict[str, Any] = {}
    before = tracker_stats(url, model)
    with PoseClient(url, model=model) as client:
        for name, (frames, _, photo, view) in clips.items():
            (still,) = camera_path(photo, [view], 1)
            (placement,) = still.placements
            truth = client.predict(still.rgb, conf=0.5).as_arrays()
            truth_boxes = (truth.boxes.reshape(-1, 2, 2) - placement.offset) / placement.scale
            truth_keypoints = truth.keypoints.copy()
            truth_keypoints[:, :, :2] = (truth.keypoints[:, :, :2] - placement.offset) / placement.scale
            results = list(client.track([encode_rgb(f.rgb, "png") for f in frames], max_in_flight=1))
            served[name] = (truth_boxes.reshape(-1, 4), truth_keypoints, results)
    step_cost = tracker_step_cost(before, tracker_stats(url, model))
    trails = {name: _trails(clips[name][0], served[name][2]) for name in served if name.startswith("still")}
    rows: list[dict[str, Any]] = []
    grid = [(None, None), *((c, b) for c in MIN_CUTOFFS for b in BETAS)]
    gate = TrackerSpec().keypoint_threshold
    for min_cutoff, beta in grid:
        row: dict[str, Any] = {"min_cutoff": min_cutoff, "beta": beta, "clips": {}}
        cost: list[float] = []
        for name, (truth_boxes, truth_keypoints, results) in served.items():
            frames, direction = clips[name][:2]
            k = truth_keypoints.shape[1]
            boxes = [np.array([p.box for p in r.poses]).reshape(-1, 4) for r in results]
            raw = [np.array([p.raw_keypoints for p in r.poses]).reshape(-1, k, 3) for r in results]
            points = raw
            if min_cutoff is not None:
                smoothing = Smoothing(min_cutoff, beta).check()
                smoothers: dict[int, KeypointSmoother] = {}
                points = []
                for r, b, kp in zip(results, boxes, raw, strict=True):
                    ids = np.array([UNTRACKED if i is None else i for i in r.track_ids], np.int64)
                    started = time.perf_counter()
                    points.append(smooth_tracks(smoothers, ids, b, kp, r.index, smoothing, gate))
                    cost.append(time.perf_counter() - started)
            score = score_keypoints(frames, truth_boxes, truth_keypoints, boxes, points, direction)
            row["clips"][name] = score.__dict__
        row["smoothing_us_per_frame"] = statistics.fmean(cost) * 1e6 if cost else 0.0
        rows.append(row)
    return {"rows": rows, "default": DEFAULT_SMOOTHING.__dict__, "tracker_step_us": step_cost, "trails": trails}


def _trails(frames: list[ClipFrame], results: list[TrackedFrame]) -> dict[str, Any]:
    """The first person's keypoints over a still clip, raw and as served (smoothed), in the first frame's pixels
    (mapped through each frame's known placement)."""
    from posetriton.core.clips import to_frame, to_photo

    (first,) = frames[0].placements
    out: dict[str, list[Any]] = {"raw": [], "smoothed": []}
    for frame, result in zip(frames, results, strict=True):
        if not result.poses:
            continue
        (placement,) = frame.placements
        pose = result.poses[0]
        for key, points in (("raw", pose.raw_keypoints), ("smoothed", pose.keypoints)):
            xy = to_frame(first, to_photo(placement, np.array([(p.x, p.y) for p in points])))
            out[key].append(np.concatenate([xy, np.array([[p.conf] for p in points])], axis=1).tolist())
    return {**out, "rgb_shape": list(frames[0].rgb.shape)}


def _summary(row: dict[str, Any], raw: dict[str, Any]) -> dict[str, float]:
    """Means over the still clips (jitter, error, OKS) and the pans (lag: along-motion error minus raw's)."""
    still = [v for k, v in row["clips"].items() if k.startswith("still")]
    pans = [(v, raw["clips"][k]) for k, v in row["clips"].items() if k.startswith("pan")]
    return {
        "jitter_px": statistics.fmean(v["jitter_px"] for v in still),
        "error_px": statistics.fmean(v["error_px"] for v in still),
        "oks": statistics.fmean(v["oks"] for v in still),
        "pan_error_px": statistics.fmean(v["error_px"] for v, _ in pans),
        "lag_px": statistics.fmean(r["along_px"] - v["along_px"] for v, r in pans),
    }


def plot_trails(result: dict[str, Any], frames: list[ClipFrame], path: Path) -> None:
    """The first frame of a still clip with each keypoint's path over the clip: raw, then smoothed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for axis, key in zip(axes, ("raw", "smoothed"), strict=True):
        points = np.array(result[key])  # [T, K, 3]
        axis.imshow(frames[0].rgb)
        for k in range(points.shape[1]):
            seen = points[:, k, 2] >= 0.5
            if not seen.any():
                continue
            trail = points[seen, k, :2]
            centre = trail.mean(axis=0)
            shown = centre + TRAIL_MAGNIFY * (trail - centre)  # the paths are a few pixels long: magnified
            axis.plot(shown[:, 0], shown[:, 1], lw=0.9, color="red" if key == "raw" else "lime")
        steps = np.linalg.norm(np.diff(points[:, :, :2], axis=0), axis=2)[(points[1:, :, 2] >= 0.5)]
        axis.set_title(f"{key}: jitter {steps.mean():.2f} px/frame (paths x{TRAIL_MAGNIFY})")
        axis.axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)


def report_smoothing(result: dict[str, Any], plot: Path | None) -> None:
    raw = result["rows"][0]
    base = _summary(raw, raw)
    print("\n| smooth_min_cutoff | smooth_beta | still: jitter px | still: error px | still: OKS | pan: error px "
          "| pan: lag px | µs/frame |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    points = []
    for row in result["rows"]:
        summary = _summary(row, raw)
        label = ("raw", "") if row["min_cutoff"] is None else (f"{row['min_cutoff']:g}", f"{row['beta']:g}")
        print(f"| {label[0]} | {label[1]} | {summary['jitter_px']:.2f} | {summary['error_px']:.2f} | "
              f"{summary['oks']:.4f} | {summary['pan_error_px']:.2f} | {summary['lag_px']:.2f} | "
              f"{row['smoothing_us_per_frame']:.0f} |")  # fmt: skip
        if row["min_cutoff"] is not None:
            points.append((row["min_cutoff"], row["beta"], summary))
    if plot is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for beta in BETAS:
        line = [(s["lag_px"], s["jitter_px"] / base["jitter_px"]) for _, b, s in points if b == beta]
        axis.plot(*zip(*line, strict=True), marker="o", label=f"beta {beta:g}")
    default = result["default"]
    for c, b, s in points:
        if (c, b) == (default["min_cutoff"], default["beta"]):
            axis.scatter([s["lag_px"]], [s["jitter_px"] / base["jitter_px"]], s=160, facecolors="none",
                         edgecolors="black", zorder=5, label=f"default ({c:g}, {b:g})")  # fmt: skip
    axis.set_xlabel("lag on a steady pan (px, frame pixels)")
    axis.set_ylabel("jitter on a still camera, smoothed / raw")
    axis.set_title("One Euro keypoint smoothing (min_cutoff 0.005 to 0.2 along each line)", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(plot, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--models", nargs="+", default=["yolo11n_pose", "yolo_nas_pose_n"])
    parser.add_argument("--config-name", default="cpu")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load level")
    parser.add_argument("--max-streams", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keypoints", action="store_true", help="measure the keypoint smoothing (see above)")
    parser.add_argument("--plot", type=Path, help="with --keypoints: the trade-off plot (PNG)")
    parser.add_argument("--trails", type=Path, help="with --keypoints: raw vs smoothed keypoint paths (PNG)")
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
    if args.keypoints:
        with TritonServer(options) as server:
            for model in args.models:
                report["models"][model] = measure_smoothing(server.grpc_url, model, ROOT / "samples")
                print(f"{model}: tracker step per frame (Triton statistics, smoothing on): "
                      f"{json.dumps(report['models'][model]['tracker_step_us'])} µs")  # fmt: skip
                report_smoothing(report["models"][model], args.plot)
                if args.trails:
                    name = "still grace_hopper.jpg"
                    frames = smoothing_clips(ROOT / "samples")[name][0]
                    plot_trails(report["models"][model]["trails"][name], frames, args.trails)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
        return
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
