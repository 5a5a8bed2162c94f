"""`make demo`: start Triton on the built repository, predict on sample photos with the CLI, stop.

Writes ``demo_out/MODEL.json`` (one entry per photo) and ``demo_out/drawn/MODEL/`` (photos with
boxes and skeletons) for each model, then tracks a short clip made from the sample photos with
``posetriton track`` (``demo_out/MODEL_tracks.jsonl`` and the annotated ``demo_out/MODEL_tracks.mp4``),
and prints where they are.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from posetriton.core.contract import TRACK_SUFFIX
from posetriton.server.launcher import ServerOptions, ServerStartError, TritonServer, free_port

ROOT = Path(__file__).resolve().parent.parent


def demo_photos(inputs: Path) -> list[Path]:
    """The bundled public-domain samples, plus Ultralytics' multi-person photos from its installed package."""
    inputs.mkdir(parents=True, exist_ok=True)
    sources = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in {".jpg", ".webp", ".png"})
    sources += sorted(ROOT.glob(".venv-export/lib/python3*/site-packages/ultralytics/assets/*.jpg"))
    photos = []
    for source in sources:
        target = inputs / source.name
        shutil.copyfile(source, target)
        photos.append(target)
    return photos


def track_demo(url: str, model: str, output: Path) -> int:
    """A short clip made from the sample photos (two people crossing), tracked: JSON Lines and an annotated video."""
    from posetriton.client.drawing import VideoSink
    from posetriton.core.clips import sample_clip

    clip = output / "inputs" / "crossing.mp4"
    with VideoSink(clip, 15.0, 640, 480) as sink:
        for frame in sample_clip(ROOT / "samples"):
            sink.write(frame.rgb)
    lines, drawn = output / f"{model}_tracks.jsonl", output / f"{model}_tracks.mp4"
    command = [
        str(Path(sys.executable).with_name("posetriton")), "track", str(clip), "--model", model, "--url", url,
        "--output", str(lines), "--draw-video", str(drawn), "--no-progress",
    ]  # fmt: skip
    code = subprocess.run(command).returncode
    if code:
        print(f"error: posetriton track exited with {code}", file=sys.stderr)
        return code
    rows = [json.loads(line) for line in lines.read_text().splitlines()]
    ids = sorted({d["track_id"] for row in rows for d in row["detections"] if d["track_id"] is not None})
    print(f"  {model}: tracked {len(rows)} frames of {clip.name}, track IDs {ids}")
    print(f"  JSON Lines: {lines}\n  annotated video: {drawn}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--models", nargs="+", default=["yolo11n_pose"])
    parser.add_argument("--output", type=Path, default=ROOT / "demo_out")
    args = parser.parse_args()

    photos = demo_photos(args.output / "inputs")
    options = ServerOptions(
        repository=args.repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        models=[name for model in args.models for name in (model, model + TRACK_SUFFIX)],
        log_file=args.output / "tritonserver.log",
    )
    print(f"Starting Triton on {args.repository} ({', '.join(args.models)}) ...", flush=True)
    try:
        server = TritonServer(options).start(timeout=180)
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        for model in args.models:
            out_json = args.output / f"{model}.json"
            drawn = args.output / "drawn" / model
            command = [
                str(Path(sys.executable).with_name("posetriton")), "predict", *map(str, photos), "--model", model,
                "--url", server.grpc_url, "--output-json", str(out_json), "--draw", str(drawn),
            ]  # fmt: skip
            code = subprocess.run(command).returncode
            if code:
                print(f"error: posetriton predict exited with {code}", file=sys.stderr)
                return code
            for entry in json.loads(out_json.read_text()):
                people = len(entry["detections"])
                noun = "person" if people == 1 else "people"
                print(f"  {model}: {Path(entry['image']).name:18s} {entry['width']}x{entry['height']}  {people} {noun}")
            print(f"  JSON: {out_json}\n  drawn photos: {drawn}/")
            code = track_demo(server.grpc_url, model, args.output)
            if code:
                return code
    finally:
        server.stop()
    print(f"Done; Triton stopped. Outputs are in {args.output}/ (server log: {options.log_file}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
