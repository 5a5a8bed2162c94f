"""Image decoding: Pillow against OpenCV, and what the opt-in reduced-size JPEG decode costs in keypoints.

1. Speed and pixel identity, per photo: Pillow (how ``decode_image`` decoded everything before),
   OpenCV's ``imdecode`` as a user would call it (``IMREAD_COLOR_RGB``, EXIF orientation applied),
   the shipped ``decode_image`` (OpenCV for colour and grey JPEGs, Pillow for the rest) and
   ``decode_image_reduced`` (libjpeg DCT scaling to the smallest 1/2, 1/4 or 1/8 whose longest side
   stays >= the network size). Candidates run interleaved, ``--repeats`` times each; medians of wall
   and CPU time (the CPU time is less disturbed by other processes on a shared machine).
2. Keypoint deviation of the reduced decode, in original-photo pixels: the photos resampled to 1080p
   and 4K (and one stored rotated with EXIF orientation 6) go through the trained network in-process
   (OpenVINO IR, f32) once fully decoded and once reduced; detections are matched by box IoU and the
   confident keypoints compared, after mapping both back to the full-size photo.

    .venv/bin/python benchmarks/decode.py --repository triton_models --model yolo11n_pose --markdown

3. ``--budget``: what the preprocess step's decode limits cost. A photo resampled to 12, 25 and 50 Mpx (the
   per-image limit) as JPEG and PNG goes through ``decode_image`` + ``letterbox``, as the step does: CPU
   seconds per megapixel and the peak memory of the decoded pixels (3 bytes per pixel). The per-request
   budget (``max_request_pixels``, summed over a request's images) is chosen from these figures
   (docs/reliability.md, decode budget).

    .venv/bin/python benchmarks/decode.py --budget
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from posetriton.core import images
from posetriton.core.images import decode_image, decode_image_reduced
from posetriton.core.processing import Poses, letterbox, postprocess, to_network_input
from posetriton.core.spec import LetterboxSpec
from posetriton.server.openvino_runtime import OpenVinoRunner
from posetriton.server.repository import ServedModel, load_catalog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.precision_deviation import compare, resampled  # noqa: E402

LIMIT = 50_000_000
SIZES = {"1080p": 1920, "4K": 3840}


def default_photos() -> list[Path]:
    samples = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in {".jpg", ".jpeg", ".png", ".webp"})
    return samples + sorted(ROOT.glob(".venv-export/lib/python3*/site-packages/ultralytics/assets/*.jpg"))


def rotated_with_exif(data: bytes) -> bytes:
    """The same photo stored turned 90 degrees with EXIF orientation 6, as phones write portrait shots."""
    stored = Image.open(io.BytesIO(data)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    stored.save(out, "JPEG", quality=92, exif=exif.tobytes())
    return out.getvalue()


def as_png(data: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, "PNG")
    return out.getvalue()


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    source: Path | None = None  # the photo it was resampled from: its own poses, scaled, are a reference
    group: str | None = None  # "1080p", "4K", "4K EXIF-rotated": the reduced decode's deviation is reported per group


def samples(photos: list[Path]) -> list[Sample]:
    """The photos as they are, each resampled to 1080p and 4K, the largest 4K one stored rotated, one PNG."""
    out = [Sample(p.name, p.read_bytes()) for p in photos]
    for size, longest in SIZES.items():
        out += [Sample(f"{p.stem} {size}", resampled(p.read_bytes(), longest), p, size) for p in photos]
    largest = max(photos, key=lambda p: Image.open(p).size[0] * Image.open(p).size[1])
    big = next(s for s in out if s.source == largest and s.group == "4K")
    out.append(Sample(f"{largest.stem} 4K EXIF-rotated", rotated_with_exif(big.data), largest, "4K EXIF-rotated"))
    out.append(Sample(f"{largest.stem}.png", as_png(largest.read_bytes())))
    return out


def pillow(data: bytes) -> np.ndarray:
    return images._decode_with_pillow(data, images._open(data, LIMIT))


def opencv(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)


def time_interleaved(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU milliseconds of each candidate, run in turn so drift hits all alike."""
    wall: dict[str, list[float]] = {name: [] for name in candidates}
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    for run in candidates.values():  # warm-up
        run()
    for _ in range(repeats):
        for name, run in candidates.items():
            w, c = time.perf_counter(), time.process_time()
            run()
            cpu[name].append((time.process_time() - c) * 1000)
            wall[name].append((time.perf_counter() - w) * 1000)
    return {
        name: {"wall_ms": statistics.median(wall[name]), "cpu_ms": statistics.median(cpu[name])} for name in candidates
    }


