"""Build TensorRT engines from the exported ONNX on the GPU that serves them (FP16, or INT8 from the Q/DQ ONNX).

Needs the optional GPU extra (``requirements/gpu.txt``: the ``tensorrt`` Python package, whose version must
equal the TensorRT inside the Triton image) and an NVIDIA GPU; ``tensorrt`` is imported only when a build runs.

* the builder's own ``tensorrt.__version__`` must equal the serving TensorRT (``$TRT_VERSION`` in NGC images);
  a plan built by another version would not load, so :func:`ensure_engine` refuses before building and the
  stamp records the builder's version;
* one optimization profile over the dynamic batch (``canvas`` uint8 ``[min|opt|max, S, S, 3]``, configurable);
* FP16: ``BuilderFlag.FP16`` on the FP32 ONNX. INT8: explicit quantization, i.e. the Q/DQ ONNX made and
  accuracy-gated by :mod:`build_engines.quantize` (calibration scales are in the graph, no TensorRT calibrator)
  with ``INT8`` + ``FP16`` flags so layers outside Q/DQ pairs run in FP16;
* the decode tail (:func:`decode_tail`: the heads' last pointwise convolutions and every layer after them:
  DFL, anchor/stride decode, box arithmetic, TopK) is held in FP32 by precision constraints
  (``OBEY_PRECISION_CONSTRAINTS``); in FP16 those coordinates would move in 0.25-0.5 px steps at 256-640 px;
* a persistent timing cache per GPU model + TensorRT version, written atomically; a cache that fails to load is
  replaced by an empty one instead of failing the build;
* every plan is stamped (:mod:`build_engines.engine_cache`) and the equivalent ``trtexec`` command is printed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from build_engines.engine_cache import (
    PLAN_NAME,
    SOURCE_ONNX,
    BatchProfile,
    DeviceInfo,
    EngineMismatchError,
    EngineStamp,
    atomic_write_bytes,
    check_engine,
    entry_lock,
    find_cached,
    install_engine,
    normalise_tensorrt_version,
    sha256_file,
    stamp_path,
    temporary_sibling,
    write_stamp,
)
from posetriton.core.contract import CANVAS

logger = logging.getLogger(__name__)

INPUT_NAME = CANVAS  # uint8 [batch, S, S, 3], letterboxed, decoded RGB order
DEFAULT_WORKSPACE_MB = 4096
TIMING_CACHE_NAME = "timing.cache"
CONVOLUTION = "Conv"


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build the network; the message carries TensorRT's own errors."""


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"
    profile: BatchProfile = field(default_factory=BatchProfile)
    input_size: int = 640
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    builder_optimization_level: int = 3  # TensorRT's default; 4-5 search longer


def input_shape(batch: int, input_size: int) -> tuple[int, int, int, int]:
    """The network input's shape for one batch size: NHWC uint8 canvas (the graph transposes and scales)."""
    return (batch, input_size, input_size, 3)


# ---------------------------------------------------------------------------------------------- decode tail


@dataclass(frozen=True)
class GraphNode:
    """One node of an ONNX graph or one layer of a TensorRT network, as far as :func:`decode_tail` needs it."""

    name: str
    op: str  # CONVOLUTION for convolutions; anything else is opaque
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    spatial: bool = False  # a convolution whose kernel is larger than 1 x 1


def decode_tail(nodes: Sequence[GraphNode]) -> list[str]:
    """Names of the nodes that must stay FP32: the heads' last convolutions and everything computed after them.

    The tail starts at the pointwise convolutions from which no spatial (kernel > 1) convolution is reachable
    (the ones that predict box distributions, scores and keypoint offsets, and the DFL) and holds every node fed
    by them that does not reach a spatial convolution either: the anchor/stride decode, the box arithmetic and
    the TopK/gather. The input side (cast, transpose,
    /255) and the backbone always reach a spatial convolution, so they keep the builder's precision. ``nodes``
    are in topological order (as in a valid ONNX graph and a TensorRT network).
    """
    consumers: dict[str, list[GraphNode]] = {}
    for node in nodes:
        for tensor in node.inputs:
            consumers.setdefault(tensor, []).append(node)
    reaches_spatial: dict[str, bool] = {}
    for node in reversed(nodes):
        reaches_spatial[node.name] = any(
            (consumer.op == CONVOLUTION and consumer.spatial) or reaches_spatial[consumer.name]
            for tensor in node.outputs
            for consumer in consumers.get(tensor, [])
        )
    tail: list[str] = []
    produced_in_tail: set[str] = set()
    for node in nodes:
        if reaches_spatial[node.name]:
            continue
        head_conv = node.op == CONVOLUTION and not node.spatial
        if head_conv or any(tensor in produced_in_tail for tensor in node.inputs):
            tail.append(node.name)
            produced_in_tail.update(node.outputs)
    return tail


