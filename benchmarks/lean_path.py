"""Served ensemble vs what a user would write instead: one Python process doing the same work in-process.

*In-process pipeline*: the project's own decode, letterbox, OpenVINO and NMS functions in one process; OpenVINO
at its best for throughput (THROUGHPUT hint, an AsyncInferQueue with the optimal number of requests, all cores)
and, for single-request latency, the LATENCY hint. *Served*: the whole ensemble (encoded photo in, poses out)
through a real Triton on 127.0.0.1, driven by an asyncio gRPC client. *Raw network*: the IR alone on
pre-letterboxed canvases. Same photos, same precision, same cores, in one run.

Every model x precision is a *cell*; in each, the served *variants* (Tuning overrides re-rendered into a scratch
repository, e.g. ``preprocess_instances=1`` against ``preprocess_instances=2``) run alternated with the in-process
pipeline, ``--repeats`` times (A B A B ...), so load from elsewhere falls on all of them alike; the tables take
the median over the repeats. Per window it records the server's CPU per process (tritonserver, each step's
stubs) and the whole machine's. The c=1 overhead per photo = served p50 - network alone (LATENCY) p50 -
decode + letterbox p50, the three taken in turn request by request (this VM's speed drifts within minutes);
the tables give the median over the photos. The full matrix (about 12 minutes):

    python benchmarks/lean_path.py --repository REPO --models yolo11n_pose yolo_nas_pose_n \\
        --config-names cpu cpu_bf16 --repeats 2 \\
        --seconds 6 --rounds 8 --json results/lean_path.json --markdown results/lean_path.md
    python benchmarks/lean_path.py --render results/lean_path.json    # the docs tables again
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import openvino as ov
import tritonclient.grpc.aio as grpcaio

from posetriton.client import image_bytes_input
from posetriton.core.contract import OUTPUTS, candidate_width
from posetriton.core.images import decode_image
from posetriton.core.processing import letterbox, postprocess
from posetriton.server.launcher import ServerOptions, TritonServer, free_port
from posetriton.server.openvino_runtime import OpenVinoRunner, cpu_threads
from posetriton.server.repository import CPU_CONFIGS, VERSION, ServedModel, Tuning, load_catalog, write_model
from posetriton.server.watchdog import python_stubs

ROOT = Path(__file__).resolve().parent.parent
# Before this change every image crossed preprocess -> network as float32 [3, 640, 640] and network ->
# postprocess as all 8400 anchors x 56 float32 (see docs/benchmarks.md, "Bytes per image").
BEFORE_NETWORK_IN = 3 * 640 * 640 * 4
BEFORE_NETWORK_OUT = 8400 * 56 * 4
AS_BUILT = "as-built"


def default_photos() -> list[Path]:
    photos = sorted((ROOT / "samples").glob("*.jp*g")) + sorted((ROOT / "samples").glob("*.webp"))
    photos += sorted(ROOT.glob(".venv-export/lib/python3*/site-packages/ultralytics/assets/*.jpg"))
    return photos


def write_json(payload: object, path: Path) -> None:
    """Write a result as JSON to ``path`` (the docs quote these files), making its folder first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def emit_json(payload: object, path: Path | None) -> None:
    """Print a result as JSON, and also write it to ``path`` when given."""
    print(json.dumps(payload, indent=2))
    if path is not None:
        write_json(payload, path)


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


class CpuWindow:
    """CPU used by the server during one window, per process role, from /proc (cores busy on average).

    Roles: ``tritonserver`` itself (gRPC, ensemble scheduling, batching) and each step's Python stubs summed
    over instances; plus this benchmark's own client and the whole machine (``machine``: every process,
    the other users of a shared machine included), so the load situation is on record."""

    TICKS = os.sysconf("SC_CLK_TCK")

    def __init__(self, server_pid: int, model: ServedModel) -> None:
        self.server_pid = server_pid
        self.roles = {model.step(role): role for role in ("preprocess", "network", "postprocess")}

    def _process_seconds(self, pid: int) -> float:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.TICKS  # utime + stime

    def _read(self) -> dict[str, float]:
        seconds = {"tritonserver": self._process_seconds(self.server_pid)}
        for pid, model_name in python_stubs(self.server_pid).values():
            role = self.roles.get(model_name, "other stubs")
            try:
                seconds[role] = seconds.get(role, 0.0) + self._process_seconds(pid)
            except OSError:
                continue
        seconds["client"] = sum(os.times()[:2])
        with open("/proc/stat") as stat:
            cpu = [int(x) for x in stat.readline().split()[1:]]
        seconds["machine"] = (sum(cpu) - cpu[3] - cpu[4]) / self.TICKS  # all but idle and iowait
        seconds["wall"] = time.perf_counter()
        return seconds

    def __enter__(self) -> CpuWindow:
        self._start = self._read()
        return self

    def __exit__(self, *_exc: object) -> None:
        end = self._read()
        wall = end.pop("wall") - self._start["wall"]
        self.cores = {role: (value - self._start.get(role, 0.0)) / wall for role, value in end.items()}
        self.cores["server"] = sum(v for k, v in self.cores.items() if k not in ("client", "machine"))


