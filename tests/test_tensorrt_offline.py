"""TensorRT path checked without a GPU: engine stamps and refusals, the engine cache (also under two racing
builders), the builder's TensorRT version check, the build itself against a recorder of the TensorRT API (flags,
profile, FP32 decode tail, timing cache), GPU configurations, and whether the exported graphs suit TensorRT's ONNX
parser. The real TensorRT build is skipped without a GPU."""

from __future__ import annotations

import importlib.util
import json
import logging
import multiprocessing
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from build_engines import tensorrt_engine
from build_engines.engine_cache import (
    BatchProfile,
    DeviceInfo,
    EngineMismatchError,
    EngineStamp,
    check_engine,
    sha256_file,
    stamp_path,
)
from build_engines.tensorrt_engine import (
    CONVOLUTION,
    BuildOptions,
    GraphNode,
    build_engine,
    decode_tail,
    ensure_engine,
    load_timing_cache,
    trtexec_command,
)
from posetriton.core.contract import CANVAS
from posetriton.server.model_config import ModelInstanceGroup, parse
from posetriton.server.repository import GPU_CONFIGS, load_catalog, render
from tests.conftest import ROOT, UL_MODEL, run_export_python

CATALOG = load_catalog(ROOT / "build_engines" / "models.toml")
H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", "10.5.0.18")
H200 = DeviceInfo("NVIDIA H200", "9.0", "10.5.0")
L4 = DeviceInfo("NVIDIA L4", "8.9", "10.5.0")
HAS_GPU = shutil.which("nvidia-smi") is not None
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
TRT_OPS = {
    line.strip()
    for line in (ROOT / "build_engines" / "trt_onnx_ops.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
}


@pytest.fixture(autouse=True)
def _builder_is_the_serving_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake builders build "with" TensorRT 10.5.0, the version of the devices below, unless a test says not."""
    monkeypatch.setattr(tensorrt_engine, "tensorrt_package_version", lambda: "10.5.0.18")


def fake_network(tmp_path: Path, model: str = UL_MODEL) -> Path:
    network = tmp_path / "repo" / f"{model}_network"
    (network / "1").mkdir(parents=True)
    (network / "1" / "model.onnx").write_bytes(b"onnx-v1")
    return network


def fake_builder(calls: list[Path]):  # type: ignore[no-untyped-def]
    def build(onnx_path: Path, plan: Path, options: BuildOptions, timing_cache: Path | None) -> None:
        calls.append(plan)
        plan.parent.mkdir(parents=True, exist_ok=True)
        plan.write_bytes(b"plan:" + onnx_path.read_bytes() + options.precision.encode())
        assert timing_cache is not None
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(b"timings")

    return build


# ------------------------------------------------------------------------------------------------ stamps


def test_engine_name_and_stamp_say_gpu_tensorrt_and_precision(tmp_path: Path) -> None:
    stamp = EngineStamp.for_build(UL_MODEL, "int8", H100, BatchProfile(1, 8, 32), "ab" * 32)
    assert stamp.engine_name() == "yolo11n_pose.int8.nvidia-h100-80gb-hbm3.sm90.trt10.5.0.plan"
    assert stamp.cache_path(tmp_path).relative_to(tmp_path).parts == (
        "nvidia-h100-80gb-hbm3.sm90",
        "trt-10.5.0",
        UL_MODEL,
        "int8.b1-8-32.onnx-abababababab",
        stamp.engine_name(),
    )
    assert EngineStamp.from_json(stamp.to_json()) == stamp
    with pytest.raises(ValueError, match="precision"):
        EngineStamp.for_build(UL_MODEL, "fp8", H100, BatchProfile(), "00")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BatchProfile(1, 64, 32)


@pytest.mark.parametrize(
    ("device", "reason"),
    [
        (L4, r"built for compute capability 9\.0 \(NVIDIA H100 80GB HBM3\), this GPU is 8\.9 \(NVIDIA L4\)"),
        (H200, r"built on 'NVIDIA H100 80GB HBM3', this GPU is 'NVIDIA H200'"),
        (
            DeviceInfo(H100.gpu_name, "9.0", "10.7.0"),
            r"built with TensorRT 10\.5\.0, this runtime is TensorRT 10\.7\.0",
        ),
    ],
)
def test_engine_for_another_gpu_or_tensorrt_is_refused(tmp_path: Path, device: DeviceInfo, reason: str) -> None:
    network = fake_network(tmp_path)
    result = ensure_engine(
        UL_MODEL, network, tmp_path / "cache", H100, BuildOptions(), builder=fake_builder([]), echo=lambda _: None
    )
    assert check_engine(result.plan, H100).gpu_name == H100.gpu_name
    with pytest.raises(EngineMismatchError, match=reason):
        check_engine(result.plan, device)


def test_stale_or_missing_stamps_and_reexports_are_refused(tmp_path: Path) -> None:
    network = fake_network(tmp_path)
    plan = ensure_engine(
        UL_MODEL, network, tmp_path / "cache", H100, BuildOptions(), builder=fake_builder([]), echo=lambda _: None
    ).plan
    onnx_path = network / "1" / "model.onnx"
    with pytest.raises(EngineMismatchError, match="max batch 32 < the model's max_batch_size 64"):
        check_engine(plan, H100, max_batch_size=64)
    onnx_path.write_bytes(b"onnx-v2")
    with pytest.raises(EngineMismatchError, match="the model was re-exported"):
        check_engine(plan, H100, onnx_path=onnx_path)
    plan.write_bytes(b"another plan")
    with pytest.raises(EngineMismatchError, match="sha256 differs from its stamp"):
        check_engine(plan, H100)
    stamp_path(plan).unlink()
    with pytest.raises(EngineMismatchError, match="no stamp"):
        check_engine(plan, H100)


def test_cache_builds_once_per_gpu_and_reuses(tmp_path: Path) -> None:
    network, cache, calls = fake_network(tmp_path), tmp_path / "cache", []
    options = BuildOptions(profile=BatchProfile(1, 16, 32))
    first = ensure_engine(UL_MODEL, network, cache, H100, options, builder=fake_builder(calls), echo=lambda _: None)
    second = ensure_engine(UL_MODEL, network, cache, H100, options, builder=fake_builder(calls), echo=lambda _: None)
    assert (first.built, second.built, len(calls)) == (True, False, 1)
    installed = network / "1" / "model.plan"
    assert first.plan == installed and installed.read_bytes() == b"plan:onnx-v1fp16"
    assert json.loads(stamp_path(installed).read_text())["plan_sha256"] == sha256_file(installed)
    assert (cache / "nvidia-h100-80gb-hbm3.sm90" / "trt-10.5.0" / "timing.cache").is_file()
    # another GPU model gets its own cache entry and build; the H100 engine stays cached
    other = ensure_engine(UL_MODEL, network, cache, L4, options, builder=fake_builder(calls), echo=lambda _: None)
    assert other.built and len(calls) == 2 and first.stamp.cache_path(cache).is_file()
    assert calls[1].relative_to(cache).parts[:2] == ("nvidia-l4.sm89", "trt-10.5.0")
    # a re-exported ONNX is a new cache entry too
    (network / "1" / "model.onnx").write_bytes(b"onnx-v2")
    assert ensure_engine(UL_MODEL, network, cache, H100, options, builder=fake_builder(calls), echo=print).built
    # symlinked install
    linked = ensure_engine(UL_MODEL, network, cache, H100, options, link=True, builder=fake_builder(calls))
    assert linked.plan.is_symlink() and not linked.built


def test_int8_needs_the_gated_qdq_model_and_profile_covers_max_batch(tmp_path: Path) -> None:
    network = fake_network(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.qdq\.onnx not found.*quantize"):
        ensure_engine(UL_MODEL, network, tmp_path / "c", H100, BuildOptions("int8"), builder=fake_builder([]))
    with pytest.raises(EngineMismatchError, match="profile max batch 16 < the Triton config's max_batch_size 32"):
        ensure_engine(
            UL_MODEL, network, tmp_path / "c", H100, BuildOptions(profile=BatchProfile(1, 8, 16)),
            max_batch_size=32, builder=fake_builder([]),
        )  # fmt: skip


def test_trtexec_command_matches_the_build() -> None:
    options = BuildOptions("int8", BatchProfile(2, 8, 32), workspace_mb=2048)
    command = trtexec_command(Path("m.qdq.onnx"), Path("m.plan"), options, Path("t.cache"))
    assert command[:3] == ["trtexec", "--onnx=m.qdq.onnx", "--saveEngine=m.plan"]
    for flag in (
        f"--minShapes={CANVAS}:2x640x640x3",
        f"--optShapes={CANVAS}:8x640x640x3",
        f"--maxShapes={CANVAS}:32x640x640x3",
        "--memPoolSize=workspace:2048M",
        "--fp16",
        "--int8",
        "--timingCacheFile=t.cache",
    ):
        assert flag in command
    assert "--int8" not in trtexec_command(Path("m.onnx"), Path("m.plan"), BuildOptions("fp16"))
    constrained = trtexec_command(Path("m.onnx"), Path("m.plan"), BuildOptions(), fp32_layers=["/h/Mul", "/h/Add"])
    assert "--precisionConstraints=obey" in constrained
    assert "--layerPrecisions=/h/Mul:fp32,/h/Add:fp32" in constrained
    assert "--layerOutputTypes=/h/Mul:fp32,/h/Add:fp32" in constrained


# ------------------------------------------------------------------------------- builder version, races


def test_a_builder_of_another_tensorrt_version_is_refused_before_building(tmp_path: Path) -> None:
    """The plan would be built by the pip ``tensorrt`` but served by the image's TensorRT: refuse a mismatch."""
    network, calls = fake_network(tmp_path), []
    with pytest.raises(EngineMismatchError, match=r"builder is TensorRT 10\.7\.0 .* served by TensorRT 10\.5\.0"):
        ensure_engine(
            UL_MODEL, network, tmp_path / "c", H100, BuildOptions(), builder=fake_builder(calls),
            builder_version="10.7.0.23", echo=lambda _: None,
        )  # fmt: skip
    with pytest.raises(EngineMismatchError, match="tensorrt Python package is not installed"):
        ensure_engine(
            UL_MODEL, network, tmp_path / "c", H100, BuildOptions(), builder=fake_builder(calls),
            builder_version="", echo=lambda _: None,
        )  # fmt: skip
    assert calls == [] and not (network / "1" / "model.plan").exists()
    result = ensure_engine(
        UL_MODEL, network, tmp_path / "c", H100, BuildOptions(), builder=fake_builder(calls),
        builder_version="10.5.0.18", echo=lambda _: None,
    )  # fmt: skip
    assert result.built and result.stamp.tensorrt_version == "10.5.0"


def _racing_build(network: str, cache: str, log: str, start_at: float) -> None:
    """One replica: waits for a common start time, then builds with a slow builder that writes in pieces."""

    def slow_builder(onnx_path: Path, plan: Path, options: BuildOptions, timing_cache: Path | None) -> list[str]:
        with open(log, "a") as handle:
            handle.write(f"build {plan.name}\n")
        with plan.open("wb") as out:
            for piece in range(20):
                out.write(bytes([piece]) * 4096)
                out.flush()
                time.sleep(0.01)
        assert timing_cache is not None
        tensorrt_engine.atomic_write_bytes(timing_cache, b"timings")
        return ["/head/Mul"]

    while time.time() < start_at:
        time.sleep(0.001)
    ensure_engine(
        UL_MODEL, Path(network), Path(cache), H100, BuildOptions(), builder=slow_builder, builder_version="10.5.0",
        echo=lambda _: None,
    )  # fmt: skip


def test_two_replicas_racing_on_one_cache_build_once_and_install_whole_plans(tmp_path: Path) -> None:
    cache, log = tmp_path / "cache", tmp_path / "builds.log"
    networks = [fake_network(tmp_path / f"replica{i}") for i in range(2)]
    context = multiprocessing.get_context("fork")
    start_at = time.time() + 0.5
    replicas = [context.Process(target=_racing_build, args=(str(n), str(cache), str(log), start_at)) for n in networks]
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.join(timeout=60)
    assert [r.exitcode for r in replicas] == [0, 0]
    assert len(log.read_text().splitlines()) == 1, "the second replica waited on the lock and reused the plan"
    expected = b"".join(bytes([piece]) * 4096 for piece in range(20))
    for network in networks:
        installed = network / "1" / "model.plan"
        assert installed.read_bytes() == expected
        assert check_engine(installed, H100).fp32_layers == 1
    leftovers = [p.name for p in cache.rglob("*") if p.name.endswith(".part")]
    assert leftovers == []


# ------------------------------------------------------------------------------- the build, against a recorder


FLOAT, HALF, INT32, UINT8 = "FLOAT", "HALF", "INT32", "UINT8"


class FakeTensor:
    def __init__(self, name: str, dtype: str = FLOAT) -> None:
        self.name, self.dtype = name, dtype


class FakeLayer:
    """A layer of a parsed network; records what the builder code sets on it."""

    def __init__(self, name: str, kind: str, inputs: list[FakeTensor], outputs: list[FakeTensor], kernel=()) -> None:
        self.name, self.type, self.inputs, self.outputs = name, kind, inputs, outputs
        self.kernel_size_nd = tuple(kernel)
        self.precision_set: str | None = None
        self.output_types: dict[int, str] = {}

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, index: int) -> FakeTensor:
        return self.inputs[index]

    def get_output(self, index: int) -> FakeTensor:
        return self.outputs[index]

    @property
    def precision(self) -> str | None:
        return self.precision_set

    @precision.setter
    def precision(self, value: str) -> None:
        self.precision_set = value

    def set_output_type(self, index: int, dtype: str) -> None:
        self.output_types[index] = dtype


