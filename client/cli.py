"""The ``posetriton`` command: pose estimation against a Triton server, model discovery, health, COCO eval, serving.

Errors reach the user as one ``error: ...`` line on stderr, never as a traceback. Exit codes:
0 all images done; 1 nothing written (server unreachable, model missing, bad output path...);
2 bad command line; 3 results written but some images failed (their JSON entries carry "error").
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ._core import DEFAULT_IN_FLIGHT
from .cli_options import (
    EXIT_FAILURE,
    EXIT_PARTIAL,
    EXIT_USAGE,
    Connection,
    RequestChoice,
    connection_options,
    fail,
    request_options,
)
from .drawing import VideoSink, draw_poses, load_image_rgb, save_image
from .evaluation import EVAL_THRESHOLDS
from .grpc_client import DEFAULT_MODEL, InvalidInputError, PoseClient, PoseClientError
from .results import FailedImage, ImagePoses, ImageResult, ModelMetadata, to_coco_results
from .streaming import directory_images, is_video, video_frames, video_info

__all__ = ["EXIT_FAILURE", "EXIT_PARTIAL", "EXIT_USAGE", "app"]

DEFAULT_BATCH_SIZE = 8
_GLOB_CHARS = frozenset("*?[")
# Formats Pillow writes that keep the input's extension; anything else is drawn as PNG.
_DRAW_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

app = typer.Typer(
    help="Pose estimation (YOLO-NAS Pose, Ultralytics pose) served by NVIDIA Triton.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
)


def _make_draw_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create --draw directory {directory}: {exc.strerror or exc}")


class OutputFormat(str, Enum):
    json = "json"
    coco = "coco"


ModelOption = Annotated[str, typer.Option("--model", "-m", help="Served model (ensemble) name.")]
ProgressOption = Annotated[
    bool | None,
    typer.Option(help="Show a progress bar on stderr. (default: when stderr is a terminal)", show_default=False),
]


def _progress(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


@app.command()
@connection_options()
@request_options()
def predict(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="INPUT",
            help="Image files (JPEG, PNG, WebP, BMP, GIF), directories of images, quoted globs ('shots/*.jpg') "
            "or videos (.mp4, .avi, .mov, .mkv, .webm); results keep this order.",
        ),
    ],
    output_json: Annotated[
        Path | None,
        typer.Option(
            "--output-json",
            "-o",
            help="Where to write the results as JSON ('-' for stdout). Without it a readable summary per image "
            "is printed.",
        ),
    ] = None,
    output_format: Annotated[
        OutputFormat,
        typer.Option(
            "--format",
            help="json: one entry per image/frame (image, width, height, detections). coco: COCO keypoint results "
            "[{image_id, category_id, keypoints, score, bbox}], image_id = 1-based position among the inputs.",
        ),
    ] = OutputFormat.json,
    model: ModelOption = DEFAULT_MODEL,
    draw: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Also write each image with its poses drawn (and each video as DIR/NAME.mp4) into DIR.",
        ),
    ] = None,
    kpt_threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Keypoints below this confidence are not drawn.")
    ] = 0.5,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images per request (capped at the model's max batch size).")
    ] = DEFAULT_BATCH_SIZE,
    in_flight: Annotated[int, typer.Option(min=1, help="Video frames in flight at once (one per request).")] = (
        DEFAULT_IN_FLIGHT
    ),
    progress: ProgressOption = None,
    *,
    connection: Connection,
    request: RequestChoice,
) -> None:
    """Detect people and their keypoints in images, directories, globs and videos; write JSON or COCO results.

    Images go to the server in batches of --batch-size; video frames are decoded here, sent as
    JPEG, --in-flight at a time. If the server refuses an image, the others still get results:
    its JSON entry carries an "error" field, the command names it on stderr and exits with code 3.

    Exit codes: 0 every image done; 1 nothing written (server unreachable, model not served...);
    2 bad command line; 3 results written but some images failed.
    """
    items = _expand_inputs(inputs)
    still_images = [item for item in items if not is_video(item)]
    image_targets = dict(zip(map(id, still_images), _draw_targets(still_images, draw), strict=True)) if draw else {}
    video_targets = _video_targets([item for item in items if is_video(item)], draw) if draw else {}
    results: list[ImageResult] = []
    draw_failures: list[str] = []
    try:
        with connection.client(model) as client:
            client.check_ready()
            metadata = client.model_metadata()
            arguments = request.checked(metadata.request_limits).sdk_arguments()
            size = _batch_size(batch_size, metadata)
            position = 0
            while position < len(items):
                if is_video(items[position]):
                    video = items[position]
                    results += _predict_video(
                        client, video, arguments, in_flight, _progress(progress), video_targets.get(video),
                        metadata, kpt_threshold, draw_failures,
                    )  # fmt: skip
                    position += 1
                    continue
                chunk: list[Path] = []
                while position < len(items) and len(chunk) < size and not is_video(items[position]):
                    chunk.append(items[position])
                    position += 1
                chunk_results = _predict_chunk(client, chunk, arguments)
                results += chunk_results
                if draw is not None:
                    targets = [image_targets[id(path)] for path in chunk]
                    draw_failures += _draw_chunk(chunk_results, targets, metadata, kpt_threshold)
    except PoseClientError as exc:
        fail(str(exc))
    if output_json is None:
        _print_summary(results, metadata.keypoint_names)
    elif output_format is OutputFormat.coco:
        _write_json(output_json, to_coco_results(results, range(1, len(results) + 1)))
    else:
        _write_json(output_json, [result.to_dict() for result in results])
    _report(results, draw_failures, output_json)


def _expand_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Files as given; a directory becomes its images (sorted); a glob that names no file becomes its matches."""
    items: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = directory_images(item)
            if not found:
                fail(f"directory {item} holds no images (.jpg, .jpeg, .png, .webp, .bmp, .gif)", EXIT_USAGE)
            items += found
        elif not item.exists() and _GLOB_CHARS & set(str(item)):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True) if Path(m).is_file())
            if not matches:
                fail(f"no file matches {item}", EXIT_USAGE)
            items += matches
        else:
            items.append(item)  # a missing file is reported as that image's error
    return items


