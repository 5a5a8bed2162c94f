"""Postprocess step: candidates -> score threshold, NMS, max detections -> poses in original-image pixels.

Per-request ``conf``, ``iou`` and ``max_det`` arrive as request parameters, which (unlike
optional inputs) do not split dynamic batches.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from posetriton.contract import (
    BOXES,
    CANDIDATES,
    IMAGE_SIZE,
    KEYPOINTS,
    LETTERBOX,
    NUM_DETECTIONS,
    SCORES,
    ContractError,
    Thresholds,
)
from posetriton.processing import LetterboxTransform, Poses, postprocess
from posetriton.serving.triton_utils import invalid_argument, model_parameters, request_parameters
from posetriton.spec import PostprocessSpec


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.spec = PostprocessSpec.from_parameters(model_parameters(config))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                thresholds = Thresholds.from_parameters(request_parameters(request)).check(self.spec.max_det_limit)
            except (ContractError, ValueError) as exc:
                responses.append(invalid_argument(str(exc)))
                continue
            candidates = pb_utils.get_input_tensor_by_name(request, CANDIDATES).as_numpy()
            transforms = [
                LetterboxTransform.from_array(row)
                for row in pb_utils.get_input_tensor_by_name(request, LETTERBOX).as_numpy()
            ]
            poses = [postprocess(c, t, self.spec, thresholds) for c, t in zip(candidates, transforms, strict=True)]
            sizes = np.array([[t.width, t.height] for t in transforms], np.int32)
            responses.append(pb_utils.InferenceResponse(output_tensors=_pack(poses, sizes, self.spec.num_keypoints)))
        return responses


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