class FakeNetwork:
    def __init__(self, layers: list[FakeLayer]) -> None:
        self.layers = layers

    num_layers = property(lambda self: len(self.layers))

    def get_layer(self, index: int) -> FakeLayer:
        return self.layers[index]


def fake_tensorrt(layers: list[FakeLayer], record: dict[str, Any], timing_cache_loads: bool = True) -> Any:
    """A recorder standing in for the ``tensorrt`` module: the calls build_engine makes, and what they set."""
    flags = types.SimpleNamespace(FP16="FP16", INT8="INT8", OBEY_PRECISION_CONSTRAINTS="OBEY_PRECISION_CONSTRAINTS")
    layer_types = types.SimpleNamespace(CONVOLUTION="CONVOLUTION", CONSTANT="CONSTANT", SHAPE="SHAPE")
    record.update(flags=[], profiles=[], timing_loads=[])

    class Cache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return b"timings:" + self.data

    class Config:
        builder_optimization_level = 0

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            record["workspace"] = size

        def set_flag(self, flag: str) -> None:
            record["flags"].append(flag)

        def add_optimization_profile(self, profile: Any) -> None:
            pass

        def create_timing_cache(self, data: bytes) -> Cache:
            record["timing_loads"].append(bytes(data))
            if data and not timing_cache_loads:
                raise TypeError("deserialization failed (truncated)")
            return Cache(bytes(data))

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> None:
            self.cache = cache

        def get_timing_cache(self) -> Cache:
            return self.cache

    class Profile:
        def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
            record["profiles"].append((name, low, opt, high))

    class Builder:
        def __init__(self, logger: Any) -> None:
            pass

        def create_network(self, flags: int) -> FakeNetwork:
            return FakeNetwork(layers)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: FakeNetwork, config: Config) -> bytes:
            record["precisions"] = {layer.name: layer.precision_set for layer in network.layers}
            return b"serialized-engine"

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    class Parser:
        num_errors = 0

        def __init__(self, network: FakeNetwork, logger: Any) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            return True

    return types.SimpleNamespace(
        Logger=Logger,
        Builder=Builder,
        OnnxParser=Parser,
        BuilderFlag=flags,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        DataType=types.SimpleNamespace(FLOAT=FLOAT, HALF=HALF, INT32=INT32, UINT8=UINT8),
        LayerType=layer_types,
        IConvolutionLayer=FakeLayer,
    )


