"""The wire contract: what crosses between the client, the ensemble's steps and the exported network.

Standard library only, so the client, the Python-backend models, the repository generator and the export
all import the same names and rules instead of repeating literals. A family with another input size,
other strides or another keypoint count changes values here through its parameters, never code.

Ensemble ``NAME`` (``NAME_pixels`` takes raw pixels instead of encoded bytes)::

    IMAGE  BYTES [B, 1]  or  PIXELS UINT8 [B, H, W, 3] (RGB)
      -> NAME_preprocess  -> canvas UINT8 [B, S, S, 3] (letterboxed, decoded RGB order), letterbox FP64 [B, 6]
      -> NAME_network     -> candidates FP32 [B, k, 5 + 3K] (best k anchors by person score, sorted)
      -> NAME_postprocess -> NUM_DETECTIONS, BOXES, SCORES, KEYPOINTS, IMAGE_SIZE
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# ------------------------------------------------------------------------------------------ tensor names
IMAGE = "IMAGE"  # ensemble input: encoded images, BYTES [B, 1]
PIXELS = "PIXELS"  # NAME_pixels input: raw RGB pixels, UINT8 [B, H, W, 3]
CANVAS = "canvas"  # preprocess -> network: letterboxed uint8 [B, S, S, 3], decoded RGB order
LETTERBOX = "letterbox"  # preprocess -> postprocess: FP64 [B, LETTERBOX_WIDTH], see LetterboxTransform
CANDIDATES = "candidates"  # network -> postprocess: FP32 [B, k, candidate_width(K)]

NUM_DETECTIONS = "NUM_DETECTIONS"  # INT32 [B, 1]
BOXES = "BOXES"  # FP32 [B, N, 4] xyxy, original-image pixels
SCORES = "SCORES"  # FP32 [B, N]
KEYPOINTS = "KEYPOINTS"  # FP32 [B, N, K, 3] (x, y, confidence)
IMAGE_SIZE = "IMAGE_SIZE"  # INT32 [B, 2] (width, height) of the upright original image
# Video (NAME_track ensemble, posetriton.server.tracking): one more input and one more output.
FRAME_INDEX = "FRAME_INDEX"  # INT64 [B, 1]: the frame's position in its video, sent by the client
TRACK_IDS = "TRACK_IDS"  # INT64 [B, N]: track ID per pose row, UNTRACKED for none (and for padding)
# FP32 [B, N, K, 3]: KEYPOINTS filtered over each track's frames (posetriton.server.tracking.KeypointSmoother); the
# confidences are KEYPOINTS' own. A pose without a track ID gets its raw keypoints.
SMOOTHED_KEYPOINTS = "SMOOTHED_KEYPOINTS"
UNTRACKED = -1
# Triton's sequence control inputs of the tracker step.
CONTROL_START, CONTROL_END, CONTROL_CORRID = "START", "END", "CORRID"
OUTPUTS = (NUM_DETECTIONS, BOXES, SCORES, KEYPOINTS, IMAGE_SIZE)

# (x1, y1, x2, y2, person_score) precede the keypoints in a candidate row.
BOX_SCORE_COLUMNS = 5
SCORE_COLUMN = 4
# scale_x, scale_y, pad_x, pad_y, width, height
LETTERBOX_WIDTH = 6
DEFAULT_STRIDES: tuple[int, ...] = (8, 16, 32)

# ------------------------------------------------------------------------------------------- model names
PIXELS_SUFFIX = "_pixels"
PREPROCESS_SUFFIX = "_preprocess"
NETWORK_SUFFIX = "_network"
POSTPROCESS_SUFFIX = "_postprocess"
TRACK_SUFFIX = "_track"  # ensemble NAME_track: NAME's outputs plus TRACK_IDS (video, sequence batching)
TRACKER_SUFFIX = "_tracker"  # its stateful step, after NAME_postprocess
# The steps of ensemble NAME (and NAME_pixels), in order.
PIPELINE_SUFFIXES = (PREPROCESS_SUFFIX, NETWORK_SUFFIX, POSTPROCESS_SUFFIX)
# Steps load with an ensemble but are not meant to be called directly.
STEP_SUFFIXES = (*PIPELINE_SUFFIXES, TRACKER_SUFFIX)
MODEL_SUFFIXES = (PIXELS_SUFFIX, *STEP_SUFFIXES, TRACK_SUFFIX)


def candidate_width(num_keypoints: int) -> int:
    """Columns of one candidate row: box, person score, then ``(x, y, conf)`` per keypoint."""
    return BOX_SCORE_COLUMNS + 3 * num_keypoints


def num_anchors(input_size: int, strides: tuple[int, ...] = DEFAULT_STRIDES) -> int:
    """Anchor points of a one-stage head on a square input: 8400 for 640 with strides 8/16/32."""
    for stride in strides:
        if input_size % stride:
            raise ContractError(f"input size {input_size} is not a multiple of stride {stride}")
    return sum((input_size // stride) ** 2 for stride in strides)


class ContractError(ValueError):
    """A value does not follow the wire contract; the message names it."""


# ---------------------------------------------------------------------------------------------- thresholds
THRESHOLD_NAMES = ("conf", "iou", "max_det")
# The keypoint smoothing of NAME_track (see Smoothing); request parameters too, read by the tracker step.
SMOOTHING_NAMES = ("smooth_min_cutoff", "smooth_beta")
# Every request parameter a served ensemble accepts: each step reads its own and lets the others' pass.
REQUEST_PARAMETER_NAMES = (*THRESHOLD_NAMES, *SMOOTHING_NAMES)


def _known_parameters(parameters: Mapping[str, Any]) -> None:
    unknown = sorted(set(parameters) - set(REQUEST_PARAMETER_NAMES))
    if unknown:
        raise ContractError(f"unknown request parameter(s) {unknown}; accepted: {list(REQUEST_PARAMETER_NAMES)}")


def _number_parameter(parameters: Mapping[str, Any], name: str, integer: bool = False) -> int | float | None:
    """A request parameter's value as a finite number, None when absent; a wrong type is refused."""
    if name not in parameters:
        return None
    value = parameters[name]
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not finite or (integer and value != int(value)):
        raise ContractError(
            f"request parameter {name} must be {'an integer' if integer else 'a number'}, got {value!r}"
        )
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class Thresholds:
    """Per-request ``conf``, ``iou`` and ``max_det``; ``None`` means the served model's default.

    They travel as Triton request parameters (which, unlike optional inputs, do not split dynamic
    batches). :meth:`check` is the one validation: the client calls it before sending, the
    postprocess step after reading them back.
    """

    conf: float | None = None
    iou: float | None = None
    max_det: int | None = None

    def check(self, max_det_limit: int | None = None) -> Thresholds:
        """Return self, or raise :class:`ContractError` naming the first value out of range."""
        if self.conf is not None and not 0.0 <= self.conf <= 1.0:
            raise ContractError(f"conf must be in [0, 1], got {self.conf}")
        if self.iou is not None and not 0.0 <= self.iou <= 1.0:
            raise ContractError(f"iou must be in [0, 1], got {self.iou}")
        if self.max_det is not None:
            if max_det_limit is None and self.max_det < 1:
                raise ContractError(f"max_det must be at least 1, got {self.max_det}")
            if max_det_limit is not None and not 1 <= self.max_det <= max_det_limit:
                raise ContractError(f"max_det must be in [1, {max_det_limit}], got {self.max_det}")
        return self

    def to_parameters(self) -> dict[str, float | int]:
        """The request parameters to send: only the values that are set."""
        return {name: value for name in THRESHOLD_NAMES if (value := getattr(self, name)) is not None}

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> Thresholds:
        """Read request parameters; unknown names and values of the wrong type are refused."""
        _known_parameters(parameters)
        return cls(*(_number_parameter(parameters, name, integer=name == "max_det") for name in THRESHOLD_NAMES))  # type: ignore[arg-type]

    def or_defaults(self, defaults: Thresholds) -> Thresholds:
        """Fill unset values from ``defaults`` (the served model's)."""
        return Thresholds(
            *(getattr(defaults, n) if getattr(self, n) is None else getattr(self, n) for n in THRESHOLD_NAMES)
        )


