"""YOLO-NAS Pose (super-gradients 3.7.1) -> the unified candidates graph, with its PyTorch reference.

Weights come from exactly one source: a super-gradients checkpoint, a URL (downloaded once), or a seed for
deterministic random weights whose scores spread over (0, 1) (see :func:`seeded_yolo_nas_pose`), saved as a
super-gradients checkpoint so a reference can run super-gradients' own ``predict()`` on exactly the exported
weights.
"""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from build_engines.onnx_graph import (
    FLOAT_INPUT_NAME,
    OUTPUT_NAME,
    GraphContractError,
    check_rank,
    clean_and_check,
    finish_unified,
    int64_constant,
    layer,
)
from build_engines.photos import network_batch, sample_photos
from build_engines.registry import OPSET, ExportOptions, FamilyExport
from posetriton.core.contract import candidate_width
from posetriton.core.spec import LetterboxSpec
from posetriton.server.repository import ServedModel

DOWNLOAD_TIMEOUT_S = 60
YOLO_NAS_VARIANTS = ("n", "s", "m", "l")

# Seeded YOLO-NAS Pose re-initialisation (see seeded_yolo_nas_pose).
BATCHNORM_SHIFT = 4.0
REGRESSION_SCALE = 0.3
PERSON_READOUT_GAIN = 1.5
KEYPOINT_READOUT_GAIN = 0.5
PERSON_POSITIVE_FRACTION = 0.007
DEAD_CHANNEL_RELATIVE_STD = 1e-2
PERSON_CHANNEL = 0


class WeightsDownloadError(RuntimeError):
    """Published weights could not be downloaded."""


def export(model: ServedModel, out_dir: Path, options: ExportOptions) -> FamilyExport:
    """Build ``model.source["variant"]`` with its weights and export the unified graph (float input, every anchor)."""
    name = yolo_nas_pose_name(model.source["variant"])
    _check_single_weights_source(name, options.checkpoint, options.weights_url, options.seed)
    spec = model.letterbox
    if options.seed is not None:
        network = seeded_yolo_nas_pose(name, options.seed, spec, num_keypoints=model.postprocess.num_keypoints)
        weights_file = save_yolo_nas_checkpoint(network, name, out_dir / f"{name}_seed{options.seed}.pth", spec)
    else:
        if options.weights_url is not None:
            weights_file = download_weights(options.weights_url, out_dir / "downloads")
        else:
            weights_file = Path(options.checkpoint)  # type: ignore[arg-type]  # exactly one source was checked
        network = load_yolo_nas_pose(name, weights_file, model.postprocess.num_keypoints)
    size = spec.input_size
    network.eval()
    network.prep_model_for_conversion(input_size=[1, 3, size, size])
    with tempfile.TemporaryDirectory(prefix="yolo_nas_export_") as tmp:
        raw_path = Path(tmp) / "raw.onnx"
        _torch_export_yolo_nas(network, raw_path, size)
        unified = clean_and_check(
            unify_yolo_nas_outputs(onnx.load(str(raw_path)), size, model.num_anchors, model.postprocess.num_keypoints)
        )
    network_float64 = copy.deepcopy(network).double()
    return FamilyExport(
        unified=unified,
        reference=lambda batch: yolo_nas_candidates(_yolo_nas_decoded(network, batch)),
        reference_float64=lambda batch: yolo_nas_candidates(_yolo_nas_decoded(network_float64, batch)),
        source=_describe_source(options.checkpoint, options.weights_url, options.seed),
        extra_files={"checkpoint": weights_file},
    )


def yolo_nas_pose_name(variant: str) -> str:
    """``"n"`` or ``"yolo_nas_pose_n"`` -> ``"yolo_nas_pose_n"``; anything else is refused with the choices."""
    short = variant.lower().removeprefix("yolo_nas_pose_")
    if short not in YOLO_NAS_VARIANTS:
        raise ValueError(f"unknown YOLO-NAS Pose variant {variant!r}; choose one of {', '.join(YOLO_NAS_VARIANTS)}")
    return f"yolo_nas_pose_{short}"


