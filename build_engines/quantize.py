"""INT8 by explicit quantization: a Q/DQ ONNX calibrated on real photos, gated against FP32 before it is kept.

TensorRT builds the INT8 engine from this Q/DQ graph (scales are part of the graph; no TensorRT calibrator, no
calibration cache), and ONNX Runtime runs the same graph on CPU, so the accuracy gate runs here, on the machine
that quantizes, before any GPU is involved:

1. :class:`PhotoCalibrationReader` letterboxes a directory of real photos (plus flips and crops) with the shared
   :func:`posetriton.core.processing.letterbox`, exactly as the served preprocess step does;
2. :func:`quantize_qdq` runs ``onnxruntime.quantization.quantize_static`` in QDQ format with TensorRT's
   constraints: symmetric signed INT8 (zero point 0) for activations and weights, per-channel weights, FP32
   weights behind Q->DQ pairs, biases left in float, Q/DQ only on the inputs of the quantized ops;
3. :func:`evaluate` runs FP32 and Q/DQ graphs on held-out photos, post-processes both with the shared
   :func:`posetriton.core.processing.postprocess`, matches detections and measures keypoint error (original-image px),
   score error and detection agreement; :func:`gate` fails the build above :class:`AccuracyLimits`.

The reader and the gate arithmetic need only numpy; ONNX Runtime is imported where it runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from posetriton.core.contract import CANDIDATES, CANVAS
from posetriton.core.processing import Poses, letterbox, postprocess
from posetriton.core.spec import LetterboxSpec, PostprocessSpec

logger = logging.getLogger(__name__)

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
INPUT_NAME = CANVAS  # uint8 [B, S, S, 3], letterboxed, decoded RGB order (the graph scales and transposes)
OUTPUT_NAME = CANDIDATES
# Ops whose inputs get Q/DQ. Conv is the bulk of the compute; MatMul (attention blocks), the decode arithmetic
# and the output layout stay in floating point (TensorRT runs them in FP16).
DEFAULT_OP_TYPES = ("Conv",)
# Kernel sizes above this count as spatial convolutions (see head_tail_convs).
POINTWISE = 1
# Centre and corner crops (fraction of each side kept) applied to calibration photos besides the flip.
CROP_FRACTIONS = (0.6,)


class AccuracyGateError(RuntimeError):
    """The quantized model departs from FP32 by more than the configured limits."""


# ------------------------------------------------------------------------------------------------ calibration


def list_photos(directory: Path) -> list[Path]:
    photos = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise FileNotFoundError(f"no photos ({', '.join(PHOTO_SUFFIXES)}) in {directory}")
    return photos


def augmented(image: np.ndarray, augment: bool = True) -> Iterator[np.ndarray]:
    """The photo, its mirror image, and crops (centre, top-left, bottom-right) at :data:`CROP_FRACTIONS`."""
    yield image
    if not augment:
        return
    yield np.ascontiguousarray(image[:, ::-1])
    height, width = image.shape[:2]
    for fraction in CROP_FRACTIONS:
        h, w = max(int(height * fraction), 1), max(int(width * fraction), 1)
        for top, left in ((height - h) // 2, (width - w) // 2), (0, 0), (height - h, width - w):
            yield np.ascontiguousarray(image[top : top + h, left : left + w])


class PhotoCalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over real photos, letterboxed by the served code.

    Implements the reader protocol (``get_next`` -> ``{"canvas": [B, S, S, 3] uint8}`` or ``None``, and
    ``rewind``): exactly what the served preprocess step hands the network; inputs are computed once, in a fixed
    order, so calibration is deterministic.
    """

    def __init__(
        self, photos: Sequence[Path], spec: LetterboxSpec, *, augment: bool = True, batch_size: int = 1
    ) -> None:
        from posetriton.core.images import decode_image

        if not photos:
            raise ValueError("calibration needs at least one photo")
        singles = []
        for path in photos:
            image = decode_image(Path(path).read_bytes(), spec.max_pixels)
            for variant in augmented(image, augment):
                canvas, _ = letterbox(variant, spec)
                singles.append(canvas[None])
        self.batches = [np.concatenate(singles[i : i + batch_size]) for i in range(0, len(singles), batch_size)]
        self.count = len(singles)
        self._position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._position >= len(self.batches):
            return None
        batch = self.batches[self._position]
        self._position += 1
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._position = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


