"""``python -m build_engines``: export served models to ONNX + OpenVINO IR and write their Triton entries.

``build`` and ``quantize`` run in the export environment (super-gradients, ultralytics, torch, ONNX Runtime);
the serving environment never needs any of them. ``engines``, ``check-engines`` and ``gpu-entrypoint`` run on
the GPU node that serves (requirements/gpu.txt: TensorRT and typer).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from posetriton.server.repository import ServedModel, load_catalog, write_model

CATALOG = Path(__file__).with_name("models.toml")
SAMPLES = Path(__file__).resolve().parent.parent / "samples"

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def resolve_weights(reference: str) -> Path:
    """``package:DIST/relative/path`` -> the file inside an installed distribution; anything else is a path."""
    if not reference.startswith("package:"):
        return Path(reference)
    dist_name, _, relative = reference.removeprefix("package:").partition("/")
    try:
        path = Path(str(importlib.metadata.distribution(dist_name).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        raise typer.BadParameter(f"weights {reference}: package {dist_name!r} is not installed") from None
    if not path.exists():
        raise typer.BadParameter(f"weights {reference}: {path} does not exist")
    return path


def export_network(model: ServedModel, workdir: Path, photos: list[Path], options: dict[str, Any]) -> dict[str, Any]:
    """Export one model's network; returns the export report (files, parity figures, tolerances and margins)."""
    from build_engines.export import export_network as export
    from build_engines.registry import ExportOptions

    # A catalogue model with its own weights (``source.weights``) gets them resolved here; otherwise the family
    # module checks the source it was given (and says which ones it takes).
    weights_file = None
    if model.source.get("weights"):
        weights_file = resolve_weights(str(options.get("checkpoint") or model.source["weights"]))
    export_options = ExportOptions(
        checkpoint=None if weights_file else options.get("checkpoint"),
        weights_url=options.get("weights_url"),
        seed=options.get("seed"),
        weights_file=weights_file,
        tolerance_overrides=options.get("tolerances") or {},
    )
    try:
        result = export(model, workdir, photos, export_options)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return {
        "onnx": result.onnx_path,
        "parity": {
            "onnxruntime_vs_pytorch": result.parity,
            "openvino_vs_pytorch": result.openvino_parity,
            **result.diagnostics,
        },
        "extra_files": result.extra_files,
    }


def parse_tolerances(values: list[str]) -> dict[str, float]:
    """``["scores=3e-4"]`` -> ``{"scores": 3e-4}``; the keys are the parity gate's (build_engines/parity.py)."""
    parsed = {}
    for value in values:
        key, sep, number = value.partition("=")
        try:
            parsed[key.strip()] = float(number)
        except ValueError:
            raise typer.BadParameter(f"--parity-tolerance takes KEY=VALUE, got {value!r}") from None
        if not sep:
            raise typer.BadParameter(f"--parity-tolerance takes KEY=VALUE, got {value!r}")
    return parsed