def _video_targets(videos: Sequence[Path], directory: Path) -> dict[Path, Path]:
    targets: dict[Path, Path] = {}
    taken: set[str] = set()
    for video in videos:
        name, counter = f"{video.stem}.mp4", 1
        while name in taken:
            name, counter = f"{video.stem}_{counter}.mp4", counter + 1
        taken.add(name)
        target = directory / name
        if target.resolve() == video.resolve():
            fail(f"--draw {directory} would overwrite the input video {video}; choose another directory", EXIT_USAGE)
        targets[video] = target
    _make_draw_directory(directory)
    return targets


def _predict_video(
    client: PoseClient, video: Path, arguments: Mapping[str, Any], in_flight: int, progress: bool,
    target: Path | None, metadata: ModelMetadata, kpt_threshold: float, draw_failures: list[str],
) -> list[ImageResult]:  # fmt: skip
    """Every frame of the video, streamed; with a target, the annotated video is written alongside."""
    try:
        info = video_info(video)
    except ValueError as exc:
        return [FailedImage(str(video), str(exc))]
    results: list[ImageResult] = []
    sink: VideoSink | None = None
    try:
        if target is not None:
            try:
                sink = VideoSink(target, info.fps, info.width, info.height)
            except OSError as exc:
                draw_failures.append(f"{video}: {exc}")
        frames = video_frames(video, keep_rgb=sink is not None)
        for item in client.stream(
            frames, in_flight=in_flight, progress=progress, total=info.frame_count or None, **arguments
        ):
            results.append(item.result)
            if sink is not None and item.frame.rgb is not None:
                poses = item.result.poses if isinstance(item.result, ImagePoses) else []
                sink.write(draw_poses(item.frame.rgb, poses, metadata.skeleton, kpt_threshold))
    except InvalidInputError as exc:  # a request-level refusal: every frame would fail the same way
        fail(f"the server refused the request: {exc.reason}", EXIT_FAILURE)
    finally:
        if sink is not None:
            sink.close()
    if not results:
        return [FailedImage(str(video), "the video has no frames OpenCV can decode")]
    return results


