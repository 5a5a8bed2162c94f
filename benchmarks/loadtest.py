"""Load-test a served pose ensemble with Triton's perf_analyzer and real JPEG photos.

For each concurrency: perf_analyzer (gRPC, the photos as input data, cycled) measures
throughput and p50/p90/p95/p99 latency; Triton's Prometheus metrics, scraped before and after,
split each request's server time into queue and compute per step of the ensemble (on the GPU
preprocess, network and postprocess; on the CPU the network step alone, which decodes and finishes
the poses). Writes ``results.csv``, ``results.md`` and ``loadtest.png`` into ``--out/MODEL/``.

    python benchmarks/loadtest.py --model yolo11n_pose --concurrency 1 2 4 8           # local Triton
    python benchmarks/loadtest.py --url HOST:8001 --metrics-url http://HOST:8002/metrics  # remote (k8s)

perf_analyzer comes from the ``tritonclient==2.51.0`` manylinux1 wheel installed into
``.venv-perf`` (``make perf-tools``); it needs ``libb64`` and ``libcudart``, which this script
links from the nvidia-pytriton wheel.
"""

from __future__ import annotations

import argparse
import base64
import csv
import importlib.util
import json
import os
import re
import struct
import subprocess
import tempfile
import urllib.request
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PERF_ANALYZER = ROOT / ".venv-perf" / "bin" / "perf_analyzer"
METRIC = re.compile(r'^(nv_inference_\w+)\{model="([^"]+)",version="[^"]*"\} ([0-9.e+]+)$')


def default_photos() -> list[Path]:
    photos = sorted((ROOT / "samples").glob("*.jp*g"))
    return photos + sorted(ROOT.glob(".venv-export/lib/python3*/site-packages/ultralytics/assets/*.jpg"))


