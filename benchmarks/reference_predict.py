"""The upstream library's own ``predict()`` timed on photo files: the reference side of benchmarks/comparisons.py.

Runs in the export environment (torch, super-gradients, ultralytics), as a subprocess of comparisons.py, before
any server starts so the two sides never share the CPU. ``N`` requests in flight is one ``predict()`` call on a
list of ``N`` photo paths: the library's own batching (super-gradients ``batch_size``, Ultralytics ``batch``),
the counterpart of Triton's dynamic batcher forming a batch from ``N`` requests. Decoding the files is inside the
timed call on both sides. bf16 runs the call under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

    .venv-export/bin/python benchmarks/reference_predict.py --library ultralytics --weights yolo11n-pose.pt \
        --seconds 10 photo1.jpg photo2.jpg
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")


def super_gradients_predict(variant: str, checkpoint: Path) -> Callable[[list[str], bool], list[int]]:
    from super_gradients.training import models
    from super_gradients.training.processing.processing import default_yolo_nas_pose_coco_processing_params

    model = models.get(variant, num_classes=17, checkpoint_path=str(checkpoint))
    model.set_dataset_processing_params(**default_yolo_nas_pose_coco_processing_params())
    model.eval()

    def predict(paths: list[str], fuse: bool) -> list[int]:
        # Its own default thresholds (conf 0.5, iou 0.7), as the served model's defaults.
        result = model.predict(paths, batch_size=len(paths), fuse_model=fuse)
        predictions = [result] if len(paths) == 1 else list(result)
        return [len(p.prediction.scores) for p in predictions]

    return predict


def ultralytics_predict(weights: Path) -> Callable[[list[str], bool], list[int]]:
    from ultralytics import YOLO

    model = YOLO(str(weights), task="pose")

    def predict(paths: list[str], fuse: bool) -> list[int]:
        # Its own defaults (conf 0.25, iou 0.7, imgsz 640); the .pt is Conv+BN-fused on the first call.
        results = model.predict(paths, batch=len(paths), device="cpu", verbose=False)
        return [len(r.boxes) for r in results]

    return predict


def measure(
    predict: Callable[[list[str], bool], list[int]], photos: list[str], in_flight: int, bf16: bool, seconds: float
) -> dict:
    import torch

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    batches = [[photos[(start + i) % len(photos)] for i in range(in_flight)] for start in range(len(photos))]
    times: list[float] = []
    conv_dtypes: set[str] = set()

    def record(module: torch.nn.Module, _inputs: object, output: object) -> None:
        if isinstance(module, torch.nn.Conv2d) and isinstance(output, torch.Tensor):
            conv_dtypes.add(str(output.dtype).removeprefix("torch."))

    # Shows that autocast really reached the convolutions (the library could turn it off inside predict()).
    hook = torch.nn.modules.module.register_module_forward_hook(record)
    with torch.inference_mode(), autocast:
        # Warm-up. f32 one at a time: every photo once, counting its people (a sanity check against the served
        # counts). Otherwise one call (emulated bf16 can take seconds per call).
        people = None
        if in_flight == 1 and not bf16:
            people = {Path(batch[0]).name: predict(batch, False)[0] for batch in batches}
        else:
            predict(batches[0], False)
        hook.remove()
        begin = time.perf_counter()
        while time.perf_counter() - begin < seconds:
            start = time.perf_counter()
            predict(batches[len(times) % len(batches)], False)
            times.append(time.perf_counter() - start)
        elapsed = time.perf_counter() - begin
    return {
        "images_per_s": in_flight * len(times) / elapsed,
        "p50_ms": 1000 * statistics.median(times),  # per call, i.e. per batch of `in_flight` images
        "calls": len(times),
        **({"people": people} if people is not None else {}),
        "conv_output_dtypes": sorted(conv_dtypes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", choices=["super_gradients", "ultralytics"], required=True)
    parser.add_argument("--variant", help="super-gradients model name, e.g. yolo_nas_pose_n")
    parser.add_argument("--weights", type=Path, required=True, help="super-gradients checkpoint or Ultralytics .pt")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--precision", nargs="+", default=["f32", "bf16"], choices=["f32", "bf16"])
    parser.add_argument("photos", nargs="+")
    args = parser.parse_args()

    import torch

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)  # every core, as OpenVINO on the served side
    if args.library == "super_gradients":
        predict = super_gradients_predict(args.variant, args.weights)
    else:
        predict = ultralytics_predict(args.weights)
    with torch.inference_mode():
        predict(args.photos[:1], True)  # the first call fuses Conv+BN, as predict() does by default
    report: dict = {
        "library": args.library,
        "torch": torch.__version__,
        "torch_threads": threads,
        "in_flight_means": "one predict() call on a list of N photo paths (the library's own batching)",
    }
    for precision in args.precision:
        for n in args.in_flight:
            key = f"{precision}_in_flight_{n}"
            try:
                report[key] = measure(predict, args.photos, n, precision == "bf16", args.seconds)
            except Exception as exc:  # a library that cannot run under bf16 autocast says so in the report
                report[key] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
