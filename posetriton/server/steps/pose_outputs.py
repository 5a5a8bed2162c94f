"""Candidates -> the ensemble's pose outputs: score threshold, NMS, max detections, map back to original pixels.

The postprocess step's work, kept here once because two steps run it: ``NAME_postprocess`` on the network's
candidates (GPU ensembles, and any direct caller), and the CPU network step on its own answers (on its finisher
thread, fed by OpenVINO's completion callback), for the images it letterboxed itself or a canvas that comes with
its letterbox rows (the CPU ensembles, which need no postprocess step). Per-request thresholds
(:class:`~posetriton.core.contract.Thresholds`) arrive as request parameters, which (unlike optional inputs) do not
split dynamic batches; the letterbox rows are checked before anything is computed (:mod:`posetriton.core.validation`):
a direct caller may send anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from posetriton.core.contract import (
    BOXES,
    IMAGE_SIZE,
    KEYPOINTS,
    NUM_DETECTIONS,
    SCORES,
    Thresholds,
    candidate_width,
)
from posetriton.core.processing import LetterboxTransform, Poses, postprocess
from posetriton.core.spec import PostprocessSpec
from posetriton.core.validation import INPUT_SIZE_PARAMETER, check_candidates, check_letterbox_rows
from posetriton.server.steps.triton_utils import request_parameters


@dataclass(frozen=True)
class PoseJob:
    """One request's checked inputs to the pose outputs: its letterbox rows and thresholds."""

    rows: np.ndarray
    transforms: list[LetterboxTransform]
    thresholds: Thresholds


class PoseOutputs:
    """Built once per step instance from its model parameters (the PostprocessSpec and the canvas size)."""

    def __init__(self, parameters: dict[str, str], num_candidates: int) -> None:
        self.spec = PostprocessSpec.from_parameters(parameters)
        self.input_size = int(parameters[INPUT_SIZE_PARAMETER])  # the canvas the letterbox rows refer to
        self.num_candidates = num_candidates
        self.width = candidate_width(self.spec.num_keypoints)

    def job(self, request: object, rows: np.ndarray) -> PoseJob:
        """The request's thresholds and letterbox rows, checked; ContractError names what is wrong."""
        thresholds = self._thresholds(request)
        check_letterbox_rows(rows, self.input_size)
        return PoseJob(rows, [LetterboxTransform.from_array(row) for row in rows], thresholds)

    def letterboxed_job(self, request: object, transforms: list[LetterboxTransform]) -> PoseJob:
        """The job of a request this step letterboxed itself: its thresholds checked, its transforms as they are."""
        rows = np.stack([t.to_array() for t in transforms])
        return PoseJob(rows, transforms, self._thresholds(request))

    def _thresholds(self, request: object) -> Thresholds:
        return Thresholds.from_parameters(request_parameters(request)).check(self.spec.limits)

    def check(self, candidates: np.ndarray, job: PoseJob) -> None:
        """Candidates from a caller (not from this server's network): their shape, count and values."""
        check_candidates(candidates, job.rows, self.num_candidates, self.width)

    def tensors(self, candidates: np.ndarray, job: PoseJob) -> list:
        """The pose output tensors of one request's candidates (one image per letterbox row)."""
        poses = [postprocess(c, t, self.spec, job.thresholds) for c, t in zip(candidates, job.transforms, strict=True)]
        sizes = np.array([[t.width, t.height] for t in job.transforms], np.int32)
        return _pack(poses, sizes, self.spec.num_keypoints)


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
