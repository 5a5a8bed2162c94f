"""Small helpers shared by the Python-backend models (importable only inside Triton's stub)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import triton_python_backend_utils as pb_utils

from posetriton.core.contract import ContractError


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """The ``parameters { key: ... value { string_value: ... } }`` block as a plain dict."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def request_parameters(request: Any) -> dict[str, Any]:
    """Per-request parameters a client sent (``infer(..., parameters={...})``)."""
    raw = request.parameters()
    try:
        parameters = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise ContractError(f"request parameters are not valid JSON: {exc}") from None
    if not isinstance(parameters, dict):
        raise ContractError(f"request parameters must be an object, got {type(parameters).__name__}")
    return parameters


def invalid_argument(message: str) -> Any:
    """A response that fails only this request with INVALID_ARGUMENT (HTTP 400)."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


def internal_error(message: str) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL))


def unavailable(message: str) -> Any:
    """A response that fails only this request with UNAVAILABLE: the step is full now, a later try may pass."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.UNAVAILABLE))


class StepBusy(RuntimeError):
    """The step cannot take this request now (a capacity cap); the request fails with UNAVAILABLE."""


def respond_each(
    requests: list,
    handle: Callable[[Any], Any],
    *,
    step: str,
    refused: tuple[type[Exception], ...],
    logger: Any = None,
    skip_cancelled: bool = True,
) -> list:
    """One response per request, in order, each failing alone: the per-request wrapper of every step.

    * a request whose client gave up (cancelled, or its deadline passed while queued) is answered CANCELLED
      without being computed (``skip_cancelled``: asking Triton costs an IPC round trip, 0.1-0.3 ms, more than
      a cheap step's own work);
    * ``refused`` errors (the step's input checks) become INVALID_ARGUMENT with their message;
    * :class:`StepBusy` becomes UNAVAILABLE;
    * anything else is unforeseen: logged with Triton's logger and answered INTERNAL naming the exception,
      for that request only, so that one request can never fail its batch-mates.
    """
    log = logger if logger is not None else pb_utils.Logger
    responses = []
    for request in requests:
        try:
            responses.append(cancelled() if skip_cancelled and request.is_cancelled() else handle(request))
        except refused as exc:
            responses.append(invalid_argument(str(exc)))
        except StepBusy as exc:
            responses.append(unavailable(str(exc)))
        except Exception as exc:
            responses.append(unforeseen(step, exc, log))
    return responses


def unforeseen(step: str, exc: Exception, logger: Any) -> Any:
    """An exception no check foresaw: logged with Triton's logger, answered INTERNAL for this request only."""
    message = f"{step} failed on this request: {type(exc).__name__}: {exc}"
    logger.log_error(message)
    return internal_error(message)


def output_dtype(model_config: dict[str, Any], name: str) -> Any:
    return pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(model_config, name)["data_type"])


def cancelled() -> Any:
    """The answer to a request its client cancelled before it was computed (gRPC CANCELLED)."""
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError("request cancelled by the client", pb_utils.TritonError.CANCELLED)
    )