def onnx_graph_nodes(model: Any) -> list[GraphNode]:
    """An ``onnx.ModelProto``'s nodes for :func:`decode_tail` (a Conv whose weight is not a constant counts as
    spatial, so the tail never grows by mistake)."""
    initializers = {init.name: list(init.dims) for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        spatial = False
        if node.op_type == "Conv":
            kernel = initializers.get(node.input[1], [])[2:] if len(node.input) > 1 else []
            spatial = not kernel or any(k > 1 for k in kernel)
        op = CONVOLUTION if node.op_type == "Conv" else node.op_type
        nodes.append(GraphNode(node.name, op, tuple(i for i in node.input if i), tuple(node.output), spatial))
    return nodes


def tensorrt_graph_nodes(network: Any, trt: Any) -> list[GraphNode]:
    """A parsed ``tensorrt.INetworkDefinition``'s layers for :func:`decode_tail`."""
    nodes = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        spatial = False
        op = str(layer.type)
        if layer.type == trt.LayerType.CONVOLUTION:
            op = CONVOLUTION
            layer.__class__ = trt.IConvolutionLayer  # the Python API's documented downcast, for kernel_size_nd
            spatial = any(int(k) > 1 for k in layer.kernel_size_nd)
        inputs = (layer.get_input(i) for i in range(layer.num_inputs))
        outputs = (layer.get_output(i) for i in range(layer.num_outputs))
        nodes.append(
            GraphNode(
                layer.name,
                op,
                tuple(t.name for t in inputs if t is not None),
                tuple(t.name for t in outputs if t is not None),
                spatial,
            )
        )
    return nodes


def constrain_decode_tail(network: Any, config: Any, trt: Any) -> list[str]:
    """Hold the decode tail in FP32: layer precision and float output types, ``OBEY_PRECISION_CONSTRAINTS``.

    Constants and shape layers carry no arithmetic and are left alone; integer outputs (TopK indices) keep
    their type. Returns the constrained layer names (recorded in the stamp and the trtexec command).
    """
    tail = set(decode_tail(tensorrt_graph_nodes(network, trt)))
    float_types = {trt.DataType.FLOAT, trt.DataType.HALF}
    skipped = {trt.LayerType.CONSTANT, trt.LayerType.SHAPE}
    constrained = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.name not in tail or layer.type in skipped:
            continue
        float_outputs = [i for i in range(layer.num_outputs) if layer.get_output(i).dtype in float_types]
        if not float_outputs:
            continue
        layer.precision = trt.DataType.FLOAT
        for output in float_outputs:
            layer.set_output_type(output, trt.DataType.FLOAT)
        constrained.append(layer.name)
    if constrained:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return constrained


# ---------------------------------------------------------------------------------------------- trtexec


def trtexec_command(
    onnx_path: Path,
    plan_path: Path,
    options: BuildOptions,
    timing_cache: Path | None = None,
    fp32_layers: Iterable[str] = (),
) -> list[str]:
    """The ``trtexec`` invocation that builds the same engine (printed by every build, for reproduction)."""
    s, p = options.input_size, options.profile

    def shape(batch: int) -> str:
        return f"{INPUT_NAME}:" + "x".join(map(str, input_shape(batch, s)))

    command = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        f"--minShapes={shape(p.min)}",
        f"--optShapes={shape(p.opt)}",
        f"--maxShapes={shape(p.max)}",
        f"--memPoolSize=workspace:{options.workspace_mb}M",
        f"--builderOptimizationLevel={options.builder_optimization_level}",
        "--fp16",
    ]
    if options.precision == "int8":
        command.append("--int8")  # explicit quantization: scales come from the Q/DQ nodes, no calibration cache
    layers = list(fp32_layers)
    if layers:
        command += [
            "--precisionConstraints=obey",
            "--layerPrecisions=" + ",".join(f"{name}:fp32" for name in layers),
            "--layerOutputTypes=" + ",".join(f"{name}:fp32" for name in layers),
        ]
    if timing_cache is not None:
        command.append(f"--timingCacheFile={timing_cache}")
    return command


def format_command(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)


# ---------------------------------------------------------------------------------------------- the build


