"""Session fixtures: the real model repository, a real Triton server, real photos, upstream references.

Exports and references run in the export environment (``.venv-export``, override with
POSETRITON_EXPORT_PYTHON); they are cached under ``.cache/tests`` keyed by the code that makes
them, so a second run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from posetriton.server.launcher import ServerOptions, TritonServer, free_port
from posetriton.server.server_ownership import PREFIX_ENV, regions_of, servers_of, stubs_of

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "tests"
EXPORT_PYTHON = Path(os.environ.get("POSETRITON_EXPORT_PYTHON", ROOT / ".venv-export" / "bin" / "python"))
SG_MODEL = "yolo_nas_pose_n"
UL_MODEL = "yolo11n_pose"
SEED = 0
# Code whose change invalidates the cached exports and references.
EXPORT_CODE = [
    "__main__.py", "export.py", "onnx_graph.py", "openvino_ir.py", "parity.py", "photos.py", "registry.py",
    "ultralytics_pose.py", "yolo_nas_pose.py",
]  # fmt: skip
CACHE_INPUTS = [
    *(ROOT / "build_engines" / name for name in EXPORT_CODE),
    ROOT / "posetriton" / "core" / "contract.py",
    ROOT / "posetriton" / "core" / "processing.py",
    ROOT / "posetriton" / "core" / "images.py",
    ROOT / "build_engines" / "models.toml",
    ROOT / "posetriton" / "server" / "repository.py",
    ROOT / "posetriton" / "core" / "spec.py",
    ROOT / "tests" / "reference" / "make_references.py",
]


# Every server this session starts, here or in a child process (``posetriton serve``, the container entry point),
# names its Python-backend shared memory with this, and its stubs carry it: the end of the session checks that
# none of them is left, without looking at the servers other users of the machine run.
SESSION_SHM_PREFIX = f"posetriton_test{os.getpid()}_{secrets.token_hex(3)}_"
os.environ[PREFIX_ENV] = SESSION_SHM_PREFIX
# How long a server's leftovers may take to go once it has ended (the reaper SIGKILLs stubs and unlinks files).
RELEASE_WAIT_S = 30.0


def wait_until(condition: Callable[[], bool], what: str | Callable[[], str], timeout_s: float) -> None:
    """Poll ``condition`` every 0.1 s; fail naming ``what`` (a text, or a function giving one then) if it is still
    false after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what() if callable(what) else what}")
        time.sleep(0.1)


def leftovers(prefix: str) -> dict[str, list]:
    """What of the servers whose region prefix starts with ``prefix`` is still there."""
    return {
        "tritonserver processes": servers_of(prefix),
        "Python-backend stubs": stubs_of(prefix),
        "shared-memory regions": [path.name for path in regions_of(prefix)],
    }


def assert_nothing_left(prefix: str, what: str) -> None:
    """Wait (bounded) until no process and no region of ``prefix`` remains; fail listing what does."""
    left: dict[str, list] = {}

    def released() -> bool:
        left.update(leftovers(prefix))
        return not any(left.values())

    wait_until(released, lambda: f"{what} to leave nothing behind; still there: {left}", RELEASE_WAIT_S)


@pytest.fixture(scope="session", autouse=True)
def session_leaves_nothing_behind() -> Iterator[None]:
    """Set up before, and so torn down after, every server fixture: the session fails if anything it started
    (a tritonserver, a stub, a shared-memory region) outlives it."""
    yield
    assert_nothing_left(SESSION_SHM_PREFIX, "the test session")


def _fingerprint(*extra: str) -> str:
    digest = hashlib.sha256()
    for path in CACHE_INPUTS:
        digest.update(path.read_bytes())
    for text in extra:
        digest.update(text.encode())
    return digest.hexdigest()[:16]


