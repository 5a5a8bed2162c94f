"""Tracking step of ``NAME_track``: a frame's poses -> a track ID per pose, state kept per video stream.

Triton's sequence batcher (``oldest`` strategy) routes every request of a sequence to the same
instance, one at a time and in the order they reach this step, and batches requests of different
sequences together. So the state lives here, keyed by the correlation ID (control input
``CORRID``): ``START`` opens it, ``END`` frees it, and a stream idle for longer than the
sequence batcher's ``max_sequence_idle_microseconds`` is freed by a timer (Triton refuses its next
request unless it starts anew, so it cannot come back to stale state). The gauge
``posetriton_track_sequences`` on Triton's metrics endpoint counts the open streams.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from posetriton.contract import (
    CANVAS,
    CONTROL_CORRID,
    CONTROL_END,
    CONTROL_START,
    FRAME_INDEX,
    IMAGE_SIZE,
    LETTERBOX,
    SMOOTHED_KEYPOINTS,
    TRACK_IDS,
    ContractError,
    Smoothing,
)
from posetriton.serving.triton_utils import invalid_argument, model_parameters, request_parameters
from posetriton.tracking import (
    PoseTracker,
    SequenceStore,
    TrackerSpec,
    TrackingError,
    box_colours,
    idle_seconds,
)

SEQUENCES_METRIC = "posetriton_track_sequences"
# How often the timer looks for idle streams, at most (and at least a tenth of the idle limit).
EVICT_PERIOD_S = 0.5


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = model_parameters(config)
        spec = TrackerSpec.from_parameters(parameters)
        num_keypoints = int(parameters["num_keypoints"])
        idle_s = idle_seconds(config["sequence_batching"])
        PoseTracker(spec, num_keypoints)  # imports Norfair (and SciPy) now, not in the first stream's first frame
        self.sequences = SequenceStore(lambda: PoseTracker(spec, num_keypoints), idle_s)
        family = pb_utils.MetricFamily(
            name=SEQUENCES_METRIC,
            description="Video streams with tracking state (open sequences) per tracker instance",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self._family = family
        self._gauge = family.Metric(labels={"model": args["model_name"], "instance": args["model_instance_name"]})
        self._gauge.set(0)
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._evict_loop, name="posetriton-track-evict", daemon=True)
        self._timer.start()

    def execute(self, requests: list) -> list:
        self._evict()
        responses = []
        for request in requests:
            try:
                responses.append(self._track(request))
            except (TrackingError, ContractError) as exc:
                responses.append(invalid_argument(str(exc)))
        self._gauge.set(len(self.sequences))
        return responses

    def _track(self, request: Any) -> Any:
        sequence_id = int(_scalar(request, CONTROL_CORRID))
        start, end = bool(_scalar(request, CONTROL_START)), bool(_scalar(request, CONTROL_END))
        tracker = self.sequences.open(sequence_id) if start else self.sequences.get(sequence_id)
        try:
            count = _input(request, "NUM_DETECTIONS").reshape(-1)
            if len(count) != 1:
                raise TrackingError(f"a tracked request carries one frame, got a batch of {len(count)}")
            n = int(count[0])
            boxes, scores = _input(request, "BOXES")[0], _input(request, "SCORES")[0]
            keypoints = _input(request, "KEYPOINTS")[0]
            frame = int(_input(request, FRAME_INDEX).reshape(-1)[0])
            ids, smoothed = _tracked_rows(tracker, request, boxes, scores, keypoints, n, frame)
        finally:
            if end:
                self.sequences.close(sequence_id)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(TRACK_IDS, ids), pb_utils.Tensor(SMOOTHED_KEYPOINTS, smoothed)]
        )

    def _evict(self) -> None:
        if self.sequences.evict_idle():
            self._gauge.set(len(self.sequences))

    def _evict_loop(self) -> None:
        period = min(EVICT_PERIOD_S, max(self.sequences.idle_s / 10, 0.05))
        while not self._stop.wait(period):
            self._evict()

    def finalize(self) -> None:
        self._stop.set()
        self._timer.join(timeout=5)
        self._gauge.set(0)


def _tracked_rows(
    tracker: PoseTracker, request: Any, boxes: np.ndarray, scores: np.ndarray, keypoints: np.ndarray, n: int, frame: int
) -> tuple[np.ndarray, np.ndarray]:
    """TRACK_IDS ``[1, N]`` and SMOOTHED_KEYPOINTS ``[1, N, K, 3]`` of one frame (padding rows: untracked, raw)."""
    smoothing = Smoothing.from_parameters(request_parameters(request)).check()
    width, height = (float(v) for v in _input(request, IMAGE_SIZE).reshape(-1)[:2])
    colours = box_colours(_input(request, CANVAS)[0], _input(request, LETTERBOX)[0], boxes[:n])
    ids = np.full((1, len(boxes)), -1, np.int64)
    smoothed = keypoints[None].astype(np.float32).copy()
    ids[0, :n], smoothed[0, :n] = tracker.track(
        boxes[:n], scores[:n], keypoints[:n], frame, smoothing, frame_size=(width, height), colours=colours
    )
    return ids, smoothed


def _input(request: Any, name: str) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise TrackingError(f"the tracker step received no {name} input")
    return tensor.as_numpy()


def _scalar(request: Any, name: str) -> Any:
    return _input(request, name).reshape(-1)[0]
