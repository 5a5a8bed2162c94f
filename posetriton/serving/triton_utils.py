"""Small helpers shared by the Python-backend models (importable only inside Triton's stub)."""

from __future__ import annotations

import json
from typing import Any

import triton_python_backend_utils as pb_utils


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """The ``parameters { key: ... value { string_value: ... } }`` block as a plain dict."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def request_parameters(request: Any) -> dict[str, Any]:
    """Per-request parameters a client sent (``infer(..., parameters={...})``)."""
    raw = request.parameters()
    return json.loads(raw) if raw else {}


def invalid_argument(message: str) -> Any:
    """A response that fails only this request with INVALID_ARGUMENT (HTTP 400)."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


def internal_error(message: str) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL))


def output_dtype(model_config: dict[str, Any], name: str) -> Any:
    return pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(model_config, name)["data_type"])


def cancelled() -> Any:
    """The answer to a request its client cancelled before it was computed (gRPC CANCELLED)."""
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError("request cancelled by the client", pb_utils.TritonError.CANCELLED)
    )


def instance_count(model_config: dict[str, Any]) -> int:
    """Instances of this model Triton runs (the sum over its ``instance_group`` entries; 1 when it has none)."""
    groups = model_config.get("instance_group") or [{"count": 1}]
    return sum(int(group.get("count", 1)) for group in groups)
