"""Postprocess step: candidates -> score threshold, NMS, max detections -> poses in original-image pixels.

Per-request ``conf``, ``iou`` and ``max_det`` arrive as request parameters, which (unlike
optional inputs) do not split dynamic batches.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from posetriton.processing import LetterboxTransform, Poses, postprocess
from posetriton.serving.triton_utils import invalid_argument, model_parameters, request_parameters
from posetriton.spec import PostprocessSpec, SpecError, check_thresholds

THRESHOLD_TYPES = {"conf": float, "iou": float, "max_det": int}


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.spec = PostprocessSpec.from_parameters(model_parameters(config))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                thresholds = self._thresholds(request_parameters(request))
            except (SpecError, ValueError) as exc:
                responses.append(invalid_argument(str(exc)))
                continue
            candidates = pb_utils.get_input_tensor_by_name(request, "candidates").as_numpy()
            transforms = pb_utils.get_input_tensor_by_name(request, "letterbox").as_numpy()
            poses = [
                postprocess(c, LetterboxTransform.from_array(t), self.spec, **thresholds)
                for c, t in zip(candidates, transforms, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=_pack(poses, self.spec.num_keypoints)))
        return responses

    def _thresholds(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(THRESHOLD_TYPES))
        if unknown:
            raise ValueError(f"unknown request parameter(s) {unknown}; accepted: {sorted(THRESHOLD_TYPES)}")
        values = {}
        for name, kind in THRESHOLD_TYPES.items():
            if name not in params:
                continue
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise ValueError(
                    f"request parameter {name} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
                )
            values[name] = kind(value)
        s = self.spec
        check_thresholds(
            values.get("conf", s.conf), values.get("iou", s.iou), values.get("max_det", s.max_det), s.max_det_limit
        )
        return values


def _pack(poses: list[Poses], num_keypoints: int) -> list:
    """Pad each image's detections to the request's largest count; NUM_DETECTIONS says how many are real."""
    width = max((len(p) for p in poses), default=0)
    boxes = np.zeros((len(poses), width, 4), np.float32)
    scores = np.zeros((len(poses), width), np.float32)
    keypoints = np.zeros((len(poses), width, num_keypoints, 3), np.float32)
    for i, p in enumerate(poses):
        boxes[i, : len(p)], scores[i, : len(p)], keypoints[i, : len(p)] = p.boxes, p.scores, p.keypoints
    counts = np.array([[len(p)] for p in poses], np.int32)
    return [
        pb_utils.Tensor("NUM_DETECTIONS", counts),
        pb_utils.Tensor("BOXES", boxes),
        pb_utils.Tensor("SCORES", scores),
        pb_utils.Tensor("KEYPOINTS", keypoints),
    ]
