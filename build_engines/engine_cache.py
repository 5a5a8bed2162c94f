"""TensorRT engines are GPU- and version-specific: stamp them, cache them per GPU + TensorRT, refuse mismatches.

A TensorRT plan only runs on the GPU model (compute capability, and in practice the exact model: tactics are
timed on it) and the TensorRT version that built it; Triton fails late and obscurely otherwise. So every plan
this project writes carries a JSON sidecar (:class:`EngineStamp`) and a name that says the same, and
:func:`check_engine` refuses, with the reason, a plan whose stamp does not match the node it is about to serve
on. Pure Python: nothing here imports TensorRT, so the checks run before Triton starts and in tests.

Cache layout (one cache per cluster volume, shared by nodes of different GPU models)::

    CACHE/
      nvidia-h100-80gb-hbm3.sm90/             one folder per GPU model + compute capability
        trt-10.5.0/                           one per TensorRT version (major.minor.patch)
          timing.cache                        TensorRT timing cache, shared by every build on this GPU + version
          yolo11n_pose/
            fp16.b1-16-32.onnx-3f2a9c1e04d7/  precision, batch profile, the ONNX it was built from
              yolo11n_pose.fp16.nvidia-h100-80gb-hbm3.sm90.trt10.5.0.plan
              yolo11n_pose.fp16.nvidia-h100-80gb-hbm3.sm90.trt10.5.0.plan.json

Installed into the Triton repository as ``NAME_network/1/model.plan`` (copy or symlink) with its stamp
``NAME_network/1/model.plan.json``.

The cache is shared by replicas that may start together: every file is written under a unique temporary name and
moved into place with ``os.replace`` (a reader sees the old file or the new one, never half of one), and a build
holds an exclusive lock on its cache entry (:func:`entry_lock`), so the second replica waits and then reuses the
first one's plan instead of building the same engine again over it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posetriton.core.contract import CANVAS

STAMP_SUFFIX = ".json"
PLAN_NAME = "model.plan"
PRECISIONS = ("fp16", "int8")
# The network ONNX each precision is built from, inside NAME_network/1/.
SOURCE_ONNX = {"fp16": "model.onnx", "int8": "model.qdq.onnx"}
STAMP_FORMAT = 1


class EngineMismatchError(RuntimeError):
    """An engine was built for another GPU, TensorRT version, ONNX or batch range; the message says which."""


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU and the TensorRT runtime an engine is built on or served with."""

    gpu_name: str  # as the driver reports it, e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"
    tensorrt_version: str  # "10.5.0" (major.minor.patch; a build suffix is dropped)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"\d+\.\d+", self.compute_capability):
            raise ValueError(f"compute capability must look like '8.9', got {self.compute_capability!r}")
        object.__setattr__(self, "tensorrt_version", normalise_tensorrt_version(self.tensorrt_version))

    @property
    def gpu_slug(self) -> str:
        return slug(self.gpu_name)

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")

    def cache_dir(self, cache_root: Path) -> Path:
        """The folder of everything built on this GPU model with this TensorRT version."""
        return cache_root / f"{self.gpu_slug}.{self.sm}" / f"trt-{self.tensorrt_version}"


@dataclass(frozen=True)
class BatchProfile:
    """TensorRT optimization profile over the dynamic batch dimension."""

    min: int = 1
    opt: int = 16
    max: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    @property
    def tag(self) -> str:
        return f"b{self.min}-{self.opt}-{self.max}"


