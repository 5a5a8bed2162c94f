"""Convert the cleaned ONNX to OpenVINO IR and run it at full float32 precision.

The IR keeps float32 weights (``compress_to_fp16=False``) and is compiled with an explicit f32 inference
precision: without the hint OpenVINO silently runs bf16 on CPUs that support it (AMX / AVX512-BF16), which moves
scores by ~3e-2 and boxes by 1-3 px.
"""

from __future__ import annotations

from pathlib import Path

import openvino as ov

# Compile configuration for every OpenVINO run whose numbers are compared with ONNX Runtime or served.
F32_CONFIG: dict[str, str] = {"INFERENCE_PRECISION_HINT": "f32"}


def convert_to_openvino(onnx_path: Path, xml_path: Path) -> Path:
    """Convert ``onnx_path`` to ``xml_path`` (plus the ``.bin`` beside it) with float32 weights; return the xml."""
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path


def compile_f32(xml_path: Path) -> ov.CompiledModel:
    """Compile the IR on CPU at float32 inference precision (used by the export parity checks)."""
    return ov.Core().compile_model(str(xml_path), "CPU", F32_CONFIG)
