"""The export gate: the served graph must reproduce its PyTorch reference on real photos, or it is not written.

Two checks. The unified graph (float input, every anchor) against PyTorch anchor by anchor, then the served graph
(uint8 canvas in, top-k out; ONNX Runtime and the OpenVINO IR) against the reference's own top-k rows.

Every bound is measured, never guessed. A float32 implementation of a network (PyTorch, ONNX Runtime, OpenVINO, each
with kernels chosen per instruction set: AVX2, AVX-512, AMX) differs from the exact result by its rounding, and how
much depends on the network and its inputs, not on the CPU. The exact result is the same PyTorch network run in
float64 on the same inputs; PyTorch float32's own distance from it (:func:`float32_noise`) is the scale, and the
bound is :data:`FLOAT32_MARGIN` times it (:func:`noise_bounds`). Every exported graph is compared with the float64
result. Every report gives the noise, the bounds and the margin (bound / measured); ``build --parity-tolerance
KEY=VALUE`` overrides one bound (docs in build_engines/README.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from posetriton.core.contract import BOX_SCORE_COLUMNS, CANDIDATES, CANVAS, SCORE_COLUMN
from posetriton.core.images import decode_image
from posetriton.core.processing import letterbox, to_network_input
from posetriton.core.spec import LetterboxSpec

if TYPE_CHECKING:  # the comparisons below are numpy-only, so the tests import them without the export tools
    import onnx
    import onnxruntime as ort

logger = logging.getLogger(__name__)

# The compared quantities: box corners and keypoint xy in network-input pixels, person score and keypoint
# confidence as probabilities.
QUANTITIES = ("boxes", "scores", "keypoints_xy", "keypoint_conf")
# bound = FLOAT32_MARGIN x (PyTorch float32 - float64). Another float32 implementation's own error may be a few
# times PyTorch's (other summation orders and blockings). |OpenVINO f32 - float64| / noise, measured on the test
# photos (tests/test_parity.py, AMD EPYC with AVX-512, 2026-12-04; docs/precision.md): <= 3.5 for yolo11n-pose,
# <= 1.9 for the seeded YOLO-NAS Pose N. On a 2-vCPU Intel Xeon with AVX-512 and AMX, the figures that failed the
# former fixed 1e-3 px bound (boxes 7.3e-4, keypoints 1.4e-3 px, scores 3.6e-6 from PyTorch float32) are at most
# 5.0x, 6.1x and 2.0x the noise from float64. 16 keeps 2.6x over the worst seen, and is still far below what a
# real export fault moves (bf16 by mistake: pixels; a wrong letterbox: more).
FLOAT32_MARGIN = 16.0
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
    max |difference| from PyTorch float64 over every input on the top-k rows. ``diagnostics`` adds the float32
    noise, the unified graph on every anchor, OpenVINO against ONNX Runtime, the tolerances used and the margins.
    """

    onnx_path: Path  # the served ONNX: uint8 canvas in, top-k candidates out, dynamic batch
    parity: dict[str, float]
    extra_files: dict[str, Path]  # checkpoint (YOLO-NAS), static_onnx (Ultralytics), openvino_xml, openvino_bin
    openvino_parity: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)


def float32_noise(exact: Sequence[np.ndarray], float32: Sequence[np.ndarray], num_keypoints: int) -> dict[str, float]:
    """How far PyTorch float32 is from the same network in float64, on top-k rows (``[B, k, W]`` each).

    Never below the float32 spacing of the largest value compared (an exact match still rounds once on output).
    """
    scores_only = top_k_differences(exact, float32, num_keypoints, math.inf)["scores"]
    gap = FLOAT32_MARGIN * max(scores_only, float(np.spacing(np.float32(1.0))))
    measured = top_k_differences(exact, float32, num_keypoints, gap)
    resolution = dict.fromkeys(QUANTITIES, 0.0)
    for want in exact:
        for key, (values, _) in _split(want, want, num_keypoints).items():
            largest = float(np.abs(values).max(initial=0.0))
            resolution[key] = max(resolution[key], float(np.spacing(np.float32(largest))))
    return {key: max(measured[key], resolution[key]) for key in QUANTITIES}


