"""Where a lone request's time goes, step by step, from Triton's own request traces.

Starts a server on ``--repository`` with Triton's tracing on (``--trace-config level=TIMESTAMPS``, every
request), sends ``--rounds`` requests one at a time per photo, and reads the trace file back: for the ensemble
and each composing step, the medians of

* *queue*: QUEUE_START -> COMPUTE_START (waiting for an instance);
* *input*: COMPUTE_START -> COMPUTE_INPUT_END (the backend copying the inputs to the stub);
* *execute*: COMPUTE_INPUT_END -> COMPUTE_OUTPUT_START (the stub's ``execute``; for the pipelined network step,
  until its answer arrives);
* *output*: COMPUTE_OUTPUT_START -> COMPUTE_END;
* *hand-off*: from the end of one step to the queue of the next (the ensemble scheduler);

and the gRPC edges (GRPC_WAITREAD_END -> the ensemble's REQUEST_START, its REQUEST_END -> GRPC_SEND_START).
The client's own round trip is measured beside it. Used for issue 19's lone-request overhead::

    python benchmarks/c1_timeline.py --repository REPO --model yolo11n_pose --config-name cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import tritonclient.grpc as grpcclient

from posetriton.client import image_bytes_input
from posetriton.core.contract import OUTPUTS
from posetriton.server.launcher import ServerOptions, TritonServer, free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.lean_path import cpu_model, default_photos, emit_json

PHASES = {
    "queue": ("QUEUE_START", "COMPUTE_START"),
    "input": ("COMPUTE_START", "COMPUTE_INPUT_END"),
    "execute": ("COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"),
    "output": ("COMPUTE_OUTPUT_START", "COMPUTE_END"),
}


def read_traces(path: Path) -> list[dict]:
    """Triton writes one JSON list per flush; merge every entry of one trace id (timestamps and model)."""
    merged: dict[int, dict] = defaultdict(lambda: {"timestamps": {}})
    text = path.read_text().strip()
    chunks = [json.loads(chunk if chunk.startswith("[") else "[" + chunk) for chunk in text.split("\n[")]
    for entry in (item for chunk in chunks for item in chunk):
        trace = merged[entry["id"]]
        trace["id"] = entry["id"]
        for key in ("model_name", "parent_id"):
            if key in entry:
                trace[key] = entry[key]
        for stamp in entry.get("timestamps", []):
            trace["timestamps"].setdefault(stamp["name"], int(stamp["ns"]))
    return list(merged.values())


def timeline(traces: list[dict], ensemble: str) -> dict[str, float]:
    """Median milliseconds of each phase of each step, and of the hand-offs between them."""
    children: dict[int, list[dict]] = defaultdict(list)
    roots = [t for t in traces if t.get("model_name") == ensemble and "REQUEST_START" in t["timestamps"]]
    for trace in traces:
        if "parent_id" in trace:
            children[trace["parent_id"]].append(trace)
    samples: dict[str, list[float]] = defaultdict(list)
    for root in roots:
        stamps = root["timestamps"]
        steps = sorted(
            (c for c in children[root["id"]] if "QUEUE_START" in c["timestamps"]),
            key=lambda c: c["timestamps"]["QUEUE_START"],
        )
        if not steps:
            continue
        if "GRPC_WAITREAD_END" in stamps:
            samples["grpc in"].append((stamps["REQUEST_START"] - stamps["GRPC_WAITREAD_END"]) / 1e6)
        if "GRPC_SEND_START" in stamps:
            samples["grpc out"].append((stamps["GRPC_SEND_START"] - stamps["REQUEST_END"]) / 1e6)
        samples["ensemble"].append((stamps["REQUEST_END"] - stamps["REQUEST_START"]) / 1e6)
        previous_end = stamps["REQUEST_START"]
        for step in steps:
            name = step["model_name"].removeprefix(ensemble + "_")
            ts = step["timestamps"]
            samples[f"hand-off -> {name}"].append((ts["QUEUE_START"] - previous_end) / 1e6)
            for phase, (start, end) in PHASES.items():
                if start in ts and end in ts:
                    samples[f"{name} {phase}"].append((ts[end] - ts[start]) / 1e6)
            previous_end = ts.get("REQUEST_END", ts.get("COMPUTE_END", previous_end))
        samples["hand-off -> answer"].append((stamps["REQUEST_END"] - previous_end) / 1e6)
    return {key: round(statistics.median(values), 3) for key, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", default="yolo11n_pose")
    parser.add_argument("--config-name", default="cpu")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--pause-ms", type=float, default=0.0, help="Idle time between requests.")
    parser.add_argument("--photos", type=Path, nargs="+", default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    photos = [p.read_bytes() for p in (args.photos or default_photos())]
    with tempfile.TemporaryDirectory() as scratch:
        trace_file = Path(scratch) / "trace.json"
        options = ServerOptions(
            repository=args.repository, config_name=args.config_name, models=[args.model],
            http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
            extra_args=[f"--trace-config=triton,file={trace_file}", "--trace-config=level=TIMESTAMPS",
                        "--trace-config=rate=1", "--trace-config=count=-1", "--trace-config=triton,log-frequency=0"],
        )  # fmt: skip
        round_trips = []
        with TritonServer(options) as server:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
            for warm in range(3):
                client.infer(args.model, [image_bytes_input([photos[warm % len(photos)]])], outputs=outputs)
            for _ in range(args.rounds):
                for data in photos:
                    time.sleep(args.pause_ms / 1e3)
                    started = time.perf_counter()
                    client.infer(args.model, [image_bytes_input([data])], outputs=outputs)
                    round_trips.append((time.perf_counter() - started) * 1e3)
            client.close()
        traces = read_traces(trace_file)
    result = {
        "machine": cpu_model(),
        "model": args.model,
        "config_name": args.config_name,
        "client round trip p50 ms": round(statistics.median(round_trips), 3),
        "steps ms (medians)": timeline(traces, args.model),
    }
    emit_json(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
