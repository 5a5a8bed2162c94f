"""Typed results of a pose request, and the model facts a client needs to use them.

The server answers with padded batch arrays; everything past the client boundary works with
these frozen dataclasses instead, so callers never see padding or numpy scalars and the JSON
written by the CLI has one well-defined shape (:meth:`ImagePoses.to_dict`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from posetriton.core.contract import BOXES, IMAGE_SIZE, KEYPOINTS, NUM_DETECTIONS, OUTPUTS, REQUEST_PARAMETERS, SCORES
from posetriton.core.spec import COCO_KEYPOINT_NAMES, COCO_SKELETON

Box = tuple[float, float, float, float]


class Keypoint(NamedTuple):
    """One keypoint in image pixels; ``conf`` is the network's confidence that it is visible."""

    x: float
    y: float
    conf: float


class PoseArrays(NamedTuple):
    """An image's poses as arrays: ``boxes [N, 4]`` (x1, y1, x2, y2), ``scores [N]``, ``keypoints [N, K, 3]``."""

    boxes: NDArray[np.float32]
    scores: NDArray[np.float32]
    keypoints: NDArray[np.float32]


# The COCO category id of "person", which every pose in COCO-format results belongs to.
COCO_PERSON_CATEGORY = 1

# Output tensors of every served pose ensemble, in the order the client requests them.
OUTPUT_NAMES = OUTPUTS


class MetadataError(ValueError):
    """The model's configuration parameters cannot be read as pose-model metadata."""


@dataclass(frozen=True)
class Pose:
    """One detected person: box ``(x1, y1, x2, y2)``, score and ``(x, y, conf)`` per keypoint, in image pixels.

    ``keypoint_names`` name the keypoints in order (the COCO person layout for 17 keypoints, or
    the served model's names when the client knows them): ``pose["left_wrist"]`` is a
    :class:`Keypoint`.
    """

    box: Box
    score: float
    keypoints: tuple[Keypoint, ...]
    keypoint_names: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "box", tuple(float(v) for v in self.box))
        object.__setattr__(self, "keypoints", tuple(Keypoint(*map(float, point)) for point in self.keypoints))
        if not self.keypoint_names:
            object.__setattr__(self, "keypoint_names", default_keypoint_names(len(self.keypoints)))
        elif len(self.keypoint_names) != len(self.keypoints):
            raise ValueError(f"{len(self.keypoint_names)} keypoint names for {len(self.keypoints)} keypoints")

    def __getitem__(self, name: str) -> Keypoint:
        try:
            return self.keypoints[self.keypoint_names.index(name)]
        except ValueError:
            raise KeyError(f"no keypoint named {name!r}; the names are {', '.join(self.keypoint_names)}") from None

    @property
    def named_keypoints(self) -> dict[str, Keypoint]:
        """``{name: Keypoint}`` in the model's keypoint order."""
        return dict(zip(self.keypoint_names, self.keypoints, strict=True))

    @property
    def xywh(self) -> tuple[float, float, float, float]:
        """The box as ``(x, y, width, height)``, COCO's bbox convention."""
        x1, y1, x2, y2 = self.box
        return (x1, y1, x2 - x1, y2 - y1)

    def keypoints_array(self) -> NDArray[np.float32]:
        """``[K, 3]`` float32 array of ``(x, y, conf)``."""
        return np.asarray(self.keypoints, dtype=np.float32).reshape(len(self.keypoints), 3)

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": list(self.box),
            "score": self.score,
            "keypoints": [list(point) for point in self.keypoints],
        }

    def to_coco(self, image_id: int) -> dict[str, Any]:
        """One COCO keypoint result: ``keypoints`` is ``[x, y, v] * K`` flat with the confidence as ``v``.

        pycocotools' OKS uses only ``x`` and ``y`` of results; keeping the confidence in ``v`` (as
        Ultralytics does) lets the file still say how sure each keypoint is.
        """
        return {
            "image_id": image_id,
            "category_id": COCO_PERSON_CATEGORY,
            "keypoints": [round(v, 3) for point in self.keypoints for v in point],
            "score": round(self.score, 5),
            "bbox": [round(v, 3) for v in self.xywh],
        }


def default_keypoint_names(count: int) -> tuple[str, ...]:
    """COCO's names for 17 keypoints, ``kpt_0 .. kpt_{count-1}`` otherwise."""
    return COCO_KEYPOINT_NAMES if count == len(COCO_KEYPOINT_NAMES) else tuple(f"kpt_{i}" for i in range(count))