# ------------------------------------------------------------------------------------------------ quantization


def head_tail_convs(model: Any) -> list[str]:
    """Names of the Conv nodes after which no spatial (kernel > 1) Conv follows: the heads' last layers.

    Their outputs become box distances, scores and keypoint offsets almost directly, so INT8 error there lands
    in the coordinates; they are a few percent of the compute and stay in floating point (FP16 in TensorRT).
    On yolo11n-pose this halves the median keypoint error of the Q/DQ model on held-out photos.
    """
    graph = model.graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name: init for init in graph.initializer}

    def spatial(node: Any) -> bool:
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        kernel = list(weight.dims[2:]) if weight is not None else []
        return not kernel or any(k > POINTWISE for k in kernel)

    reaches_spatial: dict[str, bool] = {}
    # Nodes are topologically sorted in a valid ONNX graph: walk backwards so consumers are resolved first.
    for node in reversed(graph.node):
        reaches_spatial[node.name] = any(
            (consumer.op_type == "Conv" and spatial(consumer)) or reaches_spatial.get(consumer.name, False)
            for output in node.output
            for consumer in consumers.get(output, [])
        )
    return [node.name for node in graph.node if node.op_type == "Conv" and not reaches_spatial[node.name]]


def quantize_qdq(
    fp32_onnx: Path,
    out_path: Path,
    reader: PhotoCalibrationReader,
    *,
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
    method: str = "minmax",
    per_channel: bool = True,
    keep_head_tail_float: bool = True,
) -> Path:
    """Write the TensorRT-ready Q/DQ model of ``fp32_onnx`` to ``out_path``, calibrated on ``reader``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise ValueError(f"calibration method must be one of {sorted(methods)}, got {method!r}")
    excluded = head_tail_convs(onnx.load(str(fp32_onnx), load_external_data=False)) if keep_head_tail_float else []
    reader.rewind()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qdq_") as tmp:
        partial = Path(tmp) / "model.qdq.onnx"
        quantize_static(
            str(fp32_onnx),
            str(partial),
            reader,  # the CalibrationDataReader protocol (get_next, rewind)
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            nodes_to_exclude=excluded,
            extra_options={
                "ActivationSymmetric": True,  # TensorRT: zero point 0, signed int8
                "WeightSymmetric": True,
                "AddQDQPairToWeight": True,  # FP32 weights -> Q -> DQ, the pattern TensorRT folds
                "QuantizeBias": False,  # TensorRT has no INT32 bias DQ; it fuses the float bias
                "OpTypesToExcludeOutputQuantization": list(op_types),  # Q/DQ on inputs only (TensorRT's rule)
            },
        )
        shutil.move(str(partial), out_path)
    return out_path


# ------------------------------------------------------------------------------------------------ accuracy gate


@dataclass(frozen=True)
class AccuracyLimits:
    """Largest accepted departure of the quantized model from FP32 on held-out photos.

    Keypoint errors are in original-image pixels over matched detections' keypoints whose FP32 confidence exceeds
    ``keypoint_confidence``; score error is the largest |person score difference| over matched detections;
    detection agreement is matched / max(FP32 detections, quantized detections) over all photos.
    """

    keypoint_error_p50_px: float = 3.0
    keypoint_error_p95_px: float = 20.0
    score_error: float = 0.1
    min_detection_agreement: float = 0.8
    keypoint_confidence: float = 0.5
    match_iou: float = 0.5


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes ``[N, 4]`` x ``[M, 4]``."""
    a, b = a.astype(np.float64)[:, None], b.astype(np.float64)[None]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_detections(reference: Poses, other: Poses, min_iou: float = 0.5) -> list[tuple[int, int]]:
    """Greedy one-to-one matching, best IoU pairs first; pairs below ``min_iou`` stay unmatched."""
    if not len(reference) or not len(other):
        return []
    iou = box_iou(reference.boxes, other.boxes)
    pairs = []
    used_ref: set[int] = set()
    used_other: set[int] = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        i, j = divmod(int(flat), iou.shape[1])
        if iou[i, j] < min_iou:
            break
        if i not in used_ref and j not in used_other:
            pairs.append((i, j))
            used_ref.add(i)
            used_other.add(j)
    return sorted(pairs)


