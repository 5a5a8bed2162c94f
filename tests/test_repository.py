"""The generated model repository: every config parses as Triton's ModelConfig and the ensembles wire up."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format
from tritonclient.grpc import model_config_pb2

from posetriton.core import contract
from posetriton.core.spec import DECODE_THREADS_PARAMETER, LetterboxSpec, PostprocessSpec, SpecError
from posetriton.server import model_config
from posetriton.server.admission import DOOR_CAPACITY_PARAMETER
from posetriton.server.repository import (
    CPU_CANVAS_PIPELINE,
    CPU_CONFIGS,
    CPU_PIPELINE,
    GPU_CONFIGS,
    load_catalog,
    model_configs,
    render,
    write_model,
)
from tests.conftest import ROOT

CATALOG = load_catalog(ROOT / "build_engines" / "models.toml")


def parse(text: str) -> model_config_pb2.ModelConfig:
    """With tritonclient's own generated class, not posetriton's copy of the schema: the files read as the real
    thing (test_schema_is_tritonclients keeps the two the same)."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_schema_is_tritonclients() -> None:
    """posetriton.server.model_config builds its messages from a kept copy of Triton's model_config.proto:
    it is the one the installed tritonclient ships (refresh: python -m posetriton.server.model_config)."""
    theirs = descriptor_pb2.FileDescriptorProto()
    model_config_pb2.DESCRIPTOR.CopyToProto(theirs)
    ours = text_format.Parse(model_config.SCHEMA.read_text(), descriptor_pb2.FileDescriptorProto())
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_config_file_reads_back_as_the_message_written(name: str) -> None:
    """Parse(write(message)) == message for every config file, and Triton's schema reads the same message."""
    for onnx_sha256 in (None, "ab" * 32):
        configs, files = model_configs(CATALOG[name], onnx_sha256), render(CATALOG[name], onnx_sha256)
        assert {path for path in files if path.endswith(".pbtxt")} == set(configs)
        for path, config in configs.items():
            assert model_config.parse(files[path]) == config, path
            assert parse(files[path]) == model_config_pb2.ModelConfig.FromString(config.SerializeToString()), path


def _without(config: model_config.ModelConfig, *fields: str) -> model_config.ModelConfig:
    copy = model_config.ModelConfig()
    copy.CopyFrom(config)
    for name in fields:
        copy.ClearField(name)
    return copy


