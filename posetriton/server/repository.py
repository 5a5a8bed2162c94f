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
``gpu_ort_trt`` = ONNX Runtime-TensorRT + CPU preprocess, ``gpu_ort_trt_nvjpeg`` = both. The CPU
configurations have their own ensembles (``NAME/configs/cpu.pbtxt`` ...): the CPU network step alone, which
decodes the images and finishes the poses itself (:data:`CPU_PIPELINE`; ``NAME_track`` keeps the preprocess step
for the tracker's canvas, :data:`CPU_CANVAS_PIPELINE`); ``NAME_preprocess`` and ``NAME_postprocess`` stay in the
repository for the tracking ensembles, the GPU and direct callers (loaded with the whole repository;
``--load-model=NAME`` on the CPU pulls in the network step alone).

Every config is a Triton ``ModelConfig`` message (posetriton.server.model_config) written in protobuf text
format. Variants are derived, not repeated: one base per step (name, batch size, tensors from
:data:`STEP_TENSORS`) with the fields its CPU / bf16 / GPU variant changes; ``NAME_pixels`` is ``NAME`` with
another input and first step's input, ``NAME_track`` is ``NAME`` plus the tracker step and its tensors.
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
)
from posetriton.core.spec import (
    COCO_KEYPOINT_NAMES,
    COCO_SKELETON,
    DECODE_THREADS_PARAMETER,
    KEYPOINT_LAYOUTS,
    LetterboxSpec,
    PostprocessSpec,
    SpecError,
    check_keypoint_layout,
)
from posetriton.core.validation import INPUT_SIZE_PARAMETER
from posetriton.server import model_config
from posetriton.server.admission import CAPACITY_PARAMETER as ADMISSION_CAPACITY_PARAMETER
from posetriton.server.admission import DOOR_CAPACITY_PARAMETER
from posetriton.server.model_config import (
    EnsembleStep,
    ModelConfig,
    ModelDynamicBatching,
    ModelInput,
    ModelInstanceGroup,
    ModelOutput,
    ModelQueuePolicy,
    ModelWarmup,
    SequenceControl,
    SequenceControlInput,
    WarmupInput,
)
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


@dataclass(frozen=True)
class Tuning:
    """Scheduling choices for one served model (see docs/benchmarks.md for how they were chosen)."""

    max_batch_size: int = 32
    preprocess_instances: int = 2
    postprocess_instances: int = 1
    network_max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
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
    # The GPU network (TensorRT plan and ORT-TRT alike) waits this long for a fuller batch.
    gpu_network_max_queue_delay_us: int = 100
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


# ------------------------------------------------------------------------------------------------ tensors
@dataclass(frozen=True)
class Tensor:
    """A tensor as every config that names it declares it: Triton's DataType name and dims without the batch."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    def as_input(self, optional: bool = False) -> Any:
        return ModelInput(name=self.name, data_type=self.data_type, dims=self.dims, optional=optional)

    def as_output(self) -> Any:
        return ModelOutput(name=self.name, data_type=self.data_type, dims=self.dims)


def tensors(model: ServedModel) -> dict[str, Tensor]:
    """Every tensor the model's entries pass, by name: declared once, used by each config that names it."""
    s, k = model.letterbox.input_size, model.postprocess.num_keypoints
    declared = (
        Tensor(IMAGE, "TYPE_STRING", (1,)),
        Tensor(PIXELS, "TYPE_UINT8", (-1, -1, 3)),
        Tensor(CANVAS, "TYPE_UINT8", (s, s, 3)),
        Tensor(LETTERBOX, "TYPE_FP64", (LETTERBOX_WIDTH,)),
        Tensor(CANDIDATES, "TYPE_FP32", (model.num_candidates, model.candidate_width)),
        Tensor(contract.NUM_DETECTIONS, "TYPE_INT32", (1,)),
        Tensor(contract.BOXES, "TYPE_FP32", (-1, 4)),
        Tensor(contract.SCORES, "TYPE_FP32", (-1,)),
        Tensor(contract.KEYPOINTS, "TYPE_FP32", (-1, k, 3)),
        Tensor(contract.IMAGE_SIZE, "TYPE_INT32", (2,)),
        Tensor(FRAME_INDEX, "TYPE_INT64", (1,)),
        Tensor(TRACK_IDS, "TYPE_INT64", (-1,)),
        Tensor(SMOOTHED_KEYPOINTS, "TYPE_FP32", (-1, k, 3)),
    )
    return {tensor.name: tensor for tensor in declared}