def pose_head_network() -> list[FakeLayer]:
    """A parsed network the way TensorRT's ONNX parser lays out a one-level pose model: uint8 canvas in, cast,
    transpose and /255, a backbone 3x3 conv, per-head 3x3 then 1x1 convs, DFL (softmax + 1x1 conv), anchor and
    stride decode, concat, TopK and gather."""
    t = FakeTensor

    def layer(name: str, kind: str, inputs: list[str], outputs: list[str], kernel=(), dtypes=None) -> FakeLayer:
        dtypes = dtypes or [FLOAT] * len(outputs)
        produced = [t(o, d) for o, d in zip(outputs, dtypes, strict=True)]
        return FakeLayer(name, kind, [t(i) for i in inputs], produced, kernel)

    return [
        layer("/pre/Cast", "CAST", [CANVAS], ["x_f"]),
        layer("/pre/Transpose", "SHUFFLE", ["x_f"], ["x_t"]),
        layer("/pre/Div", "ELEMENTWISE", ["x_t"], ["x"]),
        layer("/backbone/conv", "CONVOLUTION", ["x"], ["f"], (3, 3)),
        layer("/head/box/conv3", "CONVOLUTION", ["f"], ["b1"], (3, 3)),
        layer("/head/box/conv1", "CONVOLUTION", ["b1"], ["box_logits"], (1, 1)),
        layer("/head/dfl/Softmax", "SOFTMAX", ["box_logits"], ["dist"]),
        layer("/head/dfl/conv", "CONVOLUTION", ["dist"], ["ltrb"], (1, 1)),
        layer("/head/kpt/conv3", "CONVOLUTION", ["f"], ["k1"], (3, 3)),
        layer("/head/kpt/conv1", "CONVOLUTION", ["k1"], ["kpt_raw"], (1, 1)),
        layer("anchors", "CONSTANT", [], ["anchor_points"]),
        layer("strides", "CONSTANT", [], ["stride_tensor"]),
        layer("/decode/Sub", "ELEMENTWISE", ["anchor_points", "ltrb"], ["xy1"]),
        layer("/decode/Add", "ELEMENTWISE", ["anchor_points", "ltrb"], ["xy2"]),
        layer("/decode/Mul", "ELEMENTWISE", ["xy1", "stride_tensor"], ["box"]),
        layer("/decode/kpt_Mul", "ELEMENTWISE", ["kpt_raw", "stride_tensor"], ["kpt"]),
        layer("/decode/Concat", "CONCATENATION", ["box", "xy2", "kpt"], ["all"]),
        layer("/decode/Shape", "SHAPE", ["all"], ["all_shape"], dtypes=[INT32]),
        layer("/topk/TopK", "TOPK", ["all"], ["values", "indices"], dtypes=[FLOAT, INT32]),
        layer("/topk/Gather", "GATHER", ["all", "indices"], ["candidates"]),
    ]