async def served_throughput(
    url: str, model: str, photos: list[bytes], concurrency: int, seconds: float, cpu: CpuWindow | None = None
) -> dict:
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
    with cpu or contextlib.nullcontext():
        begin = time.perf_counter()
        counts = await asyncio.gather(*(worker(i, begin + seconds) for i in range(concurrency)))
        elapsed = time.perf_counter() - begin
    await client.close()
    return {
        "images_per_s": sum(counts) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "response_bytes_mean": statistics.mean(response_bytes),
        **({"server_cpu_cores": cpu.cores} if cpu else {}),
    }


async def served_single_times(url: str, model: str, data: bytes, rounds: int) -> list[float]:
    """Seconds of each of ``rounds`` requests one after the other (after one warm-up request)."""
    client = grpcaio.InferenceServerClient(url)
    await client.infer(model, [image_bytes_input([data])])
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await client.infer(model, [image_bytes_input([data])])
        times.append(time.perf_counter() - start)
    await client.close()
    return times


async def served_single_ms(url: str, model: str, data: bytes, rounds: int) -> float:
    return 1000 * statistics.median(await served_single_times(url, model, data, rounds))


async def interleaved_single_times(
    url: str, model: str, data: bytes, canvas: np.ndarray, latency: InProcessPipeline, rounds: int
) -> dict[str, list[float]]:
    """Seconds of a lone served request, of the network alone (LATENCY) and of decode + letterbox, taken in turn
    ``rounds`` times: the c=1 overhead subtracts the last two from the first, and on a VM whose speed drifts
    within minutes they must be measured under the same conditions (one apart, not one phase apart)."""
    client = grpcaio.InferenceServerClient(url)
    latency.compiled({0: canvas})
    times: dict[str, list[float]] = {"served": [], "network": [], "prepare": []}
    for _ in range(rounds):
        start = time.perf_counter()
        await client.infer(model, [image_bytes_input([data])])
        times["served"].append(time.perf_counter() - start)
        start = time.perf_counter()
        latency.compiled({0: canvas})
        times["network"].append(time.perf_counter() - start)
        start = time.perf_counter()
        latency.prepare(data)
        times["prepare"].append(time.perf_counter() - start)
    await client.close()
    return times


def step_times(url: str, model: str) -> dict[str, dict[str, int]]:
    """Cumulative (count, ns) per phase of each step of the ensemble ``model``, from Triton's own statistics (the
    CPU ensembles have no postprocess step: the network finishes the poses)."""
    import tritonclient.grpc as grpcclient

    phases = ("queue", "compute_input", "compute_infer", "compute_output")
    totals = {}
    with grpcclient.InferenceServerClient(url) as client:
        steps = client.get_model_config(model, as_json=True)["config"]["ensemble_scheduling"]["step"]
        for role in (step["model_name"].removeprefix(f"{model}_") for step in steps):
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


def single_ms(pipeline: InProcessPipeline, data: bytes, rounds: int) -> float:
    pipeline.single(data)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        pipeline.single(data)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def parse_variant(text: str) -> dict[str, int | str]:
    """``preprocess_instances=1,network_performance_hint=LATENCY`` -> Tuning overrides (ints where they parse)."""
    fields = {f.name for f in dataclasses.fields(Tuning)}
    overrides: dict[str, int | str] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--variants: {key!r} is not a Tuning field ({sorted(fields)})")
        overrides[key] = int(value) if value.lstrip("-").isdigit() else value
    return overrides