def load_timing_cache(config: Any, timing_cache: Path | None) -> Any:
    """The persisted timing cache, or an empty one when it is missing or does not load (truncated, foreign)."""
    data = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception as exc:  # TensorRT raises TypeError/RuntimeError on bytes it cannot deserialize
            cache, reason = None, str(exc)
        else:
            reason = "TensorRT returned no cache"
        if cache is not None:
            return cache
        logger.warning("timing cache %s does not load (%s); building with an empty one", timing_cache, reason)
    return config.create_timing_cache(b"")


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    options: BuildOptions,
    timing_cache: Path | None = None,
    *,
    trt: Any = None,
) -> list[str]:
    """Parse ``onnx_path``, write the serialized engine to ``plan_path`` and update ``timing_cache``.

    ``trt`` is the ``tensorrt`` module (imported when None; tests pass a recorder). Returns the names of the
    layers held in FP32. Both files are written under unique temporary names and moved into place.
    """
    if trt is None:  # pragma: no cover - needs TensorRT (tests pass a recorder)
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
    fp32_layers = constrain_decode_tail(network, config, trt)
    logger.info("%s: %d decode-tail layers held in FP32", onnx_path, len(fp32_layers))

    s, p = options.input_size, options.profile
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, input_shape(p.min, s), input_shape(p.opt, s), input_shape(p.max, s))
    config.add_optimization_profile(profile)
    config.set_timing_cache(load_timing_cache(config, timing_cache), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build {onnx_path} ({options.precision}); see its log above")
    atomic_write_bytes(plan_path, memoryview(serialized))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, memoryview(config.get_timing_cache().serialize()))
    return fp32_layers


def tensorrt_package_version() -> str | None:
    """``tensorrt.__version__`` of the package a build would import (None when it is not installed)."""
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


@dataclass
class EngineResult:
    plan: Path  # the installed (or cached, when not installed) plan
    stamp: EngineStamp
    built: bool  # False: reused from the cache
    trtexec: str


Builder = Callable[[Path, Path, BuildOptions, Path | None], Sequence[str] | None]


def check_builder_version(model: str, builder_version: str | None, device: DeviceInfo) -> str:
    """The builder's normalised TensorRT version; refuse one that differs from the serving TensorRT."""
    if not builder_version:
        raise EngineMismatchError(
            f"{model}: cannot build: the tensorrt Python package is not installed "
            f"(install tensorrt=={device.tensorrt_version}, the serving TensorRT)"
        )
    version = normalise_tensorrt_version(builder_version)
    if version != device.tensorrt_version:
        raise EngineMismatchError(
            f"{model}: the builder is TensorRT {version} (the tensorrt Python package) but engines are served by "
            f"TensorRT {device.tensorrt_version}; a plan only loads in the version that built it: "
            f"install tensorrt=={device.tensorrt_version}"
        )
    return version


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
    builder_version: str | None = None,
    echo: Callable[[str], None] = print,
) -> EngineResult:
    """Reuse the cached engine for this GPU + TensorRT + ONNX + profile, or build it; then install it.

    ``network_dir`` is ``REPOSITORY/NAME_network``; the source ONNX is ``1/model.onnx`` (fp16) or
    ``1/model.qdq.onnx`` (int8, from ``python -m build_engines quantize``). ``builder`` is replaceable so the
    cache and install logic is testable without TensorRT; ``builder_version`` is the TensorRT version it builds
    with (default: the installed ``tensorrt`` package's), checked against ``device.tensorrt_version`` (the
    serving TensorRT) before anything is built. Concurrent callers on one cache entry serialise on its lock:
    the first builds, the others reuse its plan.
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
    timing_cache = device.cache_dir(cache_root) / TIMING_CACHE_NAME
    stamp = EngineStamp.for_build(
        model, options.precision, device, options.profile, onnx_sha, input_size=options.input_size
    )
    plan = stamp.cache_path(cache_root)
    command = format_command(trtexec_command(onnx_path, plan, options, timing_cache))
    with entry_lock(plan.parent):
        built = find_cached(cache_root, model, options.precision, device, options.profile, onnx_sha) is None
        if built:
            version = check_builder_version(
                model, builder_version if builder_version is not None else tensorrt_package_version(), device
            )
            echo(
                f"[{model}] building {options.precision} engine for {device.gpu_name} "
                f"(sm {device.compute_capability}, TensorRT {version}), batch {options.profile.tag}"
            )
            echo(f"[{model}] equivalent: {command}")
            partial = temporary_sibling(plan)
            try:
                fp32_layers = list(builder(onnx_path, partial, options, timing_cache) or [])
                if fp32_layers:
                    tail = format_command(trtexec_command(onnx_path, plan, options, timing_cache, fp32_layers))
                    echo(f"[{model}] {len(fp32_layers)} decode-tail layers held in FP32; equivalent: {tail}")
                built_stamp = dataclasses.replace(
                    stamp,
                    tensorrt_version=version,  # the builder's own version, checked equal to the serving one
                    built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    fp32_layers=len(fp32_layers),
                )
                stamp_path(plan).unlink(missing_ok=True)  # a stale stamp never describes the new plan
                partial.replace(plan)
                write_stamp(plan, built_stamp)
            finally:
                partial.unlink(missing_ok=True)
        else:
            echo(f"[{model}] reusing cached engine {plan}")
        stamp = check_engine(plan, device, onnx_path=onnx_path, precision=options.precision)
    if install:
        plan = install_engine(plan, version_dir, link=link)
        echo(f"[{model}] installed {version_dir / PLAN_NAME}")
    return EngineResult(plan=plan, stamp=stamp, built=built, trtexec=command)