def compare_poses(reference: Poses, other: Poses, limits: AccuracyLimits = AccuracyLimits()) -> dict[str, Any]:
    """One image: matched detections, per-keypoint errors (px) and per-detection score errors."""
    pairs = match_detections(reference, other, limits.match_iou)
    keypoint_errors: list[float] = []
    score_errors: list[float] = []
    for i, j in pairs:
        ref_kp, other_kp = reference.keypoints[i], other.keypoints[j]
        visible = ref_kp[:, 2] > limits.keypoint_confidence
        distance = np.linalg.norm(ref_kp[visible, :2].astype(np.float64) - other_kp[visible, :2], axis=-1)
        keypoint_errors.extend(float(d) for d in distance)
        score_errors.append(abs(float(reference.scores[i]) - float(other.scores[j])))
    return {
        "reference_detections": len(reference),
        "other_detections": len(other),
        "matched": len(pairs),
        "keypoint_errors": keypoint_errors,
        "score_errors": score_errors,
    }


def accuracy_report(comparisons: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-image comparisons into the gated figures."""
    keypoints = np.array([e for c in comparisons for e in c["keypoint_errors"]], dtype=np.float64)
    scores = np.array([e for c in comparisons for e in c["score_errors"]], dtype=np.float64)
    reference = sum(c["reference_detections"] for c in comparisons)
    other = sum(c["other_detections"] for c in comparisons)
    matched = sum(c["matched"] for c in comparisons)
    denominator = max(reference, other)
    return {
        "images": len(comparisons),
        "detections_reference": reference,
        "detections_quantized": other,
        "detections_matched": matched,
        "detection_agreement": matched / denominator if denominator else 1.0,
        "keypoints_compared": len(keypoints),
        "keypoint_error_p50_px": float(np.percentile(keypoints, 50)) if len(keypoints) else 0.0,
        "keypoint_error_p95_px": float(np.percentile(keypoints, 95)) if len(keypoints) else 0.0,
        "keypoint_error_max_px": float(keypoints.max()) if len(keypoints) else 0.0,
        "score_error_max": float(scores.max()) if len(scores) else 0.0,
    }


def gate_failures(report: dict[str, Any], limits: AccuracyLimits) -> list[str]:
    """Every limit the report exceeds, in words; empty when the quantized model passes."""
    failures = []
    checks = [
        ("keypoint_error_p50_px", limits.keypoint_error_p50_px, "px"),
        ("keypoint_error_p95_px", limits.keypoint_error_p95_px, "px"),
        ("score_error_max", limits.score_error, ""),
    ]
    for key, limit, unit in checks:
        value = report[key]
        if not (math.isfinite(value) and value <= limit):
            failures.append(f"{key} {value:.4g}{unit} > {limit:g}{unit}")
    if not report["detection_agreement"] >= limits.min_detection_agreement:
        failures.append(
            f"detection_agreement {report['detection_agreement']:.3f} < {limits.min_detection_agreement:g} "
            f"({report['detections_matched']} matched of {report['detections_reference']} FP32 / "
            f"{report['detections_quantized']} quantized)"
        )
    if report["detections_reference"] == 0:
        failures.append("the FP32 model detects nobody on the held-out photos: the gate would measure nothing")
    return failures


def gate(report: dict[str, Any], limits: AccuracyLimits) -> None:
    failures = gate_failures(report, limits)
    if failures:
        raise AccuracyGateError("INT8 accuracy gate failed: " + "; ".join(failures) + f" (report: {report})")


def evaluate(
    fp32_onnx: Path,
    quantized_onnx: Path,
    photos: Sequence[Path],
    letterbox_spec: LetterboxSpec,
    postprocess_spec: PostprocessSpec,
    limits: AccuracyLimits = AccuracyLimits(),
) -> dict[str, Any]:
    """Run both graphs (ONNX Runtime, CPU) on ``photos`` and compare their served poses."""
    import onnxruntime as ort

    from posetriton.core.images import decode_image

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for path in (fp32_onnx, quantized_onnx)
    ]
    comparisons = []
    for path in photos:
        canvas, transform = letterbox(decode_image(Path(path).read_bytes(), letterbox_spec.max_pixels), letterbox_spec)
        fp32, quantized = (
            postprocess(session.run([OUTPUT_NAME], {INPUT_NAME: canvas[None]})[0][0], transform, postprocess_spec)
            for session in sessions
        )
        comparisons.append({"photo": str(path), **compare_poses(fp32, quantized, limits)})
    return {**accuracy_report(comparisons), "per_photo": [_summary(c) for c in comparisons]}


def _summary(comparison: dict[str, Any]) -> dict[str, Any]:
    errors = comparison["keypoint_errors"]
    return {
        "photo": comparison["photo"],
        "detections": [comparison["reference_detections"], comparison["other_detections"], comparison["matched"]],
        "keypoint_error_max_px": max(errors, default=0.0),
    }


def quantize_and_gate(
    fp32_onnx: Path,
    out_path: Path,
    calibration_photos: Sequence[Path],
    holdout_photos: Sequence[Path],
    letterbox_spec: LetterboxSpec,
    postprocess_spec: PostprocessSpec,
    *,
    limits: AccuracyLimits = AccuracyLimits(),
    method: str = "minmax",
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
    augment: bool = True,
) -> dict[str, Any]:
    """Calibrate, quantize, gate; ``out_path`` (and ``out_path``.report.json) appear only if the gate passes.

    Raises :class:`AccuracyGateError` (with the figures) otherwise. Calibration and held-out photos must differ.
    """
    overlap = {Path(p).resolve() for p in calibration_photos} & {Path(p).resolve() for p in holdout_photos}
    if overlap:
        raise ValueError(f"held-out photos must not be calibration photos: {sorted(map(str, overlap))}")
    reader = PhotoCalibrationReader(calibration_photos, letterbox_spec, augment=augment)
    with tempfile.TemporaryDirectory(prefix="int8_") as tmp:
        candidate = quantize_qdq(fp32_onnx, Path(tmp) / out_path.name, reader, op_types=op_types, method=method)
        report = evaluate(fp32_onnx, candidate, holdout_photos, letterbox_spec, postprocess_spec, limits)
        report = {
            **report,
            "calibration": {"photos": [str(p) for p in calibration_photos], "inputs": reader.count, "method": method},
            "holdout_photos": [str(p) for p in holdout_photos],
            "limits": dataclasses.asdict(limits),
            "op_types": list(op_types),
            "float_convs": _float_convs(fp32_onnx),
        }
        gate(report, limits)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(candidate), out_path)
    report_path(out_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _float_convs(fp32_onnx: Path) -> list[str]:
    import onnx

    return head_tail_convs(onnx.load(str(fp32_onnx), load_external_data=False))


def report_path(qdq_onnx: Path) -> Path:
    return qdq_onnx.with_name(qdq_onnx.stem + ".report.json")
