"""The export gate: the served graph must reproduce its PyTorch reference on real photos, or it is not written.

Two checks. The unified graph (float input, every anchor) against PyTorch anchor by anchor, then the served graph
(uint8 canvas in, top-k out; ONNX Runtime and the OpenVINO IR) against the reference's own top-k rows.

Tolerances follow from what the served result can tolerate (:data:`SERVED_BOUNDS`, the bounds the parity tests
hold the served poses to) divided by :data:`SAFETY_FACTOR`, not from a guess at float32 noise: a legitimate
checkpoint with large logits moves scores by a few 1e-5 between runtimes, which is harmless. Every report gives
the margin (tolerance / measured); ``build --parity-tolerance KEY=VALUE`` overrides one (docs in
build_engines/README.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from posetriton.contract import BOX_SCORE_COLUMNS, CANDIDATES, CANVAS, SCORE_COLUMN
from posetriton.images import decode_image
from posetriton.processing import letterbox, to_network_input
from posetriton.spec import LetterboxSpec

if TYPE_CHECKING:  # the comparisons below are numpy-only, so the tests import them without the export tools
    import onnx
    import onnxruntime as ort

logger = logging.getLogger(__name__)

# What the served poses are held to (tests/test_parity.py): coordinates in input pixels, scores as probabilities.
SERVED_BOUNDS: dict[str, float] = {"boxes": 0.05, "scores": 1e-3, "keypoints_xy": 0.05, "keypoint_conf": 1e-3}
# The export gate keeps a tenth of each bound, so export error alone can never use up a served bound.
SAFETY_FACTOR = 10.0
TOLERANCES: dict[str, float] = {key: bound / SAFETY_FACTOR for key, bound in SERVED_BOUNDS.items()}
# Boxes and keypoints are compared only on anchors whose reference person score reaches this. Below it the
# geometry is never served and sits at float32's noise floor: on the trained yolo11n-pose, PyTorch float32
# itself differs from float64 by 1.7e-3 px there, but by <= 4e-4 px on anchors scoring >= 0.01.
PARITY_SCORE_FLOOR = 0.01

# A function from a float input batch [B, 3, S, S] to reference candidates [B, A, W].
Reference = Callable[[np.ndarray], np.ndarray]


class ParityError(RuntimeError):
    """An exported graph does not reproduce its reference within the tolerances."""


@dataclass
class ExportResult:
    """What an export produced and how closely the exported graphs follow PyTorch.

    ``parity`` (ONNX Runtime, served graph) and ``openvino_parity`` (the IR, f32) are the enforced numbers:
    max |difference| from PyTorch over every input on the top-k rows. ``diagnostics`` adds the unified graph on
    every anchor, OpenVINO against ONNX Runtime, the tolerances used and the margins.
    """

    onnx_path: Path  # the served ONNX: uint8 canvas in, top-k candidates out, dynamic batch
    parity: dict[str, float]
    extra_files: dict[str, Path]  # checkpoint (YOLO-NAS), static_onnx (Ultralytics), openvino_xml, openvino_bin
    openvino_parity: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)


def tolerances(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """The gate's tolerances, with user overrides (unknown keys are refused)."""
    unknown = sorted(set(overrides or {}) - set(TOLERANCES))
    if unknown:
        raise ValueError(f"unknown parity tolerance(s) {unknown}; known: {sorted(TOLERANCES)}")
    return {**TOLERANCES, **(overrides or {})}


def parity_canvases(photos: Sequence[Path], spec: LetterboxSpec) -> list[np.ndarray]:
    """Every photo at batch 1, then the first two as one batch of 2: uint8 ``[B, S, S, 3]`` canvases, letterboxed
    by the served code itself, exactly what the preprocess step hands the network."""
    check_photos(photos)
    singles = [letterbox(decode_image(Path(p).read_bytes(), spec.max_pixels), spec)[0][None] for p in photos]
    return [*singles, np.concatenate([singles[0], singles[1 % len(singles)]], axis=0)]


