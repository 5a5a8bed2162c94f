"""Rewrite each family's raw ONNX into the served graph, then clean and check it.

Two stages. Each family module (:mod:`build_engines.registry`) turns its raw outputs into ``candidates``
``[batch, A, 5 + 3K]`` over all A anchors, with the building blocks below (float32 ``images``
``[batch, 3, S, S]`` in, the family's channel order): per anchor ``x1, y1, x2, y2`` (network-input pixels),
the person score in [0, 1], then K keypoints as ``(x, y, confidence)``. The export checks that stage against
PyTorch anchor by anchor. :func:`to_served_graph` then gives it the served interface (:mod:`posetriton.core.contract`):
the letterboxed ``canvas`` uint8 ``[batch, S, S, 3]`` in decoded RGB order comes in (Cast, channel reorder for
BGR families, NHWC->NCHW, /255 are prepended), and only the best ``k`` anchors by person score go out (TopK +
GatherND appended), sorted by score. Only layout ops and that selection are added, so the numbers the network
computes are unchanged; the servers post-process every family with the same code.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from posetriton.core.contract import CANDIDATES, CANVAS, SCORE_COLUMN, candidate_width
from posetriton.core.spec import LetterboxSpec

# The float input of the unified (pre-served) graph, as the family's own export names it after renaming.
FLOAT_INPUT_NAME = "images"
OUTPUT_NAME = CANDIDATES
BATCH_DIM = "batch"

# Enough for the shape subgraphs of a dynamic-size export to collapse once the input size is fixed.
MAX_FOLD_PASSES = 5
# onnxruntime logger severities (graphsurgeon folds constants with onnxruntime sessions).
ORT_WARNING, ORT_ERROR = 2, 3


class GraphContractError(ValueError):
    """The ONNX graph does not have the inputs or outputs the rewrite or the served contract expects."""


def to_served_graph(unified: onnx.ModelProto, letterbox: LetterboxSpec, topk: int) -> onnx.ModelProto:
    """The unified graph with the served interface: uint8 ``canvas`` NHWC RGB in, the best ``topk`` rows out.

    Prepended, exactly what :func:`posetriton.core.processing.to_network_input` does in numpy: Cast to float32, the
    channels reversed for a BGR family (a Gather on the channel axis), NHWC -> NCHW, then ``/ 255`` (float32
    division, correctly rounded as numpy's). Appended: TopK on the person score (sorted, ties to the lower
    anchor index) and a GatherND of those rows, so ``k`` rows of ``[batch, A, W]`` leave the network instead of
    all A. ``topk`` larger than A is capped at A.
    """
    graph = gs.import_onnx(unified)
    (images,) = graph.inputs
    (candidates,) = graph.outputs
    size = letterbox.input_size
    canvas = gs.Variable(CANVAS, dtype=np.uint8, shape=[BATCH_DIM, size, size, 3])
    pixels = layer(graph, "Cast", [canvas], "canvas_float", to=onnx.TensorProto.FLOAT)
    if letterbox.channel_order == "BGR":
        pixels = layer(graph, "Gather", [pixels, int64_constant("canvas_bgr_order", [2, 1, 0])], "canvas_bgr", axis=3)
    nchw = layer(graph, "Transpose", [pixels], "canvas_nchw", perm=[0, 3, 1, 2])
    scale = gs.Constant("canvas_255", np.array(255.0, dtype=np.float32))
    scaled = layer(graph, "Div", [nchw, scale], "canvas_scaled")
    for node in list(images.outputs):
        for index, tensor in enumerate(node.inputs):
            if tensor is images:
                node.inputs[index] = scaled
    graph.inputs = [canvas]

    anchors = candidates.shape[1] if candidates.shape else None
    k = min(topk, anchors) if isinstance(anchors, int) else topk
    score = slice_last(graph, candidates, SCORE_COLUMN, SCORE_COLUMN + 1, "topk_score")
    score = layer(graph, "Squeeze", [score, int64_constant("topk_squeeze_axis", [-1])], "topk_scores")  # [B, A]
    values = gs.Variable("topk_values", dtype=np.float32)
    indices = gs.Variable("topk_indices", dtype=np.int64)
    graph.layer(
        op="TopK", name="topk_node", inputs=[score, int64_constant("topk_k", [k])], outputs=[values, indices],
        attrs={"axis": 1, "largest": 1, "sorted": 1},
    )  # fmt: skip
    rows = gs.Variable("topk_rows", dtype=np.int64)
    graph.layer(
        op="Unsqueeze", name="topk_rows_node", inputs=[indices, int64_constant("topk_rows_axis", [-1])], outputs=[rows]
    )
    best = layer(graph, "GatherND", [candidates, rows], "topk_candidates", batch_dims=1)  # [B, k, W]
    best.name = OUTPUT_NAME
    candidates.name = "all_candidates"
    best.shape = [BATCH_DIM, k, candidates.shape[2] if candidates.shape else None]
    graph.outputs = [best]
    graph.cleanup().toposort()
    served = gs.export_onnx(graph)
    served.ir_version = unified.ir_version
    _copy_metadata(unified, served)
    return served


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
    return cleaned


def check_unified_interface(model: onnx.ModelProto, input_size: int, num_anchors: int, num_keypoints: int) -> None:
    """Raise unless the unified graph takes float ``images`` and returns ``candidates`` over every anchor."""
    _check_interface(
        model,
        (FLOAT_INPUT_NAME, onnx.TensorProto.FLOAT, (BATCH_DIM, 3, input_size, input_size)),
        (OUTPUT_NAME, onnx.TensorProto.FLOAT, (BATCH_DIM, num_anchors, candidate_width(num_keypoints))),
    )


def check_served_interface(model: onnx.ModelProto, input_size: int, num_candidates: int, num_keypoints: int) -> None:
    """Raise unless the graph has exactly the served input and output (posetriton.core.contract), batch symbolic."""
    _check_interface(
        model,
        (CANVAS, onnx.TensorProto.UINT8, (BATCH_DIM, input_size, input_size, 3)),
        (OUTPUT_NAME, onnx.TensorProto.FLOAT, (BATCH_DIM, num_candidates, candidate_width(num_keypoints))),
    )


def _check_interface(
    model: onnx.ModelProto,
    want_input: tuple[str, int, tuple[str | int, ...]],
    want_output: tuple[str, int, tuple[str | int, ...]],
) -> None:
    inputs, outputs = list(model.graph.input), list(model.graph.output)
    if [t.name for t in inputs] != [want_input[0]] or [t.name for t in outputs] != [want_output[0]]:
        raise GraphContractError(
            f"graph must have input {want_input[0]!r} and output {want_output[0]!r}, "
            f"got inputs {[t.name for t in inputs]} and outputs {[t.name for t in outputs]}"
        )
    _check_tensor(inputs[0], want_input[1], want_input[2])
    _check_tensor(outputs[0], want_output[1], want_output[2])


def finish_unified(
    graph: gs.Graph, candidates: gs.Variable, source: onnx.ModelProto, sizes: tuple[int, int, int]
) -> onnx.ModelProto:
    """Make ``candidates`` the only output and pin the input to the served shape.

    The family's own metadata is dropped on purpose: it describes the raw layout, not ``candidates``. The IR
    version is kept because graphsurgeon would otherwise stamp a newer one than older runtimes load.
    """
    if len(graph.inputs) != 1:
        raise GraphContractError(f"export must have 1 input, got {[t.name for t in graph.inputs]}")
    (images,) = graph.inputs
    input_size, num_anchors, width = sizes
    images.name = FLOAT_INPUT_NAME
    images.dtype = np.float32
    images.shape = [BATCH_DIM, 3, input_size, input_size]
    candidates.dtype = np.float32
    candidates.shape = [BATCH_DIM, num_anchors, width]
    graph.outputs = [candidates]
    graph.cleanup().toposort()
    unified = gs.export_onnx(graph)
    unified.ir_version = source.ir_version
    return unified


def layer(graph: gs.Graph, op: str, inputs: list[gs.Tensor], name: str, **attrs: object) -> gs.Variable:
    """Append one node and return its single output, named after the node for readable graphs."""
    output = gs.Variable(name, dtype=np.float32)
    graph.layer(op=op, name=f"{name}_node", inputs=inputs, outputs=[output], attrs=attrs)
    return output


def slice_last(graph: gs.Graph, tensor: gs.Tensor, start: int, end: int, name: str) -> gs.Variable:
    """``tensor[..., start:end]`` as an ONNX Slice (constant bounds, batch untouched)."""
    bounds = [
        int64_constant(f"{name}_start", [start]),
        int64_constant(f"{name}_end", [end]),
        int64_constant(f"{name}_axis", [-1]),
    ]
    return layer(graph, "Slice", [tensor, *bounds], name)


def int64_constant(name: str, values: list[int]) -> gs.Constant:
    return gs.Constant(name, np.array(values, dtype=np.int64))


def check_rank(tensor: gs.Tensor, rank: int) -> None:
    if tensor.shape is not None and len(tensor.shape) != rank:
        raise GraphContractError(f"output {tensor.name!r} must have rank {rank}, got shape {tensor.shape}")


def _check_tensor(value: onnx.ValueInfoProto, elem_type: int, expected: tuple[str | int, ...]) -> None:
    """Compare a graph input/output with the contract: element type, symbolic batch, every other dim static."""
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type != elem_type:
        raise GraphContractError(
            f"{value.name!r} must be {onnx.TensorProto.DataType.Name(elem_type)}, "
            f"got {onnx.TensorProto.DataType.Name(tensor_type.elem_type)}"
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