def variant_repository(base: Path, model: ServedModel, overrides: dict, scratch: Path) -> Path:
    """The model's entries re-rendered with ``overrides`` applied to its Tuning, reusing the built network files."""
    built = base / model.step("network") / VERSION
    network_files = {p.name: p for p in built.iterdir() if p.suffix in (".onnx", ".xml", ".bin")}
    repository = scratch / "repository"
    shutil.rmtree(repository, ignore_errors=True)
    write_model(
        dataclasses.replace(model, tuning=dataclasses.replace(model.tuning, **overrides)), repository, network_files
    )
    return repository


def measure_served(
    repository: Path,
    model: ServedModel,
    config_name: str,
    encoded: dict[str, bytes],
    canvases: dict[str, np.ndarray],
    latency: InProcessPipeline,
    args,
) -> dict:
    options = ServerOptions(repository=repository, config_name=config_name, http_port=free_port(),
                            grpc_port=free_port(), metrics_port=free_port(), models=[model.name])  # fmt: skip
    served: dict = {}
    with TritonServer(options) as server:
        assert server.process is not None
        url, pid = server.grpc_url, server.process.pid
        # Every photo once before the counters are read: a fresh instance's first requests pay one-time costs
        # (its first response's shared memory, first calls) that Triton's means would spread over the c=1 rows.
        for data in encoded.values():
            asyncio.run(served_single_times(url, model.name, data, 0))
        before = step_times(url, model.name)
        single = {
            name: asyncio.run(interleaved_single_times(url, model.name, data, canvases[name], latency, args.rounds))
            for name, data in encoded.items()
        }
        after = step_times(url, model.name)
        for key, role in (
            ("single_p50_ms", "served"),
            ("network_single_p50_ms", "network"),
            ("prepare_p50_ms", "prepare"),
        ):
            served[key] = {name: 1000 * statistics.median(times[role]) for name, times in single.items()}
        served["c1_images_per_s"] = sum(len(t["served"]) for t in single.values()) / sum(
            sum(t["served"]) for t in single.values()
        )
        served["profile_c1_ms"] = step_profile(before, after)
        for n in args.in_flight:
            window = CpuWindow(pid, model)
            photos = list(encoded.values())
            served[f"in_flight_{n}"] = asyncio.run(served_throughput(url, model.name, photos, n, args.seconds, window))
            before, after = after, step_times(url, model.name)
            served[f"in_flight_{n}"]["profile_ms"] = step_profile(before, after)
    return served


def measure_cell(model: ServedModel, config_name: str, photo_paths: list[Path], variants: list[str], args) -> dict:
    """One model at one precision: in-process and raw baselines, then each served variant, alternated."""
    encoded = {p.name: p.read_bytes() for p in photo_paths}
    precision = CPU_CONFIGS[config_name]
    xml = args.repository / model.step("network") / VERSION / "model.xml"
    spec = model.letterbox
    canvases = {n: letterbox(decode_image(d, spec.max_pixels), spec)[0][None] for n, d in encoded.items()}
    k = model.num_candidates
    cell: dict = {
        "model": model.name,
        "config_name": config_name,
        "precision": precision,
        "photos": list(encoded),
        "bytes_per_image": {
            "input_jpeg_mean": int(statistics.mean(len(d) for d in encoded.values())),
            "network_in": {"before": BEFORE_NETWORK_IN, "after": next(iter(canvases.values()))[0].nbytes},
            "network_out": {"before": BEFORE_NETWORK_OUT, "after": k * candidate_width(17) * 4},
        },
    }
    cell["raw_network_images_per_s"] = raw_network_throughput(xml, precision, list(canvases.values()), args.seconds)
    cell["rounds"] = []
    scratch = Path(tempfile.mkdtemp(prefix="lean_path-"))
    # Compiled once per cell: destroying a compiled OpenVINO model between the phases hung this script at times.
    latency = InProcessPipeline(model, xml, precision, "LATENCY")
    throughput = InProcessPipeline(model, xml, precision, "THROUGHPUT")
    try:
        for _ in range(args.repeats):  # A B A B ...: load from elsewhere falls on every variant alike
            run: dict = {
                "in_process": {
                    # The network alone and decode + letterbox alone are measured beside the served c=1 requests
                    # (interleaved_single_times); this is the in-process pipeline's own lone request.
                    "single_p50_ms": {n: single_ms(latency, d, args.rounds) for n, d in encoded.items()},
                    "optimal_requests": throughput.optimal,
                    **{
                        f"in_flight_{n}": throughput.throughput(list(encoded.values()), n, args.seconds)
                        for n in args.in_flight
                    },
                },
                "served": {},
            }
            for variant in variants:
                repository = args.repository
                if variant != AS_BUILT:
                    repository = variant_repository(args.repository, model, parse_variant(variant), scratch)
                run["served"][variant] = measure_served(
                    repository, model, config_name, encoded, canvases, latency, args
                )
                print(
                    model.name, config_name, variant, summarize_served(cell, run, variant), file=sys.stderr, flush=True
                )
            cell["rounds"].append(run)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cell["summary"] = {v: median_summary([summarize_served(cell, run, v) for run in cell["rounds"]]) for v in variants}
    return cell