def _print_summary(results: Sequence[ImageResult], keypoint_names: Sequence[str]) -> None:
    """One readable block per image: its size and each person's score, box and most confident keypoints."""
    for result in results:
        if isinstance(result, FailedImage):
            typer.echo(f"{result.image}: error: {result.error}")
            continue
        people = f"{len(result)} {'person' if len(result) == 1 else 'people'}"
        typer.echo(f"{result.image} ({result.width}x{result.height}): {people}")
        for index, (box, score, conf) in enumerate(zip(result.boxes, result.scores, result.conf, strict=True)):
            x1, y1, x2, y2 = (round(float(v)) for v in box)
            visible = int((conf >= 0.5).sum())
            typer.echo(
                f"  #{index + 1} score {score:.2f}  box ({x1}, {y1})-({x2}, {y2})  "
                f"{visible}/{len(conf)} keypoints with conf >= 0.5"
            )


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


def _predict_chunk(client: PoseClient, chunk: Sequence[Path], arguments: Mapping[str, Any]) -> list[ImageResult]:
    """One request for the chunk; if an image in it is refused, one request per image so the rest still succeed."""
    try:
        return list[ImageResult](client.predict_batch(list(chunk), **arguments))
    except InvalidInputError as exc:
        if exc.index is None:  # the request itself was refused: every image would fail the same way
            fail(f"the server refused the request: {exc.reason}", EXIT_FAILURE)
        if len(chunk) == 1:
            return [FailedImage(str(chunk[0]), exc.reason)]
    return [_predict_one(client, path, arguments) for path in chunk]


def _predict_one(client: PoseClient, path: Path, arguments: Mapping[str, Any]) -> ImageResult:
    try:
        return client.predict(path, **arguments)
    except InvalidInputError as exc:
        if exc.index is None:
            fail(f"the server refused the request: {exc.reason}", EXIT_FAILURE)
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
        fail(
            f"--draw {directory} would overwrite input image(s) {', '.join(clobbered)}; choose another directory",
            EXIT_USAGE,
        )
    _make_draw_directory(directory)
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


def _write_json(path: Path, payload: Any) -> None:
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
        fail(f"cannot write {path}: {exc.strerror or exc}")