DECODE_TAIL = [
    "/head/box/conv1", "/head/dfl/Softmax", "/head/dfl/conv", "/head/kpt/conv1", "/decode/Sub", "/decode/Add",
    "/decode/Mul", "/decode/kpt_Mul", "/decode/Concat", "/topk/TopK", "/topk/Gather",
]  # fmt: skip


def test_decode_tail_is_the_heads_last_convolutions_and_everything_after() -> None:
    nodes = tensorrt_engine.tensorrt_graph_nodes(FakeNetwork(pose_head_network()), fake_tensorrt([], {}))
    tail = decode_tail(nodes)
    assert [n for n in tail if n != "/decode/Shape"] == DECODE_TAIL
    # no convolution, no tail; a 1x1 conv that feeds a 3x3 conv and the activation after a 3x3 conv are not in it
    assert decode_tail([GraphNode("a", "Mul", ("x",), ("y",))]) == []
    chain = [
        GraphNode("c1", CONVOLUTION, ("x",), ("y",), spatial=False),
        GraphNode("c3", CONVOLUTION, ("y",), ("z",), spatial=True),
        GraphNode("act", "Sigmoid", ("z",), ("za",)),
        GraphNode("head", CONVOLUTION, ("za",), ("h",), spatial=False),
        GraphNode("m", "Mul", ("h", "anchors"), ("out",)),
    ]
    assert decode_tail(chain) == ["head", "m"]


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_build_holds_exactly_the_decode_tail_in_fp32(tmp_path: Path, precision: str) -> None:
    layers, record = pose_head_network(), {}
    trt = fake_tensorrt(layers, record)
    plan, timing = tmp_path / "entry" / "m.plan", tmp_path / "timing.cache"
    options = BuildOptions(precision, BatchProfile(1, 8, 32), workspace_mb=1024)
    fp32 = build_engine(tmp_path / "m.onnx", plan, options, timing, trt=trt)
    assert fp32 == DECODE_TAIL
    assert {name for name, value in record["precisions"].items() if value is not None} == set(DECODE_TAIL)
    assert set(record["precisions"].values()) == {None, FLOAT}
    by_name = {layer.name: layer for layer in layers}
    assert by_name["/topk/TopK"].output_types == {0: FLOAT}, "the TopK indices keep their integer type"
    assert all(by_name[name].output_types == {0: FLOAT} for name in DECODE_TAIL if name != "/topk/TopK")
    assert by_name["anchors"].precision_set is None and by_name["/decode/Shape"].precision_set is None
    int8 = ["INT8"] if precision == "int8" else []
    assert record["flags"] == ["FP16", *int8, "OBEY_PRECISION_CONSTRAINTS"]
    assert record["profiles"] == [(CANVAS, (1, 640, 640, 3), (8, 640, 640, 3), (32, 640, 640, 3))]
    assert record["workspace"] == 1024 << 20
    assert plan.read_bytes() == b"serialized-engine" and timing.read_bytes() == b"timings:"
    assert sorted(p.name for p in plan.parent.iterdir()) == ["m.plan"], "no temporary file left behind"


