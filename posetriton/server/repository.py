"""The model catalogue and the Triton model repository generated from it.

Per served model ``NAME`` the repository holds five models:

    NAME               ensemble: IMAGE (encoded bytes) -> NUM_DETECTIONS, BOXES, SCORES, KEYPOINTS
    NAME_pixels        ensemble: PIXELS (raw uint8 HWC RGB) -> the same outputs
    NAME_preprocess    Python backend: decode + letterbox            (posetriton.server.steps.preprocess)
    NAME_network       config.pbtxt: TensorRT plan (GPU, the default)
                       configs/cpu.pbtxt, configs/cpu_bf16.pbtxt: OpenVINO IR in the Python backend
                       configs/gpu_ort_trt*.pbtxt: ONNX Runtime + TensorRT accelerator (no engine build)
    NAME_postprocess   Python backend: threshold + NMS + map back    (posetriton.server.steps.postprocess)

``tritonserver --model-config-name=cpu`` selects the CPU network; a model without a file of that
name falls back to its ``config.pbtxt``. GPU configuration names (:data:`GPU_CONFIGS`) pick the
network and the preprocess variant together: ``gpu_nvjpeg`` = TensorRT plan + GPU JPEG decode and
letterbox (``NAME_preprocess/configs/gpu_nvjpeg.pbtxt``, posetriton.server.steps.gpu_preprocess),
``gpu_ort_trt`` = ONNX Runtime-TensorRT + CPU preprocess, ``gpu_ort_trt_nvjpeg`` = both. The
ensembles are the same for every configuration.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the NGC Triton image runs Python 3.10
    import tomli as tomllib

from posetriton.core import contract
from posetriton.core.contract import (
    CANDIDATES,
    CANVAS,
    CONTROL_CORRID,
    CONTROL_END,
    CONTROL_START,
    FRAME_INDEX,
    IMAGE,
    LETTERBOX,
    LETTERBOX_WIDTH,
    PIXELS,
    SMOOTHED_KEYPOINTS,
    TRACK_IDS,
    TRACK_SUFFIX,
    TRACKER_SUFFIX,
)
from posetriton.core.spec import (
    COCO_KEYPOINT_NAMES,
    COCO_SKELETON,
    KEYPOINT_LAYOUTS,
    LetterboxSpec,
    PostprocessSpec,
    SpecError,
    check_keypoint_layout,
)
from posetriton.core.validation import INPUT_SIZE_PARAMETER
from posetriton.server.tracking import StreamLimits, TrackerSpec

# Configuration names passed to --model-config-name, and the OpenVINO precision each selects.
CPU_CONFIGS = {"cpu": "f32", "cpu_bf16": "bf16"}
# GPU configuration names -> (network variant, preprocess variant). "plan" and "cpu" are the default
# config.pbtxt of NAME_network and NAME_preprocess, so no file is written for them.
GPU_CONFIGS = {
    "gpu_nvjpeg": ("plan", "nvjpeg"),
    "gpu_ort_trt": ("ort_trt", "cpu"),
    "gpu_ort_trt_nvjpeg": ("ort_trt", "nvjpeg"),
}
GPU_PREPROCESS_MODEL_FILE = "gpu_model.py"
VERSION = "1"
OUTPUTS = (
    (contract.NUM_DETECTIONS, "TYPE_INT32", "1"),
    (contract.BOXES, "TYPE_FP32", "-1, 4"),
    (contract.SCORES, "TYPE_FP32", "-1"),
    (contract.KEYPOINTS, "TYPE_FP32", "-1, {k}, 3"),
    (contract.IMAGE_SIZE, "TYPE_INT32", "2"),
)
assert tuple(name for name, _, _ in OUTPUTS) == contract.OUTPUTS


@dataclass(frozen=True)
class Tuning:
    """Scheduling choices for one served model (see docs/benchmarks.md for how they were chosen)."""

    max_batch_size: int = 32
    preprocess_instances: int = 2
    postprocess_instances: int = 1
    network_max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    # The CPU network step takes one request per execute: its pipeline starts each image as it comes and answers
    # each request on its own (posetriton.server.openvino_runtime.InferencePipeline), so a bigger batch would only
    # hold requests outside Triton's queue, where its size bound and deadlines no longer apply.
    cpu_network_preferred_batch_sizes: tuple[int, ...] = (1,)
    # OpenVINO on CPU (posetriton.server.openvino_runtime): ADAPTIVE runs a lone image on one stream using every core
    # (LATENCY) and splits a batch across the THROUGHPUT streams (docs/benchmarks.md).
    network_performance_hint: str = "ADAPTIVE"
    # OpenVINO pins its stream threads to cores by default; in the server the preprocess and postprocess stubs
    # share those cores, and a pinned thread cannot move off a busy one (docs/benchmarks.md, per-step profile).
    network_cpu_pinning: bool = False
    # GPU: ONNX Runtime-TensorRT fallback (configs/gpu_ort_trt*.pbtxt) and GPU preprocessing.
    ort_trt_precision: str = "FP16"
    ort_trt_workspace_bytes: int = 4 << 30
    ort_trt_engine_cache_path: str = "/tmp/posetriton-ort-trt-cache"
    gpu_preprocess_instances: int = 1
    # TensorRT execution contexts per GPU: one batch's copies and Triton's handover to and from the Python steps
    # overlap the other's compute, so the engine never waits between batches.
    gpu_network_instances: int = 2


@dataclass(frozen=True)
class ServedModel:
    name: str
    family: str
    letterbox: LetterboxSpec
    postprocess: PostprocessSpec
    source: dict[str, Any]
    # The build_engines module that exports the family (build-time only; build_engines.registry).
    exporter: str = ""
    description: str = ""
    license: str = ""
    # The network returns only the best `candidates_topk` anchors by person score (a TopK in the graph).
    candidates_topk: int = 300
    strides: tuple[int, ...] = contract.DEFAULT_STRIDES
    keypoint_names: tuple[str, ...] = COCO_KEYPOINT_NAMES
    skeleton: tuple[tuple[int, int], ...] = COCO_SKELETON
    tuning: Tuning = field(default_factory=Tuning)

    def __post_init__(self) -> None:
        if self.candidates_topk < 1:
            raise SpecError(f"{self.name}: candidates_topk must be positive, got {self.candidates_topk}")
        contract.num_anchors(self.letterbox.input_size, self.strides)  # raises on a size the strides do not divide
        check_keypoint_layout(self.keypoint_names, self.skeleton)
        if len(self.keypoint_names) != self.postprocess.num_keypoints:
            raise SpecError(
                f"{self.name}: {len(self.keypoint_names)} keypoint names for {self.postprocess.num_keypoints} keypoints"
            )

    @property
    def candidate_width(self) -> int:
        return contract.candidate_width(self.postprocess.num_keypoints)

    @property
    def num_anchors(self) -> int:
        return contract.num_anchors(self.letterbox.input_size, self.strides)

    @property
    def num_candidates(self) -> int:
        """Rows of the network's ``candidates`` per image: the in-graph top-k, at most every anchor."""
        return min(self.candidates_topk, self.num_anchors)

    def step(self, role: str) -> str:
        """The name of one of the model's entries: ``step("network")`` -> ``NAME_network``."""
        suffix = f"_{role}"
        if suffix not in contract.MODEL_SUFFIXES:
            raise ValueError(f"unknown step {role!r}; known: {[s.removeprefix('_') for s in contract.MODEL_SUFFIXES]}")
        return self.name + suffix

    def metadata(self) -> dict[str, Any]:
        """What a client needs to know about the model; stored as ensemble parameters and metadata.json."""
        return {
            "family": self.family,
            "description": self.description,
            "license": self.license,
            "keypoint_names": list(self.keypoint_names),
            "skeleton": [list(pair) for pair in self.skeleton],
            **{f"letterbox.{k}": v for k, v in self.letterbox.to_parameters().items()},
            **{f"default.{k}": v for k, v in self.postprocess.to_parameters().items()},
        }