@dataclass(frozen=True, eq=False)
class ImagePoses:
    """Every pose found in one image, as arrays first (in the spirit of Ultralytics' ``Results.keypoints``).

    ``boxes [N, 4]`` (x1, y1, x2, y2), ``scores [N]`` and ``keypoints [N, K, 3]`` (x, y, conf) are in the pixels
    of the upright (EXIF-rotated) image of ``width`` x ``height``, as the server reported them. ``xy``, ``xyn``
    and ``conf`` are views; :attr:`poses` makes per-person :class:`Pose` objects only when first asked for.
    """

    image: str
    width: int
    height: int
    boxes: NDArray[np.float32]
    scores: NDArray[np.float32]
    keypoints: NDArray[np.float32]
    keypoint_names: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        count = _check_rows(self.boxes, self.scores, self.keypoints)
        for name in ("boxes", "scores", "keypoints"):
            array = np.asarray(getattr(self, name), dtype=np.float32)
            array.flags.writeable = False  # results are values: views must not change them behind a caller's back
            object.__setattr__(self, name, array)
        if count and self.keypoint_names and len(self.keypoint_names) != self.keypoints.shape[1]:
            raise ValueError(f"{len(self.keypoint_names)} keypoint names for {self.keypoints.shape[1]} keypoints")

    def __len__(self) -> int:
        return len(self.scores)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImagePoses):
            return NotImplemented
        return (self.image, self.width, self.height) == (other.image, other.width, other.height) and all(
            np.array_equal(getattr(self, n), getattr(other, n)) for n in ("boxes", "scores", "keypoints")
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def xyxy(self) -> NDArray[np.float32]:
        """``[N, 4]`` boxes (the same array as :attr:`boxes`)."""
        return self.boxes

    @property
    def xy(self) -> NDArray[np.float32]:
        """``[N, K, 2]`` keypoint coordinates in image pixels (a view)."""
        return self.keypoints[..., :2]

    @property
    def xyn(self) -> NDArray[np.float32]:
        """``[N, K, 2]`` keypoint coordinates divided by the image's width and height."""
        return self.xy / np.array([self.width, self.height], dtype=np.float32)

    @property
    def conf(self) -> NDArray[np.float32]:
        """``[N, K]`` keypoint confidences (a view)."""
        return self.keypoints[..., 2]

    @functools.cached_property
    def poses(self) -> list[Pose]:
        """One :class:`Pose` per person, made on first access."""
        return [
            Pose(box=_box(box), score=float(score), keypoints=tuple(_keypoint(p) for p in points),
                 keypoint_names=self.keypoint_names)
            for box, score, points in zip(self.boxes, self.scores, self.keypoints, strict=True)
        ]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "detections": [
                {"box": box.tolist(), "score": float(score), "keypoints": points.tolist()}
                for box, score, points in zip(self.boxes, self.scores, self.keypoints, strict=True)
            ],
        }

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO-format keypoint results for this image (see :meth:`Pose.to_coco`)."""
        return [pose.to_coco(image_id) for pose in self.poses]

    def as_arrays(self, num_keypoints: int | None = None) -> PoseArrays:
        """The poses as arrays (``[0, 4]``, ``[0]``, ``[0, K, 3]`` when there are none)."""
        keypoints = self.keypoints
        if not len(self) and num_keypoints is not None:
            keypoints = np.zeros((0, num_keypoints, 3), np.float32)
        return PoseArrays(self.boxes, self.scores, keypoints)

    def renamed(self, image: str) -> ImagePoses:
        """The same result under another image name (a frame of a stream, say)."""
        return dataclasses.replace(self, image=image)

    @classmethod
    def from_poses(cls, image: str, width: int, height: int, poses: Sequence[Pose]) -> ImagePoses:
        """Build from :class:`Pose` objects (tests, hand-made results)."""
        k = len(poses[0].keypoints) if poses else len(COCO_KEYPOINT_NAMES)
        return cls(
            image, width, height,
            np.asarray([p.box for p in poses], np.float32).reshape(-1, 4),
            np.asarray([p.score for p in poses], np.float32).reshape(-1),
            np.asarray([p.keypoints for p in poses], np.float32).reshape(-1, k, 3),
            poses[0].keypoint_names if poses else (),
        )  # fmt: skip

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
        keypoint_names: tuple[str, ...] = (),
    ) -> ImagePoses:
        """Build from one image's rows of the output arrays: ``boxes [M, 4]``, ``scores [M]``, ``keypoints [M, K, 3]``.

        Only the first ``num_detections`` rows are real; the rest pad the batch to its largest
        count and are dropped here (as views, without copying).
        """
        count = int(np.asarray(num_detections).reshape(-1)[0])
        rows = _check_rows(boxes, scores, keypoints)
        if not 0 <= count <= rows:
            raise ValueError(f"NUM_DETECTIONS is {count} but the outputs hold {rows} rows")
        return cls(image, width, height, boxes[:count], scores[:count], keypoints[:count], keypoint_names)


@dataclass(frozen=True)
class FailedImage:
    """An image the server (or the client) refused; ``to_dict`` keeps the JSON shape of :class:`ImagePoses`."""

    image: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "width": None, "height": None, "detections": [], "error": self.error}


ImageResult = ImagePoses | FailedImage


def to_coco_results(results: Iterable[ImageResult], image_ids: Iterable[int]) -> list[dict[str, Any]]:
    """COCO keypoint results (``[{"image_id", "category_id": 1, "keypoints", "score", "bbox"}]``) of many images.

    ``image_ids`` pairs with ``results`` in order; failed images contribute nothing.
    """
    rows: list[dict[str, Any]] = []
    for result, image_id in zip(results, image_ids, strict=True):
        if isinstance(result, ImagePoses):
            rows += result.to_coco(image_id)
    return rows


def poses_from_batch(
    names: Sequence[str],
    outputs: Mapping[str, NDArray[Any]],
    keypoint_names: tuple[str, ...] = (),
) -> list[ImagePoses]:
    """Split a response (``outputs`` by tensor name) into one :class:`ImagePoses` per image name.

    The image sizes come from the response's ``IMAGE_SIZE`` (width, height of the upright image the server
    decoded), so the client never reads image headers itself.
    """
    missing = [name for name in OUTPUT_NAMES if name not in outputs]
    if missing:
        raise ValueError(f"the response lacks output(s) {missing}")
    counts, boxes, scores, keypoints, sizes = (
        outputs[name] for name in (NUM_DETECTIONS, BOXES, SCORES, KEYPOINTS, IMAGE_SIZE)
    )
    if len(counts) != len(names) or len(sizes) != len(names):
        raise ValueError(f"sent {len(names)} images but the response holds {len(counts)}")
    return [
        ImagePoses.from_outputs(
            name, int(sizes[i][0]), int(sizes[i][1]), counts[i], boxes[i], scores[i], keypoints[i], keypoint_names
        )
        for i, name in enumerate(names)
    ]


@dataclass(frozen=True)
class ModelMetadata:
    """What the served ensemble says about itself through its config ``parameters`` (all strings there)."""

    name: str
    keypoint_names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]
    max_batch_size: int
    parameters: Mapping[str, str] = field(default_factory=dict)
    # The ensemble's input: "IMAGE" (encoded images) or "PIXELS" (raw RGB arrays, the NAME_pixels ensembles).
    input_name: str = "IMAGE"

    @property
    def is_pose_model(self) -> bool:
        """Whether the config says it is a pose model (it carries keypoint names) — how discovery tells them apart."""
        return "keypoint_names" in self.parameters

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

    @property
    def request_defaults(self) -> dict[str, int | float]:
        """The model's own value of each request parameter whose default it states (``default.NAME``)."""
        stated = {name: _config_number(self.parameters.get(f"default.{name}")) for name in REQUEST_PARAMETERS}
        return {name: value for name, value in stated.items() if value is not None}

    @property
    def request_limits(self) -> dict[str, float | None]:
        """Each per-model bound a request parameter names (its ``limit``) as the model states it
        (``default.LIMIT_limit``; None when it does not): what ``contract.request_parameters`` checks against."""
        names = {declared.limit for declared in REQUEST_PARAMETERS.values() if declared.limit}
        return {name: _config_number(self.parameters.get(f"default.{name}_limit")) for name in sorted(names)}

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
            input_name=_first_input_name(config),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input": self.input_name,
            "family": self.family,
            "description": self.description,
            "max_batch_size": self.max_batch_size,
            "keypoint_names": list(self.keypoint_names),
            "skeleton": [list(pair) for pair in self.skeleton],
        }


def _first_input_name(config: Mapping[str, Any]) -> str:
    inputs = config.get("input") or [{}]
    return str(inputs[0].get("name", "IMAGE")) if isinstance(inputs, list) and inputs else "IMAGE"


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
    return Keypoint(x, y, conf)


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


def _config_number(text: str | None) -> int | float | None:
    """A config parameter's number (``"100"`` -> 100, ``"0.5"`` -> 0.5); None when absent or not a number."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return int(value) if value.is_integer() and "." not in text else value
