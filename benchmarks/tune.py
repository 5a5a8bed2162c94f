"""Tuning sweep: instance counts and dynamic-batching delays of the CPU steps, measured with perf_analyzer.

Each variant is the model's entries re-rendered with a different ``Tuning`` (the same generator
``make models`` uses) into a scratch repository that reuses the built network files, then
served and measured at the given concurrencies. The winner goes into build_engines/models.toml.

    python benchmarks/tune.py --model yolo11n_pose --concurrency 1 4
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.loadtest import default_photos, input_data, perf_analyzer_env, run_perf_analyzer  # noqa: E402
from posetriton.server.launcher import ServerOptions, TritonServer, free_port  # noqa: E402
from posetriton.server.repository import VERSION, load_catalog, write_model  # noqa: E402

# The CPU ensembles have no postprocess step (the network finishes the poses): its instances are not swept.
GRID = {
    "preprocess_instances": [1, 2],
    "network_max_queue_delay_us": [0, 5000],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolo11n_pose")
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--measurement-ms", type=int, default=4000)
    args = parser.parse_args()

    model = load_catalog(ROOT / "build_engines" / "models.toml")[args.model]
    built = args.repository / model.step("network") / VERSION
    network_files = {name: built / name for name in ("model.onnx", "model.xml", "model.bin")}
    env = perf_analyzer_env()
    scratch = Path(tempfile.mkdtemp(prefix="tune-"))
    data = input_data(default_photos(), scratch / "photos.json")
    rows = []
    try:
        for values in itertools.product(*GRID.values()):
            tuning = dataclasses.replace(model.tuning, **dict(zip(GRID, values, strict=True)))
            repository = scratch / "repository"
            shutil.rmtree(repository, ignore_errors=True)
            write_model(dataclasses.replace(model, tuning=tuning), repository, network_files)
            options = ServerOptions(repository=repository, http_port=free_port(), grpc_port=free_port(),
                                    metrics_port=free_port(), models=[model.name])  # fmt: skip
            row: dict = dict(zip(GRID, values, strict=True))
            with TritonServer(options) as server:
                for concurrency in args.concurrency:
                    result = run_perf_analyzer(server.grpc_url, model.name, data, concurrency, args.measurement_ms, env)
                    row[f"c{concurrency}_images_per_s"] = result["images_per_s"]
                    row[f"c{concurrency}_p50_ms"] = result["p50_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.1f}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
