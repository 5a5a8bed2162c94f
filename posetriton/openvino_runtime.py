"""Run a pose network's OpenVINO IR on the CPU: one request on every core, a batch across every stream.

Shared by the served pose model and the benchmarks' in-process baseline, so both run the network
the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import openvino as ov

Precision = Literal["f32", "bf16"]
# LATENCY: one stream using every core. THROUGHPUT: several streams, a batch split across them.
# ADAPTIVE: both compiled; a lone image takes the LATENCY model, a batch of two or more the THROUGHPUT one.
PerformanceHint = Literal["LATENCY", "THROUGHPUT", "ADAPTIVE"]
PERFORMANCE_HINTS: tuple[str, ...] = ("LATENCY", "THROUGHPUT", "ADAPTIVE")


def cpu_threads() -> int:
    """Cores this process may run on (its affinity mask, which follows a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _StreamQueue:
    """A compiled model plus an AsyncInferQueue with one infer request per stream."""

    def __init__(self, core: ov.Core, model: ov.Model, config: dict[str, str]) -> None:
        self.compiled = core.compile_model(model, "CPU", config)
        self.num_requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.queue = ov.AsyncInferQueue(self.compiled, self.num_requests)
        self._results: dict[int, np.ndarray] = {}
        self.queue.set_callback(self._collect)

    def _collect(self, request: ov.InferRequest, index: int) -> None:
        self._results[index] = request.get_output_tensor(0).data.copy()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        chunks = np.array_split(batch, min(self.num_requests, len(batch)))
        self._results.clear()
        for index, chunk in enumerate(chunks):
            # share_inputs: OpenVINO reads the caller's (contiguous) memory instead of copying it first.
            self.queue.start_async({0: np.ascontiguousarray(chunk)}, userdata=index, share_inputs=True)
        self.queue.wait_all()
        return np.concatenate([self._results[i] for i in range(len(chunks))])


class OpenVinoRunner:
    """A compiled IR (or two, see :data:`PerformanceHint`) that runs a batch and returns its first output.

    ``precision`` is explicit because on CPUs with bf16 support OpenVINO otherwise switches to
    bf16 silently (about 2x faster, keypoints off by up to a few pixels). ``num_threads`` defaults to
    the cores this process may use, so a container's CPU limit (its cpuset) is what counts.
    ``cpu_pinning`` None keeps OpenVINO's default (pinned stream threads).
    """

    def __init__(
        self,
        model_path: Path,
        precision: Precision = "f32",
        performance_hint: PerformanceHint = "ADAPTIVE",
        num_streams: int | None = None,
        num_threads: int | None = None,
        cpu_pinning: bool | None = None,
    ) -> None:
        if performance_hint not in PERFORMANCE_HINTS:
            raise ValueError(f"performance_hint must be one of {PERFORMANCE_HINTS}, got {performance_hint!r}")
        core = ov.Core()
        model = core.read_model(str(model_path))
        base = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": str(num_threads or cpu_threads())}
        if cpu_pinning is not None:
            # Pinned stream threads cannot move off a core that another process (a preprocess stub) is using.
            base["ENABLE_CPU_PINNING"] = "YES" if cpu_pinning else "NO"
        self.latency = None
        self.throughput = None
        if performance_hint in ("LATENCY", "ADAPTIVE"):
            self.latency = _StreamQueue(core, model, {**base, "PERFORMANCE_HINT": "LATENCY"})
        if performance_hint in ("THROUGHPUT", "ADAPTIVE"):
            config = {**base, "PERFORMANCE_HINT": "THROUGHPUT"}
            if num_streams:
                config["NUM_STREAMS"] = str(num_streams)
            self.throughput = _StreamQueue(core, model, config)
        self.input_dtype = model.input(0).get_element_type().to_dtype()

    @property
    def num_requests(self) -> int:
        """Requests that keep every stream busy (the THROUGHPUT layout's, else 1)."""
        return self.throughput.num_requests if self.throughput else 1

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch through the network; returns the first output for all of it."""
        if self.throughput is None or (self.latency is not None and len(batch) == 1):
            assert self.latency is not None
            return self.latency.infer(batch)
        return self.throughput.infer(batch)
