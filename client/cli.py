"""The ``posetriton`` command: run pose estimation against a Triton server, or start one.

Errors reach the user as one ``error: ...`` line on stderr, never as a traceback. Exit codes:
0 all images done; 1 nothing written (server unreachable, model missing, bad output path...);
2 bad command line; 3 results written but some images failed (their JSON entries carry "error").
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from posetriton.launcher import ServerOptions, ServerStartError, serve_forever

from .drawing import draw_poses, load_image_rgb, save_image
from .grpc_client import (
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    InvalidInputError,
    PoseClient,
    PoseClientError,
    parse_grpc_url,
)
from .results import FailedImage, ImagePoses, ImageResult, ModelMetadata

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
DEFAULT_BATCH_SIZE = 8
# Formats Pillow writes that keep the input's extension; anything else is drawn as PNG.
_DRAW_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

app = typer.Typer(
    help="Pose estimation (YOLO-NAS Pose, Ultralytics pose) served by NVIDIA Triton.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
)


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _check_url(url: str) -> str:
    try:
        return parse_grpc_url(url)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def predict(
    images: Annotated[
        list[Path],
        typer.Argument(metavar="IMAGE", help="JPEG, PNG, WebP, BMP or GIF files; results keep this order."),
    ],
    output_json: Annotated[
        Path,
        typer.Option("--output-json", "-o", help="Where to write the JSON list of results ('-' for stdout)."),
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="Served model (ensemble) name.")] = DEFAULT_MODEL,
    url: Annotated[
        str,
        typer.Option(help="Triton's gRPC address, HOST:PORT.", envvar="POSETRITON_URL", callback=_check_url),
    ] = DEFAULT_URL,
    conf: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Minimum person score. (default: the model's)", show_default=False),
    ] = None,
    iou: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="NMS IoU threshold. (default: the model's)", show_default=False),
    ] = None,
    max_det: Annotated[
        int | None,
        typer.Option(min=1, help="Most poses kept per image. (default: the model's)", show_default=False),
    ] = None,
    draw: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Also write each image with its poses drawn into DIR (created if needed)."),
    ] = None,
    kpt_threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Keypoints below this confidence are not drawn.")
    ] = 0.5,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images per request (capped at the model's max batch size).")
    ] = DEFAULT_BATCH_SIZE,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds to wait for each request before giving up.")
    ] = DEFAULT_TIMEOUT_S,
) -> None:
    """Detect people and their keypoints in IMAGE files and write the results as JSON.

    Images go to the server in batches of --batch-size. If the server refuses an image, the
    others still get results: the refused image's JSON entry carries an "error" field, the
    command lists the refused images on stderr and exits with code 3.

    Exit codes: 0 every image done; 1 nothing written (server unreachable, model not served...);
    2 bad command line; 3 results written but some images failed.
    """
    draw_targets = _draw_targets(images, draw) if draw is not None else None
    thresholds = {"conf": conf, "iou": iou, "max_det": max_det}
    try:
        with PoseClient(url, model, timeout) as client:
            client.check_ready()
            metadata = client.model_metadata()
            _check_max_det(max_det, metadata)
            size = _batch_size(batch_size, metadata)
            results: list[ImageResult] = []
            draw_failures: list[str] = []
            for start in range(0, len(images), size):
                chunk = images[start : start + size]
                chunk_results = _predict_chunk(client, chunk, thresholds)
                results += chunk_results
                if draw_targets is not None:
                    draw_failures += _draw_chunk(chunk_results, draw_targets[start:], metadata, kpt_threshold)
    except PoseClientError as exc:
        _fail(str(exc))
    _write_json(output_json, [result.to_dict() for result in results])
    _report(results, draw_failures, output_json)


def _check_max_det(max_det: int | None, metadata: ModelMetadata) -> None:
    limit = metadata.max_det_limit
    if max_det is not None and limit is not None and max_det > limit:
        _fail(f"--max-det {max_det} is above the limit of model {metadata.name!r} ({limit})", EXIT_USAGE)


def _batch_size(requested: int, metadata: ModelMetadata) -> int:
    """Keep each request within the model's max_batch_size, which the server would otherwise refuse."""
    limit = metadata.max_batch_size
    if limit > 0 and requested > limit:
        typer.echo(
            f"note: model {metadata.name!r} takes at most {limit} images per request; using batches of {limit}",
            err=True,
        )
        return limit
    return requested


def _predict_chunk(client: PoseClient, chunk: Sequence[Path], thresholds: dict[str, Any]) -> list[ImageResult]:
    """One request for the chunk; if an image in it is refused, one request per image so the rest still succeed."""
    try:
        return list(client.predict(chunk, **thresholds))
    except InvalidInputError as exc:
        if exc.index is None:  # the request itself was refused: every image would fail the same way
            _fail(f"the server refused the request: {exc.reason}", EXIT_FAILURE)
        if len(chunk) == 1:
            return [FailedImage(str(chunk[0]), exc.reason)]
    return [_predict_one(client, path, thresholds) for path in chunk]