def load_catalog(path: Path) -> dict[str, ServedModel]:
    """Read the TOML catalogue: ``[families.X]`` hold shared specs, ``[models.Y]`` pick a family and a source."""
    data = tomllib.loads(path.read_text())
    families = data.get("families", {})
    models = {}
    for name, entry in data.get("models", {}).items():
        family_name = entry.get("family")
        if family_name not in families:
            raise SpecError(f"{path}: model {name!r} names unknown family {family_name!r}; known: {sorted(families)}")
        family = families[family_name]
        try:
            names, skeleton = _keypoint_layout(family)
            postprocess = {"num_keypoints": len(names), **family.get("postprocess", {}), **entry.get("postprocess", {})}
            models[name] = ServedModel(
                name=name,
                family=family_name,
                letterbox=LetterboxSpec(**{**family.get("letterbox", {}), **entry.get("letterbox", {})}),
                postprocess=PostprocessSpec(**postprocess),
                source=dict(entry.get("source", {})),
                exporter=str(family.get("exporter", "")),
                description=entry.get("description", family.get("description", "")),
                license=entry.get("license", family.get("license", "")),
                candidates_topk=int(entry.get("candidates_topk", family.get("candidates_topk", 300))),
                strides=tuple(entry.get("strides", family.get("strides", contract.DEFAULT_STRIDES))),
                keypoint_names=names,
                skeleton=skeleton,
                tuning=Tuning(**{**data.get("tuning", {}), **entry.get("tuning", {})}),
            )
        except (TypeError, SpecError) as exc:
            raise SpecError(f"{path}: model {name!r}: {exc}") from None
    return models


