"""Export a catalogue model to the served ONNX and OpenVINO IR, proving parity on the way.

The module the model's family names (:mod:`build_engines.registry`) builds the unified graph; this module gives
it the served interface (uint8 canvas in, top-k candidates out, :func:`build_engines.onnx_graph.to_served_graph`),
checks it against PyTorch on real photos (:mod:`build_engines.parity`) and refuses to return a graph that misses.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from build_engines.onnx_graph import check_served_interface, check_unified_interface, clean_and_check, to_served_graph
from build_engines.parity import ExportResult, parity_canvases, verify_export
from build_engines.registry import ExportOptions, family_exporter
from posetriton.core.processing import to_network_input
from posetriton.server.repository import ServedModel


def export_network(model: ServedModel, out_dir: Path, photos: list[Path], options: ExportOptions) -> ExportResult:
    """Export ``model`` into ``out_dir``: ``<name>.onnx`` (served) and its IR; raises ParityError on a miss."""
    exporter = family_exporter(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    canvases = parity_canvases(photos, model.letterbox)
    family = exporter(model, out_dir, options)
    keypoints = model.postprocess.num_keypoints
    check_unified_interface(family.unified, model.letterbox.input_size, model.num_anchors, keypoints)

    served = clean_and_check(to_served_graph(family.unified, model.letterbox, model.candidates_topk))
    check_served_interface(served, model.letterbox.input_size, model.num_candidates, keypoints)
    served_path = out_dir / f"{model.name}.onnx"
    _save_served_onnx(served, served_path, model, source=family.source)

    result = verify_export(
        family.unified, served_path, canvases, model.letterbox, family.reference, family.reference_float64, keypoints,
        options.tolerance_overrides,
    )  # fmt: skip
    if family.extra_check is not None:
        floats = [to_network_input(batch, model.letterbox) for batch in canvases]
        family.extra_check(floats, [family.reference(batch) for batch in floats], result.diagnostics["tolerances"])
    result.extra_files = {**family.extra_files, **result.extra_files}
    return result


def _save_served_onnx(graph: onnx.ModelProto, path: Path, model: ServedModel, *, source: str) -> None:
    """Save with metadata that says what the graph is, since its interface no longer matches the family's own."""
    k = model.postprocess.num_keypoints
    entries = {
        "posetriton.family": model.family,
        "posetriton.source": source,
        "posetriton.input": f"canvas uint8 [batch, {model.letterbox.input_size}, {model.letterbox.input_size}, 3] RGB",
        "posetriton.output_layout": (
            f"best {model.num_candidates} anchors by score: x1,y1,x2,y2,score,{k}x(x,y,conf) in input pixels"
        ),
    }
    del graph.metadata_props[:]
    for key, value in entries.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))