def summarize_served(cell: dict, run: dict, variant: str) -> dict:
    served, inproc = run["served"][variant], run["in_process"]
    base = c1_baseline(cell, run, variant)
    overhead = {
        n: served["single_p50_ms"][n] - base["network_single_p50_ms"][n] - base["prepare_p50_ms"][n]
        for n in served["single_p50_ms"]
    }
    flights = [int(key.removeprefix("in_flight_")) for key in inproc if key.startswith("in_flight_")]
    return {
        "c1_images_per_s": served["c1_images_per_s"],
        "c1_p50_ms": statistics.median(served["single_p50_ms"].values()),
        "overhead_c1_ms": statistics.median(overhead.values()),
        **{f"in_process_{n}": inproc[f"in_flight_{n}"]["images_per_s"] for n in flights},
        **{f"served_{n}": served[f"in_flight_{n}"]["images_per_s"] for n in flights},
        **{
            f"served_over_in_process_{n}": served[f"in_flight_{n}"]["images_per_s"]
            / inproc[f"in_flight_{n}"]["images_per_s"]
            for n in flights
        },
        **{f"cpu_{n}": served[f"in_flight_{n}"]["server_cpu_cores"] for n in flights},
    }


def c1_baseline(cell: dict, run: dict, variant: str) -> dict:
    """The in-process c=1 figures the served c=1 is compared with: measured in turn with its requests; older result
    files (``--render``) have them in the repeat's in-process phase, or once per cell."""
    if "prepare_p50_ms" in run["served"][variant]:
        return run["served"][variant]
    return run["in_process"] if "prepare_p50_ms" in run["in_process"] else cell["in_process"]


def median_summary(rows: list[dict]) -> dict:
    """Median over the repeats, key by key (CPU per role too)."""
    out: dict = {}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            out[key] = {role: statistics.median(r[key].get(role, 0.0) for r in rows) for role in value}
        else:
            out[key] = statistics.median(r[key] for r in rows)
    return out


