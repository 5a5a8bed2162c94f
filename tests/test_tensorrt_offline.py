"""TensorRT path checked without a GPU: engine stamps and refusals, the engine cache, GPU configurations, and
whether the exported graphs suit TensorRT's ONNX parser. The real TensorRT build is skipped without a GPU."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from build_engines.engine_cache import (
    BatchProfile,
    DeviceInfo,
    EngineMismatchError,
    EngineStamp,
    check_engine,
    sha256_file,
    stamp_path,
)
from build_engines.tensorrt_engine import BuildOptions, ensure_engine, trtexec_command
from posetriton.repository import GPU_CONFIGS, load_catalog, render
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


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


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
    assert first.plan == installed and installed.read_bytes() == calls[0].read_bytes()
    assert json.loads(stamp_path(installed).read_text())["plan_sha256"] == sha256_file(installed)
    assert (cache / "nvidia-h100-80gb-hbm3.sm90" / "trt-10.5.0" / "timing.cache").is_file()
    # another GPU model gets its own cache entry and build; the H100 engine stays cached
    other = ensure_engine(UL_MODEL, network, cache, L4, options, builder=fake_builder(calls), echo=lambda _: None)
    assert other.built and len(calls) == 2 and calls[0].is_file()
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
        "--minShapes=images:2x3x640x640",
        "--optShapes=images:8x3x640x640",
        "--maxShapes=images:32x3x640x640",
        "--memPoolSize=workspace:2048M",
        "--fp16",
        "--int8",
        "--timingCacheFile=t.cache",
    ):
        assert flag in command
    assert "--int8" not in trtexec_command(Path("m.onnx"), Path("m.plan"), BuildOptions("fp16"))


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


def _resolved(files: dict[str, str], model: str, config_name: str) -> dict[str, model_config_pb2.ModelConfig]:
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
    kind_gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
    if network_variant == "plan":
        assert network.platform == "tensorrt_plan" and network.default_model_filename == "model.plan"
    else:
        assert network.platform == "onnxruntime_onnx" and network.default_model_filename == "model.onnx"
        (accelerator,) = network.optimization.execution_accelerators.gpu_execution_accelerator
        assert accelerator.name == "tensorrt"
        assert accelerator.parameters["precision_mode"] == "FP16"
        assert int(accelerator.parameters["max_workspace_size_bytes"]) >= 1 << 30
        assert [w.batch_size for w in network.model_warmup] == [1, network.max_batch_size]
    assert network.instance_group[0].kind == kind_gpu and network.dynamic_batching is not None
    if preprocess_variant == "nvjpeg":
        assert preprocess.instance_group[0].kind == kind_gpu
        assert preprocess.default_model_filename == "gpu_model.py"
        assert f"{name}_preprocess/1/gpu_model.py" in files
        assert "posetriton.serving.gpu_preprocess" in files[f"{name}_preprocess/1/gpu_model.py"]
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
        assert summary["inputs"] == {"images": ["batch", 3, 640, 640]}
        assert summary["outputs"] == {"candidates": ["batch", 8400, 56]}


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
        "python3", "-m", "posetriton.watchdog", "--", "/opt/tritonserver/bin/tritonserver",
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