def _keypoint_layout(family: dict[str, Any]) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...]]:
    """A family's keypoint names and skeleton: a layout it names (``keypoints``) or the ones it lists."""
    listed = "keypoint_names" in family or "skeleton" in family
    if "keypoints" in family:
        if listed:
            raise SpecError("give either keypoints = LAYOUT or keypoint_names + skeleton, not both")
        if family["keypoints"] not in KEYPOINT_LAYOUTS:
            raise SpecError(f"unknown keypoint layout {family['keypoints']!r}; known: {sorted(KEYPOINT_LAYOUTS)}")
        return KEYPOINT_LAYOUTS[family["keypoints"]]
    if not listed:
        return COCO_KEYPOINT_NAMES, COCO_SKELETON
    return tuple(family.get("keypoint_names", ())), tuple(tuple(edge) for edge in family.get("skeleton", ()))


def _tensor(name: str, data_type: str, dims: str, extra: str = "") -> str:
    return f'  {{ name: "{name}" data_type: {data_type} dims: [ {dims} ]{extra} }}'


def _block(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]"


def _parameters(values: dict[str, Any]) -> str:
    lines = []
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value)
        lines.append(f"parameters {{ key: {json.dumps(key)} value {{ string_value: {json.dumps(text)} }} }}")
    return "\n".join(lines)


def _header(name: str, kind: str, max_batch_size: int) -> str:
    return f'name: "{name}"\n{kind}\nmax_batch_size: {max_batch_size}'


def _outputs(model: ServedModel) -> list[str]:
    k = model.postprocess.num_keypoints
    return [_tensor(name, dtype, dims.format(k=k)) for name, dtype, dims in OUTPUTS]


def _network_io(model: ServedModel) -> str:
    s = model.letterbox.input_size
    return "\n".join(
        [
            _block("input", [_tensor(CANVAS, "TYPE_UINT8", f"{s}, {s}, 3")]),
            _block("output", [_tensor(CANDIDATES, "TYPE_FP32", f"{model.num_candidates}, {model.candidate_width}")]),
        ]
    )


def _batching(delay_us: int, preferred: tuple[int, ...] = (), queue: str = "") -> str:
    sizes = f" preferred_batch_size: [ {', '.join(map(str, preferred))} ]" if preferred else ""
    policy = f"\n  {queue}\n" if queue else " "
    return f"dynamic_batching {{{sizes} max_queue_delay_microseconds: {delay_us}{policy}}}"


