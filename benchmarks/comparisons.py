"""Side-by-side comparisons on the same photos and model, in one run (numbers for docs/benchmarks.md).

1. served ensemble (JPEG in; f32 ``cpu`` and bf16 ``cpu_bf16``) vs super-gradients' own
   ``model.predict()`` on the CPU (run in the export environment on the same photos);
2. served ensemble vs client-side preprocessing that sends float tensors to the network model
   (the common Ultralytics-guide pattern; letterbox and NMS on the client): bytes per request
   and throughput;
3. cost vs input resolution (VGA, 1080p, 4K resamplings of a real photo);
4. cost vs people per image (real photos tiled into 1x1, 2x2 and 3x3 mosaics).

    python benchmarks/comparisons.py --model yolo_nas_pose_n --seconds 10
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

from posetriton.client import image_bytes_input
from posetriton.images import decode_image
from posetriton.launcher import ServerOptions, TritonServer, free_port
from posetriton.processing import letterbox, postprocess, to_network_input
from posetriton.repository import load_catalog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.loadtest import default_photos  # noqa: E402

SG_PREDICT = """
import sys, time, torch
from super_gradients.training import models
from super_gradients.training.processing.processing import default_yolo_nas_pose_coco_processing_params
torch.set_num_threads(2)
variant, checkpoint, seconds, *photos = sys.argv[1:]
weights = {"checkpoint_path": checkpoint} if checkpoint != "-" else {}
model = models.get(variant, num_classes=17, **weights)
model.set_dataset_processing_params(**default_yolo_nas_pose_coco_processing_params())
model.predict(photos[0], conf=0.5)  # warm-up (fuses the model)
count, start = 0, time.perf_counter()
while time.perf_counter() - start < float(seconds):
    model.predict(photos[count % len(photos)], conf=0.5, fuse_model=False)
    count += 1
print(count / (time.perf_counter() - start))
"""


def rate(call: Callable[[int], object], seconds: float) -> tuple[float, float]:
    """(calls per second, median seconds per call) of ``call(i)`` run back to back."""
    call(0)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        begin = time.perf_counter()
        call(len(times))
        times.append(time.perf_counter() - begin)
    return len(times) / (time.perf_counter() - start), float(np.median(times))


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def resampled(photo: Path, longest: int) -> bytes:
    image = Image.open(photo).convert("RGB")
    scale = longest / max(image.size)
    return jpeg(image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS))


def mosaic(photos: list[Path], side: int, tile: int = 640) -> bytes:
    canvas = Image.new("RGB", (side * tile, side * tile))
    for i in range(side * side):
        image = Image.open(photos[i % len(photos)]).convert("RGB")
        image.thumbnail((tile, tile))
        canvas.paste(image, ((i % side) * tile, (i // side) * tile))
    return jpeg(canvas)


def served(client: grpcclient.InferenceServerClient, model: str, photos: list[bytes], seconds: float) -> dict:
    def call(i: int) -> object:
        return client.infer(model, [image_bytes_input([photos[i % len(photos)]])]).as_numpy("NUM_DETECTIONS")

    per_s, median = rate(call, seconds)
    people = [int(call(i)[0, 0]) for i in range(len(photos))]  # type: ignore[index]
    return {"images_per_s": per_s, "p50_ms": 1000 * median, "people": people}


def client_side(client: grpcclient.InferenceServerClient, name: str, photos: list[bytes], seconds: float) -> dict:
    """Decode, letterbox and NMS on the client; only the float tensor crosses the wire to NAME_network."""
    spec = load_catalog(ROOT / "build_engines" / "models.toml")[name]

    def call(i: int) -> object:
        canvas, transform = letterbox(decode_image(photos[i % len(photos)], spec.letterbox.max_pixels), spec.letterbox)
        tensor = grpcclient.InferInput("images", [1, 3, 640, 640], "FP32")
        tensor.set_data_from_numpy(to_network_input(canvas[None], spec.letterbox))
        candidates = client.infer(f"{name}_network", [tensor]).as_numpy("candidates")
        return postprocess(candidates[0], transform, spec.postprocess)

    per_s, median = rate(call, seconds)
    return {"images_per_s": per_s, "p50_ms": 1000 * median, "request_bytes": 4 * 3 * 640 * 640}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolo_nas_pose_n")
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--checkpoint", default="-", help="super-gradients checkpoint for predict() ('-': random init)")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    photos = default_photos()
    encoded = [p.read_bytes() for p in photos]
    bus = next(p for p in photos if p.name == "bus.jpg")
    results: dict = {"model": args.model, "photos": [p.name for p in photos], "date": time.strftime("%Y-%m-%d")}

    variant = load_catalog(ROOT / "build_engines" / "models.toml")[args.model].source.get("variant")
    if variant:
        sg = subprocess.run(
            [str(ROOT / ".venv-export" / "bin" / "python"), "-c", SG_PREDICT, variant, args.checkpoint,
             str(args.seconds), *map(str, photos)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results["super_gradients_predict_images_per_s"] = float(sg.stdout.strip().splitlines()[-1])

    for config in ("cpu", "cpu_bf16"):
        options = ServerOptions(repository=args.repository, config_name=config, http_port=free_port(),
                                grpc_port=free_port(), metrics_port=free_port(), models=[args.model])  # fmt: skip
        with TritonServer(options) as server, grpcclient.InferenceServerClient(server.grpc_url) as client:
            results[f"served_{config}"] = served(client, args.model, encoded, args.seconds)
            if config != "cpu":
                continue
            results["served_cpu"]["request_bytes_mean"] = float(np.mean([len(e) for e in encoded]))
            results["client_side_preprocessing"] = client_side(client, args.model, encoded, args.seconds)
            results["resolution"] = {
                label: {**served(client, args.model, [data], args.seconds / 2), "bytes": len(data)}
                for label, data in (("VGA", resampled(bus, 640)), ("1080p", resampled(bus, 1920)),
                                    ("4K", resampled(bus, 3840)))
            }  # fmt: skip
            results["people_per_image"] = {
                f"{side}x{side} mosaic": served(client, args.model, [mosaic(photos, side)], args.seconds / 2)
                for side in (1, 2, 3)
            }
    if "super_gradients_predict_images_per_s" in results:
        for config in ("cpu", "cpu_bf16"):
            results[f"served_{config}"]["speedup_vs_super_gradients"] = (
                results[f"served_{config}"]["images_per_s"] / results["super_gradients_predict_images_per_s"]
            )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
