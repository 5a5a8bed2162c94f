"""Run a pose network's OpenVINO IR on the CPU: one request on every core, a batch across every stream.

Shared by the served pose model and the benchmarks' in-process baseline, so both run the network
the same way. Several processes (Triton instances of one network) can share the cores: each computes on
every core while it is alone and on its share of them while another one computes (:class:`CoreShare`).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
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


class CoreShare:
    """Which of the processes running one network compute now, so each knows whether it has the cores alone.

    Every process computing holds a shared ``flock`` on one path (the network's version folder: one per
    model, nothing to create or clean up); "alone" means no other process holds it. A process that finds
    itself alone runs on every core; a second one arriving meanwhile runs on its
    share, and the first one takes its share from its next call on.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)

    @contextmanager
    def computing(self) -> Iterator[bool]:
        """Hold this process's place among the computing ones; yields whether no other process computes."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        fcntl.flock(self._fd, fcntl.LOCK_SH)  # from exclusive (alone) or from nothing
        try:
            yield alone
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


class OpenVinoRunner:
    """A compiled IR (or several, see :data:`PerformanceHint`) that runs a batch and returns its first output.

    ``precision`` is explicit because on CPUs with bf16 support OpenVINO otherwise switches to
    bf16 silently (about 2x faster, keypoints off by up to a few pixels). ``num_threads`` defaults to
    the cores this process may use, so a container's CPU limit (its cpuset) is what counts.
    ``cpu_pinning`` None keeps OpenVINO's default (pinned stream threads). ``shared_by`` > 1: that many
    processes run this network on the same cores; each also compiles the network for its share of them
    (``num_threads // shared_by``), used when another one is computing (``infer(batch, alone=False)``).
    """

    def __init__(
        self,
        model_path: Path,
        precision: Precision = "f32",
        performance_hint: PerformanceHint = "ADAPTIVE",
        num_streams: int | None = None,
        num_threads: int | None = None,
        cpu_pinning: bool | None = None,
        shared_by: int = 1,
    ) -> None:
        if performance_hint not in PERFORMANCE_HINTS:
            raise ValueError(f"performance_hint must be one of {PERFORMANCE_HINTS}, got {performance_hint!r}")
        if shared_by < 1:
            raise ValueError(f"shared_by must be at least 1, got {shared_by}")
        core = ov.Core()
        model = core.read_model(str(model_path))
        threads = num_threads or cpu_threads()
        base = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": str(threads)}
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
        # This process's share of the cores, for when another process runs the network too.
        self.shared = None
        if shared_by > 1:
            share = {**base, "INFERENCE_NUM_THREADS": str(max(1, threads // shared_by))}
            share["PERFORMANCE_HINT"] = "LATENCY" if performance_hint == "LATENCY" else "THROUGHPUT"
            self.shared = _StreamQueue(core, model, share)
        self.input_dtype = model.input(0).get_element_type().to_dtype()

    @property
    def num_requests(self) -> int:
        """Requests that keep every stream busy (the THROUGHPUT layout's, else 1)."""
        return self.throughput.num_requests if self.throughput else 1

    def warm_up(self, image_shape: tuple[int, ...]) -> None:
        """Run every compiled layout once (OpenVINO finishes its set-up on the first call), so no request pays it."""
        for queue in (self.latency, self.throughput, self.shared):
            if queue is not None:
                queue.infer(np.zeros((queue.num_requests, *image_shape), self.input_dtype))

    def infer(self, batch: np.ndarray, alone: bool = True) -> np.ndarray:
        """Run a batch through the network; returns the first output for all of it.

        ``alone`` False: another process computes on the same cores now; run on this one's share of them."""
        if not alone and self.shared is not None:
            return self.shared.infer(batch)
        if self.throughput is None or (self.latency is not None and len(batch) == 1):
            assert self.latency is not None
            return self.latency.infer(batch)
        return self.throughput.infer(batch)