# ------------------------------------------------------------------------------------------- overload control
# Bounded queues with fast rejection (docs/reliability.md, overload): a request that finds its step's queue
# full is refused at once with UNAVAILABLE "Exceeds maximum queue size", and one that waited past its timeout
# is dropped before it is computed (REJECT) with UNAVAILABLE "Request timeout expired". The client's own
# deadline (gRPC `timeout`, microseconds) overrides the default when shorter; Triton's ensemble hands it to
# every step. The SDK maps both to ServerBusyError and retries within the caller's deadline.
@dataclass(frozen=True)
class QueueLimits:
    """Per step: requests that may wait in its queue, and the longest wait of a request without a deadline."""

    max_queue_size: int
    default_timeout_us: int


# Sized from the measured capacity of each step on 2 vCPUs (docs/reliability.md): the CPU network step (the
# bottleneck, ~20 img/s) holds about 0.5 s of work; preprocess (~11 ms per image, 2 instances) and postprocess
# (~2 ms) are 5-20x faster, so their queues fill only with bursts: theirs bound memory (a raw-pixel request can
# be large) and stay well above what a GPU server's clients keep in flight. The GPU network configurations
# have no queue bound yet (not measured).
# The longest a request that carries no deadline may wait in a step's queue: the SDK's default deadline
# (120 s). Triton lets a request's own timeout only shorten it, so it must not be 0 (0 would also ignore theirs).
NO_DEADLINE_QUEUE_US = 120_000_000
QUEUE_LIMITS = {
    "preprocess": QueueLimits(max_queue_size=64, default_timeout_us=NO_DEADLINE_QUEUE_US),
    "network": QueueLimits(max_queue_size=12, default_timeout_us=NO_DEADLINE_QUEUE_US),
    "postprocess": QueueLimits(max_queue_size=256, default_timeout_us=NO_DEADLINE_QUEUE_US),
}


def queue_policy(role: str) -> str:
    """The ``default_queue_policy`` of step ``role``'s dynamic batcher."""
    limits = QUEUE_LIMITS[role]
    return (
        f"default_queue_policy {{ timeout_action: REJECT default_timeout_microseconds: {limits.default_timeout_us} "
        f"allow_timeout_override: true max_queue_size: {limits.max_queue_size} }}"
    )


def _instances(count: int, kind: str) -> str:
    return f"instance_group [ {{ count: {count} kind: {kind} }} ]"


