"""The perf_analyzer load-test kit works end to end against a real server (one short window)."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

from benchmarks.loadtest import (
    PERF_ANALYZER,
    input_data,
    per_step_split,
    perf_analyzer_env,
    run_perf_analyzer,
    scrape,
    write_outputs,
)
from posetriton.server.launcher import TritonServer
from tests.conftest import UL_MODEL


def test_input_data_holds_each_photo_as_a_serialized_bytes_element(photo_paths: list[Path], tmp_path: Path) -> None:
    steps = json.loads(input_data(photo_paths, tmp_path / "data.json").read_text())["data"]
    assert len(steps) == len(photo_paths)
    for step, photo in zip(steps, photo_paths, strict=True):
        raw = base64.b64decode(step["IMAGE"]["b64"])
        (length,) = struct.unpack("<I", raw[:4])
        assert raw[4:] == photo.read_bytes() and length == len(raw) - 4 and step["IMAGE"]["shape"] == [1]


def test_perf_analyzer_sweep_point_and_metric_split(
    server: TritonServer, photo_paths: list[Path], tmp_path: Path
) -> None:
    assert PERF_ANALYZER.exists(), "perf_analyzer missing: run `make perf-tools`"
    metrics_url = f"http://127.0.0.1:{server.options.metrics_port}/metrics"
    data = input_data(photo_paths, tmp_path / "data.json")
    before = scrape(metrics_url)
    row = run_perf_analyzer(server.grpc_url, UL_MODEL, data, 1, 1500, perf_analyzer_env())
    row["steps"] = per_step_split(before, scrape(metrics_url), UL_MODEL)
    assert row["images_per_s"] > 0 and 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert set(row["steps"]) == {"network"}  # on the CPU the network step decodes and finishes the poses too
    assert all(step["compute_ms"] > 0 for step in row["steps"].values())
    # The CPU network step hands each image to OpenVINO and answers it later through its response sender, so
    # Triton times only that hand-over: the steps' time stays below each request's, by the network's compute.
    assert sum(s["queue_ms"] + s["compute_ms"] for s in row["steps"].values()) < row["p50_ms"]
    write_outputs([row], tmp_path / "out", "test")
    assert (tmp_path / "out" / "loadtest.png").stat().st_size > 10_000
    assert "| 1 |" in (tmp_path / "out" / "results.md").read_text()