# Each step's inputs and outputs: its config declares them and the ensembles map them, under the same names.
# The preprocess step takes either IMAGE or PIXELS (both optional): each ensemble feeds it one.
# The tracker reads the frame the network saw (canvas, letterbox): the colours that re-identify a returning
# person come from it (posetriton.server.tracking.box_colours).
STEP_TENSORS = {
    "preprocess": ((IMAGE, PIXELS), (CANVAS, LETTERBOX)),
    "network": ((CANVAS,), (CANDIDATES,)),
    "postprocess": ((CANDIDATES, LETTERBOX), contract.OUTPUTS),
    "tracker": ((*contract.OUTPUTS, FRAME_INDEX, CANVAS, LETTERBOX), (TRACK_IDS, SMOOTHED_KEYPOINTS)),
}
PIPELINE = ("preprocess", "network", "postprocess")
# On the CPU the network step is the whole of NAME and NAME_pixels: it decodes their images itself (the preprocess
# step's code, on its own decode threads) and finishes the poses (the postprocess step's code, on its own finisher
# thread), so a lone image crosses one Python process, not three (posetriton.server.steps.openvino_pose). The
# tracking ensembles keep NAME_preprocess before it, since the tracker reads the canvas the network saw; with the
# canvas the network reads the letterbox rows and answers the poses too. NAME_postprocess stays in the repository
# for direct callers. What the CPU network reads and writes besides its own STEP_TENSORS (every input optional:
# images, or a canvas with or without its letterbox rows):
CPU_NETWORK_TENSORS = ((IMAGE, PIXELS, CANVAS, LETTERBOX), contract.OUTPUTS)
CPU_PIPELINE = ("network",)
CPU_CANVAS_PIPELINE = ("preprocess", "network")
LATEST_VERSION = -1  # an ensemble step runs the newest version its model has
# Python-backend steps batch what is already queued and never hold a request to wait for more.
STEP_MAX_QUEUE_DELAY_US = 0
PLAN_FILE, ONNX_FILE, OPENVINO_FILE = "model.plan", "model.onnx", "model.xml"


def _step_config(model: ServedModel, role: str, optional_inputs: bool = False, **fields: str) -> Any:
    """Step ``role``: its name, batch size and tensors (STEP_TENSORS), plus top-level ``fields`` (its backend or
    platform, its model file): the base every variant of the step starts from."""
    inputs, outputs = STEP_TENSORS[role]
    declared = tensors(model)
    return ModelConfig(
        name=model.step(role),
        max_batch_size=model.tuning.max_batch_size,
        input=[declared[name].as_input(optional_inputs) for name in inputs],
        output=[declared[name].as_output() for name in outputs],
        **fields,
    )


def _set_parameters(config: Any, values: dict[str, Any]) -> None:
    """Triton's parameters are strings: other values as JSON (lists, numbers), as the steps read them back."""
    for key, value in values.items():
        config.parameters[key].string_value = value if isinstance(value, str) else json.dumps(value)


def _instances(count: int, kind: str) -> list[Any]:
    return [ModelInstanceGroup(count=count, kind=kind)]


def _dynamic_batching(delay_us: int, preferred: tuple[int, ...] = (), queue_role: str = "") -> Any:
    """Triton's dynamic batcher; ``queue_role`` bounds its queue with that step's QUEUE_LIMITS."""
    batching = ModelDynamicBatching(preferred_batch_size=preferred, max_queue_delay_microseconds=delay_us)
    if queue_role:
        batching.default_queue_policy.CopyFrom(queue_policy(queue_role))
    return batching


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


