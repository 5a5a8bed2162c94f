"""Build TensorRT engines from the exported ONNX on the GPU that serves them (FP16, or INT8 from the Q/DQ ONNX).

Needs the optional GPU extra (``requirements/gpu.txt``: the ``tensorrt`` Python package, whose version must
equal the TensorRT inside the Triton image) and an NVIDIA GPU; ``tensorrt`` is imported only when a build runs.

* one optimization profile over the dynamic batch (``images`` ``[min|opt|max, 3, 640, 640]``, configurable);
* a persistent timing cache per GPU model + TensorRT version (builds after the first reuse its tactic timings);
* FP16: ``BuilderFlag.FP16`` on the FP32 ONNX. INT8: explicit quantization, i.e. the Q/DQ ONNX made and
  accuracy-gated by :mod:`build_engines.quantize` (calibration scales are in the graph, no TensorRT calibrator)
  with ``INT8`` + ``FP16`` flags so layers outside Q/DQ pairs run in FP16;
* every plan is stamped (:mod:`build_engines.engine_cache`) and the equivalent ``trtexec`` command is printed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from build_engines.engine_cache import (
    PLAN_NAME,
    SOURCE_ONNX,
    BatchProfile,
    DeviceInfo,
    EngineMismatchError,
    EngineStamp,
    check_engine,
    find_cached,
    install_engine,
    sha256_file,
    write_stamp,
)

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
DEFAULT_WORKSPACE_MB = 4096
TIMING_CACHE_NAME = "timing.cache"


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build the network; the message carries TensorRT's own errors."""


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"
    profile: BatchProfile = field(default_factory=BatchProfile)
    input_size: int = 640
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    builder_optimization_level: int = 3  # TensorRT's default; 4-5 search longer


def trtexec_command(
    onnx_path: Path, plan_path: Path, options: BuildOptions, timing_cache: Path | None = None
) -> list[str]:
    """The ``trtexec`` invocation that builds the same engine (printed by every build, for reproduction)."""
    s, p = options.input_size, options.profile
    shape = f"{INPUT_NAME}:{{}}x3x{s}x{s}"
    command = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        f"--minShapes={shape.format(p.min)}",
        f"--optShapes={shape.format(p.opt)}",
        f"--maxShapes={shape.format(p.max)}",
        f"--memPoolSize=workspace:{options.workspace_mb}M",
        f"--builderOptimizationLevel={options.builder_optimization_level}",
        "--fp16",
    ]
    if options.precision == "int8":
        command.append("--int8")  # explicit quantization: scales come from the Q/DQ nodes, no calibration cache
    if timing_cache is not None:
        command.append(f"--timingCacheFile={timing_cache}")
    return command


def format_command(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)


def build_engine(
    onnx_path: Path, plan_path: Path, options: BuildOptions, timing_cache: Path | None = None
) -> None:  # pragma: no cover - needs TensorRT and a GPU (tests/test_tensorrt_offline.py skips it here)
    """Parse ``onnx_path`` and write the serialized engine to ``plan_path``; update ``timing_cache``."""
    import tensorrt as trt

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    config.builder_optimization_level = options.builder_optimization_level
    config.set_flag(trt.BuilderFlag.FP16)
    if options.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)

    s, p = options.input_size, options.profile
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (p.min, 3, s, s), (p.opt, 3, s, s), (p.max, 3, s, s))
    config.add_optimization_profile(profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build {onnx_path} ({options.precision}); see its log above")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    partial = plan_path.with_name(plan_path.name + ".part")
    partial.write_bytes(memoryview(serialized))
    partial.replace(plan_path)
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        updated = config.get_timing_cache()
        timing_cache.write_bytes(memoryview(updated.serialize()))


@dataclass
class EngineResult:
    plan: Path  # the installed (or cached, when not installed) plan
    stamp: EngineStamp
    built: bool  # False: reused from the cache
    trtexec: str


Builder = Callable[[Path, Path, BuildOptions, Path | None], None]


def ensure_engine(
    model: str,
    network_dir: Path,
    cache_root: Path,
    device: DeviceInfo,
    options: BuildOptions,
    *,
    install: bool = True,
    link: bool = False,
    max_batch_size: int | None = None,
    builder: Builder = build_engine,
    echo: Callable[[str], None] = print,
) -> EngineResult:
    """Reuse the cached engine for this GPU + TensorRT + ONNX + profile, or build it; then install it.

    ``network_dir`` is ``REPOSITORY/NAME_network``; the source ONNX is ``1/model.onnx`` (fp16) or
    ``1/model.qdq.onnx`` (int8, from ``python -m build_engines quantize``). ``builder`` is replaceable so the
    cache and install logic is testable without TensorRT.
    """
    version_dir = network_dir / "1"
    onnx_path = version_dir / SOURCE_ONNX[options.precision]
    if not onnx_path.is_file():
        hint = " (run `python -m build_engines quantize` in the export environment first)" * (
            options.precision == "int8"
        )
        raise FileNotFoundError(f"{model}: {onnx_path} not found{hint}")
    if max_batch_size is not None and options.profile.max < max_batch_size:
        raise EngineMismatchError(
            f"{model}: profile max batch {options.profile.max} < the Triton config's max_batch_size {max_batch_size}"
        )
    onnx_sha = sha256_file(onnx_path)
    timing_cache = device.cache_dir(cache_root) / "timing.cache"
    cached = find_cached(cache_root, model, options.precision, device, options.profile, onnx_sha)
    built = cached is None
    stamp = EngineStamp.for_build(
        model, options.precision, device, options.profile, onnx_sha, input_size=options.input_size
    )
    plan = stamp.cache_path(cache_root)
    command = format_command(trtexec_command(onnx_path, plan, options, timing_cache))
    if cached is None:
        echo(f"[{model}] building {options.precision} engine for {device.gpu_name} (sm {device.compute_capability}, "
             f"TensorRT {device.tensorrt_version}), batch {options.profile.tag}")  # fmt: skip
        echo(f"[{model}] equivalent: {command}")
        builder(onnx_path, plan, options, timing_cache)
        built_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        write_stamp(plan, dataclasses.replace(stamp, built_at=built_at))
    else:
        echo(f"[{model}] reusing cached engine {plan}")
    stamp = check_engine(plan, device, onnx_path=onnx_path, precision=options.precision)
    if install:
        plan = install_engine(plan, version_dir, link=link)
        echo(f"[{model}] installed {version_dir / PLAN_NAME}")
    return EngineResult(plan=plan, stamp=stamp, built=built, trtexec=command)
