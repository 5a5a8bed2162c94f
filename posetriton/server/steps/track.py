"""Tracking step of ``NAME_track``: a frame's poses -> a track ID per pose, state kept per video stream.

Triton's sequence batcher (``oldest`` strategy) routes every request of a sequence to the same
instance, one at a time and in the order they reach this step, and batches requests of different
sequences together. So the state lives here, keyed by the correlation ID (control input
``CORRID``): ``START`` opens it, ``END`` frees it, and a stream idle for longer than the
sequence batcher's ``max_sequence_idle_microseconds`` is freed by a timer (Triton refuses its next
request unless it starts anew, so it cannot come back to stale state). The gauge
``posetriton_track_sequences`` on Triton's metrics endpoint counts the open streams.

Any client may call this step directly, so each request is checked first (:mod:`posetriton.core.validation`,
:class:`~posetriton.server.tracking.StreamLimits`): at most ``max_rows`` finite detection rows and a
``NUM_DETECTIONS`` that fits them, a sane frame index; a START on a live correlation ID is refused, and so
is a stream over the instance's cap (UNAVAILABLE); only the ``max_tracked`` best poses of a frame are
tracked and a stream keeps at most ``max_tracks`` tracks, so one request's cost is bounded.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from posetriton.core.contract import (
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
from posetriton.core.validation import check_detections, check_frame_index, check_letterbox_rows
from posetriton.server.steps.triton_utils import StepBusy, model_parameters, request_parameters, respond_each
from posetriton.server.tracking import (
    PoseTracker,
    SequenceStore,
    StreamLimits,
    TrackerFull,
    TrackerSpec,
    TrackingError,
    box_colours,
    cap_live_tracks,
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
        self.new_tracker = lambda: PoseTracker(spec, num_keypoints)
        self.sequences = SequenceStore(self.new_tracker, idle_s)
        self.limits = StreamLimits.from_parameters(parameters)
        self.num_keypoints = num_keypoints
        self.name = args["model_name"]
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
        responses = respond_each(requests, self._track, step=self.name, refused=(TrackingError, ContractError))
        self._gauge.set(len(self.sequences))
        return responses

    def _track(self, request: Any) -> Any:
        sequence_id = int(_scalar(request, CONTROL_CORRID))
        start, end = bool(_scalar(request, CONTROL_START)), bool(_scalar(request, CONTROL_END))
        owned = not start  # a START owns its ID only once accepted: a refused one must not END someone else's
        try:
            tracker = self.new_tracker() if start else self.sequences.get(sequence_id)
            n, rows, frame = self._checked(request, tracker)
            boxes, scores = _input(request, "BOXES")[0], _input(request, "SCORES")[0]
            keypoints = _input(request, "KEYPOINTS")[0]
            tracked = min(n, self.limits.max_tracked)  # the best poses first: postprocess rows are score-ordered
            smoothing = Smoothing.from_parameters(request_parameters(request)).check()
            canvas, letterbox, frame_size = self._checked_pixels(request)
            if start:  # kept only once its first frame passed the checks, so a refused START leaves nothing behind
                self.sequences.start(sequence_id, tracker, self.limits.max_sequences)
                owned = True
            cap_live_tracks(tracker, self.limits.max_tracks)
            ids = np.full((1, rows), -1, np.int64)
            smoothed = keypoints[None].astype(np.float32)  # rows left untracked keep their raw keypoints
            try:
                colours = box_colours(canvas, letterbox, boxes[:tracked])
                ids[0, :tracked], smoothed[0, :tracked] = tracker.track(
                    boxes[:tracked], scores[:tracked], keypoints[:tracked], frame, smoothing,
                    frame_size=frame_size, colours=colours,
                )  # fmt: skip
            except Exception:
                if start:  # the client will START again with its next frame: that must not meet a live ID
                    self.sequences.close(sequence_id)
                raise
        except TrackerFull as exc:
            raise StepBusy(str(exc)) from None
        finally:
            if end and owned:
                self.sequences.close(sequence_id)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(TRACK_IDS, ids), pb_utils.Tensor(SMOOTHED_KEYPOINTS, smoothed)]
        )

    def _checked(self, request: Any, tracker: PoseTracker) -> tuple[int, int, int]:
        """(detections, rows, frame index) of a request that passed the checks."""
        n = check_detections(
            _input(request, "NUM_DETECTIONS"), _input(request, "BOXES"), _input(request, "SCORES"),
            _input(request, "KEYPOINTS"), max_detections=self.limits.max_rows, num_keypoints=self.num_keypoints,
        )  # fmt: skip
        index = _input(request, FRAME_INDEX).reshape(-1)
        if len(index) != 1:
            raise TrackingError(f"a tracked request carries one FRAME_INDEX, got {len(index)}")
        frame = int(index[0])
        check_frame_index(frame, tracker.last_frame)
        return n, int(_input(request, "BOXES").shape[1]), frame

    def _checked_pixels(self, request: Any) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
        """(canvas, letterbox row, original size) of a request: the frame the tracker reads colours from."""
        canvas = _input(request, CANVAS)[0]
        letterbox = _input(request, LETTERBOX)
        check_letterbox_rows(letterbox, input_size=canvas.shape[0])
        width, height = (int(v) for v in _input(request, IMAGE_SIZE).reshape(-1)[:2])
        if width < 1 or height < 1:
            raise TrackingError(f"IMAGE_SIZE must be positive, got {width}x{height}")
        return canvas, letterbox[0], (float(width), float(height))

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


def _input(request: Any, name: str) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise TrackingError(f"the tracker step received no {name} input")
    return tensor.as_numpy()


def _scalar(request: Any, name: str) -> Any:
    return _input(request, name).reshape(-1)[0]
