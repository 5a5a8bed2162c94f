"""``python -m build_engines``: export served models to ONNX + OpenVINO IR and write their Triton entries.

Runs in the export environment (super-gradients, ultralytics, torch); the serving environment
never needs any of them.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from posetriton.repository import ServedModel, load_catalog, write_model

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
    """Export one model's network; returns the export report (files, parity figures)."""
    from build_engines.export import export_ultralytics_pose, export_yolo_nas_pose

    kind = model.source.get("kind")
    if kind == "ultralytics":
        weights = resolve_weights(options.get("checkpoint") or model.source["weights"])
        result = export_ultralytics_pose(weights, workdir, photos=photos, letterbox=model.letterbox)
        result.extra_files.setdefault("weights", weights)
    elif kind == "super_gradients":
        if not (options.get("checkpoint") or options.get("weights_url") or options.get("seed") is not None):
            raise typer.BadParameter(
                f"{model.name}: the published YOLO-NAS Pose weights cannot be downloaded by super-gradients 3.7.1; "
                "pass --checkpoint FILE, --weights-url URL, or --seed N for a deterministic random init (tests)"
            )
        result = export_yolo_nas_pose(
            model.source["variant"],
            workdir,
            checkpoint=options.get("checkpoint"),
            weights_url=options.get("weights_url"),
            seed=options.get("seed"),
            photos=photos,
            letterbox=model.letterbox,
        )
    else:
        raise typer.BadParameter(f"{model.name}: unknown source kind {kind!r} in {CATALOG}")
    return {
        "onnx": result.onnx_path,
        "parity": {"onnxruntime_vs_pytorch": result.parity, "openvino_vs_pytorch": result.openvino_parity},
        "extra_files": result.extra_files,
    }


@app.command()
def build(
    models: Annotated[list[str], typer.Argument(help="Catalogue names, e.g. yolo11n_pose yolo_nas_pose_n.")],
    repository: Annotated[Path, typer.Option(help="Triton model repository to write into.")] = Path("triton_models"),
    workdir: Annotated[Path, typer.Option(help="Where intermediate ONNX files and reports go.")] = Path("build/export"),
    checkpoint: Annotated[
        Path | None, typer.Option(help="Weights file (super-gradients .pth or Ultralytics .pt).")
    ] = None,
    weights_url: Annotated[str | None, typer.Option(help="URL of published YOLO-NAS Pose weights to download.")] = None,
    seed: Annotated[int | None, typer.Option(help="YOLO-NAS Pose: deterministic random init (for tests).")] = None,
    photos: Annotated[Path, typer.Option(help="Folder of real photos used for the parity checks.")] = SAMPLES,
    catalog: Annotated[Path, typer.Option(help="Model catalogue (TOML).")] = CATALOG,
) -> None:
    """Export MODELS and write their ensemble, pre/postprocess and network entries into REPOSITORY."""
    known = load_catalog(catalog)
    unknown = [name for name in models if name not in known]
    if unknown:
        raise typer.BadParameter(f"unknown model(s) {unknown}; the catalogue has {sorted(known)}")
    photo_files = sorted(p for p in photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    options = {"checkpoint": checkpoint, "weights_url": weights_url, "seed": seed}
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


@app.command("list")
def list_models(catalog: Annotated[Path, typer.Option(help="Model catalogue (TOML).")] = CATALOG) -> None:
    """List the catalogue's models and their families."""
    for name, model in load_catalog(catalog).items():
        typer.echo(f"{name:20s} {model.family:18s} {model.description}")


if __name__ == "__main__":
    app()
