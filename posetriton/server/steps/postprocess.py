"""Postprocess step: candidates -> score threshold, NMS, max detections -> poses in original-image pixels.

The work itself is :class:`~posetriton.server.steps.pose_outputs.PoseOutputs` (the CPU network step runs it too,
on its own answers); this step is what the GPU ensembles chain after the network, and a public endpoint: the
candidates and letterbox rows a direct caller sends are checked first.
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from posetriton.core.contract import CANDIDATES, LETTERBOX, ContractError
from posetriton.server.steps.pose_outputs import PoseOutputs
from posetriton.server.steps.triton_utils import model_parameters, respond_each


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        candidates_input = next(i for i in config["input"] if i["name"] == CANDIDATES)
        self.poses = PoseOutputs(model_parameters(config), num_candidates=int(candidates_input["dims"][0]))
        self.name = args["model_name"]

    def execute(self, requests: list) -> list:
        # NMS on k candidates costs less than asking Triton whether the client is still there.
        return respond_each(requests, self._postprocess, step=self.name, refused=(ContractError,), skip_cancelled=False)

    def _postprocess(self, request: object) -> object:
        job = self.poses.job(request, pb_utils.get_input_tensor_by_name(request, LETTERBOX).as_numpy())
        candidates = pb_utils.get_input_tensor_by_name(request, CANDIDATES).as_numpy()
        self.poses.check(candidates, job)
        return pb_utils.InferenceResponse(output_tensors=self.poses.tensors(candidates, job))
