"""Pose network step on CPU: the OpenVINO IR in this model's version folder, run in the Python backend.

The Triton wheel used here ships no OpenVINO backend, and running the IR in-process keeps the
precision (f32 / bf16) and stream layout in this model's ``parameters``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from posetriton.contract import CANDIDATES, CANVAS
from posetriton.cpu_limit import container_cpu_limit
from posetriton.openvino_runtime import OpenVinoRunner
from posetriton.serving.triton_utils import internal_error, model_parameters


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = model_parameters(config)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        precision = params.get("precision", "f32")
        if precision not in ("f32", "bf16"):
            raise ValueError(f"parameter precision must be 'f32' or 'bf16', got {precision!r}")
        self.runner = OpenVinoRunner(
            version_dir / params.get("model_file", "model.xml"),
            precision=precision,  # type: ignore[arg-type]
            performance_hint=params.get("performance_hint", "ADAPTIVE"),  # type: ignore[arg-type]
            num_streams=int(params["num_streams"]) if params.get("num_streams") else None,
            # The model's own setting, else the container's CPU limit (k8s downward API), else OpenVINO's choice.
            num_threads=int(params["num_threads"]) if params.get("num_threads") else container_cpu_limit(),
            cpu_pinning=params["cpu_pinning"] == "true" if params.get("cpu_pinning") else None,
        )

    def execute(self, requests: list) -> list:
        # Dynamic batching hands over several requests: run them as one batch, split the result back.
        inputs = [pb_utils.get_input_tensor_by_name(r, CANVAS).as_numpy() for r in requests]
        try:
            outputs = self.runner.infer(inputs[0] if len(inputs) == 1 else np.concatenate(inputs))
        except RuntimeError as exc:
            return [internal_error(f"OpenVINO inference failed: {exc}") for _ in requests]
        bounds = np.cumsum([len(x) for x in inputs])[:-1]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(CANDIDATES, out)])
            for out in np.split(outputs, bounds)
        ]
