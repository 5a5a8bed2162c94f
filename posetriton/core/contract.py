"""The wire contract: what crosses between the client, the ensemble's steps and the exported network.

Standard library only, so the client, the Python-backend models, the repository generator and the export
all import the same names and rules instead of repeating literals. A family with another input size,
other strides or another keypoint count changes values here through its parameters, never code.

Ensemble ``NAME`` (``NAME_pixels`` takes raw pixels instead of encoded bytes)::

    IMAGE  BYTES [B, 1]  or  PIXELS UINT8 [B, H, W, 3] (RGB)
      -> NAME_preprocess  -> canvas UINT8 [B, S, S, 3] (letterboxed, decoded RGB order), letterbox FP64 [B, 6]
      -> NAME_network     -> candidates FP32 [B, k, 5 + 3K] (best k anchors by person score, sorted)
      -> NAME_postprocess -> NUM_DETECTIONS, BOXES, SCORES, KEYPOINTS, IMAGE_SIZE

On the CPU the network step is the whole of NAME and NAME_pixels: it takes IMAGE or PIXELS, decodes them itself
and answers the five outputs (the preprocess and postprocess steps' work, run in its own process). NAME_track on
the CPU is NAME_preprocess -> NAME_network (which then takes the letterbox rows with the canvas) -> the tracker.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar

# ------------------------------------------------------------------------------------------ tensor names
IMAGE = "IMAGE"  # ensemble input: encoded images, BYTES [B, 1]
PIXELS = "PIXELS"  # NAME_pixels input: raw RGB pixels, UINT8 [B, H, W, 3]
CANVAS = "canvas"  # preprocess -> network: letterboxed uint8 [B, S, S, 3], decoded RGB order
# preprocess -> postprocess (on the CPU: -> network, which finishes the poses): FP64 [B, LETTERBOX_WIDTH], see
# LetterboxTransform
LETTERBOX = "letterbox"
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


# -------------------------------------------------------------------------------------- request parameters
# Each per-request parameter is declared once, as a field of a parameter group below (Thresholds, Smoothing):
# its wire name, type, range and help. The validation, the wire form, the SDK's keyword arguments, the CLI's
# options, the web page's controls and the client's error parsing all derive from these declarations.


@dataclass(frozen=True)
class RequestParameter:
    """One per-request parameter: sent as Triton request parameter ``name`` (which, unlike an optional input,
    does not split dynamic batches). ``limit`` names a per-model upper bound given to ``check`` (e.g. the
    family's ``max_det``), used instead of ``maximum`` when known."""

    name: str
    kind: type  # int or float
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    limit: str | None = None
    unit: str = ""

    @property
    def option(self) -> str:
        """The CLI option: ``--max-det`` for ``max_det``."""
        return "--" + self.name.replace("_", "-")

    def coerce(self, value: Any) -> int | float:
        """``value`` as this parameter's type; a bool, a non-number, a non-finite or (for an int) a fractional
        value is refused."""
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or (self.kind is int and value != int(value)):
            kind = "an integer" if self.kind is int else "a number"
            raise ContractError(f"request parameter {self.name} must be {kind}, got {value!r}")
        return int(value) if self.kind is int else float(value)

    def check(self, value: int | float, limit: float | None = None) -> None:
        """Raise :class:`ContractError` naming this parameter when ``value`` is out of its range."""
        low, high = self.minimum, self.maximum if limit is None else limit
        unit = f" ({self.unit})" if self.unit else ""
        if self.exclusive_minimum and low is not None and high is None and not value > low:
            raise ContractError(f"{self.name} must be > {_plain(low)}{unit}, got {value}")
        if low is not None and high is None and not value >= low:
            raise ContractError(f"{self.name} must be {_at_least(self)} {_plain(low)}{unit}, got {value}")
        if low is not None and high is not None and not low <= value <= high:
            raise ContractError(f"{self.name} must be in [{_plain(low)}, {_plain(high)}]{unit}, got {value}")

    def range_text(self) -> str:
        """The accepted values in words, for a help text: ``in [0, 1]``, ``> 0``, ``at least 1, at most the
        model's max_det limit``."""
        low, high = self.minimum, self.maximum
        unit = f" ({self.unit})" if self.unit else ""
        if low is not None and high is not None:
            return f"in [{_plain(low)}, {_plain(high)}]{unit}"
        words = [f"{'>' if self.exclusive_minimum else _at_least(self)} {_plain(low)}{unit}"] if low is not None else []
        if self.limit:
            words.append(f"at most the model's {self.limit} limit")
        return ", ".join(words) or "any number"

    def describe(self) -> dict[str, Any]:
        """What a user interface needs to offer this parameter (the web page builds its controls from it)."""
        return {
            "name": self.name, "type": self.kind.__name__, "help": self.help, "minimum": self.minimum,
            "maximum": self.maximum, "exclusive_minimum": self.exclusive_minimum, "limit": self.limit,
            "range": self.range_text(),
        }  # fmt: skip


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def _at_least(parameter: RequestParameter) -> str:
    return "at least" if parameter.kind is int else ">="


def parameter(declaration: RequestParameter) -> Any:
    """A parameter group's field: unset (``None``, the served model's default) unless given."""
    return field(default=None, metadata={"parameter": declaration})


G = TypeVar("G", bound="ParameterGroup")


class ParameterGroup:
    """Base of a frozen dataclass whose fields are request parameters (declared with :func:`parameter`);
    ``None`` means the served model's default. :meth:`check` is the one validation: the client calls it
    before sending, the step that reads the group after reading it back."""

    # Only NAME_track's tracker step reads this group; a request to NAME (a photo, a frame) has no use for it.
    tracking_only: ClassVar[bool] = False

    @classmethod
    def declarations(cls) -> dict[str, RequestParameter]:
        """Field name -> its parameter, in declaration order."""
        return {f.name: f.metadata["parameter"] for f in fields(cls)}  # type: ignore[arg-type]

    def check(self: G, limits: Mapping[str, float | None] | None = None) -> G:
        """Return self, or raise :class:`ContractError` naming the first value out of range."""
        for attribute, declared in self.declarations().items():
            value = getattr(self, attribute)
            if value is not None:
                declared.check(declared.coerce(value), (limits or {}).get(declared.limit or ""))
        return self

    def to_parameters(self) -> dict[str, int | float]:
        """The request parameters to send: only the values that are set."""
        return {
            declared.name: declared.coerce(value)
            for attribute, declared in self.declarations().items()
            if (value := getattr(self, attribute)) is not None
        }

    @classmethod
    def from_parameters(cls: type[G], parameters: Mapping[str, Any]) -> G:
        """Read this group from request parameters; unknown names and values of the wrong type are refused
        (another group's names pass: each step reads its own)."""
        unknown = sorted(set(parameters) - set(REQUEST_PARAMETERS))
        if unknown:
            raise ContractError(f"unknown request parameter(s) {unknown}; accepted: {list(REQUEST_PARAMETERS)}")
        return cls(**{
            attribute: declared.coerce(parameters[declared.name]) if declared.name in parameters else None
            for attribute, declared in cls.declarations().items()
        })  # fmt: skip

    def or_defaults(self: G, defaults: G) -> G:
        """Fill unset values from ``defaults`` (the served model's)."""
        chosen = {a: v for a in self.declarations() if (v := getattr(self, a)) is not None}
        return replace(defaults, **chosen)  # type: ignore[type-var]  # every group is a dataclass


@dataclass(frozen=True)
class Thresholds(ParameterGroup):
    """Per-request ``conf``, ``iou`` and ``max_det`` of the postprocess step."""

    conf: float | None = parameter(RequestParameter("conf", float, "minimum person score", 0.0, 1.0))
    iou: float | None = parameter(RequestParameter("iou", float, "NMS IoU threshold", 0.0, 1.0))
    max_det: int | None = parameter(
        RequestParameter("max_det", int, "most poses per image", minimum=1, limit="max_det")
    )

    def check(self, limits: Mapping[str, float | None] | int | None = None) -> Thresholds:
        """As :meth:`ParameterGroup.check`; a plain number is the model's ``max_det`` limit."""
        if limits is None or isinstance(limits, Mapping):
            return super().check(limits)
        return super().check({"max_det": limits})


@dataclass(frozen=True)
class Smoothing(ParameterGroup):
    """Per-request keypoint smoothing of ``NAME_track`` (a One Euro filter per keypoint coordinate, per track);
    ``None`` means the default, measured in docs/benchmarks.md.

    ``min_cutoff`` (cycles per frame) is the filter's cutoff for a keypoint at rest: lower is smoother.
    ``beta`` raises the cutoff with the keypoint's speed (in person heights per frame), so a moving
    limb is followed with little lag; 0 is a plain low-pass filter. ``min_cutoff`` >= 0.5 (the Nyquist
    limit) turns smoothing off.
    """

    tracking_only: ClassVar[bool] = True

    min_cutoff: float | None = parameter(
        RequestParameter(
            "smooth_min_cutoff", float, "keypoint smoothing cutoff at rest (lower is smoother)",
            minimum=0.0, exclusive_minimum=True, unit="cycles per frame",
        )
    )  # fmt: skip
    beta: float | None = parameter(
        RequestParameter("smooth_beta", float, "keypoint smoothing speed coefficient (higher: less lag)", minimum=0.0)
    )


# Every parameter group, in the order the SDK, the CLI and the web page show them; a new group is added here.
PARAMETER_GROUPS: tuple[type[ParameterGroup], ...] = (Thresholds, Smoothing)
# Every request parameter a served ensemble accepts, by wire name: each step reads its own and lets the others pass.
REQUEST_PARAMETERS: dict[str, RequestParameter] = {
    declared.name: declared for group in PARAMETER_GROUPS for declared in group.declarations().values()
}
REQUEST_PARAMETER_NAMES = tuple(REQUEST_PARAMETERS)
THRESHOLD_NAMES = tuple(d.name for d in Thresholds.declarations().values())
SMOOTHING_NAMES = tuple(d.name for d in Smoothing.declarations().values())


def parameter_groups(*, tracking: bool = False) -> tuple[type[ParameterGroup], ...]:
    """The groups a request to ``NAME`` reads (with ``tracking``, to ``NAME_track``), in showing order. Read from
    PARAMETER_GROUPS at each call, so that a group registered later is offered too."""
    return tuple(group for group in PARAMETER_GROUPS if tracking or not group.tracking_only)


def register_parameter_group(group: type[ParameterGroup]) -> None:
    """Add a group (and its parameters) to those every layer offers: for an extension loaded at run time and for
    tests; a group of this project is declared above and listed in PARAMETER_GROUPS instead."""
    global PARAMETER_GROUPS
    clashes = sorted(set(REQUEST_PARAMETERS) & {d.name for d in group.declarations().values()})
    if clashes:
        raise ContractError(f"request parameter(s) {clashes} are declared already")
    PARAMETER_GROUPS = (*PARAMETER_GROUPS, group)
    REQUEST_PARAMETERS.update({declared.name: declared for declared in group.declarations().values()})


def request_parameters(
    *groups: ParameterGroup | None, limits: Mapping[str, float | None] | None = None, **values: Any
) -> dict[str, int | float]:
    """The request parameters to send: the groups' values, then ``values`` by wire name over them (``conf=0.3``;
    ``None`` keeps the group's), each checked by its one declaration. ContractError names the first bad one."""
    chosen: dict[str, Any] = {}
    for group in groups:
        if group is not None:
            chosen.update(group.check(limits).to_parameters())
    unknown = sorted(set(values) - set(REQUEST_PARAMETERS))
    if unknown:
        raise ContractError(f"unknown request parameter(s) {unknown}; accepted: {list(REQUEST_PARAMETERS)}")
    for name, value in values.items():
        if value is not None:
            declared = REQUEST_PARAMETERS[name]
            number = declared.coerce(value)
            declared.check(number, (limits or {}).get(declared.limit or ""))
            chosen[name] = number
    return chosen


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