def queue_policy(role: str) -> Any:
    """The ``default_queue_policy`` (a ``ModelQueuePolicy``) of step ``role``'s dynamic batcher."""
    limits = QUEUE_LIMITS[role]
    return ModelQueuePolicy(
        timeout_action="REJECT",
        default_timeout_microseconds=limits.default_timeout_us,
        allow_timeout_override=True,
        max_queue_size=limits.max_queue_size,
    )


# ------------------------------------------------------------------------------------------------ ensembles
def _ensemble_step(model: ServedModel, role: str, inputs: tuple[str, ...] = (), cpu: bool = False) -> Any:
    """Step ``role`` in an ensemble: it reads ``inputs`` (default: all of its own) and writes its outputs; on the
    CPU path the network writes the poses (CPU_NETWORK_TENSORS), from the canvas and its letterbox rows unless
    ``inputs`` says otherwise."""
    own_inputs, outputs = STEP_TENSORS[role]
    if cpu and role == "network":
        own_inputs, outputs = (CANVAS, LETTERBOX), CPU_NETWORK_TENSORS[1]
    return EnsembleStep(
        model_name=model.step(role),
        model_version=LATEST_VERSION,
        input_map={name: name for name in inputs or own_inputs},
        output_map={name: name for name in outputs},
    )


def ensemble_config(model: ServedModel, cpu: bool = False, pipeline: tuple[str, ...] | None = None) -> Any:
    """NAME: encoded images in (IMAGE), poses out, through preprocess -> network -> postprocess (``cpu``: the
    network step alone, CPU_PIPELINE; ``pipeline`` names other steps); its parameters carry the model's metadata
    (keypoint names, skeleton, letterbox, default thresholds) for clients."""
    declared = tensors(model)
    config = ModelConfig(
        name=model.name,
        platform="ensemble",
        max_batch_size=model.tuning.max_batch_size,
        input=[declared[IMAGE].as_input()],
        output=[declared[name].as_output() for name in contract.OUTPUTS],
    )
    first, *rest = pipeline or (CPU_PIPELINE if cpu else PIPELINE)
    config.ensemble_scheduling.step.extend(
        [_ensemble_step(model, first, (IMAGE,), cpu), *(_ensemble_step(model, role, cpu=cpu) for role in rest)]
    )
    _set_parameters(config, model.metadata())
    return config


def pixels_ensemble_config(model: ServedModel, cpu: bool = False) -> Any:
    """NAME_pixels: NAME with raw pixels (PIXELS) in place of the encoded image, fed to the same first step."""
    config = ensemble_config(model, cpu)
    config.name = model.step("pixels")
    config.input[0].CopyFrom(tensors(model)[PIXELS].as_input())
    first = config.ensemble_scheduling.step[0]
    first.ClearField("input_map")
    first.input_map[PIXELS] = PIXELS
    return config


# -------------------------------------------------------------------------------------------------- steps
def preprocess_config(model: ServedModel) -> Any:
    """Decode + letterbox on the CPU (posetriton.server.steps.preprocess); either input, as the ensemble sends."""
    config = _step_config(model, "preprocess", optional_inputs=True, backend="python")
    config.dynamic_batching.CopyFrom(_dynamic_batching(STEP_MAX_QUEUE_DELAY_US, queue_role="preprocess"))
    config.instance_group.extend(_instances(model.tuning.preprocess_instances, "KIND_CPU"))
    _set_parameters(config, {**model.letterbox.to_parameters(), **admission_parameters(model)})
    return config


def admission_parameters(model: ServedModel) -> dict[str, str]:
    """The ledger both the preprocess and the CPU network step open (posetriton.server.admission): as many
    admitted requests as the network's queue holds plus what the preprocess instances decode meanwhile, so a
    request admitted before its decode is one the network queue can still take."""
    capacity = QUEUE_LIMITS["network"].max_queue_size + model.tuning.preprocess_instances
    return {ADMISSION_CAPACITY_PARAMETER: str(capacity)}