def render_markdown(results: dict) -> str:
    """The docs tables from one run's JSON, so no number is copied by hand."""
    lines = [
        f"{results['date']}, **{results['machine']}**; command: `{results['command']}`",
        "",
        "| model | precision | served variant | in-process img/s (4 / 8) | served img/s (c=1 / 4 / 8) "
        "| **served ÷ in-process** (4 / 8) | c=1 p50 | **c=1 overhead** |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cpu_lines = [
        "| model | precision | served variant | in flight | tritonserver | preprocess | network | postprocess "
        "| server total | benchmark client | whole machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in results["cells"]:
        for variant, s in cell["summary"].items():
            head = f"| {cell['model']} | {cell['precision']} | {variant}"
            lines.append(
                f"{head} | {s['in_process_4']:.1f} / {s['in_process_8']:.1f} "
                f"| {s['c1_images_per_s']:.1f} / {s['served_4']:.1f} / {s['served_8']:.1f} "
                f"| **{s['served_over_in_process_4']:.2f} / {s['served_over_in_process_8']:.2f}** "
                f"| {s['c1_p50_ms']:.1f} ms | **{s['overhead_c1_ms']:.1f} ms** |"
            )
            for n in (4, 8):
                c = s[f"cpu_{n}"]
                roles = ("tritonserver", "preprocess", "network", "postprocess", "server", "client", "machine")
                cpu_lines.append(f"{head} | {n} | " + " | ".join(f"{c.get(r, 0.0):.2f}" for r in roles) + " |")
    return "\n".join([*lines, "", "Server CPU per process during each window (cores busy on average, of "
                       f"{results['cores']}):", "", *cpu_lines, "", *c1_breakdown(results)]) + "\n"  # fmt: skip


def c1_breakdown(results: dict) -> list[str]:
    """Where a lone request's milliseconds go: the work measured in-process, each step as Triton times it, the rest."""
    lines = [
        "A lone request (c=1), ms, medians over photos and repeats; steps as Triton's statistics time them "
        "(queue + compute input + infer + output, means). The CPU network step admits each request at its door and "
        "returns, so Triton times only that hand-over; its compute is the network alone (LATENCY). On the CPU "
        "path the network step also decodes the images and finishes the poses (no preprocess or postprocess step: "
        "—). *The rest* = served mean − network alone − decode + letterbox − the steps' sum (gRPC, ensemble "
        "hand-offs, the step's own decode hand-over and answer with its NMS, client):",
        "",
        "| model | precision | served variant | served p50 / mean | network alone (LATENCY) | decode + letterbox "
        "| preprocess step | network hand-over | postprocess step | the rest |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in results["cells"]:
        for variant in cell["summary"]:
            runs = [run["served"][variant] for run in cell["rounds"]]
            p50 = statistics.median(statistics.median(r["single_p50_ms"].values()) for r in runs)
            mean = statistics.median(1000 / r["c1_images_per_s"] for r in runs)

            def step(role: str, runs: list = runs) -> float:
                return statistics.median(
                    sum(v for k, v in r["profile_c1_ms"][role].items() if k != "images_per_execution") for r in runs
                )

            roles = [role for role in ("preprocess", "network", "postprocess") if role in runs[0]["profile_c1_ms"]]
            steps = {role: step(role) for role in roles}
            shown = {role: f"{steps[role]:.1f}" if role in steps else "—" for role in ("preprocess", "postprocess")}
            alone, prepare = (
                statistics.median(
                    statistics.median(c1_baseline(cell, r, variant)[key].values()) for r in cell["rounds"]
                )
                for key in ("network_single_p50_ms", "prepare_p50_ms")
            )
            lines.append(
                f"| {cell['model']} | {cell['precision']} | {variant} | {p50:.1f} / {mean:.1f} "
                f"| {alone:.1f} | {prepare:.1f} | {shown['preprocess']} "
                f"| {steps['network']:.1f} | {shown['postprocess']} "
                f"| {mean - alone - (0 if 'preprocess' in steps else prepare) - sum(steps.values()):.1f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--models", nargs="+", default=["yolo11n_pose"])
    parser.add_argument("--config-names", nargs="+", default=["cpu"], choices=sorted(CPU_CONFIGS))
    parser.add_argument("--variants", nargs="+", default=[AS_BUILT],
                        help="Served variants, alternated: Tuning overrides such as preprocess_instances=1, "
                        f"or {AS_BUILT!r} (the repository as it is).")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="Rounds of in-process + every variant (A B A B).")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=20, help="Single requests per photo for the c=1 medians.")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--photos", type=Path, nargs="+", default=None)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--markdown", type=Path, help="Also write the docs tables here.")
    parser.add_argument("--render", type=Path, nargs="+", help="Only print the docs tables of these --json files.")
    args = parser.parse_args()
    if args.render:
        print("\n".join(render_markdown(json.loads(path.read_text())) for path in args.render), end="")
        return

    catalog = load_catalog(ROOT / "build_engines" / "models.toml")
    photo_paths = args.photos or default_photos()
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": cpu_model(),
        "cores": cpu_threads(),
        "command": "python benchmarks/lean_path.py " + " ".join(sys.argv[1:]).replace(str(args.repository), "REPO"),
        "cells": [],
    }
    for model_name in args.models:
        for config_name in args.config_names:
            cell = measure_cell(catalog[model_name], config_name, photo_paths, args.variants, args)
            results["cells"].append(cell)
            if args.json:  # after every cell: a run cut short keeps what it measured
                write_json(results, args.json)
    print(json.dumps([{c["model"]: c["summary"]} for c in results["cells"]], indent=2))
    if args.markdown:
        args.markdown.write_text(render_markdown(results))


if __name__ == "__main__":
    main()