def _predict_one(client: PoseClient, path: Path, thresholds: dict[str, Any]) -> ImageResult:
    try:
        return client.predict([path], **thresholds)[0]
    except InvalidInputError as exc:
        if exc.index is None:
            _fail(f"the server refused the request: {exc.reason}", EXIT_FAILURE)
        return FailedImage(str(path), exc.reason)


def _draw_targets(images: Sequence[Path], directory: Path) -> list[Path]:
    """One output file per input, named after it; repeated names get a counter, and inputs are never overwritten."""
    taken: set[str] = set()
    targets = []
    for image in images:
        suffix = image.suffix.lower() if image.suffix.lower() in _DRAW_SUFFIXES else ".png"
        name, counter = f"{image.stem}{suffix}", 1
        while name in taken:
            name, counter = f"{image.stem}_{counter}{suffix}", counter + 1
        taken.add(name)
        targets.append(directory / name)
    inputs = {image.resolve() for image in images}
    clobbered = [str(target) for target in targets if target.resolve() in inputs]
    if clobbered:
        _fail(
            f"--draw {directory} would overwrite input image(s) {', '.join(clobbered)}; choose another directory",
            EXIT_USAGE,
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"cannot create --draw directory {directory}: {exc.strerror or exc}")
    return targets


def _draw_chunk(
    results: Sequence[ImageResult], targets: Sequence[Path], metadata: ModelMetadata, kpt_threshold: float
) -> list[str]:
    """Draw every successful result; a failure to draw one image is reported, not fatal."""
    failures = []
    for result, target in zip(results, targets, strict=False):
        if not isinstance(result, ImagePoses):
            continue
        try:
            image = load_image_rgb(result.image)
            save_image(target, draw_poses(image, result.poses, metadata.skeleton, kpt_threshold))
        except (OSError, ValueError) as exc:
            failures.append(f"{result.image}: could not draw to {target}: {exc}")
    return failures


def _write_json(path: Path, payload: list[dict[str, Any]]) -> None:
    """Write atomically, so a failed run never leaves a truncated file that looks like results."""
    text = json.dumps(payload, indent=2) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
            handle.write(text)
        os.replace(handle.name, path)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}")


def _report(results: Sequence[ImageResult], draw_failures: Sequence[str], output_json: Path) -> None:
    failed = [result for result in results if isinstance(result, FailedImage)]
    for failure in failed:
        typer.echo(f"error: {failure.image}: {failure.error}", err=True)
    for message in draw_failures:
        typer.echo(f"error: {message}", err=True)
    poses = sum(len(result.poses) for result in results if isinstance(result, ImagePoses))
    where = "stdout" if str(output_json) == "-" else str(output_json)
    typer.echo(
        f"{len(results) - len(failed)} of {len(results)} images done, {poses} poses; results in {where}", err=True
    )
    if failed or draw_failures:
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
def serve(
    repository: Annotated[
        Path, typer.Option(help="Model repository, as written by 'python -m build_engines build'.")
    ] = Path("triton_models"),
    config_name: Annotated[
        str,
        typer.Option(
            help="Network configuration: 'cpu' (OpenVINO f32) or 'cpu_bf16'; a name the repository has no "
            "configs/NAME.pbtxt for (e.g. 'gpu') falls back to config.pbtxt, the TensorRT engine."
        ),
    ] = "cpu",
    host: Annotated[str, typer.Option(help="Address the HTTP, gRPC and metrics endpoints listen on.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP/REST port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(min=1, max=65535, help="gRPC port (what 'predict --url' talks to).")] = 8001,
    metrics_port: Annotated[int, typer.Option(min=1, max=65535, help="Prometheus metrics port.")] = 8002,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Load only this model (with its steps); repeat for several. (default: every model in the repository)",
            show_default=False,
        ),
    ] = None,
    log_file: Annotated[
        Path | None, typer.Option(help="Write Triton's log here. (default: a temporary file)", show_default=False)
    ] = None,
) -> None:
    """Start Triton on a model repository and serve until Ctrl-C (or SIGTERM)."""
    options = ServerOptions(
        repository=repository,
        config_name=config_name,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        models=list(model) if model else None,
        log_file=log_file,
    )
    try:
        code = serve_forever(options)
    except ServerStartError as exc:
        _fail(str(exc))
    # A process killed by a signal reports -N; shells expect 128 + N.
    raise typer.Exit(code if code >= 0 else 128 - code)