def gpu_preprocess_config(model: ServedModel) -> Any:
    """The preprocess step with nvJPEG decode + letterbox on the GPU (posetriton.server.steps.gpu_preprocess,
    non-JPEG inputs on the CPU path): the same tensors, queue and parameters, another file and instance kind."""
    config = preprocess_config(model)
    config.default_model_filename = GPU_PREPROCESS_MODEL_FILE
    config.ClearField("instance_group")
    config.instance_group.extend(_instances(model.tuning.gpu_preprocess_instances, "KIND_GPU"))
    return config


def postprocess_config(model: ServedModel) -> Any:
    config = _step_config(model, "postprocess", backend="python")
    config.dynamic_batching.CopyFrom(_dynamic_batching(STEP_MAX_QUEUE_DELAY_US, queue_role="postprocess"))
    config.instance_group.extend(_instances(model.tuning.postprocess_instances, "KIND_CPU"))
    _set_parameters(config, pose_output_parameters(model))
    return config


def pose_output_parameters(model: ServedModel) -> dict[str, str]:
    """What a step that finishes the poses reads (posetriton.server.steps.pose_outputs): the postprocess spec and
    the canvas size its letterbox rows refer to. The postprocess step and the CPU network step both carry them."""
    return {**model.postprocess.to_parameters(), INPUT_SIZE_PARAMETER: str(model.letterbox.input_size)}


def network_gpu_config(model: ServedModel) -> Any:
    """The default network: the TensorRT plan, several execution contexts on the GPU (Tuning)."""
    t = model.tuning
    config = _step_config(model, "network", platform="tensorrt_plan", default_model_filename=PLAN_FILE)
    config.dynamic_batching.CopyFrom(_dynamic_batching(t.gpu_network_max_queue_delay_us, t.preferred_batch_sizes))
    config.instance_group.extend(_instances(t.gpu_network_instances, "KIND_GPU"))
    return config


def _warmup(model: ServedModel) -> list[Any]:
    """Batch 1 then the largest batch at load, so ORT-TRT builds its engine for the whole range before serving."""
    canvas = tensors(model)[CANVAS]
    entries = []
    for batch in sorted({1, model.tuning.max_batch_size}):
        entry = ModelWarmup(name=f"batch_{batch}", batch_size=batch)
        zeros = WarmupInput(data_type=canvas.data_type, dims=canvas.dims, zero_data=True)
        entry.inputs[canvas.name].CopyFrom(zeros)
        entries.append(entry)
    return entries


