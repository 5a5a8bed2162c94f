"""Pose network step on CPU: the OpenVINO IR in this model's version folder, run in the Python backend.

The Triton wheel used here ships no OpenVINO backend, and running the IR in-process keeps the
precision (f32 / bf16) and stream layout in this model's ``parameters``. With several instances (one
process each) a batch computes while the next one is formed and handed over, so the cores never wait
for Triton; a lone request still gets every core (posetriton.server.openvino_runtime.CoreShare).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from posetriton.core.contract import CANDIDATES, CANVAS
from posetriton.server.cpu_limit import container_cpu_limit
from posetriton.server.openvino_runtime import CoreShare, OpenVinoRunner
from posetriton.server.steps.triton_utils import cancelled, instance_count, internal_error, model_parameters, unforeseen


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = model_parameters(config)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        precision = params.get("precision", "f32")
        if precision not in ("f32", "bf16"):
            raise ValueError(f"parameter precision must be 'f32' or 'bf16', got {precision!r}")
        instances = instance_count(config)
        self.runner = OpenVinoRunner(
            version_dir / params.get("model_file", "model.xml"),
            precision=precision,  # type: ignore[arg-type]
            performance_hint=params.get("performance_hint", "ADAPTIVE"),  # type: ignore[arg-type]
            num_streams=int(params["num_streams"]) if params.get("num_streams") else None,
            # The model's own setting, else the container's CPU limit (k8s downward API), else OpenVINO's choice.
            num_threads=int(params["num_threads"]) if params.get("num_threads") else container_cpu_limit(),
            cpu_pinning=params["cpu_pinning"] == "true" if params.get("cpu_pinning") else None,
            shared_by=instances,
        )
        canvas = pb_utils.get_input_config_by_name(config, CANVAS)
        self.runner.warm_up(tuple(int(d) for d in canvas["dims"]))
        # The instances of this network share the cores: each knows whether another one computes now.
        self.cores = CoreShare(version_dir) if instances > 1 else None
        self.logger = pb_utils.Logger
        self.name = args["model_name"]

    def execute(self, requests: list) -> list:
        # Dynamic batching hands over several requests: run them as one batch, split the result back.
        # A request its client already cancelled is answered CANCELLED, not computed.
        responses: list = []
        for request in requests:
            try:
                responses.append(cancelled() if request.is_cancelled() else None)
            except Exception as exc:  # unforeseen: this request alone fails
                responses.append(self._failed(exc))
        live = [i for i, response in enumerate(responses) if response is None]
        if live:
            try:
                for i, response in zip(live, self._run([requests[i] for i in live]), strict=True):
                    responses[i] = response
            except Exception as exc:  # unforeseen: find whose request it is, fail only that one
                if len(live) == 1:
                    responses[live[0]] = self._failed(exc)
                else:
                    for i in live:
                        responses[i] = self._run_alone(requests[i])
        return responses

    def _run(self, requests: list) -> list:
        inputs = [pb_utils.get_input_tensor_by_name(r, CANVAS).as_numpy() for r in requests]
        batch = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
        try:
            if self.cores is None:
                outputs = self.runner.infer(batch)
            else:
                with self.cores.computing() as alone:
                    outputs = self.runner.infer(batch, alone=alone)
        except RuntimeError as exc:
            return [internal_error(f"OpenVINO inference failed: {exc}") for _ in requests]
        bounds = np.cumsum([len(x) for x in inputs])[:-1]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(CANDIDATES, out)])
            for out in np.split(outputs, bounds)
        ]

    def _run_alone(self, request: object) -> object:
        try:
            return self._run([request])[0]
        except Exception as exc:  # this request's own failure, answered and logged
            return self._failed(exc)

    def _failed(self, exc: Exception) -> object:
        return unforeseen(self.name, exc, self.logger)

    def finalize(self) -> None:
        if self.cores is not None:
            self.cores.close()