def test_a_timing_cache_that_does_not_load_is_replaced_by_an_empty_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"truncat")
    record: dict[str, Any] = {}
    trt = fake_tensorrt(pose_head_network(), record, timing_cache_loads=False)
    with caplog.at_level(logging.WARNING):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", BuildOptions(), timing, trt=trt)
    assert record["timing_loads"] == [b"truncat", b""]
    assert "does not load" in caplog.text
    assert timing.read_bytes() == b"timings:", "the rebuilt cache replaced the broken one"
    record.clear()
    good = fake_tensorrt(pose_head_network(), record)
    cache = load_timing_cache(good.Builder(None).create_builder_config(), timing)
    assert cache.data == b"timings:" and record["timing_loads"] == [b"timings:"]


def test_check_engines_command_refuses_before_triton_starts(tmp_path: Path) -> None:
    """The deployment entry point's check: exit 2 with the reason for a foreign engine, 0 for a matching one."""
    network = fake_network(tmp_path)
    ensure_engine(UL_MODEL, network, tmp_path / "cache", L4, BuildOptions(), builder=fake_builder([]))

    def check(device: DeviceInfo) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "build_engines", "check-engines", UL_MODEL, "--repository", str(network.parent),
             "--gpu-name", device.gpu_name, "--compute-capability", device.compute_capability,
             "--tensorrt-version", device.tensorrt_version],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    refused = check(H100)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "built for compute capability 8.9 (NVIDIA L4), this GPU is 9.0" in refused.stderr
    accepted = check(L4)
    assert accepted.returncode == 0, accepted.stderr
    assert "ok: yolo11n_pose.fp16.nvidia-l4.sm89.trt10.5.0.plan" in accepted.stdout