def network_ort_trt_config(model: ServedModel, onnx_sha256: str | None = None) -> Any:
    """ONNX Runtime with the TensorRT execution accelerator on model.onnx: GPU serving with no engine build step;
    the TensorRT plan's batching and instances, engines built by ONNX Runtime at load (the warmup).

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

    config = network_gpu_config(model)
    config.platform, config.default_model_filename = "onnxruntime_onnx", ONNX_FILE
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    accelerator.parameters.update(
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
    config.model_warmup.extend(_warmup(model))
    return config


def network_cpu_config(model: ServedModel, precision: str) -> Any:
    """The OpenVINO IR run by posetriton.server.steps.openvino_pose at ``precision`` (CPU_CONFIGS)."""
    t = model.tuning
    config = _step_config(model, "network", backend="python")
    config.dynamic_batching.CopyFrom(
        _dynamic_batching(t.network_max_queue_delay_us, t.preferred_batch_sizes, queue_role="network")
    )
    # Images, or the canvas with its letterbox rows, give the poses (CPU_NETWORK_TENSORS); the canvas alone gives
    # the candidates alone. Every input is optional: the step itself says what a request lacks.
    declared, outputs = tensors(model), STEP_TENSORS["network"][1]
    config.ClearField("input")
    config.input.extend(declared[name].as_input(optional=True) for name in CPU_NETWORK_TENSORS[0])
    config.output.extend(declared[name].as_output() for name in CPU_NETWORK_TENSORS[1] if name not in outputs)
    # One process: its OpenVINO streams use every core (more instances would oversubscribe them).
    config.instance_group.extend(_instances(1, "KIND_CPU"))
    _set_parameters(
        config,
        {
            "precision": precision,
            "model_file": OPENVINO_FILE,
            "performance_hint": t.network_performance_hint,
            "cpu_pinning": str(t.network_cpu_pinning).lower(),
            # It decodes as many requests at once as the preprocess instances it stands in for, with their
            # letterbox parameters, and lets as many wait for their decode as their queue would.
            DECODE_THREADS_PARAMETER: str(t.preprocess_instances),
            DOOR_CAPACITY_PARAMETER: str(QUEUE_LIMITS["preprocess"].max_queue_size),
            **model.letterbox.to_parameters(),
            **admission_parameters(model),
            **pose_output_parameters(model),
        },
    )
    return config


def _shim(module: str) -> str:
    return (
        f'"""Generated: Triton loads this file; the model is posetriton.server.steps.{module}."""\n\n'
        f"from posetriton.server.steps.{module} import TritonPythonModel  # noqa: F401\n"
    )


# Every config file starts with this note: the catalogue is the place to change a value.
GENERATED_NOTE = "Generated by posetriton.server.repository from build_engines/models.toml: edit that, not this file."


def model_configs(model: ServedModel, onnx_sha256: str | None = None) -> dict[str, Any]:
    """Every ``ModelConfig`` of the model's repository entries, by file path relative to the repository root:
    each entry's ``config.pbtxt`` and the ``configs/NAME.pbtxt`` that ``--model-config-name=NAME`` selects.

    ``onnx_sha256`` (of the network's model.onnx) keys the ONNX Runtime-TensorRT engine cache, so re-exported
    weights never reuse a stale engine."""
    network, preprocess = model.step("network"), model.step("preprocess")
    configs = {
        f"{model.name}/config.pbtxt": ensemble_config(model),
        f"{model.step('pixels')}/config.pbtxt": pixels_ensemble_config(model),
        f"{preprocess}/config.pbtxt": preprocess_config(model),
        f"{model.step('postprocess')}/config.pbtxt": postprocess_config(model),
        f"{network}/config.pbtxt": network_gpu_config(model),
        **track_configs(model),
    }
    for config_name, precision in CPU_CONFIGS.items():
        configs[f"{network}/configs/{config_name}.pbtxt"] = network_cpu_config(model, precision)
        configs[f"{model.name}/configs/{config_name}.pbtxt"] = ensemble_config(model, cpu=True)
        configs[f"{model.step('pixels')}/configs/{config_name}.pbtxt"] = pixels_ensemble_config(model, cpu=True)
    for config_name, (network_variant, preprocess_variant) in GPU_CONFIGS.items():
        if network_variant == "ort_trt":
            configs[f"{network}/configs/{config_name}.pbtxt"] = network_ort_trt_config(model, onnx_sha256)
        if preprocess_variant == "nvjpeg":
            configs[f"{preprocess}/configs/{config_name}.pbtxt"] = gpu_preprocess_config(model)
    return configs


def render(model: ServedModel, onnx_sha256: str | None = None) -> dict[str, str]:
    """Every text file of the model's repository entries, by path relative to the repository root: the configs
    of :func:`model_configs` as Triton reads them, the steps' model.py files and the network's metadata.json."""
    files = {
        path: model_config.to_text(config, GENERATED_NOTE) for path, config in model_configs(model, onnx_sha256).items()
    }
    shims = {"preprocess": "preprocess", "postprocess": "postprocess", "network": "openvino_pose", "tracker": "track"}
    for role, module in shims.items():
        files[f"{model.step(role)}/{VERSION}/model.py"] = _shim(module)
    files[f"{model.step('preprocess')}/{VERSION}/{GPU_PREPROCESS_MODEL_FILE}"] = _shim("gpu_preprocess")
    files[f"{model.step('network')}/metadata.json"] = json.dumps({"name": model.name, **model.metadata()}, indent=2)
    return {path: text if text.endswith("\n") else text + "\n" for path, text in files.items()}


def write_model(model: ServedModel, repository: Path, network_files: dict[str, Path]) -> list[Path]:
    """Write the model's five entries; ``network_files`` (model.onnx, .xml, .bin) go in the network's version folder."""
    for stale in (model.name, *(model.step(r) for r in ("pixels", "preprocess", "network", "postprocess"))):
        shutil.rmtree(repository / stale, ignore_errors=True)
    for stale in track_models(model):
        shutil.rmtree(repository / stale, ignore_errors=True)
    written = []
    onnx_file = network_files.get(ONNX_FILE)
    onnx_sha256 = hashlib.sha256(Path(onnx_file).read_bytes()).hexdigest() if onnx_file else None
    for relative, text in render(model, onnx_sha256).items():
        path = repository / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")  # configs keep non-ASCII text (descriptions) as UTF-8
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
    return model.step("track"), model.step("tracker")


def _control(name: str, kind: str, **value: Any) -> Any:
    """A sequence batcher control input: Triton sets tensor ``name`` to tell the step about the sequence."""
    return SequenceControlInput(name=name, control=[SequenceControl(kind=kind, **value)])


def tracker_config(model: ServedModel, spec: TrackerSpec | None = None) -> Any:
    """The tracker step: ``oldest`` sequence batching, i.e. requests of many streams batched together, every
    request of one stream on one instance, in order; the model keeps each stream's state by correlation ID
    (``direct`` would pin each stream to a batch slot, capping open streams at instances x max_batch_size)."""
    config = _step_config(model, "tracker", backend="python")
    batching = config.sequence_batching
    batching.max_sequence_idle_microseconds = TRACK_IDLE_MICROSECONDS
    batching.oldest.max_candidate_sequences = TRACK_MAX_SEQUENCES
    batching.oldest.max_queue_delay_microseconds = STEP_MAX_QUEUE_DELAY_US
    false_true = [0, 1]  # the int32 values Triton sends for "not the first / last request" and "it is"
    batching.control_input.extend(
        [
            _control(CONTROL_START, "CONTROL_SEQUENCE_START", int32_false_true=false_true),
            _control(CONTROL_END, "CONTROL_SEQUENCE_END", int32_false_true=false_true),
            _control(CONTROL_CORRID, "CONTROL_SEQUENCE_CORRID", data_type="TYPE_UINT64"),
        ]
    )
    config.instance_group.extend(_instances(TRACKER_INSTANCES, "KIND_CPU"))
    _set_parameters(
        config,
        {
            "num_keypoints": str(model.postprocess.num_keypoints),
            **(spec or TrackerSpec()).to_parameters(),
            **stream_limits(model).to_parameters(),
        },
    )
    return config


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


def track_ensemble_config(model: ServedModel, cpu: bool = False) -> Any:
    """``NAME`` (encoded images in) with FRAME_INDEX in, the tracker step after the poses, and its outputs out.

    Derived from NAME's own ensemble so the two never drift apart: every change there (steps, outputs,
    metadata) carries over.
    """
    declared = tensors(model)
    config = ensemble_config(model, cpu, CPU_CANVAS_PIPELINE if cpu else None)
    config.name = track_models(model)[0]
    config.input.extend([declared[FRAME_INDEX].as_input()])
    config.output.extend(declared[name].as_output() for name in STEP_TENSORS["tracker"][1])
    config.ensemble_scheduling.step.extend([_ensemble_step(model, "tracker")])
    return config


def track_configs(model: ServedModel) -> dict[str, Any]:
    track, tracker = track_models(model)
    configs = {f"{track}/config.pbtxt": track_ensemble_config(model), f"{tracker}/config.pbtxt": tracker_config(model)}
    for config_name in CPU_CONFIGS:
        configs[f"{track}/configs/{config_name}.pbtxt"] = track_ensemble_config(model, cpu=True)
    return configs