def load_yolo_nas_pose(name: str, checkpoint: Path, num_keypoints: int = 17) -> nn.Module:
    """Build ``name`` and load a super-gradients checkpoint (a dict with ``"net"``) into it."""
    from super_gradients.training import models

    if not checkpoint.is_file():
        raise FileNotFoundError(f"YOLO-NAS Pose checkpoint not found: {checkpoint}")
    return models.get(name, num_classes=num_keypoints, checkpoint_path=str(checkpoint))


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
    name: str,
    seed: int,
    letterbox: LetterboxSpec,
    calibration_photos: Sequence[Path] | None = None,
    num_keypoints: int = 17,
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
        model = models.get(name, num_classes=num_keypoints)
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


def save_yolo_nas_checkpoint(model: nn.Module, name: str, path: Path, letterbox: LetterboxSpec) -> Path:
    """Save ``{"net": state_dict}`` and prove super-gradients loads it back into a model with identical outputs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"net": model.state_dict()}, path)
    reloaded = load_yolo_nas_pose(name, path, int(model.num_classes) if hasattr(model, "num_classes") else 17).eval()
    size = letterbox.input_size
    probe = torch.linspace(0, 1, 3 * size * size).reshape(1, 3, size, size)
    model.eval()
    expected, actual = _yolo_nas_decoded(model, probe.numpy()), _yolo_nas_decoded(reloaded, probe.numpy())
    if not all(torch.equal(a, b) for a, b in zip(expected, actual, strict=True)):
        raise RuntimeError(f"checkpoint {path} does not reproduce the model it was saved from")
    return path


def yolo_nas_candidates(decoded: Sequence[torch.Tensor]) -> np.ndarray:
    """super-gradients' decoded outputs -> ``[B, A, 5 + 3K]`` candidates, the layout the unified graph produces."""
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


def _torch_export_yolo_nas(model: nn.Module, path: Path, input_size: int) -> None:
    """TorchScript-based export (dynamo=False): tracing returns only the four decoded outputs."""
    names = ["boxes_xyxy", "scores", "keypoints_xy", "keypoint_scores"]
    dynamic_axes = {name: {0: "batch"} for name in [FLOAT_INPUT_NAME, *names]}
    example = torch.zeros(2, 3, input_size, input_size)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[FLOAT_INPUT_NAME],
            output_names=names,
            dynamic_axes=dynamic_axes,
        )


def unify_yolo_nas_outputs(
    model: onnx.ModelProto, input_size: int, num_anchors: int, num_keypoints: int
) -> onnx.ModelProto:
    """Merge super-gradients' four decoded YOLO-NAS Pose outputs into ``candidates``.

    Expects the outputs in the order super-gradients' traced forward returns them: boxes xyxy ``[B, A, 4]``,
    person scores ``[B, A, 1]``, keypoint xy ``[B, A, K, 2]`` and keypoint scores ``[B, A, K]``; scores are already
    sigmoided and all coordinates are in input pixels, so only the layout changes.
    """
    graph = gs.import_onnx(model)
    if len(graph.outputs) != 4:
        raise GraphContractError(f"YOLO-NAS Pose export must have 4 outputs, got {[t.name for t in graph.outputs]}")
    boxes, scores, keypoint_xy, keypoint_scores = graph.outputs
    check_rank(boxes, 3)
    check_rank(scores, 3)
    check_rank(keypoint_xy, 4)
    check_rank(keypoint_scores, 3)

    axis = int64_constant("unify_last_axis", [-1])
    keypoint_conf = layer(graph, "Unsqueeze", [keypoint_scores, axis], "unify_keypoint_conf")  # [B, A, K, 1]
    keypoints = layer(graph, "Concat", [keypoint_xy, keypoint_conf], "unify_keypoints", axis=-1)  # [B, A, K, 3]
    # Reshape's 0 copies batch and anchors from the input, so the batch stays dynamic.
    flat_shape = int64_constant("unify_flat_shape", [0, 0, -1])
    keypoints_flat = layer(graph, "Reshape", [keypoints, flat_shape], "unify_keypoints_flat")  # [B, A, 3K]
    candidates = layer(graph, "Concat", [boxes, scores, keypoints_flat], OUTPUT_NAME, axis=-1)
    return finish_unified(graph, candidates, model, (input_size, num_anchors, candidate_width(num_keypoints)))