# ------------------------------------------------------------------------------------------ configurations


def _resolved(files: dict[str, str], model: str, config_name: str) -> dict[str, Any]:
    """Each model's configuration as Triton resolves --model-config-name: configs/NAME.pbtxt, else config.pbtxt."""
    steps = [model, *(f"{model}_{role}" for role in ("pixels", "preprocess", "network", "postprocess"))]
    return {
        step: parse(files.get(f"{step}/configs/{config_name}.pbtxt") or files[f"{step}/config.pbtxt"]) for step in steps
    }


@pytest.mark.parametrize("name", sorted(CATALOG))
@pytest.mark.parametrize("config_name", sorted(GPU_CONFIGS))
def test_gpu_configurations_parse_and_keep_the_ensemble_interface(name: str, config_name: str) -> None:
    files = render(CATALOG[name])
    default = _resolved(files, name, "config")
    configs = _resolved(files, name, config_name)
    network_variant, preprocess_variant = GPU_CONFIGS[config_name]
    network, preprocess = configs[f"{name}_network"], configs[f"{name}_preprocess"]
    kind_gpu = ModelInstanceGroup.KIND_GPU
    if network_variant == "plan":
        assert network.platform == "tensorrt_plan" and network.default_model_filename == "model.plan"
    else:
        assert network.platform == "onnxruntime_onnx" and network.default_model_filename == "model.onnx"
        (accelerator,) = network.optimization.execution_accelerators.gpu_execution_accelerator
        assert accelerator.name == "tensorrt"
        assert accelerator.parameters["precision_mode"] == "FP16"
        assert int(accelerator.parameters["max_workspace_size_bytes"]) >= 1 << 30
        assert [w.batch_size for w in network.model_warmup] == [1, network.max_batch_size]
        for warmup in network.model_warmup:  # the warmup feeds exactly the network's input
            assert [(k, v.data_type, list(v.dims)) for k, v in warmup.inputs.items()] == [
                (t.name, t.data_type, list(t.dims)) for t in network.input
            ]
        size, top = CATALOG[name].letterbox.input_size, network.max_batch_size
        assert accelerator.parameters["trt_profile_min_shapes"] == f"{CANVAS}:1x{size}x{size}x3"
        assert accelerator.parameters["trt_profile_opt_shapes"] == f"{CANVAS}:{top // 2}x{size}x{size}x3"
        assert accelerator.parameters["trt_profile_max_shapes"] == f"{CANVAS}:{top}x{size}x{size}x3"
        assert accelerator.parameters["trt_engine_cache_path"].endswith(f"/{name}/unhashed")
    assert network.instance_group[0].kind == kind_gpu and network.dynamic_batching is not None
    if preprocess_variant == "nvjpeg":
        assert preprocess.instance_group[0].kind == kind_gpu
        assert preprocess.default_model_filename == "gpu_model.py"
        assert f"{name}_preprocess/1/gpu_model.py" in files
        assert "posetriton.server.steps.gpu_preprocess" in files[f"{name}_preprocess/1/gpu_model.py"]
        assert dict(preprocess.parameters) == dict(default[f"{name}_preprocess"].parameters)
    else:
        assert preprocess == default[f"{name}_preprocess"]
    # the interface is identical: same tensors on every step, same ensembles
    for step, config in configs.items():
        assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
            (t.name, t.data_type, list(t.dims)) for t in default[step].input
        ]
        assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
            (t.name, t.data_type, list(t.dims)) for t in default[step].output
        ]
        assert config.max_batch_size == default[step].max_batch_size
    assert configs[name] == default[name] and configs[f"{name}_pixels"] == default[f"{name}_pixels"]


