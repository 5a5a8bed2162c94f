"""A/B of the network step's OpenVINO settings inside the server: the same served measurement per variant.

Copies the repository once per variant, sets one parameter of ``NAME_network/configs/cpu.pbtxt`` (for example
``cpu_pinning`` or ``performance_hint``), serves it and measures single-request latency per photo and throughput
at 4 and 8 requests in flight, with the network step's compute time from Triton's statistics. Variants run one
after the other; repeat the command to see the run-to-run noise.

    python benchmarks/network_ab.py --repository REPO --model yolo11n_pose --parameter performance_hint \\
        --values THROUGHPUT ADAPTIVE LATENCY
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from lean_path import default_photos, served_single_ms, served_throughput, step_profile, step_times  # noqa: E402

from posetriton.server import model_config  # noqa: E402
from posetriton.server.launcher import ServerOptions, TritonServer, free_port  # noqa: E402


def set_parameter(config: Path, key: str, value: str) -> None:
    with model_config.editing(config) as network:
        network.parameters[key].string_value = value


def measure(repository: Path, model: str, photos: list[bytes], seconds: float) -> dict:
    options = ServerOptions(repository=repository, config_name="cpu", http_port=free_port(), grpc_port=free_port(),
                            metrics_port=free_port(), models=[model])  # fmt: skip
    with TritonServer(options) as server:
        before = step_times(server.grpc_url, model)
        result: dict = {"c1_p50_ms": [asyncio.run(served_single_ms(server.grpc_url, model, d, 10)) for d in photos]}
        after = step_times(server.grpc_url, model)
        result["c1_network_compute_ms"] = step_profile(before, after)["network"]["compute_infer"]
        for n in (4, 8):
            served = asyncio.run(served_throughput(server.grpc_url, model, photos, n, seconds))
            before, after = after, step_times(server.grpc_url, model)
            result[f"in_flight_{n}"] = {
                "images_per_s": served["images_per_s"],
                "network_compute_ms": step_profile(before, after)["network"]["compute_infer"],
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--model", default="yolo11n_pose")
    parser.add_argument("--parameter", required=True)
    parser.add_argument("--values", nargs="+", required=True)
    parser.add_argument("--seconds", type=float, default=12)
    args = parser.parse_args()
    photos = [p.read_bytes() for p in default_photos()]
    results = {}
    with tempfile.TemporaryDirectory(prefix="network_ab_") as tmp:
        for value in args.values:
            copy = Path(tmp) / value
            shutil.copytree(args.repository, copy, symlinks=True)
            set_parameter(copy / f"{args.model}_network" / "configs" / "cpu.pbtxt", args.parameter, value)
            results[value] = measure(copy, args.model, photos, args.seconds)
            print(value, json.dumps(results[value]), file=sys.stderr)
    print(json.dumps({"model": args.model, "parameter": args.parameter, "results": results}, indent=2))


if __name__ == "__main__":
    main()
