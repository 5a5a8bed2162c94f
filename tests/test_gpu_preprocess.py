"""The GPU preprocess step's torch code, run on CPU in the export environment: its letterbox reproduces the shared
numpy letterbox on real photos, and the whole GPU code path (torchvision decode, EXIF, letterbox) matches the CPU
step. The same code on CUDA, and the device check script's GPU part, need a GPU and are skipped here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, UL_MODEL, run_export_python

HAS_GPU = shutil.which("nvidia-smi") is not None

LETTERBOX_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from posetriton.images import decode_image
from posetriton.processing import letterbox, to_network_input
from posetriton.repository import load_catalog
from posetriton.serving import gpu_preprocess as gp

photos = [Path(p) for p in sys.argv[1:]]
catalog = load_catalog(Path("build_engines/models.toml"))
out = {"photos": [], "sizes": [], "exif": [], "batch": {}}

def chw(image):
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

for name, model in sorted(catalog.items()):
    if name not in ("yolo11n_pose", "yolo_nas_pose_n"):
        continue
    spec = model.letterbox
    for path in photos:
        image = decode_image(path.read_bytes(), spec.max_pixels)
        for variant, pixels in (("original", image), ("upscaled", image[: image.shape[0] // 3, : image.shape[1] // 3])):
            pixels = np.ascontiguousarray(pixels)
            canvas, transform = letterbox(pixels, spec)
            canvas_t, transform_t = gp.letterbox_torch(chw(pixels), spec, device="cpu")
            diff = np.abs(canvas.transpose(2, 0, 1).astype(int) - canvas_t.numpy().astype(int))
            net = to_network_input(canvas[None], spec)
            net_t = gp.to_network_input_torch(canvas_t[None], spec).numpy()
            out["photos"].append({
                "model": name, "photo": path.name, "variant": variant, "same_transform": transform == transform_t,
                "max_diff": int(diff.max()), "differing": float((diff > 0).mean()),
                "input_max_diff": float(np.abs(net - net_t).max()),
            })
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 5000), (5000, 1), (639, 641), (640, 640), (641, 639), (3, 7), (2160, 3840), (1080, 1920)]
    sizes += [tuple(int(v) for v in rng.integers(1, 2500, 2)) for _ in range(25)]
    for h, w in sizes:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        canvas, transform = letterbox(pixels, spec)
        canvas_t, transform_t = gp.letterbox_torch(chw(pixels), spec, device=torch.device("cpu"))
        diff = np.abs(canvas.transpose(2, 0, 1).astype(int) - canvas_t.numpy().astype(int))
        out["sizes"].append({"model": name, "size": [h, w], "same_transform": transform == transform_t,
                             "max_diff": int(diff.max())})
    # the whole GPU code path on CPU: torchvision decode (libjpeg-turbo), header/EXIF handling, torch letterbox
    blobs = [p.read_bytes() for p in photos]
    images, transforms, paths = gp.preprocess_batch(blobs + [pixels], spec, "cpu", torch_decode=True)
    reference = [letterbox(decode_image(b, spec.max_pixels), spec) for b in blobs] + [letterbox(pixels, spec)]
    expected = np.concatenate([to_network_input(c[None], spec) for c, _ in reference])
    out["batch"][name] = {
        "paths": paths, "same_transforms": [t == r for t, (_, r) in zip(transforms, reference)],
        "max_diff_grey": float(np.abs(images.numpy() - expected).max() * 255),
    }

array = np.random.default_rng(1).integers(0, 256, (3, 5, 7), dtype=np.uint8)
methods = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
for orientation in range(1, 9):
    expected = np.asarray(Image.fromarray(array.transpose(1, 2, 0)).transpose(methods[orientation])
                          if orientation in methods else Image.fromarray(array.transpose(1, 2, 0)))
    got = gp.apply_exif_orientation(torch.from_numpy(array), orientation).numpy().transpose(1, 2, 0)
    out["exif"].append([orientation, bool(expected.shape == got.shape and (expected == got).all())])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def torch_letterbox(photo_paths: list[Path]) -> dict:
    return json.loads(run_export_python("-c", LETTERBOX_SCRIPT, *map(str, photo_paths)).splitlines()[-1])


def test_torch_letterbox_reproduces_the_numpy_letterbox_on_real_photos(torch_letterbox: dict) -> None:
    rows = torch_letterbox["photos"]
    assert len(rows) == 2 * 4 * 2
    for row in rows:
        assert row["same_transform"], row
        assert row["max_diff"] <= 1, row  # OpenCV's own rounding paths, see gpu_preprocess.resize_linear_cv2
        assert row["differing"] < 1e-3, row
        assert row["input_max_diff"] <= 1 / 255 + 1e-6, row
    # downscaled photos (the usual case) are bit-exact
    assert all(
        r["max_diff"] == 0 for r in rows if r["photo"] in {"bus.jpg", "zidane.jpg"} and r["variant"] == "original"
    )


def test_torch_letterbox_geometry_on_extreme_and_random_sizes(torch_letterbox: dict) -> None:
    for row in torch_letterbox["sizes"]:
        assert row["same_transform"], row
        assert row["max_diff"] <= 1, row


def test_gpu_code_path_on_cpu_matches_the_cpu_step(torch_letterbox: dict) -> None:
    for name, batch in torch_letterbox["batch"].items():
        assert batch["paths"] == ["gpu", "cpu", "gpu", "gpu", "pixels"], name  # the WebP takes the CPU path
        assert all(batch["same_transforms"]), name
        assert batch["max_diff_grey"] <= 1.0 + 1e-4, name


def test_exif_orientations_match_pillow(torch_letterbox: dict) -> None:
    assert torch_letterbox["exif"] == [[o, True] for o in range(1, 9)]


@pytest.mark.slow
def test_device_check_bundle_loads_with_torch_only_and_passes_a_cpu_dry_run(
    model_repository: Path, tmp_path: Path
) -> None:
    """The TorchScript network the GPU check carries: no device-pinned ops, equals ONNX Runtime, and the check's
    parity logic passes on CPU (the GPU run itself needs a GPU machine)."""
    bundle = tmp_path / "bundle"
    onnx_path = model_repository / f"{UL_MODEL}_network" / "1" / "model.onnx"
    run_export_python("scripts/gpu_device_check.py", "prepare", "--out", str(bundle), "--onnx", str(onnx_path))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["traced_vs_onnxruntime_cpu"]["geometry_px"] < 1e-2
    assert manifest["traced_vs_onnxruntime_cpu"]["scores"] < 1e-4
    output = run_export_python(
        "scripts/gpu_device_check.py", "run", "--bundle", str(bundle), "--device", "cpu", "--no-throughput"
    )
    report = json.loads(output[output.index("{") :])
    assert report["passed"], report["failures"]
    assert [r["path"] for r in report["checks"]["canvas_gpu_vs_cpu"]] == ["gpu", "cpu", "gpu", "gpu"]
    assert all(r["keypoint_error_max_px"] <= 1.0 for r in report["checks"]["keypoints_gpu_vs_cpu_preprocess"])


@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU (nvJPEG decode and the letterbox on CUDA)")
def test_gpu_device_check_on_cuda(model_repository: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    onnx_path = model_repository / f"{UL_MODEL}_network" / "1" / "model.onnx"
    run_export_python("scripts/gpu_device_check.py", "prepare", "--out", str(bundle), "--onnx", str(onnx_path))
    output = run_export_python("scripts/gpu_device_check.py", "run", "--bundle", str(bundle), "--seconds", "2")
    assert json.loads(output[output.index("{") :])["passed"]


def test_gpu_preprocess_module_is_what_the_gpu_config_loads() -> None:
    from posetriton.repository import load_catalog, render

    files = render(load_catalog(ROOT / "build_engines" / "models.toml")[UL_MODEL])
    shim = files[f"{UL_MODEL}_preprocess/1/gpu_model.py"]
    assert "from posetriton.serving.gpu_preprocess import TritonPythonModel" in shim
    assert (ROOT / "posetriton" / "serving" / "gpu_preprocess.py").is_file()
