"""`make demo`: start Triton on the built repository, predict on sample photos with the CLI, stop.

Writes ``demo_out/MODEL.json`` (one entry per photo) and ``demo_out/drawn/MODEL/`` (photos with
boxes and skeletons) for each model, then prints where they are.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from posetriton.launcher import ServerOptions, ServerStartError, TritonServer, free_port

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
        models=args.models,
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
    finally:
        server.stop()
    print(f"Done; Triton stopped. Outputs are in {args.output}/ (server log: {options.log_file}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