def ensemble_config(model: ServedModel, pixels: bool) -> str:
    s = model.letterbox.input_size
    source = PIXELS if pixels else IMAGE
    source_tensor = _tensor(PIXELS, "TYPE_UINT8", "-1, -1, 3") if pixels else _tensor(IMAGE, "TYPE_STRING", "1")
    steps = [
        (model.step("preprocess"), {source: source}, {CANVAS: CANVAS, LETTERBOX: LETTERBOX}),
        (model.step("network"), {CANVAS: CANVAS}, {CANDIDATES: CANDIDATES}),
        (
            model.step("postprocess"),
            {CANDIDATES: CANDIDATES, LETTERBOX: LETTERBOX},
            {name: name for name, _, _ in OUTPUTS},
        ),
    ]
    step_text = []
    for step_name, inputs, outputs in steps:
        maps = [f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
        maps += [f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
        step_text.append(f'  {{ model_name: "{step_name}" model_version: -1\n    ' + "\n    ".join(maps) + " }")
    name = model.step("pixels") if pixels else model.name
    return "\n".join(
        [
            _header(name, 'platform: "ensemble"', model.tuning.max_batch_size),
            f"# Network input {s}x{s}; thresholds per request as parameters conf, iou, max_det.",
            _block("input", [source_tensor]),
            _block("output", _outputs(model)),
            "ensemble_scheduling {\n step [\n" + ",\n".join(step_text) + "\n ]\n}",
            _parameters(model.metadata()),
        ]
    )


def preprocess_config(model: ServedModel, gpu: bool = False) -> str:
    """CPU decode + letterbox (config.pbtxt), or with ``gpu`` nvJPEG decode + letterbox on the GPU
    (posetriton.server.steps.gpu_preprocess, non-JPEG inputs on the CPU path); the tensors are the same."""
    s = model.letterbox.input_size
    optional = " optional: true"
    if gpu:
        variant = [
            "# nvJPEG decode (torchvision) + letterbox on the GPU; non-JPEG inputs take the CPU path.",
            f'default_model_filename: "{GPU_PREPROCESS_MODEL_FILE}"',
        ]
        instances = _instances(model.tuning.gpu_preprocess_instances, "KIND_GPU")
    else:
        variant, instances = [], _instances(model.tuning.preprocess_instances, "KIND_CPU")
    return "\n".join(
        [
            _header(model.step("preprocess"), 'backend: "python"', model.tuning.max_batch_size),
            *variant,
            _block(
                "input",
                [
                    _tensor(IMAGE, "TYPE_STRING", "1", optional),
                    _tensor(PIXELS, "TYPE_UINT8", "-1, -1, 3", optional),
                ],
            ),
            _block(
                "output",
                [
                    _tensor(CANVAS, "TYPE_UINT8", f"{s}, {s}, 3"),
                    _tensor(LETTERBOX, "TYPE_FP64", str(LETTERBOX_WIDTH)),
                ],
            ),
            _batching(0, queue=queue_policy("preprocess")),
            instances,
            _parameters(model.letterbox.to_parameters()),
        ]
    )


def postprocess_config(model: ServedModel) -> str:
    return "\n".join(
        [
            _header(model.step("postprocess"), 'backend: "python"', model.tuning.max_batch_size),
            _block(
                "input",
                [
                    _tensor(CANDIDATES, "TYPE_FP32", f"{model.num_candidates}, {model.candidate_width}"),
                    _tensor(LETTERBOX, "TYPE_FP64", str(LETTERBOX_WIDTH)),
                ],
            ),
            _block("output", _outputs(model)),
            _batching(0, queue=queue_policy("postprocess")),
            _instances(model.tuning.postprocess_instances, "KIND_CPU"),
            _parameters({**model.postprocess.to_parameters(), INPUT_SIZE_PARAMETER: str(model.letterbox.input_size)}),
        ]
    )


def network_gpu_config(model: ServedModel) -> str:
    t = model.tuning
    return "\n".join(
        [
            _header(model.step("network"), 'platform: "tensorrt_plan"', t.max_batch_size),
            'default_model_filename: "model.plan"',
            _network_io(model),
            _batching(100, t.preferred_batch_sizes),
            _instances(t.gpu_network_instances, "KIND_GPU"),
        ]
    )


def _warmup(model: ServedModel) -> str:
    """Batch 1 then the largest batch at load, so ORT-TRT builds its engine for the whole range before serving."""
    s = model.letterbox.input_size
    entries = []
    for batch in sorted({1, model.tuning.max_batch_size}):
        entries.append(
            f'  {{ name: "batch_{batch}" batch_size: {batch} inputs {{ key: "{CANVAS}" value: '
            f"{{ data_type: TYPE_UINT8 dims: [ {s}, {s}, 3 ] zero_data: true }} }} }}"
        )
    return "model_warmup [\n" + ",\n".join(entries) + "\n]"


def network_ort_trt_config(model: ServedModel, onnx_sha256: str | None = None) -> str:
    """ONNX Runtime with the TensorRT execution accelerator on model.onnx: GPU serving with no engine build step.

    ONNX Runtime names its cached engines after the model file and the graph, not the weights, so a re-export
    with new weights would be served by the old engine: the cache folder is per model and per ONNX sha256
    (``CACHE/NAME/onnx-SHA12``; ``unhashed`` when the ONNX is not known, e.g. a config rendered without its
    files). One explicit optimization profile (batch 1 / max_batch_size // 2 / max_batch_size over the uint8
    canvas) makes ONNX Runtime build one engine for every batch the dynamic batcher forms, at the warmup.
    """
    t = model.tuning
    s = model.letterbox.input_size
    cache = f"{t.ort_trt_engine_cache_path.rstrip('/')}/{model.name}/" + (
        f"onnx-{onnx_sha256[:12]}" if onnx_sha256 else "unhashed"
    )

    def shape(batch: int) -> str:
        return f"{CANVAS}:{batch}x{s}x{s}x3"

    accelerator = _parameters_inline(
        {
            "precision_mode": t.ort_trt_precision,
            "max_workspace_size_bytes": str(t.ort_trt_workspace_bytes),
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": cache,
            "trt_profile_min_shapes": shape(1),
            "trt_profile_opt_shapes": shape(max(1, t.max_batch_size // 2)),
            "trt_profile_max_shapes": shape(t.max_batch_size),
        }
    )
    return "\n".join(
        [
            _header(model.step("network"), 'platform: "onnxruntime_onnx"', t.max_batch_size),
            "# ONNX Runtime + TensorRT (ORT-TRT) on model.onnx; engines are built by ONNX Runtime at load (warmup).",
            'default_model_filename: "model.onnx"',
            _network_io(model),
            _batching(100, t.preferred_batch_sizes),
            _instances(t.gpu_network_instances, "KIND_GPU"),
            "optimization { execution_accelerators { gpu_execution_accelerator : [ {\n"
            f'  name : "tensorrt"\n{accelerator}\n}} ] }} }}',
            _warmup(model),
        ]
    )


def _parameters_inline(values: dict[str, str]) -> str:
    return "\n".join(f"  parameters {{ key: {json.dumps(k)} value: {json.dumps(v)} }}" for k, v in values.items())


def network_cpu_config(model: ServedModel, precision: str) -> str:
    t = model.tuning
    return "\n".join(
        [
            _header(model.step("network"), 'backend: "python"', t.max_batch_size),
            f"# OpenVINO IR (model.xml) run by posetriton.server.steps.openvino_pose at {precision} precision.",
            _network_io(model),
            _batching(t.network_max_queue_delay_us, t.cpu_network_preferred_batch_sizes, queue_policy("network")),
            # One process: its OpenVINO streams use every core (more instances would oversubscribe them).
            _instances(1, "KIND_CPU"),
            _parameters(
                {
                    "precision": precision,
                    "model_file": "model.xml",
                    "performance_hint": t.network_performance_hint,
                    "cpu_pinning": str(t.network_cpu_pinning).lower(),
                }
            ),
        ]
    )


def _shim(module: str) -> str:
    return (
        f'"""Generated: Triton loads this file; the model is posetriton.server.steps.{module}."""\n\n'
        f"from posetriton.server.steps.{module} import TritonPythonModel  # noqa: F401\n"
    )


def render(model: ServedModel, onnx_sha256: str | None = None) -> dict[str, str]:
    """Every text file of the model's repository entries, by path relative to the repository root.

    ``onnx_sha256`` (of the network's model.onnx) keys the ONNX Runtime-TensorRT engine cache, so re-exported
    weights never reuse a stale engine."""
    network = model.step("network")
    files = {
        f"{model.name}/config.pbtxt": ensemble_config(model, pixels=False),
        f"{model.step('pixels')}/config.pbtxt": ensemble_config(model, pixels=True),
        f"{model.step('preprocess')}/config.pbtxt": preprocess_config(model),
        f"{model.step('preprocess')}/{VERSION}/model.py": _shim("preprocess"),
        f"{model.step('preprocess')}/{VERSION}/{GPU_PREPROCESS_MODEL_FILE}": _shim("gpu_preprocess"),
        f"{model.step('postprocess')}/config.pbtxt": postprocess_config(model),
        f"{model.step('postprocess')}/{VERSION}/model.py": _shim("postprocess"),
        f"{network}/config.pbtxt": network_gpu_config(model),
        f"{network}/{VERSION}/model.py": _shim("openvino_pose"),
        f"{network}/metadata.json": json.dumps({"name": model.name, **model.metadata()}, indent=2),
    }
    for config_name, precision in CPU_CONFIGS.items():
        files[f"{network}/configs/{config_name}.pbtxt"] = network_cpu_config(model, precision)
    for config_name, (network_variant, preprocess_variant) in GPU_CONFIGS.items():
        if network_variant == "ort_trt":
            files[f"{network}/configs/{config_name}.pbtxt"] = network_ort_trt_config(model, onnx_sha256)
        if preprocess_variant == "nvjpeg":
            files[f"{model.step('preprocess')}/configs/{config_name}.pbtxt"] = preprocess_config(model, gpu=True)
    files.update(track_files(model))
    return {path: text if text.endswith("\n") else text + "\n" for path, text in files.items()}


def write_model(model: ServedModel, repository: Path, network_files: dict[str, Path]) -> list[Path]:
    """Write the model's five entries; ``network_files`` (model.onnx, .xml, .bin) go in the network's version folder."""
    for stale in (model.name, *(model.step(r) for r in ("pixels", "preprocess", "network", "postprocess"))):
        shutil.rmtree(repository / stale, ignore_errors=True)
    for stale in track_models(model):
        shutil.rmtree(repository / stale, ignore_errors=True)
    written = []
    onnx_file = network_files.get("model.onnx")
    onnx_sha256 = hashlib.sha256(Path(onnx_file).read_bytes()).hexdigest() if onnx_file else None
    for relative, text in render(model, onnx_sha256).items():
        path = repository / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    (repository / model.name / VERSION).mkdir(exist_ok=True)
    (repository / model.step("pixels") / VERSION).mkdir(exist_ok=True)
    (repository / track_models(model)[0] / VERSION).mkdir(exist_ok=True)
    version_dir = repository / model.step("network") / VERSION
    for target_name, source in network_files.items():
        shutil.copyfile(source, version_dir / target_name)
        written.append(version_dir / target_name)
    return written


# ------------------------------------------------------------------------------------------------ tracking
# NAME_track = NAME's steps + NAME_tracker (stateful, Triton's sequence batcher): poses with track IDs per video.
# Kept apart from NAME so that NAME stays stateless (no correlation ID needed); see posetriton.server.tracking.
TRACK_IDLE_MICROSECONDS = 10_000_000  # a stream silent this long is dropped, and its tracking state freed
TRACK_MAX_SEQUENCES = 1024  # open streams per tracker instance; more wait in Triton's backlog
TRACKER_INSTANCES = 1


def track_models(model: ServedModel) -> tuple[str, str]:
    """(the tracking ensemble, its tracker step): ``NAME_track``, ``NAME_tracker``."""
    return model.name + TRACK_SUFFIX, model.name + TRACKER_SUFFIX


def tracker_config(model: ServedModel, spec: TrackerSpec | None = None) -> str:
    """The tracker step: ``oldest`` sequence batching, i.e. requests of many streams batched together, every
    request of one stream on one instance, in order; the model keeps each stream's state by correlation ID
    (``direct`` would pin each stream to a batch slot, capping open streams at instances x max_batch_size)."""
    k = model.postprocess.num_keypoints
    control = [
        f'  {{ name: "{CONTROL_START}" control [ {{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] }} ] }}',
        f'  {{ name: "{CONTROL_END}" control [ {{ kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] }} ] }}',
        f'  {{ name: "{CONTROL_CORRID}" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }} ] }}',
    ]
    return "\n".join(
        [
            _header(track_models(model)[1], 'backend: "python"', model.tuning.max_batch_size),
            _block("input", [*_outputs(model), _tensor(FRAME_INDEX, "TYPE_INT64", "1"), *_tracker_pixels(model)]),
            _block("output", _track_outputs(model)),
            "sequence_batching {",
            f"  max_sequence_idle_microseconds: {TRACK_IDLE_MICROSECONDS}",
            f"  oldest {{ max_candidate_sequences: {TRACK_MAX_SEQUENCES} max_queue_delay_microseconds: 0 }}",
            "  control_input [\n" + ",\n".join(control) + "\n  ]",
            "}",
            _instances(TRACKER_INSTANCES, "KIND_CPU"),
            _parameters(
                {
                    "num_keypoints": str(k),
                    **(spec or TrackerSpec()).to_parameters(),
                    **stream_limits(model).to_parameters(),
                }
            ),
        ]
    )


def stream_limits(model: ServedModel) -> StreamLimits:
    """The tracker's caps, derived from what the model's postprocess step can produce: rows up to the
    max_det a request may ask for, its default max_det tracked per frame, twice that in live tracks per
    stream. Triton's sequence batcher already holds an instance to its slots (more streams wait in its
    backlog); the store's own cap is twice that, a backstop against leaked state that never races a slot
    Triton freed a moment before the store's idle timer did."""
    post = model.postprocess
    return StreamLimits(
        max_rows=post.max_det_limit, max_tracked=post.max_det, max_tracks=2 * post.max_det,
        max_sequences=2 * TRACK_MAX_SEQUENCES,
    )  # fmt: skip


def _tracker_pixels(model: ServedModel) -> list[str]:
    """The frame as the network saw it (and how it maps to the original): the tracker reads each person's colours
    from it to tell a returning person from someone else (posetriton.server.tracking.box_colours)."""
    s = model.letterbox.input_size
    return [_tensor(CANVAS, "TYPE_UINT8", f"{s}, {s}, 3"), _tensor(LETTERBOX, "TYPE_FP64", str(LETTERBOX_WIDTH))]


def _track_outputs(model: ServedModel) -> list[str]:
    """What the tracker step adds to NAME's outputs: the track IDs and the smoothed keypoints."""
    k = model.postprocess.num_keypoints
    return [_tensor(TRACK_IDS, "TYPE_INT64", "-1"), _tensor(SMOOTHED_KEYPOINTS, "TYPE_FP32", f"-1, {k}, 3")]


def track_ensemble_config(model: ServedModel) -> str:
    """``NAME`` (encoded images in) with FRAME_INDEX in, the tracker step after postprocess, and TRACK_IDS out.

    Derived from NAME's own ensemble so the two never drift apart: every change there (steps, outputs,
    metadata) carries over.
    """
    track, tracker = track_models(model)
    text = ensemble_config(model, pixels=False)
    source = _tensor("IMAGE", "TYPE_STRING", "1")
    detections = [name for name, _, _ in OUTPUTS]
    maps = [f'input_map {{ key: "{name}" value: "{name}" }}' for name in (*detections, FRAME_INDEX, CANVAS, LETTERBOX)]
    maps += [f'output_map {{ key: "{name}" value: "{name}" }}' for name in (TRACK_IDS, SMOOTHED_KEYPOINTS)]
    step = f'  {{ model_name: "{tracker}" model_version: -1\n    ' + "\n    ".join(maps) + " }"
    for old, new in (
        (f'name: "{model.name}"\n', f'name: "{track}"\n'),
        (_block("input", [source]), _block("input", [source, _tensor(FRAME_INDEX, "TYPE_INT64", "1")])),
        (
            _block("output", _outputs(model)),
            _block("output", [*_outputs(model), *_track_outputs(model)]),
        ),
        ("\n ]\n}", ",\n" + step + "\n ]\n}"),
    ):
        if text.count(old) != 1:
            raise AssertionError(f"cannot derive {track} from {model.name}'s ensemble: {old!r} not found once")
        text = text.replace(old, new)
    return text


def track_files(model: ServedModel) -> dict[str, str]:
    track, tracker = track_models(model)
    return {
        f"{track}/config.pbtxt": track_ensemble_config(model),
        f"{tracker}/config.pbtxt": tracker_config(model),
        f"{tracker}/{VERSION}/model.py": _shim("track"),
    }