def _report(results: Sequence[ImageResult], draw_failures: Sequence[str], output_json: Path | None) -> None:
    failed = [result for result in results if isinstance(result, FailedImage)]
    for failure in failed:
        typer.echo(f"error: {failure.image}: {failure.error}", err=True)
    for message in draw_failures:
        typer.echo(f"error: {message}", err=True)
    poses = sum(len(result.poses) for result in results if isinstance(result, ImagePoses))
    where = "stdout" if output_json is None or str(output_json) == "-" else str(output_json)
    typer.echo(
        f"{len(results) - len(failed)} of {len(results)} images done, {poses} poses; results in {where}", err=True
    )
    if failed or draw_failures:
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
@connection_options(retries=1)
@request_options(tracking=True)
def track(
    source: Annotated[
        str,
        typer.Argument(
            metavar="INPUT",
            help="A video file, a camera index (0) or a stream URL (rtsp://..., http://...).",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="JSON Lines file, one line per frame ('-' for stdout)."),
    ] = Path("-"),
    draw_video: Annotated[
        Path | None,
        typer.Option(metavar="FILE.mp4", help="Also write the video with each track in its colour and its ID drawn."),
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    max_in_flight: Annotated[int, typer.Option(min=1, help="Frames in flight on the stream at once.")] = (
        DEFAULT_IN_FLIGHT
    ),
    live: Annotated[
        bool | None,
        typer.Option(
            help="Treat INPUT as live: send the newest frame when a slot frees up and count the skipped ones. "
            "(default: for a camera index or a URL)",
            show_default=False,
        ),
    ] = None,
    kpt_threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Keypoints below this confidence are not drawn.")
    ] = 0.5,
    raw_keypoints: Annotated[
        bool,
        typer.Option(
            "--raw-keypoints", help="Write and draw each frame's raw keypoints instead of the track-smoothed ones."
        ),
    ] = False,
    progress: ProgressOption = None,
    *,
    connection: Connection,
    request: RequestChoice,
) -> None:
    """Track people through a video: poses with track IDs that stay with each person, one JSON line per frame.

    Frames travel on one gRPC stream to the model's tracking ensemble (NAME_track), which keeps the
    tracks on the server. Each line: {"frame", "timestamp", "image", "width", "height", "detections":
    [{"box", "score", "keypoints", "track_id"}], "dropped", "latency_ms"}. A file is processed frame
    by frame (progress bar); the keypoints are smoothed over each track by the server (the raw ones
    with --raw-keypoints). A camera or URL is live (newest frame first, a fps/latency line on
    stderr; Ctrl-C stops). Exit codes: 0 done; 1 nothing or not all written (server, stream or
    source failed); 2 bad command line; 3 done but some frames were refused (their lines carry "error").
    """
    from .tracking import draw_tracks, is_live_source, live_frames, track_model, video_file_frames

    is_live = is_live_source(source) if live is None else live
    total, fps = None, 15.0
    if is_live_source(source):
        frames: Any = live_frames(int(source) if source.isdigit() else source, keep_rgb=draw_video is not None)
    else:
        if not Path(source).is_file():
            fail(f"{source}: no such video file (a camera is an index like 0, a stream a URL)", EXIT_USAGE)
        try:
            info = video_info(source)
        except ValueError as exc:
            fail(str(exc))
        total, fps = info.frame_count or None, info.fps
        frames = video_file_frames(source, keep_rgb=draw_video is not None)
    failed = written = 0
    sink: VideoSink | None = None
    status = _TrackStatus(enabled=_progress(progress), live=is_live, total=total)
    out = sys.stdout if str(output) == "-" else None
    try:
        handle = out or open(output, "w")  # noqa: SIM115 - closed below
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror or exc}")
    try:
        with connection.client(model) as client:
            client.check_ready(track_model(client.model))
            metadata = client.model_metadata()
            arguments = request.checked(metadata.request_limits).sdk_arguments(tracking=True)
            results = client.track(
                frames, live=is_live, max_in_flight=max_in_flight, smoothed=not raw_keypoints, **arguments
            )
            for result in results:
                handle.write(json.dumps(result.to_dict()) + "\n")
                handle.flush()
                written += 1
                failed += not result.ok
                status.update(result)
                if draw_video is not None and result.frame is not None and result.frame.rgb is not None:
                    if sink is None:
                        height, width = result.frame.rgb.shape[:2]
                        sink = VideoSink(draw_video, fps, width, height)
                    sink.write(draw_tracks(result.frame.rgb, result.poses, metadata.skeleton, kpt_threshold))
    except KeyboardInterrupt:
        pass  # a live source runs until stopped; the stream was closed (END sent) on the way out
    except PoseClientError as exc:
        status.close()
        fail(f"{exc} ({written} frame(s) written)")
    except (OSError, ValueError) as exc:
        status.close()
        fail(str(exc))
    finally:
        status.close()
        if sink is not None:
            sink.close()
        if out is None:
            handle.close()
    if failed:
        typer.echo(f'{failed} of {written} frame(s) were refused; their lines carry "error"', err=True)
        raise typer.Exit(EXIT_PARTIAL)