def top_k_rows(candidates: np.ndarray, k: int) -> np.ndarray:
    """``[B, A, W]`` -> the ``k`` rows with the highest score per image, sorted (ties: lower anchor first), as
    the served graph's TopK orders them."""
    order = np.argsort(-candidates[..., SCORE_COLUMN], axis=1, kind="stable")[:, :k]
    return np.take_along_axis(candidates, order[..., None], axis=1)


def verify_export(
    unified: onnx.ModelProto,
    served_path: Path,
    canvases: Sequence[np.ndarray],
    spec: LetterboxSpec,
    reference: Reference,
    num_keypoints: int,
    tolerance_overrides: Mapping[str, float] | None = None,
) -> ExportResult:
    """Unified graph vs PyTorch on every anchor, then the served ONNX and its OpenVINO IR vs PyTorch's top-k.

    OpenVINO is held to PyTorch rather than to ONNX Runtime: two independent float32 implementations differ by
    the sum of their errors. Raises :class:`ParityError` on any miss.
    """
    import onnxruntime as ort

    from build_engines.onnx_graph import FLOAT_INPUT_NAME
    from build_engines.openvino_ir import compile_f32, convert_to_openvino

    limits = tolerances(tolerance_overrides)
    floats = [to_network_input(batch, spec) for batch in canvases]
    expected_all = [reference(batch) for batch in floats]

    unified_session = ort.InferenceSession(unified.SerializeToString(), providers=["CPUExecutionProvider"])
    unified_out = [unified_session.run([CANDIDATES], {FLOAT_INPUT_NAME: batch})[0] for batch in floats]
    unified_parity = candidate_differences(expected_all, unified_out, num_keypoints, PARITY_SCORE_FLOOR)
    enforce("unified ONNX (every anchor) vs PyTorch", unified_parity, limits)

    session = ort.InferenceSession(str(served_path), providers=["CPUExecutionProvider"])
    served_out = [session.run([CANDIDATES], {CANVAS: batch})[0] for batch in canvases]
    k = served_out[0].shape[1]
    expected = [top_k_rows(batch, k) for batch in expected_all]
    parity = top_k_differences(expected, served_out, num_keypoints, limits["scores"])
    enforce(f"ONNX Runtime {served_path.name} (top-{k}) vs PyTorch", parity, limits)

    xml_path = convert_to_openvino(served_path, served_path.with_suffix(".xml"))
    compiled = compile_f32(xml_path)
    openvino_out = [np.asarray(compiled({0: batch})[compiled.output(0)]) for batch in canvases]
    openvino_parity = top_k_differences(expected, openvino_out, num_keypoints, limits["scores"])
    enforce(f"OpenVINO {xml_path.name} (top-{k}) vs PyTorch", openvino_parity, limits)
    return ExportResult(
        onnx_path=served_path,
        parity=parity,
        extra_files={"openvino_xml": xml_path, "openvino_bin": xml_path.with_suffix(".bin")},
        openvino_parity=openvino_parity,
        diagnostics={
            "unified_onnxruntime_vs_pytorch": unified_parity,
            "unified_onnxruntime_vs_pytorch_all_anchors": candidate_differences(
                expected_all, unified_out, num_keypoints
            ),
            "openvino_vs_onnxruntime": top_k_differences(served_out, openvino_out, num_keypoints, limits["scores"]),
            "tolerances": limits,
            "margins": {key: margin(limits[key], max(parity[key], openvino_parity[key])) for key in limits},
        },
    )


def margin(tolerance: float, measured: float) -> float:
    """How many times the measured difference fits in the tolerance (inf for an exact match)."""
    return math.inf if measured == 0 else tolerance / measured