def run_export_python(*args: str, timeout: float = 1800) -> str:
    if not EXPORT_PYTHON.exists():
        pytest.fail(f"export environment missing: {EXPORT_PYTHON} (run `make export-env`)")
    proc = subprocess.run(
        [str(EXPORT_PYTHON), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "YOLO_OFFLINE": "1"},
    )  # fmt: skip
    if proc.returncode:
        pytest.fail(
            f"export-environment command failed: {' '.join(args)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


@pytest.fixture(scope="session")
def photo_paths() -> list[Path]:
    """Real photos with people: the bundled samples plus Ultralytics' bus.jpg and zidane.jpg."""
    assets = Path(
        run_export_python(
            "-c", "import ultralytics, pathlib; print(pathlib.Path(ultralytics.__file__).parent / 'assets')"
        ).strip()
    )
    return [ROOT / "samples" / "grace_hopper.jpg", ROOT / "samples" / "astronaut.webp", assets / "bus.jpg",
            assets / "zidane.jpg"]  # fmt: skip


@pytest.fixture(scope="session")
def crowd_photo(photo_paths: list[Path]) -> Path:
    """A dense scene made from a real photo: bus.jpg tiled 4x4 and halved (yolo11n-pose finds 37 people at 0.25).

    It sets the Ultralytics family's in-graph top-k (build_engines/models.toml): the parity tests compare the
    served poses on it with Ultralytics' own, which keeps every candidate above conf.
    """
    path = CACHE / "photos" / "bus_crowd_4x4.jpg"
    if not path.exists():
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(next(p for p in photo_paths if p.name == "bus.jpg")) as bus:
            tile = Image.new("RGB", (bus.width * 4, bus.height * 4))
            for column in range(4):
                for row in range(4):
                    tile.paste(bus, (column * bus.width, row * bus.height))
        tile.resize((tile.width // 2, tile.height // 2), Image.Resampling.LANCZOS).save(path, "JPEG", quality=95)
    return path


@pytest.fixture(scope="session")
def model_repository() -> Path:
    """yolo11n_pose (trained weights) and yolo_nas_pose_n (seeded random init), exported and written."""
    key = _fingerprint(str(SEED))
    repository = CACHE / "repository"
    stamp = CACHE / "repository.key"
    if not (stamp.exists() and stamp.read_text() == key and (repository / UL_MODEL / "config.pbtxt").exists()):
        workdir = CACHE / "export"
        common = ["-m", "build_engines", "build", "--repository", str(repository), "--workdir", str(workdir)]
        run_export_python(*common, UL_MODEL)
        run_export_python(*common, SG_MODEL, "--seed", str(SEED))
        stamp.write_text(key)
    return repository


def export_report(repository: Path, model: str) -> dict:
    return json.loads((repository / f"{model}_network" / "export_report.json").read_text())


@pytest.fixture(scope="session")
def references(model_repository: Path, photo_paths: list[Path], crowd_photo: Path) -> dict:
    """Upstream outputs: ``{"arrays": {name: array}, "detections": {"super_gradients"|"ultralytics": {photo: ..}}}``.

    Covers ``photo_paths`` and ``crowd_photo``.
    """
    photo_paths = [*photo_paths, crowd_photo]
    out = CACHE / "references"
    key = _fingerprint(*(str(p) for p in photo_paths))
    stamp = out / "key"
    if not (stamp.exists() and stamp.read_text() == key):
        sg_files = export_report(model_repository, SG_MODEL)["files"]
        ul_files = export_report(model_repository, UL_MODEL)["files"]
        run_export_python(
            "tests/reference/make_references.py", "--out", str(out), "--photos", *map(str, photo_paths),
            "--sg-variant", SG_MODEL, "--sg-checkpoint", sg_files["checkpoint"],
            "--ul-weights", ul_files["weights"], "--ul-static-onnx", ul_files["static_onnx"],
        )  # fmt: skip
        stamp.write_text(key)
    with np.load(out / "arrays.npz") as data:
        arrays = {name: data[name] for name in data.files}
    return {"arrays": arrays, "detections": json.loads((out / "detections.json").read_text())}


@pytest.fixture(scope="session")
def float32_noise_of(references: dict, photo_paths: list[Path], crowd_photo: Path) -> dict[str, dict[str, float]]:
    """Per model: PyTorch float32's own distance from the same network in float64 on every reference photo,
    on the rows the served network returns (build_engines.parity.float32_noise): the scale of every bound that
    compares two float32 runs of a network."""
    from build_engines.parity import float32_noise, top_k_rows
    from posetriton.server.repository import load_catalog

    catalog = load_catalog(ROOT / "build_engines" / "models.toml")
    photos = [*photo_paths, crowd_photo]
    noise = {}
    for model, prefix in ((SG_MODEL, "sg"), (UL_MODEL, "ul")):
        k, keypoints = catalog[model].num_candidates, catalog[model].postprocess.num_keypoints

        def rows(name: str, prefix: str = prefix, k: int = k) -> list[np.ndarray]:
            return [top_k_rows(references["arrays"][f"{prefix}_{name}/{photo.name}"][None], k) for photo in photos]

        noise[model] = float32_noise(rows("candidates64"), rows("candidates"), keypoints)
    return noise


def photo_bounds(noise: dict[str, float], width: int, height: int, input_size: int) -> dict[str, float]:
    """Bounds for two float32 runs of a served model on one photo, in its own pixels (boxes, keypoints_xy) and
    as probabilities (scores, keypoint_conf): the network's (FLOAT32_MARGIN x noise, in input pixels) times the
    letterbox's inverse scale, plus the float32 spacing of the photo's largest coordinate once per side (each
    maps it back with its own rounding)."""
    from build_engines.parity import noise_bounds

    network = noise_bounds(noise)
    inverse_scale = max(width, height) / input_size
    mapping = 2 * float(np.spacing(np.float32(max(width, height))))
    return {
        "boxes": network["boxes"] * inverse_scale + mapping,
        "keypoints_xy": network["keypoints_xy"] * inverse_scale + mapping,
        "scores": network["scores"],
        "keypoint_conf": network["keypoint_conf"],
    }


@pytest.fixture(scope="session")
def bounds_for(float32_noise_of: dict[str, dict[str, float]]) -> Callable[[str, bytes], dict[str, float]]:
    """``bounds_for(model, image)``: how far two float32 runs of ``model`` on that encoded photo may differ."""
    from posetriton.core.images import decode_image
    from posetriton.server.repository import load_catalog

    catalog = load_catalog(ROOT / "build_engines" / "models.toml")

    def bounds(model: str, image: bytes) -> dict[str, float]:
        spec = catalog[model].letterbox
        height, width = decode_image(image, spec.max_pixels).shape[:2]
        return photo_bounds(float32_noise_of[model], width, height, spec.input_size)

    return bounds


def model_stats(url: str, model: str) -> tuple[int, int, int]:
    """(successful requests, failed requests, images inferred) so far, from Triton's statistics.

    Triton counts a request just after it sent the response, so a read right after a call can miss
    it: read until two reads a moment apart agree.
    """

    def read() -> tuple[int, int, int]:
        with grpcclient.InferenceServerClient(url) as triton:
            (stats,) = triton.get_inference_statistics(model, as_json=True)["model_stats"]
        inference = stats["inference_stats"]
        return (
            int(inference["success"].get("count", 0)),
            int(inference["fail"].get("count", 0)),
            int(stats.get("inference_count", 0)),
        )

    previous = read()
    for _ in range(20):
        time.sleep(0.25)
        current = read()
        if current == previous:
            return current
        previous = current
    return previous


def start_server(
    repository: Path, config_name: str = "cpu", models: list[str] | None = None, restrict_control_apis: bool = False
) -> TritonServer:
    # Unrestricted by default: the shared test servers serve tests that register shared memory and load
    # models themselves; the launcher's restricted default is tested in tests/test_launcher.py.
    options = ServerOptions(
        repository=repository,
        config_name=config_name,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        models=models,
        restrict_control_apis=restrict_control_apis,
    )
    return TritonServer(options).start(timeout=180)


@pytest.fixture(scope="session")
def server(model_repository: Path) -> Iterator[TritonServer]:
    """One real Triton for the session, CPU configuration (OpenVINO f32)."""
    triton = start_server(model_repository)
    yield triton
    triton.stop()


@pytest.fixture(scope="session")
def served_url(server: TritonServer) -> str:
    return server.grpc_url