def perf_analyzer_env() -> dict[str, str]:
    """LD_LIBRARY_PATH with ``libb64.so.0d`` and ``libcudart.so.12`` linked from the nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("nvidia-pytriton is not installed in this environment")
    wheel_libs = Path(next(iter(spec.submodule_search_locations))).parent / "nvidia_pytriton.libs"
    links = ROOT / ".venv-perf" / "lib"
    links.mkdir(parents=True, exist_ok=True)
    for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
        target = next(wheel_libs.glob(pattern))
        link = links / name
        if not link.exists():
            link.symlink_to(target)
    return {**os.environ, "LD_LIBRARY_PATH": f"{links}{os.pathsep}{wheel_libs}"}


def input_data(photos: list[Path], path: Path) -> Path:
    """perf_analyzer input data: each photo as one serialized BYTES element (4-byte length + payload)."""
    steps = []
    for photo in photos:
        data = photo.read_bytes()
        steps.append({"IMAGE": {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode(), "shape": [1]}})
    path.write_text(json.dumps({"data": steps}))
    return path


def scrape(metrics_url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    values: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = METRIC.match(line)
        if match:
            values[(match.group(2), match.group(1))] = float(match.group(3))
    return values


def per_step_split(before: dict, after: dict, model: str) -> dict[str, dict[str, float]]:
    """Average queue and compute time per request (ms) of each step during one measurement."""
    delta: dict[str, dict[str, float]] = defaultdict(dict)
    for (name, metric), value in after.items():
        delta[name][metric] = value - before.get((name, metric), 0.0)
    split = {}
    for name, d in sorted(delta.items()):
        requests = d.get("nv_inference_request_success", 0.0)
        if not name.startswith(model) or name == model or requests <= 0:
            continue
        step = name.removeprefix(f"{model}_")
        compute = sum(d.get(f"nv_inference_compute_{k}_duration_us", 0.0) for k in ("input", "infer", "output"))
        split[step] = {
            "queue_ms": d.get("nv_inference_queue_duration_us", 0.0) / requests / 1000,
            "compute_ms": compute / requests / 1000,
            "batch": d.get("nv_inference_count", 0.0) / max(d.get("nv_inference_exec_count", 0.0), 1.0),
        }
    return split


def run_perf_analyzer(url: str, model: str, data: Path, concurrency: int, window_ms: int, env: dict) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".csv") as report:
        command = [
            str(PERF_ANALYZER), "-m", model, "-u", url, "-i", "grpc", "--input-data", str(data),
            "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(window_ms),
            "--percentile", "95", "--stability-percentage", "50", "--max-trials", "10",
            "-f", report.name, "--verbose-csv",
        ]  # fmt: skip
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise SystemExit(f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
        row = next(csv.DictReader(open(report.name)))  # noqa: SIM115 - closed with the temp file
    return {
        "concurrency": concurrency,
        "images_per_s": float(row["Inferences/Second"]),
        **{f"p{p}_ms": float(row[f"p{p} latency"]) / 1000 for p in (50, 90, 95, 99)},
    }


def write_outputs(rows: list[dict], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    steps = sorted({step for row in rows for step in row["steps"]})
    flat = [
        {
            **{k: v for k, v in row.items() if k != "steps"},
            **{f"{s}_{k}": row["steps"].get(s, {}).get(k, 0.0) for s in steps for k in ("queue_ms", "compute_ms")},
        }
        for row in rows
    ]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    header = "| concurrency | img/s | p50 ms | p95 ms | p99 ms | " + " | ".join(
        f"{s} queue / compute ms (batch)" for s in steps
    )
    lines = [f"## {title}", "", header + " |", "|" + "---|" * (5 + len(steps))]
    for row in rows:
        cells = [
            f"{row['steps'][s]['queue_ms']:.1f} / {row['steps'][s]['compute_ms']:.1f} ({row['steps'][s]['batch']:.1f})"
            if s in row["steps"]
            else "-"
            for s in steps
        ]
        lines.append(
            f"| {row['concurrency']} | {row['images_per_s']:.1f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
            f"{row['p99_ms']:.0f} | " + " | ".join(cells) + " |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, steps, out / "loadtest.png", title)


def plot(rows: list[dict], steps: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrency = [row["concurrency"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(concurrency, [row["images_per_s"] for row in rows], "o-", color="tab:blue", label="images/s")
    left.set_xlabel("requests in flight")
    left.set_ylabel("images/s", color="tab:blue")
    latency = left.twinx()
    for p, style in ((50, "--"), (95, "-."), (99, ":")):
        latency.plot(concurrency, [row[f"p{p}_ms"] for row in rows], style, color="tab:red", label=f"p{p}")
    latency.set_ylabel("latency ms", color="tab:red")
    latency.legend(loc="upper left")
    bottom = [0.0] * len(rows)
    for step in steps:
        for part, hatch in (("queue_ms", "//"), ("compute_ms", "")):
            values = [row["steps"].get(step, {}).get(part, 0.0) for row in rows]
            right.bar([str(c) for c in concurrency], values, bottom=bottom, hatch=hatch, label=f"{step} {part[:-3]}")
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set_xlabel("requests in flight")
    right.set_ylabel("server ms per request")
    right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolo11n_pose")
    parser.add_argument("--url", help="gRPC HOST:PORT of a running server; default: start one locally")
    parser.add_argument("--metrics-url", help="Prometheus metrics URL (default: the local server's)")
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--config-name", default="cpu")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--measurement-ms", type=int, default=5000)
    parser.add_argument("--photos", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "loadtest")
    args = parser.parse_args()

    env = perf_analyzer_env()
    workdir = Path(tempfile.mkdtemp(prefix="loadtest-"))
    data = input_data(args.photos or default_photos(), workdir / "photos.json")
    server = None
    if args.url is None:
        from posetriton.server.launcher import ServerOptions, TritonServer, free_port

        options = ServerOptions(
            repository=args.repository, config_name=args.config_name, http_port=free_port(),
            grpc_port=free_port(), metrics_port=free_port(), models=[args.model],
        )  # fmt: skip
        server = TritonServer(options).start(timeout=180)
        args.url, args.metrics_url = server.grpc_url, f"http://127.0.0.1:{options.metrics_port}/metrics"
    try:
        rows = []
        for concurrency in args.concurrency:
            before = scrape(args.metrics_url) if args.metrics_url else {}
            row = run_perf_analyzer(args.url, args.model, data, concurrency, args.measurement_ms, env)
            row["steps"] = per_step_split(before, scrape(args.metrics_url), args.model) if args.metrics_url else {}
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        if server is not None:
            server.stop()
    write_outputs(rows, args.out / args.model, f"{args.model} ({args.config_name}) via perf_analyzer, gRPC")
    print(f"results: {args.out / args.model}/results.md, results.csv, loadtest.png")


if __name__ == "__main__":
    main()