def test_ort_trt_engine_cache_is_per_model_and_per_onnx_hash() -> None:
    """ONNX Runtime keys its engine cache by file name and graph, not weights: a re-export gets a new folder."""
    from posetriton.server.repository import network_ort_trt_config

    def cache_path(name: str, sha: str) -> str:
        config = network_ort_trt_config(CATALOG[name], sha)
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        return accelerator.parameters["trt_engine_cache_path"]

    first, second = cache_path(UL_MODEL, "ab" * 32), cache_path(UL_MODEL, "cd" * 32)
    assert first.endswith(f"/{UL_MODEL}/onnx-abababababab") and second.endswith(f"/{UL_MODEL}/onnx-cdcdcdcdcdcd")
    other = next(name for name in CATALOG if name != UL_MODEL)
    assert cache_path(other, "ab" * 32).endswith(f"/{other}/onnx-abababababab")


# ------------------------------------------------------------------------------------------ TensorRT-friendly


OPS_SCRIPT = """
import json, sys, onnx
out = {}
for path in sys.argv[1:]:
    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    out[path] = {
        "ops": sorted({n.op_type for n in graph.node}),
        "domains": sorted({n.domain for n in graph.node}),
        "opset": {o.domain: o.version for o in model.opset_import},
        "inputs": {i.name: dims(i) for i in graph.input},
        "outputs": {o.name: dims(o) for o in graph.output},
    }
print(json.dumps(out))
"""


def graph_summary(*paths: Path) -> dict[str, dict]:
    return json.loads(run_export_python("-c", OPS_SCRIPT, *map(str, paths)))


def test_exported_graphs_use_only_tensorrt_ops_and_keep_a_dynamic_batch(model_repository: Path) -> None:
    paths = sorted(model_repository.glob("*_network/1/model.onnx"))
    assert len(paths) == 2
    for path, summary in graph_summary(*paths).items():
        unsupported = set(summary["ops"]) - TRT_OPS
        assert not unsupported, f"{path}: ops outside TensorRT 10's ONNX support: {unsupported}"
        assert summary["domains"] == [""], f"{path}: custom-domain ops need TensorRT plugins"
        assert summary["opset"][""] == 17
        model = CATALOG[Path(path).parent.parent.name.removesuffix("_network")]
        assert summary["inputs"] == {CANVAS: ["batch", 640, 640, 3]}
        assert summary["outputs"] == {"candidates": ["batch", model.num_candidates, 56]}


TAIL_SCRIPT = """
import json, sys, onnx
from build_engines.tensorrt_engine import decode_tail, onnx_graph_nodes
out = {}
for path in sys.argv[1:]:
    model = onnx.load(path, load_external_data=False)
    nodes = onnx_graph_nodes(model)
    out[path] = {
        "nodes": [[n.name, n.op, list(n.inputs), list(n.outputs), n.spatial] for n in nodes],
        "tail": decode_tail(nodes),
        "output_producer": next(n.name for n in nodes if model.graph.output[0].name in n.outputs),
        "input_consumers": [n.name for n in nodes if model.graph.input[0].name in n.inputs],
    }
print(json.dumps(out))
"""