def decoder_table(photos: list[Sample], min_side: int, repeats: int) -> list[dict]:
    rows = []
    spec = LetterboxSpec(input_size=min_side)
    for name, data in ((s.name, s.data) for s in photos):
        reference = pillow(data)
        cv = opencv(data)
        shipped = decode_image(data, LIMIT)
        reduced, original = decode_image_reduced(data, LIMIT, min_side)
        assert original == (reference.shape[1], reference.shape[0]), name
        timings = time_interleaved(
            {
                "pillow": lambda d=data: pillow(d),
                "opencv": lambda d=data: opencv(d),
                "decode_image": lambda d=data: decode_image(d, LIMIT),
                "reduced": lambda d=data: decode_image_reduced(d, LIMIT, min_side),
                "decode_image+letterbox": lambda d=data: letterbox(decode_image(d, LIMIT), spec),
                "reduced+letterbox": lambda d=data: letterbox(decode_image_reduced(d, LIMIT, min_side)[0], spec),
            },
            repeats,
        )

        def max_diff(a: np.ndarray, b: np.ndarray) -> int | str:
            return int(np.abs(a.astype(np.int16) - b).max()) if a.shape == b.shape else f"shape {a.shape}"

        rows.append(
            {
                "photo": name,
                "format": Image.open(io.BytesIO(data)).format,
                "size": f"{reference.shape[1]}x{reference.shape[0]}",
                "reduced_size": f"{reduced.shape[1]}x{reduced.shape[0]}",
                "opencv_vs_pillow_max_abs_diff": max_diff(cv, reference),
                "decode_image_vs_pillow_max_abs_diff": max_diff(shipped, reference),
                "timings": timings,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def run_network(runner: OpenVinoRunner, canvas: np.ndarray, spec: LetterboxSpec) -> np.ndarray:
    """One canvas through the IR, whichever input it declares: uint8 NHWC canvas, or float32 NCHW in [0, 1]."""
    return runner.infer(canvas[None] if runner.input_dtype == np.uint8 else to_network_input(canvas[None], spec))[0]


def poses(runner: OpenVinoRunner, pixels: np.ndarray, original: tuple[int, int], model: ServedModel) -> Poses:
    """Poses in the pixels of the full-size photo, whatever size the pixels were decoded at."""
    canvas, transform = letterbox(pixels, model.letterbox)
    to_photo = transform.for_original(*original)
    return postprocess(run_network(runner, canvas, model.letterbox), to_photo, model.postprocess)


def scaled(poses: Poses, size: tuple[int, int], to: tuple[int, int]) -> Poses:
    """Poses found on a photo of ``size`` expressed in the pixels of the same photo resampled to ``to``."""
    factor = np.array(to, np.float32) / np.array(size, np.float32)
    keypoints = poses.keypoints.copy()
    keypoints[..., :2] *= factor
    return Poses(poses.boxes * np.tile(factor, 2), poses.scores, keypoints)


def deviation_table(photos: list[Sample], xml: Path, model: ServedModel) -> dict[str, dict]:
    """Per group: how far the reduced decode moves keypoints from the full decode, and how far each of the two
    is from the poses found on the source photo at its own size (scaled up): a reference neither decode has."""
    runner = OpenVinoRunner(xml, precision="f32")
    min_side = model.letterbox.input_size
    groups: dict[str, dict] = {}
    for sample in photos:
        if sample.group is None or sample.source is None:
            continue
        full = decode_image(sample.data, LIMIT)
        reduced, original = decode_image_reduced(sample.data, LIMIT, min_side)
        source = decode_image(sample.source.read_bytes(), LIMIT)
        source_size = (source.shape[1], source.shape[0])
        reference = scaled(poses(runner, source, source_size, model), source_size, original)
        full_poses, reduced_poses = poses(runner, full, original, model), poses(runner, reduced, original, model)
        totals = groups.setdefault(sample.group, {"photos": [], "detections_full": 0, "detections_reduced": 0})
        totals["photos"].append(f"{sample.name} ({original[0]}x{original[1]} -> {reduced.shape[1]}x{reduced.shape[0]})")
        totals["detections_full"] += len(full_poses)
        totals["detections_reduced"] += len(reduced_poses)
        for key, (a, b) in {
            "reduced_vs_full": (full_poses, reduced_poses),
            "full_vs_source": (reference, full_poses),
            "reduced_vs_source": (reference, reduced_poses),
        }.items():
            result = compare(a, b)
            entry = totals.setdefault(key, {"matched": 0, "errors": []})
            entry["matched"] += result["matched"]
            entry["errors"] += result["keypoint_errors"]
    for totals in groups.values():
        for key in ("reduced_vs_full", "full_vs_source", "reduced_vs_source"):
            errors = np.asarray(totals[key].pop("errors"))
            totals[key]["keypoints_compared"] = int(errors.size)
            totals[key]["keypoint_error_px"] = {
                q: float(np.percentile(errors, p)) for q, p in (("p50", 50), ("p95", 95), ("max", 100)) if errors.size
            }
    return groups


def markdown(rows: list[dict], deviation: dict[str, dict]) -> str:
    """CPU-time medians: on a shared machine the wall-clock ones (in the JSON) mostly measure the neighbours."""
    lines = [
        "| photo | format | size | Pillow | OpenCV | max abs diff: OpenCV / `decode_image` | `decode_image` "
        "| reduced decode | reduced speed-up: decode / + letterbox |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = {name: v["cpu_ms"] for name, v in row["timings"].items()}
        reduced = row["reduced_size"] != row["size"]
        lines.append(
            f"| {row['photo']} | {row['format']} | {row['size']} | {c['pillow']:.1f} ms | {c['opencv']:.1f} ms "
            f"| {row['opencv_vs_pillow_max_abs_diff']} / {row['decode_image_vs_pillow_max_abs_diff']} "
            f"| {c['decode_image']:.1f} ms ({c['pillow'] / c['decode_image']:.2f}x) "
            + (
                f"| {c['reduced']:.1f} ms at {row['reduced_size']} | {c['decode_image'] / c['reduced']:.2f}x / "
                f"{c['decode_image+letterbox'] / c['reduced+letterbox']:.2f}x |"
                if reduced
                else "| not reduced (< 2x network size, or not a JPEG) | — |"
            )
        )
    lines += [
        "",
        "| photos | detections full / reduced | compared | keypoints | p50 | p95 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, d in deviation.items():
        for key, label in (
            ("reduced_vs_full", "**reduced vs full decode**"),
            ("full_vs_source", "full decode vs source photo"),
            ("reduced_vs_source", "reduced decode vs source photo"),
        ):
            e, first = d[key]["keypoint_error_px"], key == "reduced_vs_full"
            count = len(d["photos"])
            photos = f"{group}: {count} photo{'s' if count > 1 else ''}" if first else ""
            detections = f"{d['detections_full']} / {d['detections_reduced']}" if first else ""
            quantiles = " | ".join(f"{e.get(q, 0):.1f} px" for q in ("p50", "p95", "max"))
            lines.append(f"| {photos} | {detections} | {label} | {d[key]['keypoints_compared']} | {quantiles} |")
    return "\n".join(lines)


BUDGET_SIZES_MPX = (12, 25, 50)


def budget_table(photo: Path, model: ServedModel, repeats: int) -> list[dict]:
    """Decode + letterbox CPU time and decoded bytes of large images, per format and size."""
    rows = []
    source = Image.open(photo).convert("RGB")
    for mpx in BUDGET_SIZES_MPX:
        scale = (mpx * 0.999e6 / (source.width * source.height)) ** 0.5  # just under the per-image limit at 50
        big = source.resize((round(source.width * scale), round(source.height * scale)), Image.Resampling.BILINEAR)
        for fmt, options in (("JPEG", {"quality": 90}), ("PNG", {"compress_level": 1})):
            out = io.BytesIO()
            big.save(out, fmt, **options)
            data = out.getvalue()
            times = []
            for _ in range(repeats):
                started = time.process_time()
                pixels = decode_image(data, LIMIT)
                letterbox(pixels, model.letterbox)
                times.append(time.process_time() - started)
            cpu = statistics.median(times)
            pixels_count = big.width * big.height
            rows.append({
                "format": fmt, "size": f"{big.width}x{big.height}", "mpx": round(pixels_count / 1e6, 1),
                "encoded_mb": round(len(data) / 1e6, 1), "cpu_s": round(cpu, 3),
                "cpu_s_per_mpx": round(cpu / (pixels_count / 1e6), 4), "decoded_mb": round(pixels_count * 3 / 1e6),
            })  # fmt: skip
    return rows


def machine() -> dict[str, object]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = models[0] if models else platform.processor()
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--model", default="yolo11n_pose")
    parser.add_argument("--photos", type=Path, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--markdown", action="store_true", help="also print the tables for docs/benchmarks.md")
    parser.add_argument("--budget", action="store_true", help="only the decode-budget table (no model needed)")
    args = parser.parse_args()
    model = load_catalog(ROOT / "build_engines" / "models.toml")[args.model]
    if args.budget:
        photo = (args.photos or [ROOT / "samples" / "grace_hopper.jpg"])[0]
        rows = budget_table(photo, model, max(3, args.repeats // 5))
        print(json.dumps({"date": date.today().isoformat(), "machine": machine(), "budget": rows}, indent=2))
        return
    load_before = os.getloadavg()[0]
    photos = samples(args.photos or default_photos())
    rows = decoder_table(photos, model.letterbox.input_size, args.repeats)
    xml = args.repository / f"{args.model}_network" / "1" / "model.xml"
    deviation = deviation_table(photos, xml, model)
    report = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "opencv": cv2.__version__,
        "pillow": Image.__version__,
        "model": args.model,
        "decoders": rows,
        "reduced_decode_deviation": deviation,
    }
    print(json.dumps(report, indent=2))
    if args.markdown:
        print(markdown(rows, deviation))


if __name__ == "__main__":
    main()