@dataclass(frozen=True)
class EngineStamp:
    """What a plan was built for; written next to it as JSON and checked before it is served."""

    model: str
    precision: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    batch_min: int
    batch_opt: int
    batch_max: int
    onnx_sha256: str  # the ONNX the plan was built from
    plan_sha256: str = ""  # filled once the plan exists
    input_name: str = CANVAS  # uint8 [batch, S, S, 3]
    input_size: int = 640
    fp32_layers: int = 0  # layers held in FP32 by precision constraints (the decode tail, see tensorrt_engine)
    built_at: str = ""
    format: int = STAMP_FORMAT

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    @classmethod
    def for_build(
        cls, model: str, precision: str, device: DeviceInfo, profile: BatchProfile, onnx_sha256: str, **extra: Any
    ) -> EngineStamp:
        return cls(
            model=model,
            precision=precision,
            gpu_name=device.gpu_name,
            compute_capability=device.compute_capability,
            tensorrt_version=device.tensorrt_version,
            batch_min=profile.min,
            batch_opt=profile.opt,
            batch_max=profile.max,
            onnx_sha256=onnx_sha256,
            **extra,
        )

    @property
    def device(self) -> DeviceInfo:
        return DeviceInfo(self.gpu_name, self.compute_capability, self.tensorrt_version)

    @property
    def profile(self) -> BatchProfile:
        return BatchProfile(self.batch_min, self.batch_opt, self.batch_max)

    def engine_name(self) -> str:
        """``MODEL.PRECISION.GPU.smXY.trtVERSION.plan``: the stamp's essentials, readable in a directory listing."""
        d = self.device
        return f"{self.model}.{self.precision}.{d.gpu_slug}.{d.sm}.trt{d.tensorrt_version}.plan"

    def cache_path(self, cache_root: Path) -> Path:
        """Where this engine lives in the cache (see the module docstring for the layout)."""
        variant = f"{self.precision}.{self.profile.tag}.onnx-{self.onnx_sha256[:12]}"
        return self.device.cache_dir(cache_root) / self.model / variant / self.engine_name()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> EngineStamp:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (safe in file and folder names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown-gpu"


def normalise_tensorrt_version(version: str) -> str:
    """``"10.5.0.18"`` or ``"10.5.0"`` -> ``"10.5.0"``: engines are compatible within one major.minor.patch."""
    match = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not match:
        raise ValueError(f"cannot read a TensorRT version from {version!r}")
    major, minor, patch = match.group(1), match.group(2), match.group(3) or "0"
    return f"{major}.{minor}.{patch}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def stamp_path(plan: Path) -> Path:
    return plan.with_name(plan.name + STAMP_SUFFIX)


def temporary_sibling(path: Path) -> Path:
    """A new, unique, empty file next to ``path`` (same file system, so ``os.replace`` onto ``path`` is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(handle)
    return Path(name)


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that concurrent readers and writers never see a partial file."""
    partial = temporary_sibling(path)
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def atomic_copy(source: Path, target: Path) -> None:
    partial = temporary_sibling(target)
    try:
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def entry_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on one cache entry (``directory/.lock``) across processes and nodes sharing it.

    ``flock`` is advisory and released by the kernel when the holder dies, so a crashed build never leaves the
    entry locked. On network file systems without ``flock`` support use one builder Job instead of racing pods.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_stamp(plan: Path, stamp: EngineStamp) -> EngineStamp:
    """Record the plan's hash in the stamp and write the sidecar; returns the completed stamp."""
    stamp = dataclasses.replace(stamp, plan_sha256=sha256_file(plan))
    atomic_write_bytes(stamp_path(plan), stamp.to_json().encode())
    return stamp


def read_stamp(plan: Path) -> EngineStamp:
    sidecar = stamp_path(plan)
    if not sidecar.is_file():
        raise EngineMismatchError(f"{plan}: no stamp {sidecar.name}; engines without a stamp are refused (rebuild it)")
    try:
        return EngineStamp.from_json(sidecar.read_text())
    except (ValueError, TypeError) as exc:
        raise EngineMismatchError(f"{plan}: unreadable stamp {sidecar}: {exc}") from None


def mismatches(
    stamp: EngineStamp,
    device: DeviceInfo,
    *,
    onnx_sha256: str | None = None,
    max_batch_size: int | None = None,
    precision: str | None = None,
) -> list[str]:
    """Every reason the stamped engine cannot serve on ``device``; empty when it can."""
    reasons = []
    if stamp.compute_capability != device.compute_capability:
        reasons.append(
            f"built for compute capability {stamp.compute_capability} ({stamp.gpu_name}), "
            f"this GPU is {device.compute_capability} ({device.gpu_name})"
        )
    elif slug(stamp.gpu_name) != device.gpu_slug:
        reasons.append(
            f"built on {stamp.gpu_name!r}, this GPU is {device.gpu_name!r} (same compute capability, but TensorRT "
            "tactics are timed per GPU model)"
        )
    if normalise_tensorrt_version(stamp.tensorrt_version) != device.tensorrt_version:
        reasons.append(
            f"built with TensorRT {stamp.tensorrt_version}, this runtime is TensorRT {device.tensorrt_version}"
        )
    if onnx_sha256 is not None and stamp.onnx_sha256 != onnx_sha256:
        reasons.append(
            f"built from ONNX sha256 {stamp.onnx_sha256[:12]}, the repository's ONNX is {onnx_sha256[:12]} "
            "(the model was re-exported)"
        )
    if max_batch_size is not None and stamp.batch_max < max_batch_size:
        reasons.append(
            f"optimization profile max batch {stamp.batch_max} < the model's max_batch_size {max_batch_size}"
        )
    if precision is not None and stamp.precision != precision:
        reasons.append(f"built at {stamp.precision}, {precision} was asked for")
    return reasons


def check_engine(
    plan: Path,
    device: DeviceInfo,
    *,
    onnx_path: Path | None = None,
    max_batch_size: int | None = None,
    precision: str | None = None,
    verify_plan_hash: bool = True,
) -> EngineStamp:
    """Return the plan's stamp if it can serve on ``device``; raise :class:`EngineMismatchError` saying why not."""
    plan = Path(plan)
    if not plan.is_file():
        raise EngineMismatchError(f"{plan}: no such engine")
    stamp = read_stamp(plan)
    reasons = mismatches(
        stamp,
        device,
        onnx_sha256=sha256_file(onnx_path) if onnx_path is not None and onnx_path.is_file() else None,
        max_batch_size=max_batch_size,
        precision=precision,
    )
    if verify_plan_hash and stamp.plan_sha256 and sha256_file(plan) != stamp.plan_sha256:
        reasons.append("the plan's sha256 differs from its stamp (plan replaced or stamp stale)")
    if reasons:
        raise EngineMismatchError(f"{plan} refused: " + "; ".join(reasons))
    return stamp


def install_engine(cached_plan: Path, version_dir: Path, *, link: bool = False) -> Path:
    """Put a cached plan (and its stamp) at ``version_dir/model.plan``; ``link`` symlinks instead of copying."""
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / PLAN_NAME
    stamp_path(target).unlink(missing_ok=True)  # no moment where a new plan sits next to the old stamp
    if link:
        partial = temporary_sibling(target)
        partial.unlink()
        partial.symlink_to(cached_plan.resolve())
        os.replace(partial, target)
    else:
        atomic_copy(cached_plan, target)
    atomic_copy(stamp_path(cached_plan), stamp_path(target))
    return target


def find_cached(
    cache_root: Path, model: str, precision: str, device: DeviceInfo, profile: BatchProfile, onnx_sha256: str
) -> Path | None:
    """The cached plan for exactly this build, if one is there and its stamp agrees."""
    expected = EngineStamp.for_build(model, precision, device, profile, onnx_sha256)
    plan = expected.cache_path(cache_root)
    if not plan.is_file():
        return None
    try:
        check_engine(plan, device, precision=precision)
    except EngineMismatchError:
        return None
    return plan


# ------------------------------------------------------------------------------------------ device detection


def detect_device(gpu_index: int = 0, tensorrt_version: str | None = None) -> DeviceInfo:
    """The node's GPU (``nvidia-smi``, else torch) and the TensorRT runtime version.

    The TensorRT version is, in order: ``tensorrt_version``; ``$TRT_VERSION`` (set in NVIDIA's NGC containers,
    i.e. the version Triton itself serves with); the ``tensorrt`` Python package.
    """
    name, capability = _gpu_from_nvidia_smi(gpu_index) or _gpu_from_torch(gpu_index) or (None, None)
    if name is None or capability is None:
        raise EngineMismatchError("no NVIDIA GPU found (nvidia-smi and torch.cuda both failed): cannot serve engines")
    version = tensorrt_version or os.environ.get("TRT_VERSION") or _tensorrt_package_version()
    if not version:
        raise EngineMismatchError("TensorRT version unknown: set TRT_VERSION or install the tensorrt package")
    return DeviceInfo(name, capability, version)


def _gpu_from_nvidia_smi(index: int) -> tuple[str, str] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    parts = [p.strip() for p in out.strip().splitlines()[0].rsplit(",", 1)] if out.strip() else []
    return (parts[0], parts[1]) if len(parts) == 2 else None


def _gpu_from_torch(index: int) -> tuple[str, str] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def _tensorrt_package_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)