def candidate_differences(
    expected: Sequence[np.ndarray], actual: Sequence[np.ndarray], num_keypoints: int, score_floor: float = 0.0
) -> dict[str, float]:
    """Largest |difference| per quantity over all batches; NaN, infinities and shape mismatches count as inf.

    Scores are compared on every row. Boxes and keypoints only on rows whose expected person score is at
    least ``score_floor``: the others can never be served, and their geometry sits at float32's noise floor.
    """
    worst = dict.fromkeys(TOLERANCES, 0.0)
    for want, got in zip(expected, actual, strict=True):
        if want.shape != got.shape:
            return dict.fromkeys(TOLERANCES, math.inf)
        selected = want[..., SCORE_COLUMN] >= score_floor
        for key, (expected_values, actual_values) in _split(want, got, num_keypoints).items():
            keep = Ellipsis if key == "scores" else selected
            diff = np.abs(expected_values[keep].astype(np.float64) - actual_values[keep].astype(np.float64))
            value = float(diff.max(initial=0.0)) if np.isfinite(diff).all() else math.inf
            worst[key] = max(worst[key], value)
    return worst


def top_k_differences(
    expected: Sequence[np.ndarray], actual: Sequence[np.ndarray], num_keypoints: int, score_tolerance: float
) -> dict[str, float]:
    """Compare two top-k outputs row by row where the rank is unambiguous.

    Scores are compared sorted, on every rank (a near-tie swapping two rows does not change the sorted values).
    Geometry is compared on the ranks whose expected score is separated from both neighbours by more than
    ``score_tolerance`` (elsewhere the other runtime may legitimately order the near-tied rows the other way),
    and only above :data:`PARITY_SCORE_FLOOR`.
    """
    worst = dict.fromkeys(TOLERANCES, 0.0)
    for want, got in zip(expected, actual, strict=True):
        if want.shape != got.shape:
            return dict.fromkeys(TOLERANCES, math.inf)
        scores = want[..., SCORE_COLUMN].astype(np.float64)
        gaps = np.abs(np.diff(scores, axis=1))
        inf = np.full((len(scores), 1), np.inf)
        separated = (np.concatenate([inf, gaps], axis=1) > score_tolerance) & (
            np.concatenate([gaps, inf], axis=1) > score_tolerance
        )
        rows = separated & (scores >= PARITY_SCORE_FLOOR)
        for key, (want_values, got_values) in _split(want, got, num_keypoints).items():
            if key == "scores":
                diff = np.abs(np.sort(want_values, axis=1) - np.sort(got_values, axis=1))
            else:
                diff = np.abs(want_values[rows].astype(np.float64) - got_values[rows].astype(np.float64))
            value = float(diff.max(initial=0.0)) if np.isfinite(diff).all() else math.inf
            worst[key] = max(worst[key], value)
    return worst


def _split(want: np.ndarray, got: np.ndarray, num_keypoints: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pair up the compared quantities: boxes, person score, keypoint xy and keypoint confidence."""

    def keypoints(candidates: np.ndarray) -> np.ndarray:
        return candidates[..., BOX_SCORE_COLUMNS:].reshape(*candidates.shape[:-1], num_keypoints, 3)

    return {
        "boxes": (want[..., :4], got[..., :4]),
        "scores": (want[..., SCORE_COLUMN], got[..., SCORE_COLUMN]),
        "keypoints_xy": (keypoints(want)[..., :2], keypoints(got)[..., :2]),
        "keypoint_conf": (keypoints(want)[..., 2], keypoints(got)[..., 2]),
    }


def enforce(what: str, differences: Mapping[str, float], limits: Mapping[str, float] = TOLERANCES) -> None:
    failures = {key: value for key, value in differences.items() if not value <= limits[key]}
    if failures:
        detail = ", ".join(f"{key} {differences[key]:.3g} > {limits[key]:g}" for key in failures)
        raise ParityError(
            f"{what}: {detail} (all max abs diffs: {dict(differences)}); if the checkpoint is known good, "
            "override with build --parity-tolerance KEY=VALUE"
        )
    logger.info("%s parity: %s", what, {key: f"{value:.3g}" for key, value in differences.items()})


def ort_session(path: Path) -> ort.InferenceSession:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_photos(photos: Sequence[Path]) -> None:
    if not photos:
        raise ValueError("at least one photo is needed for the parity checks")
    missing = [str(path) for path in photos if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"photos not found: {missing}")