class _TrackStatus:
    """A tqdm bar for a file; for a live source, a line with fps, latency and dropped frames, redrawn each second."""

    def __init__(self, *, enabled: bool, live: bool, total: int | None) -> None:
        from .streaming import progress_bar

        self.enabled, self.live = enabled, live
        self.bar = progress_bar(enabled and not live, total, "track")
        self.started = time.monotonic()
        self.shown = self.started
        self.frames = 0
        self.latencies: list[float] = []

    def update(self, result: Any) -> None:
        self.frames += 1
        self.latencies.append(result.latency_s)
        if self.bar is not None:
            self.bar.update(1)
        now = time.monotonic()
        if self.enabled and self.live and now - self.shown >= 1.0:
            recent = sorted(self.latencies[-50:])
            fps = self.frames / (now - self.started)
            line = (
                f"frame {result.index}  {fps:.1f} fps  latency p50 {recent[len(recent) // 2] * 1e3:.0f} ms  "
                f"dropped {result.dropped}"
            )
            sys.stderr.write("\r" + line.ljust(70))
            sys.stderr.flush()
            self.shown = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled and self.live and self.frames:
            sys.stderr.write("\n")
            self.frames = 0


@app.command()
@connection_options(timeout=30.0)
def models(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the models as a JSON list instead of a table.")
    ] = False,
    *,
    connection: Connection,
) -> None:
    """List the pose models the server offers: name, input, family, batch limit, keypoints.

    A pose model is a ready ensemble whose configuration carries keypoint names; NAME takes
    encoded images (IMAGE), NAME_pixels raw RGB arrays (PIXELS).
    """
    try:
        with connection.client(DEFAULT_MODEL) as client:
            found = client.list_models()
    except PoseClientError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps([meta.to_dict() for meta in found], indent=2))
        return
    if not found:
        typer.echo(f"no pose models are ready on {connection.url}", err=True)
        return
    rows = [("MODEL", "INPUT", "FAMILY", "MAX BATCH", "KEYPOINTS", "DESCRIPTION")]
    rows += [
        (m.name, m.input_name, m.family or "-", str(m.max_batch_size), str(len(m.keypoint_names)), m.description)
        for m in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True)) + "  " + row[5])


@app.command()
@connection_options(timeout=10.0, retries=1)
def health(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Also check this model is ready; repeatable.", show_default=False),
    ] = None,
    *,
    connection: Connection,
) -> None:
    """Check that the server is live and ready (and each --model ready). Exit 0 if so, 1 otherwise."""
    try:
        with connection.client(DEFAULT_MODEL) as client:
            live, ready = client.is_server_live(), client.is_server_ready()
            typer.echo(f"server {client.url}: {'live' if live else 'NOT live'}, {'ready' if ready else 'NOT ready'}")
            if not (live and ready):
                raise typer.Exit(EXIT_FAILURE)
            for name in model or []:
                client.check_ready(name)
                typer.echo(f"model {name}: ready")
    except PoseClientError as exc:
        fail(str(exc))


