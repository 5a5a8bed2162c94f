"""COCO keypoint evaluation (OKS AP/AR) of a served model, with pycocotools.

``evaluate()`` sends every image of a COCO ``person_keypoints`` annotation file through the
server, turns the poses into COCO results and runs pycocotools' ``COCOeval(iouType="keypoints")``
on them. pycocotools is optional (``pip install pycocotools``); only this module needs it.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from posetriton.core.contract import Thresholds, request_parameters

from ._core import DEFAULT_IN_FLIGHT
from .grpc_client import PoseClient
from .inputs import sdk_arguments
from .results import ImagePoses
from .streaming import Frame

# COCOeval.stats of iouType "keypoints", in order.
STAT_NAMES = ("AP", "AP50", "AP75", "AP_medium", "AP_large", "AR", "AR50", "AR75", "AR_medium", "AR_large")
# Ultralytics and super-gradients validate with a very low score threshold: AP integrates over all scores.
EVAL_CONF = 0.001
EVAL_THRESHOLDS = Thresholds(conf=EVAL_CONF)  # the other thresholds: the model's


class EvaluationError(ValueError):
    """The annotations or images cannot be evaluated; the message says why."""


@dataclass(frozen=True)
class EvalResult:
    """The ten COCOeval numbers (``stats``, named by ``STAT_NAMES``), pycocotools' printed table, and the results."""

    stats: tuple[float, ...]
    summary: str
    detections: list[dict[str, Any]] = field(repr=False)
    images: int = 0
    failed: tuple[str, ...] = ()

    @property
    def ap(self) -> float:
        return self.stats[0]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(STAT_NAMES, self.stats, strict=True))


def load_annotations(path: str | PathLike[str]) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"cannot read annotations {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(key in data for key in ("images", "annotations", "categories")):
        raise EvaluationError(f"{path} is not a COCO annotation file (needs images, annotations, categories)")
    return data


def coco_keypoint_eval(annotations: Mapping[str, Any], detections: Sequence[Mapping[str, Any]]) -> EvalResult:
    """Run pycocotools' keypoint evaluation of ``detections`` (COCO results) against ``annotations``."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise EvaluationError("evaluation needs pycocotools: pip install pycocotools") from exc

    images = len(annotations.get("images", []))
    noise = io.StringIO()
    with contextlib.redirect_stdout(noise):
        ground_truth = COCO()
        ground_truth.dataset = json.loads(json.dumps(annotations))  # pycocotools mutates what it is given
        ground_truth.createIndex()
        if not detections:
            empty = tuple(0.0 for _ in STAT_NAMES)
            return EvalResult(empty, "no detections: every AP and AR is 0\n", [], images)
        results = ground_truth.loadRes([dict(d) for d in detections])
        evaluator = COCOeval(ground_truth, results, iouType="keypoints")
        evaluator.evaluate()
        evaluator.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        evaluator.summarize()
    stats = tuple(float(v) for v in evaluator.stats)
    return EvalResult(stats, table.getvalue(), [dict(d) for d in detections], images)


def evaluate(
    client: PoseClient,
    annotations_path: str | PathLike[str],
    images_dir: str | PathLike[str],
    *,
    thresholds: Thresholds | None = None,
    in_flight: int = DEFAULT_IN_FLIGHT,
    progress: bool = False,
    **parameters: Any,
) -> EvalResult:
    """Predict every annotated image (``images_dir / file_name``) through ``client`` and evaluate the poses.

    ``thresholds``, then request ``parameters`` by wire name (``conf=0.01``), over :data:`EVAL_THRESHOLDS`;
    ContractError (a ValueError) names a value out of range. Images the server refuses are reported in
    ``failed`` and count as images without detections.
    """
    arguments = sdk_arguments(request_parameters(EVAL_THRESHOLDS, thresholds, **parameters))
    annotations = load_annotations(annotations_path)
    root = Path(images_dir)
    frames = []
    for index, image in enumerate(annotations["images"]):
        path = root / str(image["file_name"])
        if not path.is_file():
            raise EvaluationError(f"image {image['file_name']!r} (id {image['id']}) is not in {root}")
        frames.append((int(image["id"]), Frame(image=path, name=str(path), index=index)))
    detections: list[dict[str, Any]] = []
    failed: list[str] = []
    ids = dict((frame.index, image_id) for image_id, frame in frames)
    for item in client.stream(
        [frame for _, frame in frames], in_flight=in_flight, progress=progress, **arguments,
        total=len(frames),
    ):  # fmt: skip
        if isinstance(item.result, ImagePoses):
            detections += item.result.to_coco(ids[item.frame.index])
        else:
            failed.append(f"{item.result.image}: {item.result.error}")
    result = coco_keypoint_eval(annotations, detections)
    return EvalResult(result.stats, result.summary, result.detections, len(frames), tuple(failed))