def test_decode_tail_of_the_exported_graphs(model_repository: Path) -> None:
    """On both exported families: the tail is the heads' pointwise predictions and the decode, never the input
    side or a spatial conv, and the TensorRT-network reading of the same graph selects the same layers."""
    paths = sorted(model_repository.glob("*_network/1/model.onnx"))
    graphs = json.loads(run_export_python("-c", TAIL_SCRIPT, *map(str, paths)).splitlines()[-1])
    assert len(graphs) == 2
    for path, graph in graphs.items():
        nodes = [GraphNode(name, op, tuple(i), tuple(o), spatial) for name, op, i, o, spatial in graph["nodes"]]
        by_name = {node.name: node for node in nodes}
        tail = graph["tail"]
        assert graph["output_producer"] in tail, path
        assert sum(by_name[name].op == "TopK" for name in tail) == 1, path
        assert not set(graph["input_consumers"]) & set(tail), path
        assert all(not by_name[name].spatial for name in tail), path
        assert 9 <= sum(by_name[name].op == CONVOLUTION for name in tail) <= 16, path  # 3 levels x the heads' 1x1
        assert len(tail) < 0.3 * len(nodes), path
        layers = [
            FakeLayer(
                n.name, "CONVOLUTION" if n.op == CONVOLUTION else n.op, [FakeTensor(i) for i in n.inputs],
                [FakeTensor(o) for o in n.outputs], (3, 3) if n.spatial else (1, 1),
            )
            for n in nodes
        ]  # fmt: skip
        trt_nodes = tensorrt_engine.tensorrt_graph_nodes(FakeNetwork(layers), fake_tensorrt([], {}))
        assert decode_tail(trt_nodes) == tail, path


@pytest.mark.skipif(not (HAS_GPU and HAS_TENSORRT), reason="needs an NVIDIA GPU and the tensorrt package")
def test_tensorrt_builds_and_stamps_an_fp16_engine(model_repository: Path, tmp_path: Path) -> None:
    from build_engines.engine_cache import detect_device

    network = tmp_path / f"{UL_MODEL}_network"
    shutil.copytree(model_repository / f"{UL_MODEL}_network", network)
    device = detect_device()
    options = BuildOptions(profile=BatchProfile(1, 4, 32), workspace_mb=2048)
    result = ensure_engine(UL_MODEL, network, tmp_path / "cache", device, options, max_batch_size=32)
    assert result.built and check_engine(network / "1" / "model.plan", device).precision == "fp16"
    again = ensure_engine(UL_MODEL, network, tmp_path / "cache", device, options, max_batch_size=32)
    assert not again.built


def test_gpu_entrypoint_builds_checks_then_execs_the_watchdog_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The container command documented in docs/gpu.md: engines first, then the stub watchdog's own ``--``
    reaches it intact. TensorRT and the GPU are replaced by recorders (no GPU here)."""
    from typer.testing import CliRunner

    import build_engines.__main__ as cli

    calls: list[str] = []
    device = types.SimpleNamespace(gpu_name="NVIDIA H100", compute_capability="9.0", tensorrt_version="10.5.0")
    monkeypatch.setattr(cli, "_device", lambda *args: device)
    monkeypatch.setattr(cli, "_engines", lambda *args: calls.append("engines"))
    monkeypatch.setattr(cli, "_check_installed", lambda *args: calls.append("check"))
    monkeypatch.setattr(cli.os, "execvp", lambda file, argv: calls.append(f"exec {argv}"))
    triton = [
        "python3", "-m", "posetriton.server.watchdog", "--", "/opt/tritonserver/bin/tritonserver",
        "--model-repository=/models", "--model-control-mode=explicit", "--load-model=*",
    ]  # fmt: skip
    args = ["gpu-entrypoint", "--repository", str(tmp_path), "--cache", str(tmp_path / "cache"), "--", *triton]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert calls == ["engines", "check", f"exec {triton}"]

    calls.clear()
    monkeypatch.setattr(cli, "_check_installed", lambda *args: (_ for _ in ()).throw(SystemExit(2)))
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2 and calls == ["engines"], "Triton never starts after a refused engine"


def test_gpu_requirements_pin_a_cuda12_torch_pair_numpy_1_and_typer() -> None:
    """The GPU image's extra (requirements/gpu.txt): exact torch/torchvision pair of one CUDA 12 build, numpy < 2
    for the Python backend, typer for the engine CLI, TensorRT of the 24.10 image."""
    from packaging.requirements import Requirement

    lines = (ROOT / "requirements" / "gpu.txt").read_text().splitlines()
    pins = {r.name: r for r in (Requirement(line) for line in lines if line.strip() and not line.startswith("#"))}
    assert str(pins["torch"].specifier) == "==2.5.1" and str(pins["torchvision"].specifier) == "==0.20.1"
    assert not pins["numpy"].specifier.contains("2.0.0") and pins["numpy"].specifier.contains("1.26.4")
    assert "typer" in pins
    assert str(pins["tensorrt-cu12"].specifier) == "==10.5.0"
