"""Rewrite each family's raw ONNX outputs into the one served candidate tensor, then clean and check the graph.

Served contract: one input ``images`` float32 ``[batch, 3, 640, 640]`` and one output ``candidates`` float32
``[batch, 8400, 56]``; per anchor ``x1, y1, x2, y2`` (network-input pixels), the person score in [0, 1], then 17
keypoints as ``(x, y, confidence)``. The rewrite only appends layout ops (Transpose, Slice, Div, Sub, Add,
Unsqueeze, Concat, Reshape) after the exported heads, so the numbers the network computes are unchanged; the
servers then post-process every family with the same code.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

INPUT_NAME = "images"
OUTPUT_NAME = "candidates"
BATCH_DIM = "batch"
INPUT_SIZE = 640
STRIDES = (8, 16, 32)
NUM_KEYPOINTS = 17
NUM_ANCHORS = sum((INPUT_SIZE // stride) ** 2 for stride in STRIDES)  # 8400
CANDIDATE_WIDTH = 5 + 3 * NUM_KEYPOINTS  # 56

# Enough for the shape subgraphs of a dynamic-size export to collapse once the input size is fixed.
MAX_FOLD_PASSES = 5
# onnxruntime logger severities (graphsurgeon folds constants with onnxruntime sessions).
ORT_WARNING, ORT_ERROR = 2, 3


class GraphContractError(ValueError):
    """The ONNX graph does not have the inputs or outputs the rewrite or the served contract expects."""


def unify_yolo_nas_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Merge super-gradients' four decoded YOLO-NAS Pose outputs into ``candidates``.

    Expects the outputs in the order super-gradients' traced forward returns them: boxes xyxy ``[B, A, 4]``,
    person scores ``[B, A, 1]``, keypoint xy ``[B, A, K, 2]`` and keypoint scores ``[B, A, K]``; scores are already
    sigmoided and all coordinates are in input pixels, so only the layout changes.
    """
    graph = gs.import_onnx(model)
    if len(graph.outputs) != 4:
        raise GraphContractError(f"YOLO-NAS Pose export must have 4 outputs, got {[t.name for t in graph.outputs]}")
    boxes, scores, keypoint_xy, keypoint_scores = graph.outputs
    _check_rank(boxes, 3)
    _check_rank(scores, 3)
    _check_rank(keypoint_xy, 4)
    _check_rank(keypoint_scores, 3)

    axis = _int64("unify_last_axis", [-1])
    keypoint_conf = _layer(graph, "Unsqueeze", [keypoint_scores, axis], "unify_keypoint_conf")  # [B, A, K, 1]
    keypoints = _layer(graph, "Concat", [keypoint_xy, keypoint_conf], "unify_keypoints", axis=-1)  # [B, A, K, 3]
    # Reshape's 0 copies batch and anchors from the input, so the batch stays dynamic.
    flat_shape = _int64("unify_flat_shape", [0, 0, -1])
    keypoints_flat = _layer(graph, "Reshape", [keypoints, flat_shape], "unify_keypoints_flat")  # [B, A, 3K]
    candidates = _layer(graph, "Concat", [boxes, scores, keypoints_flat], OUTPUT_NAME, axis=-1)
    return _finish(graph, candidates, model)


def unify_ultralytics_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn Ultralytics' pose output ``[B, 5 + 3K, A]`` (cx, cy, w, h, score, keypoints) into ``candidates``.

    Boxes become xyxy exactly as Ultralytics' own ``xywh2xyxy`` computes them (``cx -/+ w / 2`` in float32), so
    the served boxes equal the ones Ultralytics feeds its NMS. Keypoints are already ``(x, y, visibility)``
    interleaved with sigmoided visibility. A dynamic-size export gets its input fixed to 640x640 here; only the
    batch stays dynamic.
    """
    graph = gs.import_onnx(model)
    if len(graph.outputs) != 1:
        raise GraphContractError(f"Ultralytics pose export must have 1 output, got {[t.name for t in graph.outputs]}")
    (raw,) = graph.outputs
    _check_rank(raw, 3)

    transposed = _layer(graph, "Transpose", [raw], "unify_anchors_last", perm=[0, 2, 1])  # [B, A, 5 + 3K]
    centre = _slice_last(graph, transposed, 0, 2, "unify_centre")
    size = _slice_last(graph, transposed, 2, 4, "unify_size")
    rest = _slice_last(graph, transposed, 4, CANDIDATE_WIDTH, "unify_score_keypoints")
    half = _layer(graph, "Div", [size, gs.Constant("unify_two", np.array(2.0, dtype=np.float32))], "unify_half_size")
    top_left = _layer(graph, "Sub", [centre, half], "unify_top_left")
    bottom_right = _layer(graph, "Add", [centre, half], "unify_bottom_right")
    candidates = _layer(graph, "Concat", [top_left, bottom_right, rest], OUTPUT_NAME, axis=-1)
    return _finish(graph, candidates, model)


def clean_and_check(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants (shape subgraphs included), drop dead nodes, sort, then prove the graph is valid.

    Shape inference runs first so that graphsurgeon knows the static dims and can fold the anchor and shape
    arithmetic a dynamic-size export leaves behind; only what depends on the batch stays. ``onnx.checker`` with
    ``full_check`` runs strict shape inference, so a declared output shape that the graph cannot produce fails
    here rather than in a server. The batch dimension must stay symbolic everywhere.
    """
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    previous = -1
    ort.set_default_logger_severity(ORT_ERROR)  # folding logs harmless optimizer warnings per node
    try:
        for _ in range(MAX_FOLD_PASSES):
            graph.fold_constants(fold_shapes=True).cleanup(remove_unused_graph_inputs=False).toposort()
            if len(graph.nodes) == previous:
                break
            previous = len(graph.nodes)
    finally:
        ort.set_default_logger_severity(ORT_WARNING)
    cleaned = gs.export_onnx(graph)
    cleaned.ir_version = model.ir_version
    _copy_metadata(model, cleaned)
    onnx.checker.check_model(cleaned, full_check=True)
    check_served_interface(cleaned)
    return cleaned