@app.command("eval")
@connection_options()
@request_options(defaults=EVAL_THRESHOLDS.to_parameters(), notes={"conf": "AP integrates over scores, so keep it low."})
def evaluate_command(
    annotations: Annotated[
        Path,
        typer.Option(exists=True, dir_okay=False, help="COCO person_keypoints JSON (images, annotations, categories)."),
    ],
    images: Annotated[
        Path, typer.Option(exists=True, file_okay=False, help="Directory holding the annotated images (file_name).")
    ],
    model: ModelOption = DEFAULT_MODEL,
    in_flight: Annotated[int, typer.Option(min=1, help="Requests in flight at once (one image each).")] = (
        DEFAULT_IN_FLIGHT
    ),
    output_json: Annotated[
        Path | None,
        typer.Option("--output-json", "-o", help="Also write the COCO results evaluated here.", show_default=False),
    ] = None,
    progress: ProgressOption = None,
    *,
    connection: Connection,
    request: RequestChoice,
) -> None:
    """COCO keypoint AP/AR (OKS, pycocotools) of a served model on an annotated image set.

    Every image of the annotation file goes through the server; the standard AP/AR table is
    printed on stdout. Exit 3 if the server refused some images (they count as finding nobody).
    """
    from .evaluation import EvaluationError, evaluate

    try:
        with connection.client(model) as client:
            client.check_ready()
            limits = client.model_metadata().request_limits
            result = evaluate(
                client, annotations, images, in_flight=in_flight, progress=_progress(progress),
                **request.checked(limits).sdk_arguments(),
            )  # fmt: skip
    except (PoseClientError, EvaluationError) as exc:
        fail(str(exc))
    if output_json is not None:
        _write_json(output_json, result.detections)
    typer.echo(f"{model} on {result.images} images of {annotations} (OKS keypoint AP, pycocotools):")
    typer.echo(result.summary, nl=False)
    for failure in result.failed:
        typer.echo(f"error: {failure}", err=True)
    if result.failed:
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
    # Imported here: the client commands must load without the server's modules.
    from posetriton.server.launcher import ServerOptions, ServerStartError, serve_forever

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
        fail(str(exc))
    # A process killed by a signal reports -N; shells expect 128 + N.
    raise typer.Exit(code if code >= 0 else 128 - code)


@app.command()
@connection_options(timeout=30.0)
def ui(
    model: Annotated[str, typer.Option("--model", "-m", help="The model the page opens with.")] = DEFAULT_MODEL,
    host: Annotated[
        str, typer.Option(help="Address the page listens on; other than loopback, anyone who reaches it can use it.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the page.")] = 8080,
    max_upload_mb: Annotated[
        float, typer.Option(min=0.01, help="Largest photo or camera frame accepted, in MiB (checked before decoding).")
    ] = 20.0,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="Also answer requests that name the page NAME or NAME:PORT (a DNS name, a reverse proxy); "
            "repeat for several. (default: the names of --host: loopback ones for a loopback address)",
            show_default=False,
        ),
    ] = None,
    max_cameras: Annotated[
        int, typer.Option(min=1, help="Camera connections open at once (each one tracking sequence on the server).")
    ] = 4,
    max_uploads: Annotated[int, typer.Option(min=1, help="Photos analysed at once; more are answered 503.")] = 8,
    *,
    connection: Connection,
) -> None:
    """A web page to see the poses: drop photos or start a camera, and watch the skeletons drawn.

    Serves on http://HOST:PORT/ until Ctrl-C and talks to Triton at --url through the SDK. Needs
    the `ui` extra (pip install "posetriton[ui]").
    """
    try:
        from posetriton.ui import UiSettings, serve
        from posetriton.ui.app import exposure_warning
        from posetriton.ui.origins import HostPolicy
    except ImportError as exc:
        fail(f"posetriton ui needs the 'ui' extra (pip install \"posetriton[ui]\"): {exc}")
    warning = exposure_warning(host)
    if warning:
        typer.echo(warning, err=True)
    settings = UiSettings(
        url=connection.url, model=model, max_upload_bytes=int(max_upload_mb * 2**20), timeout_s=connection.timeout_s,
        client_options=connection.client_options(), max_cameras=max_cameras, max_uploads=max_uploads,
    )  # fmt: skip
    try:
        hosts = HostPolicy.for_bind(host, port, allowed_host or ())
    except ValueError as exc:
        fail(str(exc))
    shown = f"[{host}]" if ":" in host else host
    typer.echo(
        f"posetriton ui: http://{shown}:{port}/ (Triton at {connection.url}, model {model}); Ctrl-C stops it", err=True
    )
    typer.echo(f"posetriton ui answers requests naming {hosts.describe()}", err=True)
    serve(settings, host=host, port=port, allowed_hosts=tuple(allowed_host or ()))
