"""Typed results of a pose request, and the model facts a client needs to use them.

The server answers with padded batch arrays; everything past the client boundary works with
these frozen dataclasses instead, so callers never see padding or numpy scalars and the JSON
written by the CLI has one well-defined shape (:meth:`ImagePoses.to_dict`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from posetriton.spec import COCO_KEYPOINT_NAMES, COCO_SKELETON

Box = tuple[float, float, float, float]
Keypoint = tuple[float, float, float]

# Output tensors of every served pose ensemble, in the order the client requests them.
OUTPUT_NAMES = ("NUM_DETECTIONS", "BOXES", "SCORES", "KEYPOINTS")


class MetadataError(ValueError):
    """The model's configuration parameters cannot be read as pose-model metadata."""


@dataclass(frozen=True)
class Pose:
    """One detected person: box ``(x1, y1, x2, y2)``, score and ``(x, y, conf)`` per keypoint, in image pixels."""

    box: Box
    score: float
    keypoints: tuple[Keypoint, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": list(self.box),
            "score": self.score,
            "keypoints": [list(point) for point in self.keypoints],
        }


@dataclass(frozen=True)
class ImagePoses:
    """Every pose found in one image; ``width`` and ``height`` are those of the upright (EXIF-rotated) image."""

    image: str
    width: int
    height: int
    poses: list[Pose] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "detections": [pose.to_dict() for pose in self.poses],
        }

    @classmethod
    def from_outputs(
        cls,
        image: str,
        width: int,
        height: int,
        num_detections: int | NDArray[Any],
        boxes: NDArray[Any],
        scores: NDArray[Any],
        keypoints: NDArray[Any],
    ) -> ImagePoses:
        """Build from one image's rows of the output arrays: ``boxes [K, 4]``, ``scores [K]``, ``keypoints [K, N, 3]``.

        Only the first ``num_detections`` rows are real; the rest pad the batch to its largest
        count and are dropped here.
        """
        count = int(np.asarray(num_detections).reshape(-1)[0])
        rows = _check_rows(boxes, scores, keypoints)
        if not 0 <= count <= rows:
            raise ValueError(f"NUM_DETECTIONS is {count} but the outputs hold {rows} rows")
        poses = [
            Pose(
                box=_box(boxes[i]),
                score=float(scores[i]),
                keypoints=tuple(_keypoint(point) for point in keypoints[i]),
            )
            for i in range(count)
        ]
        return cls(image=image, width=width, height=height, poses=poses)


@dataclass(frozen=True)
class FailedImage:
    """An image the server (or the client) refused; ``to_dict`` keeps the JSON shape of :class:`ImagePoses`."""

    image: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "width": None, "height": None, "detections": [], "error": self.error}


ImageResult = ImagePoses | FailedImage


def poses_from_batch(images: Sequence[tuple[str, int, int]], outputs: Mapping[str, NDArray[Any]]) -> list[ImagePoses]:
    """Split a response (``outputs`` by tensor name) into one :class:`ImagePoses` per ``(name, width, height)``."""
    missing = [name for name in OUTPUT_NAMES if name not in outputs]
    if missing:
        raise ValueError(f"the response lacks output(s) {missing}")
    counts, boxes, scores, keypoints = (outputs[name] for name in OUTPUT_NAMES)
    if len(counts) != len(images):
        raise ValueError(f"sent {len(images)} images but the response holds {len(counts)}")
    return [
        ImagePoses.from_outputs(name, width, height, counts[i], boxes[i], scores[i], keypoints[i])
        for i, (name, width, height) in enumerate(images)
    ]


@dataclass(frozen=True)
class ModelMetadata:
    """What the served ensemble says about itself through its config ``parameters`` (all strings there)."""

    name: str
    keypoint_names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]
    max_batch_size: int
    parameters: Mapping[str, str] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.parameters.get("family", "")

    @property
    def description(self) -> str:
        return self.parameters.get("description", "")

    @property
    def max_det_limit(self) -> int | None:
        """The largest ``max_det`` a request may ask for, when the model states one."""
        raw = self.parameters.get("default.max_det_limit")
        return int(raw) if raw is not None and raw.isdigit() else None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelMetadata:
        """Read a model config as JSON (``get_model_config(..., as_json=True)["config"]``).

        Values are parsed with ``json.loads`` and type-checked, never evaluated. A model without
        ``keypoint_names``/``skeleton`` (not built by this project) gets the COCO person layout.
        """
        name = str(config.get("name", ""))
        raw_parameters = config.get("parameters", {})
        parameters = {str(key): str(value.get("string_value", "")) for key, value in raw_parameters.items()}
        names = _parse_names(name, parameters.get("keypoint_names"))
        skeleton = _parse_skeleton(name, parameters.get("skeleton"), len(names))
        return cls(
            name=name,
            keypoint_names=names,
            skeleton=skeleton,
            max_batch_size=int(config.get("max_batch_size", 0)),
            parameters=parameters,
        )


def _check_rows(boxes: NDArray[Any], scores: NDArray[Any], keypoints: NDArray[Any]) -> int:
    rows = boxes.shape[0] if boxes.ndim == 2 else -1
    if boxes.shape != (rows, 4) or scores.shape != (rows,) or keypoints.ndim != 3 or keypoints.shape[0] != rows:
        raise ValueError(
            f"inconsistent output shapes: BOXES {list(boxes.shape)}, SCORES {list(scores.shape)}, "
            f"KEYPOINTS {list(keypoints.shape)} (expected [K, 4], [K], [K, N, 3])"
        )
    if keypoints.shape[2] != 3:
        raise ValueError(f"KEYPOINTS rows must be (x, y, conf), got shape {list(keypoints.shape)}")
    return rows


def _box(row: NDArray[Any]) -> Box:
    x1, y1, x2, y2 = (float(v) for v in row)
    return (x1, y1, x2, y2)


def _keypoint(row: NDArray[Any]) -> Keypoint:
    x, y, conf = (float(v) for v in row)
    return (x, y, conf)


def _load_json(model: str, key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MetadataError(f"model {model!r}: parameter {key!r} is not valid JSON: {exc}") from None


def _parse_names(model: str, text: str | None) -> tuple[str, ...]:
    if text is None:
        return COCO_KEYPOINT_NAMES
    value = _load_json(model, "keypoint_names", text)
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise MetadataError(f"model {model!r}: parameter 'keypoint_names' must be a non-empty JSON list of strings")
    return tuple(value)


def _parse_skeleton(model: str, text: str | None, num_keypoints: int) -> tuple[tuple[int, int], ...]:
    if text is None:
        return COCO_SKELETON if num_keypoints == len(COCO_KEYPOINT_NAMES) else ()
    value = _load_json(model, "skeleton", text)
    pairs: list[tuple[int, int]] = []
    for pair in value if isinstance(value, list) else [None]:
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(i) is int for i in pair)):
            raise MetadataError(f"model {model!r}: parameter 'skeleton' must be a JSON list of [i, j] integer pairs")
        i, j = pair
        if not (0 <= i < num_keypoints and 0 <= j < num_keypoints):
            raise MetadataError(
                f"model {model!r}: skeleton pair {pair} names a keypoint outside 0..{num_keypoints - 1}"
            )
        pairs.append((i, j))
    return tuple(pairs)
