"""Postprocess step: candidates -> score threshold, NMS, max detections -> poses in original-image pixels.

Per-request thresholds (:class:`~posetriton.core.contract.Thresholds`) arrive as request parameters, which (unlike
optional inputs) do not split dynamic batches. The candidates and letterbox rows are checked first
(:mod:`posetriton.core.validation`): a direct caller may send anything.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from posetriton.core.contract import (
    BOXES,
    CANDIDATES,
    IMAGE_SIZE,
    KEYPOINTS,
    LETTERBOX,
    NUM_DETECTIONS,
    SCORES,
    ContractError,
    Thresholds,
    candidate_width,
)
from posetriton.core.processing import LetterboxTransform, Poses, postprocess
from posetriton.core.spec import PostprocessSpec
from posetriton.core.validation import INPUT_SIZE_PARAMETER, check_candidates, check_letterbox_rows
from posetriton.server.steps.triton_utils import model_parameters, request_parameters, respond_each


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = model_parameters(config)
        self.spec = PostprocessSpec.from_parameters(parameters)
        self.name = args["model_name"]
        self.input_size = int(parameters[INPUT_SIZE_PARAMETER])  # the canvas the letterbox rows refer to
        candidates_input = next(i for i in config["input"] if i["name"] == CANDIDATES)
        self.num_candidates = int(candidates_input["dims"][0])

    def execute(self, requests: list) -> list:
        # NMS on k candidates costs less than asking Triton whether the client is still there.
        return respond_each(requests, self._postprocess, step=self.name, refused=(ContractError,), skip_cancelled=False)

    def _postprocess(self, request: object) -> object:
        thresholds = Thresholds.from_parameters(request_parameters(request)).check(self.spec.limits)
        candidates = pb_utils.get_input_tensor_by_name(request, CANDIDATES).as_numpy()
        rows = pb_utils.get_input_tensor_by_name(request, LETTERBOX).as_numpy()
        check_letterbox_rows(rows, self.input_size)
        check_candidates(candidates, rows, self.num_candidates, candidate_width(self.spec.num_keypoints))
        transforms = [LetterboxTransform.from_array(row) for row in rows]
        poses = [postprocess(c, t, self.spec, thresholds) for c, t in zip(candidates, transforms, strict=True)]
        sizes = np.array([[t.width, t.height] for t in transforms], np.int32)
        return pb_utils.InferenceResponse(output_tensors=_pack(poses, sizes, self.spec.num_keypoints))


def _pack(poses: list[Poses], sizes: np.ndarray, num_keypoints: int) -> list:
    """Pad each image's detections to the request's largest count; NUM_DETECTIONS says how many are real."""
    width = max((len(p) for p in poses), default=0)
    boxes = np.zeros((len(poses), width, 4), np.float32)
    scores = np.zeros((len(poses), width), np.float32)
    keypoints = np.zeros((len(poses), width, num_keypoints, 3), np.float32)
    for i, p in enumerate(poses):
        boxes[i, : len(p)], scores[i, : len(p)], keypoints[i, : len(p)] = p.boxes, p.scores, p.keypoints
    counts = np.array([[len(p)] for p in poses], np.int32)
    return [
        pb_utils.Tensor(NUM_DETECTIONS, counts),
        pb_utils.Tensor(BOXES, boxes),
        pb_utils.Tensor(SCORES, scores),
        pb_utils.Tensor(KEYPOINTS, keypoints),
        pb_utils.Tensor(IMAGE_SIZE, sizes),
    ]