def test_variants_differ_from_their_base_only_where_they_must() -> None:
    """Each derived config is its base plus what makes it that variant: nothing else can drift between them."""
    model = CATALOG["yolo11n_pose"]
    configs = model_configs(model, "ab" * 32)
    plain = configs["yolo11n_pose/config.pbtxt"]
    pixels = _without(configs["yolo11n_pose_pixels/config.pbtxt"], "name", "input")
    pixels.ensemble_scheduling.step[0].ClearField("input_map")
    expected = _without(plain, "name", "input")
    expected.ensemble_scheduling.step[0].ClearField("input_map")
    assert pixels == expected
    track = _without(configs["yolo11n_pose_track/config.pbtxt"], "name")
    assert track.input[-1].name == contract.FRAME_INDEX and track.ensemble_scheduling.step[-1].model_name.endswith(
        contract.TRACKER_SUFFIX
    )
    del track.input[-1], track.output[len(plain.output) :], track.ensemble_scheduling.step[-1]
    assert track == _without(plain, "name")
    # The CPU ensembles are the same but for their steps: the network finishes the poses (no postprocess step), and
    # decodes the images itself but where the tracker needs the canvas (the preprocess step then stays).
    for ensemble, steps in (("yolo11n_pose", CPU_PIPELINE), ("yolo11n_pose_pixels", CPU_PIPELINE),
                            ("yolo11n_pose_track", (*CPU_CANVAS_PIPELINE, "tracker"))):  # fmt: skip
        base = configs[f"{ensemble}/config.pbtxt"]
        for config_name in CPU_CONFIGS:
            cpu_ensemble = configs[f"{ensemble}/configs/{config_name}.pbtxt"]
            assert _without(cpu_ensemble, "ensemble_scheduling") == _without(base, "ensemble_scheduling")
            roles = [step.model_name for step in cpu_ensemble.ensemble_scheduling.step]
            assert roles == [model.step(role) for role in steps]
    network = "yolo11n_pose_network"
    cpu = [_without(configs[f"{network}/configs/{c}.pbtxt"], "parameters") for c in CPU_CONFIGS]
    assert all(config == cpu[0] for config in cpu)
    ort_trt = [f"{network}/configs/{c}.pbtxt" for c, (variant, _) in GPU_CONFIGS.items() if variant == "ort_trt"]
    varying = ("platform", "default_model_filename", "optimization", "model_warmup")
    for path in ort_trt:
        assert _without(configs[path], *varying) == _without(configs[f"{network}/config.pbtxt"], *varying)
    nvjpeg = [path for path in configs if path.startswith("yolo11n_pose_preprocess/configs/")]
    assert nvjpeg and all(
        _without(configs[path], "default_model_filename", "instance_group")
        == _without(configs["yolo11n_pose_preprocess/config.pbtxt"], "instance_group")
        for path in nvjpeg
    )


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_configs_parse_and_ensembles_wire_up(name: str) -> None:
    files = render(CATALOG[name])
    configs = {path.split("/")[0]: parse(text) for path, text in files.items() if path.endswith("config.pbtxt")}
    steps = {f"{name}_preprocess", f"{name}_network", f"{name}_postprocess", f"{name}_tracker"}
    assert set(configs) == {name, f"{name}_pixels", f"{name}_track", *steps}
    # Every configuration Triton may select (--model-config-name): each model's configs/NAME.pbtxt, else config.pbtxt.
    for config_name in (None, *CPU_CONFIGS, *GPU_CONFIGS):
        selected = {
            model: parse(files.get(f"{model}/configs/{config_name}.pbtxt", files[f"{model}/config.pbtxt"]))
            for model in configs
        }
        for ensemble in (name, f"{name}_pixels", f"{name}_track"):
            produced = {i.name for i in selected[ensemble].input}
            for step in selected[ensemble].ensemble_scheduling.step:
                model = selected[step.model_name]
                where = f"{config_name}: {ensemble}: {step.model_name}"
                assert set(step.input_map) <= {i.name for i in model.input}, where
                assert {i.name for i in model.input if not i.optional} <= set(step.input_map), where
                assert set(step.input_map.values()) <= produced, f"{where} reads an unproduced tensor"
                assert set(step.output_map) <= {o.name for o in model.output}, where
                produced |= set(step.output_map.values())
            assert {o.name for o in selected[ensemble].output} <= produced
    gpu = configs[f"{name}_network"]
    assert (
        gpu.platform == "tensorrt_plan" and gpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    )
    tuning = CATALOG[name].tuning
    # Several engine contexts per GPU (a batch computes while the next is handed over); one CPU network process
    # whose pipeline does the same; both steps of a CPU server share the admission ledger's capacity.
    gpu_networks = [
        gpu,
        *(parse(files[f"{name}_network/configs/{c}.pbtxt"]) for c in ("gpu_ort_trt", "gpu_ort_trt_nvjpeg")),
    ]
    for network in gpu_networks:
        assert [(g.count, g.kind) for g in network.instance_group] == [
            (tuning.gpu_network_instances, model_config_pb2.ModelInstanceGroup.KIND_GPU)
        ]
        assert network.instance_group[0].count >= 2 and network.dynamic_batching.preferred_batch_size
    for config_name, precision in CPU_CONFIGS.items():
        cpu = parse(files[f"{name}_network/configs/{config_name}.pbtxt"])
        assert cpu.backend == "python" and cpu.parameters["precision"].string_value == precision
        assert [(g.count, g.kind) for g in cpu.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
        queue = cpu.dynamic_batching.default_queue_policy
        assert queue.max_queue_size > 0 and queue.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
        pre = parse(files[f"{name}_preprocess/config.pbtxt"])
        capacity = int(cpu.parameters["admission_capacity"].string_value)
        assert capacity == int(pre.parameters["admission_capacity"].string_value)
        assert capacity == queue.max_queue_size + tuning.preprocess_instances
        # The preprocess step's images and the GPU network's canvas in, with the letterbox rows, every one optional
        # (the step says what a request lacks); the GPU network's candidates and the poses out: the GPU ensembles
        # could run on it unchanged, and the CPU ensembles need no other step (the tracking ones keep the
        # preprocess step for the canvas). It reads the parameters of both steps it stands in for.
        names = (contract.IMAGE, contract.PIXELS, contract.CANVAS, contract.LETTERBOX)
        assert [(i.name, i.optional) for i in cpu.input] == [(n, True) for n in names]
        declared = {i.name: list(i.dims) for i in cpu.input}
        assert all(declared[i.name] == list(i.dims) for i in (*gpu.input, *pre.input))
        assert [o.dims for o in cpu.output][: len(gpu.output)] == [o.dims for o in gpu.output]
        post = parse(files[f"{name}_postprocess/config.pbtxt"])
        assert cpu.output[len(gpu.output) :] == post.output
        for step in (pre, post):
            assert {k: cpu.parameters[k] for k in step.parameters} == dict(step.parameters)
        assert cpu.parameters[DECODE_THREADS_PARAMETER].string_value == str(tuning.preprocess_instances)
        door = int(cpu.parameters[DOOR_CAPACITY_PARAMETER].string_value)
        assert door == pre.dynamic_batching.default_queue_policy.max_queue_size


def test_family_values_reach_the_step_parameters() -> None:
    files = render(CATALOG["yolo_nas_pose_n"])
    pre = parse(files["yolo_nas_pose_n_preprocess/config.pbtxt"])
    spec = LetterboxSpec.from_parameters({k: v.string_value for k, v in pre.parameters.items()})
    assert spec == LetterboxSpec(channel_order="BGR", pad_position="bottom_right", pad_value=127, per_axis_scale=False)
    post = parse(files["yolo_nas_pose_n_postprocess/config.pbtxt"])
    spec_post = PostprocessSpec.from_parameters({k: v.string_value for k, v in post.parameters.items()})
    assert (spec_post.conf, spec_post.pre_nms_topk, spec_post.max_det, spec_post.clip_to_image) == (
        0.5,
        300,
        100,
        False,
    )


def test_catalogue_errors_name_the_problem(tmp_path: Path) -> None:
    bad_family = tmp_path / "a.toml"
    bad_family.write_text('[models.x]\nfamily = "nope"\n')
    with pytest.raises(SpecError, match="unknown family 'nope'"):
        load_catalog(bad_family)
    bad_value = tmp_path / "b.toml"
    bad_value.write_text('[families.f]\nletterbox = { pad_value = 300 }\n[models.x]\nfamily = "f"\n')
    with pytest.raises(SpecError, match=r"pad_value must be in \[0, 255\]"):
        load_catalog(bad_value)
    with pytest.raises(SpecError, match="cannot read 'abc' as int"):
        LetterboxSpec.from_parameters({"input_size": "abc"})


@pytest.mark.parametrize(
    ("family", "message"),
    [
        ('keypoints = "hands"', "unknown keypoint layout 'hands'"),
        ('keypoints = "coco_person"\nkeypoint_names = ["a"]', "either keypoints = LAYOUT or keypoint_names"),
        ('keypoint_names = ["a", "b"]\nskeleton = [[0, 2]]', r"skeleton edge \[0, 2\] must join two of the 2"),
        ('keypoint_names = ["a", "a"]', "must be unique"),
        ('keypoint_names = ["a", "b"]\npostprocess = { num_keypoints = 3 }', "2 keypoint names for 3 keypoints"),
    ],
)
def test_catalogue_keypoint_layout_errors_name_the_problem(tmp_path: Path, family: str, message: str) -> None:
    catalog = tmp_path / "models.toml"
    catalog.write_text(f'[families.f]\n{family}\n[models.x]\nfamily = "f"\n')
    with pytest.raises(SpecError, match=message):
        load_catalog(catalog)


def test_a_family_listing_its_keypoints_needs_no_code(tmp_path: Path) -> None:
    """Names and skeleton come from the catalogue into the ensemble's parameters; the count follows the names."""
    catalog = tmp_path / "models.toml"
    catalog.write_text(
        '[families.hand]\nexporter = "some.module"\nkeypoint_names = ["wrist", "thumb", "index"]\n'
        'skeleton = [[0, 1], [0, 2]]\n[models.hand_pose]\nfamily = "hand"\n'
    )
    model = load_catalog(catalog)["hand_pose"]
    assert (model.exporter, model.postprocess.num_keypoints) == ("some.module", 3)
    ensemble = parse(render(model)["hand_pose/config.pbtxt"])
    assert json.loads(ensemble.parameters["keypoint_names"].string_value) == ["wrist", "thumb", "index"]
    assert json.loads(ensemble.parameters["skeleton"].string_value) == [[0, 1], [0, 2]]
    post = parse(render(model)["hand_pose_postprocess/config.pbtxt"])
    assert [list(o.dims) for o in post.output if o.name == contract.KEYPOINTS] == [[-1, 3, 3]]


def test_another_input_size_keypoint_count_and_topk_flow_through_every_config() -> None:
    """Nothing is pinned to 640 / 17 / 8400: the contract's values come from the family."""
    base = CATALOG["yolo11n_pose"]
    model = dataclasses.replace(
        base,
        letterbox=dataclasses.replace(base.letterbox, input_size=320),
        postprocess=dataclasses.replace(base.postprocess, num_keypoints=5),
        keypoint_names=("a", "b", "c", "d", "e"),
        skeleton=((0, 1), (1, 2)),
        candidates_topk=5000,
    )
    assert model.num_anchors == contract.num_anchors(320) == 2100 and model.num_candidates == 2100
    files = render(model)
    for config_name in CPU_CONFIGS:
        network = parse(files[f"yolo11n_pose_network/configs/{config_name}.pbtxt"])
        assert [list(i.dims) for i in network.input] == [[1], [-1, -1, 3], [320, 320, 3], [contract.LETTERBOX_WIDTH]]
        assert list(network.output[0].dims) == [2100, contract.candidate_width(5)]
        assert [list(o.dims) for o in network.output if o.name == contract.KEYPOINTS] == [[-1, 5, 3]]
    post = parse(files["yolo11n_pose_postprocess/config.pbtxt"])
    assert list(post.input[0].dims) == [2100, 20]
    assert [list(o.dims) for o in post.output if o.name == contract.KEYPOINTS] == [[-1, 5, 3]]
    with pytest.raises(contract.ContractError, match="not a multiple of stride 48"):
        dataclasses.replace(base, strides=(8, 16, 48))


def test_ort_trt_engine_cache_is_keyed_by_the_onnx_it_serves(tmp_path: Path) -> None:
    """write_model keys the ONNX Runtime-TensorRT cache by the ONNX's hash: new weights, a new cache folder."""
    model = CATALOG["yolo11n_pose"]
    folders = []
    for weights in (b"first export", b"second export"):
        onnx_file = tmp_path / "model.onnx"
        onnx_file.write_bytes(weights)
        write_model(model, tmp_path / "repository", {"model.onnx": onnx_file})
        config = parse((tmp_path / "repository" / "yolo11n_pose_network/configs/gpu_ort_trt.pbtxt").read_text())
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
        folders.append(accelerator.parameters["trt_engine_cache_path"])
    assert folders[0] != folders[1] and all("/yolo11n_pose/onnx-" in folder for folder in folders), folders
