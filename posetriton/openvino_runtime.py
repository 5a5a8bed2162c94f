"""Run a pose network's OpenVINO IR on the CPU, keeping every stream busy.

Shared by the served pose model and the benchmark's raw baseline, so both run the network
the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import openvino as ov

Precision = Literal["f32", "bf16"]
PerformanceHint = Literal["LATENCY", "THROUGHPUT"]


class OpenVinoRunner:
    """A compiled IR plus an AsyncInferQueue: a batch is split across the streams OpenVINO chose.

    ``precision`` is explicit because on CPUs with bf16 support OpenVINO otherwise switches to
    bf16 silently (about 2x faster, keypoints off by up to a few pixels).
    """

    def __init__(
        self,
        model_path: Path,
        precision: Precision = "f32",
        performance_hint: PerformanceHint = "THROUGHPUT",
        num_streams: int | None = None,
        num_threads: int | None = None,
    ) -> None:
        config: dict[str, str] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": performance_hint}
        if num_streams:
            config["NUM_STREAMS"] = str(num_streams)
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = str(num_threads)
        self.compiled = ov.Core().compile_model(str(model_path), "CPU", config)
        self.num_requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.queue = ov.AsyncInferQueue(self.compiled, self.num_requests)
        self._results: dict[int, np.ndarray] = {}
        self.queue.set_callback(self._collect)

    def _collect(self, request: ov.InferRequest, index: int) -> None:
        self._results[index] = request.get_output_tensor(0).data.copy()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run ``[B, 3, S, S]`` float32 through the network; returns the first output for all B."""
        chunks = np.array_split(batch, min(self.num_requests, len(batch)))
        self._results.clear()
        for index, chunk in enumerate(chunks):
            self.queue.start_async({0: np.ascontiguousarray(chunk)}, userdata=index)
        self.queue.wait_all()
        return np.concatenate([self._results[i] for i in range(len(chunks))])