def noise_bounds(noise: Mapping[str, float], overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """:data:`FLOAT32_MARGIN` x the measured noise, with user overrides (unknown keys are refused)."""
    unknown = sorted(set(overrides or {}) - set(QUANTITIES))
    if unknown:
        raise ValueError(f"unknown parity tolerance(s) {unknown}; known: {sorted(QUANTITIES)}")
    return {**{key: FLOAT32_MARGIN * noise[key] for key in QUANTITIES}, **(overrides or {})}


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
    reference_float64: Reference,
    num_keypoints: int,
    tolerance_overrides: Mapping[str, float] | None = None,
) -> ExportResult:
    """Unified graph vs PyTorch float64 on every anchor, then the served ONNX and its IR vs float64's top-k.

    The bounds are :data:`FLOAT32_MARGIN` x PyTorch float32's own distance from float64 on these inputs. Raises
    :class:`ParityError` on any miss.
    """
    import onnxruntime as ort

    from build_engines.onnx_graph import FLOAT_INPUT_NAME
    from build_engines.openvino_ir import compile_f32, convert_to_openvino

    floats = [to_network_input(batch, spec) for batch in canvases]
    exact_all = [reference_float64(batch.astype(np.float64)) for batch in floats]
    float32_all = [reference(batch) for batch in floats]

    session = ort.InferenceSession(str(served_path), providers=["CPUExecutionProvider"])
    served_out = [session.run([CANDIDATES], {CANVAS: batch})[0] for batch in canvases]
    k = served_out[0].shape[1]
    exact = [top_k_rows(batch, k) for batch in exact_all]
    noise = float32_noise(exact, [top_k_rows(batch, k) for batch in float32_all], num_keypoints)
    limits = noise_bounds(noise, tolerance_overrides)
    logger.info("float32 noise (PyTorch float32 vs float64): %s; bounds x%g", noise, FLOAT32_MARGIN)

    unified_session = ort.InferenceSession(unified.SerializeToString(), providers=["CPUExecutionProvider"])
    unified_out = [unified_session.run([CANDIDATES], {FLOAT_INPUT_NAME: batch})[0] for batch in floats]
    unified_parity = candidate_differences(exact_all, unified_out, num_keypoints, PARITY_SCORE_FLOOR)
    enforce("unified ONNX (every anchor) vs PyTorch float64", unified_parity, limits)

    parity = top_k_differences(exact, served_out, num_keypoints, limits["scores"])
    enforce(f"ONNX Runtime {served_path.name} (top-{k}) vs PyTorch float64", parity, limits)

    xml_path = convert_to_openvino(served_path, served_path.with_suffix(".xml"))
    compiled = compile_f32(xml_path)
    openvino_out = [np.asarray(compiled({0: batch})[compiled.output(0)]) for batch in canvases]
    openvino_parity = top_k_differences(exact, openvino_out, num_keypoints, limits["scores"])
    enforce(f"OpenVINO {xml_path.name} (top-{k}) vs PyTorch float64", openvino_parity, limits)
    return ExportResult(
        onnx_path=served_path,
        parity=parity,
        extra_files={"openvino_xml": xml_path, "openvino_bin": xml_path.with_suffix(".bin")},
        openvino_parity=openvino_parity,
        diagnostics={
            "float32_noise": noise,
            "unified_onnxruntime_vs_pytorch": unified_parity,
            "unified_onnxruntime_vs_pytorch_all_anchors": candidate_differences(exact_all, unified_out, num_keypoints),
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
    worst = dict.fromkeys(QUANTITIES, 0.0)
    for want, got in zip(expected, actual, strict=True):
        if want.shape != got.shape:
            return dict.fromkeys(QUANTITIES, math.inf)
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
    worst = dict.fromkeys(QUANTITIES, 0.0)
    for want, got in zip(expected, actual, strict=True):
        if want.shape != got.shape:
            return dict.fromkeys(QUANTITIES, math.inf)
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


def enforce(what: str, differences: Mapping[str, float], limits: Mapping[str, float]) -> None:
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
