"""What a served pose model expects and how its candidates are post-processed.

A model family (YOLO-NAS Pose, Ultralytics pose) differs only in these values: the build
tool writes them into each Triton model's ``parameters`` and the server models read them
back with :meth:`from_parameters`, so no code branches on the family name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from posetriton.core.contract import ContractError, Thresholds

ChannelOrder = Literal["RGB", "BGR"]
PadPosition = Literal["bottom_right", "center"]

COCO_KEYPOINT_NAMES: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)

# COCO person skeleton as 0-based keypoint index pairs.
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip


# The keypoint layouts a catalogue family can name (``keypoints = "coco_person"``) instead of listing its own.
KEYPOINT_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[tuple[int, int], ...]]] = {
    "coco_person": (COCO_KEYPOINT_NAMES, COCO_SKELETON),
}


class SpecError(ValueError):
    """A model specification value is missing or out of range."""


def check_keypoint_layout(names: tuple[str, ...], skeleton: tuple[tuple[int, int], ...]) -> None:
    """Names unique and non-empty; every skeleton edge joins two different keypoints of the layout."""
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise SpecError(f"keypoint names must be unique non-empty strings, got {list(names)}")
    for edge in skeleton:
        if len(edge) != 2 or not all(isinstance(i, int) and 0 <= i < len(names) for i in edge) or edge[0] == edge[1]:
            raise SpecError(f"skeleton edge {list(edge)} must join two of the {len(names)} keypoints (0-based)")


def _coerce(cls: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Convert string parameters (as stored in config.pbtxt) to the dataclass field types."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in raw:
            continue
        value = raw[field.name]
        kind = field.type if isinstance(field.type, str) else field.type.__name__
        try:
            if kind == "int":
                value = int(value)
            elif kind == "float":
                value = float(value)
            elif kind == "bool":
                value = value if isinstance(value, bool) else str(value).lower() in {"1", "true", "yes"}
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{cls.__name__}.{field.name}: cannot read {value!r} as {kind}") from exc
        values[field.name] = value
    return values


SpecT = TypeVar("SpecT", bound="_Spec")


class _Spec:
    @classmethod
    def from_parameters(cls: type[SpecT], raw: Mapping[str, Any]) -> SpecT:
        """Build from a flat mapping of strings (Triton model-config parameters); unknown keys are ignored."""
        return cls(**_coerce(cls, raw))

    def to_parameters(self) -> dict[str, str]:
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]


# The model parameter of a step that decodes requests (the CPU network step): how many it decodes at once, so a large
# image never holds up the next request. Derived from the preprocess instances it stands in for.
DECODE_THREADS_PARAMETER = "decode_threads"


@dataclass(frozen=True)
class LetterboxSpec(_Spec):
    """How an image becomes the network input: resize longest side, pad, reorder channels."""

    input_size: int = 640
    channel_order: ChannelOrder = "BGR"
    pad_position: PadPosition = "bottom_right"
    pad_value: int = 127
    # Map back with each axis' actual resize ratio (Ultralytics) rather than the single
    # longest-side ratio (super-gradients); they differ by the rounding of the resized size.
    per_axis_scale: bool = False
    # Decoded images above this many pixels are refused (decompression bombs, memory).
    max_pixels: int = 50_000_000
    # The decode budget of one request: the pixels of all its images together (docs/reliability.md, decode
    # budget, gives the decode time and memory this bounds).
    max_request_pixels: int = 200_000_000
    # Opt-in: decode large JPEGs at a reduced size with libjpeg's DCT scaling (1/2, 1/4, 1/8), never below
    # the network input size. Faster on big photos, not pixel-identical (docs/benchmarks.md gives the deviation).
    reduced_jpeg_decode: bool = False

    def __post_init__(self) -> None:
        if not 32 <= self.input_size <= 4096 or self.input_size % 32:
            raise SpecError(f"input_size must be a multiple of 32 in [32, 4096], got {self.input_size}")
        if self.channel_order not in get_args(ChannelOrder):
            raise SpecError(f"channel_order must be one of {get_args(ChannelOrder)}, got {self.channel_order!r}")
        if self.pad_position not in get_args(PadPosition):
            raise SpecError(f"pad_position must be one of {get_args(PadPosition)}, got {self.pad_position!r}")
        if not 0 <= self.pad_value <= 255:
            raise SpecError(f"pad_value must be in [0, 255], got {self.pad_value}")
        if self.max_pixels < 1:
            raise SpecError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.max_request_pixels < self.max_pixels:
            raise SpecError(
                f"max_request_pixels ({self.max_request_pixels}) must be at least max_pixels ({self.max_pixels})"
            )


@dataclass(frozen=True)
class PostprocessSpec(_Spec):
    """Defaults and fixed rules of score threshold -> NMS -> top-k. The fields named as Thresholds' are the served
    defaults a request's own thresholds override."""

    conf: float = 0.5
    iou: float = 0.7
    max_det: int = 100
    # At most this many candidates (best scores first) enter NMS.
    pre_nms_topk: int = 300
    # Clip boxes and keypoints to the original image (Ultralytics does, super-gradients does not).
    clip_to_image: bool = False
    num_keypoints: int = 17
    # Upper bound a request may ask for with max_det.
    max_det_limit: int = 1000

    def __post_init__(self) -> None:
        try:
            self.thresholds.check(self.limits)
        except ContractError as exc:
            raise SpecError(str(exc)) from None
        if self.pre_nms_topk < 1:
            raise SpecError(f"pre_nms_topk must be positive, got {self.pre_nms_topk}")
        if self.num_keypoints < 1:
            raise SpecError(f"num_keypoints must be positive, got {self.num_keypoints}")

    @property
    def thresholds(self) -> Thresholds:
        """The served defaults, which a request's own :class:`~posetriton.core.contract.Thresholds` override."""
        return Thresholds(**{attribute: getattr(self, attribute) for attribute in Thresholds.declarations()})

    @property
    def limits(self) -> dict[str, float]:
        """The per-model bounds the thresholds name (a declaration's ``limit`` L is this spec's ``L_limit``, which
        the ensemble's config states as ``default.L_limit`` for clients)."""
        names = {declared.limit for declared in Thresholds.declarations().values() if declared.limit}
        return {name: getattr(self, f"{name}_limit") for name in names}