@dataclass(frozen=True)
class Smoothing:
    """Per-request keypoint smoothing of ``NAME_track`` (a One Euro filter per keypoint coordinate, per track);
    ``None`` means the default, measured in docs/benchmarks.md.

    ``min_cutoff`` (cycles per frame) is the filter's cutoff for a keypoint at rest: lower is smoother.
    ``beta`` raises the cutoff with the keypoint's speed (in person heights per frame), so a moving
    limb is followed with little lag; 0 is a plain low-pass filter. ``min_cutoff`` >= 0.5 (the Nyquist
    limit) turns smoothing off. They travel as the request parameters ``smooth_min_cutoff`` and
    ``smooth_beta``; :meth:`check` is the one validation (client before sending, tracker step after).
    """

    min_cutoff: float | None = None
    beta: float | None = None

    def check(self) -> Smoothing:
        if self.min_cutoff is not None and not self.min_cutoff > 0.0:
            raise ContractError(f"smooth_min_cutoff must be > 0 (cycles per frame), got {self.min_cutoff}")
        if self.beta is not None and not self.beta >= 0.0:
            raise ContractError(f"smooth_beta must be >= 0, got {self.beta}")
        return self

    def to_parameters(self) -> dict[str, float]:
        values = (self.min_cutoff, self.beta)
        return {name: value for name, value in zip(SMOOTHING_NAMES, values, strict=True) if value is not None}

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> Smoothing:
        """Read request parameters (the thresholds are the postprocess step's); unknown names are refused."""
        _known_parameters(parameters)
        return cls(*(_number_parameter(parameters, name) for name in SMOOTHING_NAMES))

    def or_defaults(self, defaults: Smoothing) -> Smoothing:
        return Smoothing(
            defaults.min_cutoff if self.min_cutoff is None else self.min_cutoff,
            defaults.beta if self.beta is None else self.beta,
        )


# ------------------------------------------------------------------------------------------------ errors
# Triton prefixes an error raised inside an ensemble step with the ensemble's name.
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")
_IMAGE_INDEX = re.compile(r"^image (\d+) of (\d+): ")


def image_error(index: int, count: int, reason: str) -> str:
    """The message for one refused image of a request: ``image I of N: reason`` (just ``reason`` when N is 1)."""
    return f"image {index} of {count}: {reason}" if count > 1 else reason


@dataclass(frozen=True)
class ParsedError:
    """A server error message taken apart: which image of the request (if it says), and the reason."""

    reason: str
    index: int | None = None
    count: int | None = None


def parse_error(message: str) -> ParsedError:
    """Inverse of :func:`image_error`, after removing Triton's ensemble prefix."""
    reason = _ENSEMBLE_PREFIX.sub("", message)
    match = _IMAGE_INDEX.match(reason)
    if match is None:
        return ParsedError(reason)
    return ParsedError(reason[match.end() :], int(match.group(1)), int(match.group(2)))