def check_served_interface(model: onnx.ModelProto) -> None:
    """Raise unless the graph has exactly the served input and output, with a symbolic batch dimension."""
    inputs, outputs = list(model.graph.input), list(model.graph.output)
    if [t.name for t in inputs] != [INPUT_NAME] or [t.name for t in outputs] != [OUTPUT_NAME]:
        raise GraphContractError(
            f"served graph must have input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
            f"got inputs {[t.name for t in inputs]} and outputs {[t.name for t in outputs]}"
        )
    _check_tensor(inputs[0], (BATCH_DIM, 3, INPUT_SIZE, INPUT_SIZE))
    _check_tensor(outputs[0], (BATCH_DIM, NUM_ANCHORS, CANDIDATE_WIDTH))


def _finish(graph: gs.Graph, candidates: gs.Variable, source: onnx.ModelProto) -> onnx.ModelProto:
    """Make ``candidates`` the only output and pin the input to the served shape.

    The family's own metadata is dropped on purpose: it describes the raw layout, not ``candidates``. The IR
    version is kept because graphsurgeon would otherwise stamp a newer one than older runtimes load.
    """
    if len(graph.inputs) != 1:
        raise GraphContractError(f"export must have 1 input, got {[t.name for t in graph.inputs]}")
    (images,) = graph.inputs
    images.name = INPUT_NAME
    images.dtype = np.float32
    images.shape = [BATCH_DIM, 3, INPUT_SIZE, INPUT_SIZE]
    candidates.dtype = np.float32
    candidates.shape = [BATCH_DIM, NUM_ANCHORS, CANDIDATE_WIDTH]
    graph.outputs = [candidates]
    graph.cleanup().toposort()
    unified = gs.export_onnx(graph)
    unified.ir_version = source.ir_version
    return unified


def _layer(graph: gs.Graph, op: str, inputs: list[gs.Tensor], name: str, **attrs: object) -> gs.Variable:
    """Append one node and return its single output, named after the node for readable graphs."""
    output = gs.Variable(name, dtype=np.float32)
    graph.layer(op=op, name=f"{name}_node", inputs=inputs, outputs=[output], attrs=attrs)
    return output


def _slice_last(graph: gs.Graph, tensor: gs.Tensor, start: int, end: int, name: str) -> gs.Variable:
    """``tensor[..., start:end]`` as an ONNX Slice (constant bounds, batch untouched)."""
    bounds = [_int64(f"{name}_start", [start]), _int64(f"{name}_end", [end]), _int64(f"{name}_axis", [-1])]
    return _layer(graph, "Slice", [tensor, *bounds], name)


def _int64(name: str, values: list[int]) -> gs.Constant:
    return gs.Constant(name, np.array(values, dtype=np.int64))


def _check_rank(tensor: gs.Tensor, rank: int) -> None:
    if tensor.shape is not None and len(tensor.shape) != rank:
        raise GraphContractError(f"output {tensor.name!r} must have rank {rank}, got shape {tensor.shape}")


def _check_tensor(value: onnx.ValueInfoProto, expected: tuple[str | int, ...]) -> None:
    """Compare a graph input/output with the contract: float32, symbolic batch, every other dim static."""
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise GraphContractError(
            f"{value.name!r} must be float32, got {onnx.TensorProto.DataType.Name(tensor_type.elem_type)}"
        )
    dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in tensor_type.shape.dim)
    if dims != expected:
        raise GraphContractError(f"{value.name!r} must have shape {list(expected)}, got {list(dims)}")


def _copy_metadata(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """Keep producer metadata and docs that graphsurgeon's round trip drops."""
    target.producer_name, target.producer_version = source.producer_name, source.producer_version
    target.doc_string = source.doc_string
    del target.metadata_props[:]
    target.metadata_props.extend(source.metadata_props)