@app.command()
def build(
    models: Annotated[list[str], typer.Argument(help="Catalogue names, e.g. yolo11n_pose yolo_nas_pose_n.")],
    repository: Annotated[Path, typer.Option(help="Triton model repository to write into.")] = Path("triton_models"),
    workdir: Annotated[Path, typer.Option(help="Where intermediate ONNX files and reports go.")] = Path("build/export"),
    checkpoint: Annotated[
        Path | None, typer.Option(help="Weights file in the family's own format (e.g. a .pth or .pt).")
    ] = None,
    weights_url: Annotated[
        str | None, typer.Option(help="URL of published weights to download (families that take one).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Deterministic random init (families that take one; for tests).")
    ] = None,
    photos: Annotated[Path, typer.Option(help="Folder of real photos used for the parity checks.")] = SAMPLES,
    catalog: Annotated[Path, typer.Option(help="Model catalogue (TOML).")] = CATALOG,
    parity_tolerance: Annotated[
        list[str] | None,
        typer.Option(
            help="Override one export-gate tolerance, KEY=VALUE (boxes, scores, keypoints_xy, keypoint_conf); "
            "repeatable. Defaults: a tenth of the served parity bounds."
        ),
    ] = None,
) -> None:
    """Export MODELS and write their ensemble, pre/postprocess and network entries into REPOSITORY."""
    known = load_catalog(catalog)
    unknown = [name for name in models if name not in known]
    if unknown:
        raise typer.BadParameter(f"unknown model(s) {unknown}; the catalogue has {sorted(known)}")
    photo_files = sorted(p for p in photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    options = {
        "checkpoint": checkpoint, "weights_url": weights_url, "seed": seed,
        "tolerances": parse_tolerances(parity_tolerance or []),
    }  # fmt: skip
    for name in models:
        model = known[name]
        out = workdir / name
        out.mkdir(parents=True, exist_ok=True)
        typer.echo(f"[{name}] exporting ({model.family}) ...")
        report = export_network(model, out, photo_files, options)
        files = report["extra_files"]
        network_files = {
            "model.onnx": report["onnx"],
            "model.xml": files["openvino_xml"],
            "model.bin": files["openvino_bin"],
        }
        write_model(model, repository, network_files)
        summary = {
            "model": name,
            "parity": report["parity"],
            "files": {k: str(v) for k, v in report["extra_files"].items()},
        }
        (repository / model.step("network") / "export_report.json").write_text(json.dumps(summary, indent=2) + "\n")
        typer.echo(f"[{name}] written to {repository}; parity: {report['parity']}")


@app.command()
def quantize(
    models: Annotated[list[str], typer.Argument(help="Catalogue names whose exported ONNX to quantize.")],
    calibration: Annotated[Path, typer.Option(help="Folder of real photos to calibrate on.")],
    holdout: Annotated[Path, typer.Option(help="Folder of other real photos for the accuracy gate.")],
    repository: Annotated[Path, typer.Option(help="Triton model repository holding NAME_network/1/model.onnx.")] = Path(
        "triton_models"
    ),
    method: Annotated[str, typer.Option(help="Calibration: minmax, entropy or percentile.")] = "minmax",
    max_keypoint_error_p50: Annotated[float, typer.Option(help="Gate: median keypoint error, px.")] = 3.0,
    max_keypoint_error_p95: Annotated[float, typer.Option(help="Gate: 95th percentile keypoint error, px.")] = 20.0,
    max_score_error: Annotated[float, typer.Option(help="Gate: largest person-score difference.")] = 0.1,
    min_detection_agreement: Annotated[float, typer.Option(help="Gate: matched / max(FP32, INT8) detections.")] = 0.8,
    augment: Annotated[bool, typer.Option(help="Add flips and crops of the calibration photos.")] = True,
    catalog: Annotated[Path, typer.Option(help="Model catalogue (TOML).")] = CATALOG,
) -> None:
    """INT8 Q/DQ ONNX (ONNX Runtime static quantization) -> NAME_network/1/model.qdq.onnx, if the gate passes."""
    from build_engines.quantize import AccuracyGateError, AccuracyLimits, list_photos, quantize_and_gate

    known = _known(catalog, models)
    limits = AccuracyLimits(
        keypoint_error_p50_px=max_keypoint_error_p50,
        keypoint_error_p95_px=max_keypoint_error_p95,
        score_error=max_score_error,
        min_detection_agreement=min_detection_agreement,
    )
    for name in models:
        model = known[name]
        version_dir = repository / model.step("network") / "1"
        try:
            report = quantize_and_gate(
                version_dir / "model.onnx",
                version_dir / "model.qdq.onnx",
                list_photos(calibration),
                list_photos(holdout),
                model.letterbox,
                model.postprocess,
                limits=limits,
                method=method,
                augment=augment,
            )
        except AccuracyGateError as exc:
            typer.echo(f"[{name}] {exc}", err=True)
            raise typer.Exit(1) from None
        figures = {k: v for k, v in report.items() if k.startswith(("keypoint", "score", "detection"))}
        typer.echo(f"[{name}] INT8 Q/DQ written to {version_dir / 'model.qdq.onnx'}; gate passed: {figures}")
        _echo_trtexec(version_dir / "model.qdq.onnx", "int8")


def _echo_trtexec(onnx_path: Path, precision: str) -> None:
    from build_engines.tensorrt_engine import BuildOptions, format_command, trtexec_command

    command = trtexec_command(onnx_path, onnx_path.with_name(f"model.{precision}.plan"), BuildOptions(precision))
    typer.echo(f"equivalent trtexec build (on the serving GPU): {format_command(command)}")


def _known(catalog: Path, models: list[str]) -> dict[str, ServedModel]:
    known = load_catalog(catalog)
    unknown = [name for name in models if name not in known]
    if unknown:
        raise typer.BadParameter(f"unknown model(s) {unknown}; the catalogue has {sorted(known)}")
    return known


def _models_in(repository: Path, known: dict[str, ServedModel], models: list[str] | None) -> list[str]:
    """The named models, or every catalogue model whose network is in the repository."""
    if models:
        return models
    present = [name for name, model in known.items() if (repository / model.step("network") / "1").is_dir()]
    if not present:
        raise typer.BadParameter(f"no exported model in {repository}")
    return present


def _device(gpu_name: str | None, compute_capability: str | None, tensorrt_version: str | None) -> Any:
    from build_engines.engine_cache import DeviceInfo, EngineMismatchError, detect_device

    if gpu_name and compute_capability and tensorrt_version:
        return DeviceInfo(gpu_name, compute_capability, tensorrt_version)
    try:
        detected = detect_device(tensorrt_version=tensorrt_version)
    except EngineMismatchError as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(2) from None
    return DeviceInfo(
        gpu_name or detected.gpu_name, compute_capability or detected.compute_capability, detected.tensorrt_version
    )


GPU_NAME = typer.Option("--gpu-name", help="Override the detected GPU name (default: nvidia-smi).")
COMPUTE_CAPABILITY = typer.Option("--compute-capability", help="Override the detected compute capability.")
TENSORRT_VERSION = typer.Option(
    "--tensorrt-version", help="TensorRT runtime version (default: $TRT_VERSION, else the tensorrt package)."
)


@app.command()
def engines(
    models: Annotated[list[str] | None, typer.Argument(help="Models (default: every model in the repository).")] = None,
    repository: Annotated[Path, typer.Option(help="Triton model repository.")] = Path("triton_models"),
    cache: Annotated[Path, typer.Option(help="Engine cache (a persistent volume on Kubernetes).")] = Path(
        "build/engine_cache"
    ),
    precision: Annotated[str, typer.Option(help="fp16, or int8 (needs model.qdq.onnx from `quantize`).")] = "fp16",
    min_batch: Annotated[int, typer.Option(help="Optimization profile: smallest batch.")] = 1,
    opt_batch: Annotated[int, typer.Option(help="Optimization profile: batch TensorRT tunes for.")] = 16,
    max_batch: Annotated[
        int | None, typer.Option(help="Optimization profile: largest batch (default: max_batch_size).")
    ] = None,
    workspace_mb: Annotated[int, typer.Option(help="TensorRT workspace limit, MiB.")] = 4096,
    link: Annotated[bool, typer.Option(help="Symlink model.plan into the cache instead of copying.")] = False,
    gpu_name: Annotated[str | None, GPU_NAME] = None,
    compute_capability: Annotated[str | None, COMPUTE_CAPABILITY] = None,
    tensorrt_version: Annotated[str | None, TENSORRT_VERSION] = None,
    catalog: Annotated[Path, typer.Option(help="Model catalogue (TOML).")] = CATALOG,
) -> None:
    """Build (or reuse from CACHE) TensorRT engines for this node's GPU; install them as NAME_network/1/model.plan."""
    _engines(
        models, repository, cache, precision, (min_batch, opt_batch, max_batch), workspace_mb, link,
        _device(gpu_name, compute_capability, tensorrt_version), catalog,
    )  # fmt: skip


def _engines(
    models: list[str] | None,
    repository: Path,
    cache: Path,
    precision: str,
    batches: tuple[int, int, int | None],
    workspace_mb: int,
    link: bool,
    device: Any,
    catalog: Path,
) -> None:
    from build_engines.engine_cache import BatchProfile, EngineMismatchError
    from build_engines.tensorrt_engine import BuildOptions, EngineBuildError, ensure_engine

    known = _known(catalog, models or [])
    for name in _models_in(repository, known, models):
        model = known[name]
        max_batch_size = model.tuning.max_batch_size
        profile = BatchProfile(batches[0], min(batches[1], batches[2] or max_batch_size), batches[2] or max_batch_size)
        options = BuildOptions(precision, profile, model.letterbox.input_size, workspace_mb)
        try:
            ensure_engine(
                name, repository / model.step("network"), cache, device, options,
                link=link, max_batch_size=max_batch_size, echo=typer.echo,
            )  # fmt: skip
        except (EngineMismatchError, EngineBuildError, FileNotFoundError, ValueError) as exc:
            typer.echo(f"[{name}] refused: {exc}", err=True)
            raise typer.Exit(2) from None


@app.command("check-engines")
def check_engines(
    models: Annotated[list[str] | None, typer.Argument(help="Models (default: every model in the repository).")] = None,
    repository: Annotated[Path, typer.Option(help="Triton model repository.")] = Path("triton_models"),
    gpu_name: Annotated[str | None, GPU_NAME] = None,
    compute_capability: Annotated[str | None, COMPUTE_CAPABILITY] = None,
    tensorrt_version: Annotated[str | None, TENSORRT_VERSION] = None,
    catalog: Annotated[Path, typer.Option(help="Model catalogue (TOML).")] = CATALOG,
) -> None:
    """Refuse (exit 2, with the reason) any installed model.plan built for another GPU, TensorRT version or ONNX."""
    device = _device(gpu_name, compute_capability, tensorrt_version)
    _check_installed(models, repository, device, catalog)


def _check_installed(models: list[str] | None, repository: Path, device: Any, catalog: Path) -> None:
    from build_engines.engine_cache import SOURCE_ONNX, EngineMismatchError, check_engine

    known = _known(catalog, models or [])
    failures = []
    for name in _models_in(repository, known, models):
        model = known[name]
        version_dir = repository / model.step("network") / "1"
        try:
            stamp = check_engine(version_dir / "model.plan", device, max_batch_size=model.tuning.max_batch_size)
            check_engine(
                version_dir / "model.plan", device, onnx_path=version_dir / SOURCE_ONNX[stamp.precision],
                verify_plan_hash=False,
            )  # fmt: skip
        except EngineMismatchError as exc:
            failures.append(str(exc))
            continue
        typer.echo(
            f"[{name}] ok: {stamp.engine_name()} serves on {device.gpu_name} / TensorRT {device.tensorrt_version}"
        )
    if failures:
        for failure in failures:
            typer.echo(f"refused: {failure}", err=True)
        raise typer.Exit(2)


@app.command("gpu-entrypoint", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def gpu_entrypoint(
    ctx: typer.Context,
    repository: Annotated[Path, typer.Option(help="Triton model repository.")] = Path("/models"),
    cache: Annotated[Path, typer.Option(help="Persistent engine cache volume.")] = Path("/engine-cache"),
    precision: Annotated[str, typer.Option(help="fp16 or int8.")] = "fp16",
    opt_batch: Annotated[int, typer.Option(help="Optimization profile: batch TensorRT tunes for.")] = 16,
    link: Annotated[bool, typer.Option(help="Symlink model.plan into the cache (mount it in Triton too).")] = False,
    catalog: Annotated[Path, typer.Option(help="Model catalogue (TOML).")] = CATALOG,
) -> None:
    """Container entry point: build-or-reuse engines for this GPU, check them, then exec the command after ``--``.

    As a Kubernetes init container (or Job) give no command; as the Triton container's command append
    ``-- tritonserver --model-repository=/models ...``. Triton is never started with a mismatched engine.
    """
    device = _device(None, None, None)
    typer.echo(f"GPU {device.gpu_name} (sm {device.compute_capability}), TensorRT {device.tensorrt_version}")
    _engines(None, repository, cache, precision, (1, opt_batch, None), 4096, link, device, catalog)
    _check_installed(None, repository, device, catalog)
    command = list(ctx.args)
    if command:
        typer.echo(f"engines ok; exec {' '.join(command)}")
        sys.stdout.flush()
        os.execvp(command[0], command)


@app.command("list")
def list_models(catalog: Annotated[Path, typer.Option(help="Model catalogue (TOML).")] = CATALOG) -> None:
    """List the catalogue's models and their families."""
    for name, model in load_catalog(catalog).items():
        typer.echo(f"{name:20s} {model.family:18s} {model.description}")


if __name__ == "__main__":
    app()
