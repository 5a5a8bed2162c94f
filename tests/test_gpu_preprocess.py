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
from posetriton.core.images import decode_image
from posetriton.core.processing import letterbox
from posetriton.server.repository import load_catalog
from posetriton.server.steps import gpu_preprocess as gp

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
            diff = np.abs(canvas.astype(int) - canvas_t.numpy().astype(int))
            out["photos"].append({
                "model": name, "photo": path.name, "variant": variant, "same_transform": transform == transform_t,
                "shape": list(canvas_t.shape), "max_diff": int(diff.max()), "differing": float((diff > 0).mean()),
            })
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 5000), (5000, 1), (639, 641), (640, 640), (641, 639), (3, 7), (2160, 3840), (1080, 1920)]
    sizes += [tuple(int(v) for v in rng.integers(1, 2500, 2)) for _ in range(25)]
    for h, w in sizes:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        canvas, transform = letterbox(pixels, spec)
        canvas_t, transform_t = gp.letterbox_torch(chw(pixels), spec, device=torch.device("cpu"))
        diff = np.abs(canvas.astype(int) - canvas_t.numpy().astype(int))
        out["sizes"].append({"model": name, "size": [h, w], "same_transform": transform == transform_t,
                             "max_diff": int(diff.max())})
    # the whole GPU code path on CPU: torchvision decode (libjpeg-turbo), header/EXIF handling, torch letterbox
    blobs = [p.read_bytes() for p in photos]
    canvases, transforms, paths = gp.preprocess_batch(blobs + [pixels], spec, "cpu", torch_decode=True)
    reference = [letterbox(decode_image(b, spec.max_pixels), spec) for b in blobs] + [letterbox(pixels, spec)]
    expected = np.stack([c for c, _ in reference])
    out["batch"][name] = {
        "paths": paths, "same_transforms": [t == r for t, (_, r) in zip(transforms, reference)],
        "shape": list(canvases.shape), "dtype": str(canvases.dtype),
        "max_diff_grey": int(np.abs(canvases.numpy().astype(int) - expected.astype(int)).max()),
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

# One execute call of the GPU preprocess model, with Triton's Python-backend utilities replaced by a recorder
# (the GPU configuration cannot load in the CPU-only Triton here): what the model hands to Triton, per request.
EXECUTE_SCRIPT = """
import json, sys, types
from pathlib import Path
import numpy as np, torch

handed = []

class TritonError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"
    def __init__(self, message, code=None):
        self.message, self.code = message, code

class Tensor:
    def __init__(self, name, array):
        self.name, self.value, self.kind = name, array, "numpy"
    @classmethod
    def from_dlpack(cls, name, tensor):
        made = cls(name, tensor)
        made.kind = type(tensor).__module__ + "." + type(tensor).__name__
        return made

class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors or [], error

class Request:
    def __init__(self, **inputs):
        self.inputs = inputs

class Input:
    def __init__(self, array):
        self.array = array
    def as_numpy(self):
        return self.array

def get_input_tensor_by_name(request, name):
    return request.inputs.get(name)

sys.modules["triton_python_backend_utils"] = types.SimpleNamespace(
    TritonError=TritonError, Tensor=Tensor, InferenceResponse=InferenceResponse,
    get_input_tensor_by_name=get_input_tensor_by_name)

from posetriton.core.contract import CANVAS, LETTERBOX
from posetriton.core.images import decode_image
from posetriton.core.processing import letterbox
from posetriton.server.repository import load_catalog
from posetriton.server.steps import gpu_preprocess as gp

photos = [Path(p).read_bytes() for p in sys.argv[1:]]
jpegs = [b for b in photos if b.startswith(gp.JPEG_MAGIC)]
webp = next(b for b in photos if not b.startswith(gp.JPEG_MAGIC))
spec = load_catalog(Path("build_engines/models.toml"))["yolo11n_pose"].letterbox
pixels = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)

def encoded(*blobs):
    return Input(np.array([[b] for b in blobs], dtype=object))

decode_calls = []
def counting_decode(blobs, device):
    decode_calls.append(len(blobs))
    if fault["decoder_raises"]:
        raise RuntimeError("nvjpeg internal error")
    out = gp.decode_jpegs(blobs, device)
    if fault["float_at"] is not None:  # a decoder result the GPU letterbox cannot use: an internal failure
        out[fault["float_at"]] = out[fault["float_at"]].float()
    return out

fault = {"float_at": None, "usable": True, "decoder_raises": False}
real = gp.preprocess_requests
def patched(requests, spec, device, **kwargs):
    return real(requests, spec, device, torch_decode=True, decode=counting_decode,
                context_usable=lambda d: fault["usable"])
gp.preprocess_requests = patched

model = gp.TritonPythonModel()
parameters = {k: {"string_value": v} for k, v in spec.to_parameters().items()}
model.initialize({"model_config": json.dumps({"parameters": parameters}), "model_instance_kind": "CPU"})
exits = []
model.exit = exits.append
requests = [
    Request(IMAGE=encoded(jpegs[0], webp)),
    Request(IMAGE=encoded(jpegs[1], b"not an image")),
    Request(PIXELS=Input(pixels[None])),
    Request(),
    Request(IMAGE=encoded(jpegs[2], jpegs[0])),
]

def summary(responses):
    rows = []
    for response in responses:
        if response.error is not None:
            rows.append({"error": response.error.message, "code": response.error.code})
            continue
        tensors = {t.name: t for t in response.output_tensors}
        canvas = tensors[CANVAS].value
        rows.append({"canvas_kind": tensors[CANVAS].kind, "shape": list(canvas.shape), "dtype": str(canvas.dtype),
                     "letterbox_dtype": str(tensors[LETTERBOX].value.dtype),
                     "letterbox_shape": list(tensors[LETTERBOX].value.shape)})
    return rows

def cpu_canvases(blobs):
    return np.stack([letterbox(decode_image(b, spec.max_pixels), spec)[0] for b in blobs])


out = {}
responses = model.execute(requests)
out["normal"] = summary(responses)
out["normal_decode_calls"] = list(decode_calls)
first = {t.name: t.value for t in responses[4].output_tensors}[CANVAS]
difference = first.numpy().astype(int) - cpu_canvases([jpegs[2], jpegs[0]]).astype(int)
out["normal_last_max_diff"] = int(np.abs(difference).max())

fault["decoder_raises"] = True  # the batched decode itself fails: every JPEG of the call takes the CPU decode
responses = model.execute(requests)
out["decoder_failed"] = summary(responses)
redone = {t.name: t.value for t in responses[4].output_tensors}[CANVAS]
out["decoder_failed_equal_cpu"] = bool((redone.numpy() == cpu_canvases([jpegs[2], jpegs[0]])).all())
fault["decoder_raises"] = False

decode_calls.clear()
fault["float_at"] = 0  # the first JPEG of the call (request 0) breaks the GPU letterbox: request 0 falls back
responses = model.execute(requests)
out["fallback"] = summary(responses)
fallback = {t.name: t.value for t in responses[0].output_tensors}[CANVAS]
out["fallback_equal_cpu"] = bool((fallback == cpu_canvases([jpegs[0], webp])).all())

fault["usable"] = False  # the same failure with the CUDA context gone: the stub exits
out["sticky"] = summary(model.execute(requests))
out["exits"] = exits
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
        assert row["shape"] == [640, 640, 3], row  # the canvas of the wire contract: NHWC, decoded RGB order
        assert row["max_diff"] <= 1, row  # OpenCV's own rounding paths, see gpu_preprocess.resize_linear_cv2
        assert row["differing"] < 1e-3, row
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
        assert batch["shape"] == [5, 640, 640, 3] and batch["dtype"] == "torch.uint8", name
        assert all(batch["same_transforms"]), name
        assert batch["max_diff_grey"] <= 1, name


def test_exif_orientations_match_pillow(torch_letterbox: dict) -> None:
    assert torch_letterbox["exif"] == [[o, True] for o in range(1, 9)]


@pytest.fixture(scope="module")
def executed(photo_paths: list[Path]) -> dict:
    return json.loads(run_export_python("-c", EXECUTE_SCRIPT, *map(str, photo_paths)).splitlines()[-1])


def test_one_execute_decodes_every_request_in_one_batch_and_hands_over_torch_tensors(executed: dict) -> None:
    rows = executed["normal"]
    assert executed["normal_decode_calls"] == [4], "the JPEGs of requests 0, 1 and 4 in one decode call"
    for index, count in ((0, 2), (2, 1), (4, 2)):
        row = rows[index]
        assert row["canvas_kind"] == "torch.Tensor", "the tensor itself, not a DLPack capsule"
        assert row["shape"] == [count, 640, 640, 3] and row["dtype"] == "torch.uint8", row
        assert row["letterbox_shape"] == [count, 6] and row["letterbox_dtype"] == "float64", row
    assert rows[1]["code"] == "INVALID_ARG" and rows[1]["error"].startswith("image 1 of 2: "), rows[1]
    assert rows[3]["code"] == "INVALID_ARG" and "neither IMAGE" in rows[3]["error"], rows[3]
    assert executed["normal_last_max_diff"] <= 1


def test_a_gpu_path_failure_falls_back_to_the_cpu_for_that_request_only(executed: dict) -> None:
    rows = executed["fallback"]
    assert rows[0]["canvas_kind"] == "numpy" and rows[0]["shape"] == [2, 640, 640, 3], rows[0]
    assert executed["fallback_equal_cpu"], "the fallback is the CPU step's decode and letterbox"
    assert [rows[i]["canvas_kind"] for i in (2, 4)] == ["torch.Tensor", "torch.Tensor"]
    assert rows[1]["code"] == "INVALID_ARG" and rows[3]["code"] == "INVALID_ARG"


def test_a_failing_decoder_sends_the_jpegs_to_the_cpu_decode(executed: dict) -> None:
    rows = executed["decoder_failed"]
    assert [rows[i]["shape"] for i in (0, 2, 4)] == [[2, 640, 640, 3], [1, 640, 640, 3], [2, 640, 640, 3]]
    assert executed["decoder_failed_equal_cpu"]
    assert rows[1]["code"] == "INVALID_ARG"


def test_a_sticky_cuda_error_exits_the_stub(executed: dict) -> None:
    assert executed["exits"] == [75]  # gpu_preprocess.CUDA_FAULT_EXIT_CODE (torch is not in this environment)
    assert all(row.get("code") == "INTERNAL" for row in executed["sticky"])


@pytest.mark.slow
def test_device_check_prepares_its_bundle_and_passes_a_cpu_dry_run(model_repository: Path, tmp_path: Path) -> None:
    """The device check runs the served ONNX through its torch interpreter (no TorchScript to go stale): equal to
    ONNX Runtime here; its CPU dry run of the checks passes (the GPU run itself needs a GPU machine)."""
    bundle = tmp_path / "bundle"
    onnx_path = model_repository / f"{UL_MODEL}_network" / "1" / "model.onnx"
    run_export_python("scripts/gpu_device_check.py", "prepare", "--out", str(bundle), "--onnx", str(onnx_path))
    manifest = json.loads((bundle / "manifest.json").read_text())
    for row in manifest["interpreter_vs_onnxruntime_cpu"]:
        assert row["matched"] == max(row["detections"]) and row["keypoint_error_max_px"] < 0.01, row
    assert {v["name"] for v in manifest["variants"]} >= {
        "444",
        "422",
        "420",
        "progressive",
        "grayscale",
        "cmyk",
        "truncated",
        "4k",
        *(f"exif{i}" for i in range(1, 9)),
    }
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    assert size < 40 << 20, "the bundle travels to the GPU machine with the working tree (64 MiB in all)"
    output = run_export_python(
        "scripts/gpu_device_check.py", "run", "--bundle", str(bundle), "--device", "cpu", "--seconds", "0", "--quick"
    )
    report = json.loads(output[output.index("\n{") :])
    assert report["passed"], report["failures"]
    rows = {row["image"]: row for row in report["checks"]["gpu_vs_cpu_preprocess"]}
    assert [rows[n].get("path") for n in ("grace_hopper.jpg", "astronaut.webp", "420", "cmyk")] == [
        "gpu", "cpu", "gpu", "cpu"
    ]  # fmt: skip
    assert rows["truncated"]["cpu"].startswith("refused") and rows["truncated"]["gpu"].startswith("refused")
    assert all(row["same_geometry"] for row in rows.values() if "same_geometry" in row)
    assert report["checks"]["handoff"]["zero_copy"]
    assert report["pool_bytes"]["canvas_uint8"] == 32 * 640 * 640 * 3
    (bus,) = report["checks"]["fp16_vs_fp32"]
    if isinstance(bus["fp16_fp32_tail"], dict):  # FP16 convolutions exist on this CPU build of torch
        assert bus["fp16_fp32_tail"]["keypoint_error_max_px"] <= bus["fp16"]["keypoint_error_max_px"]


@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU (nvJPEG decode and the letterbox on CUDA)")
def test_gpu_device_check_on_cuda(model_repository: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    onnx_path = model_repository / f"{UL_MODEL}_network" / "1" / "model.onnx"
    run_export_python("scripts/gpu_device_check.py", "prepare", "--out", str(bundle), "--onnx", str(onnx_path))
    output = run_export_python("scripts/gpu_device_check.py", "run", "--bundle", str(bundle), "--seconds", "1")
    assert json.loads(output[output.index("\n{") :])["passed"]


def test_gpu_preprocess_module_is_what_the_gpu_config_loads() -> None:
    from posetriton.server.repository import load_catalog, render

    files = render(load_catalog(ROOT / "build_engines" / "models.toml")[UL_MODEL])
    shim = files[f"{UL_MODEL}_preprocess/1/gpu_model.py"]
    assert "from posetriton.server.steps.gpu_preprocess import TritonPythonModel" in shim
    assert (ROOT / "posetriton" / "server" / "steps" / "gpu_preprocess.py").is_file()
