"""The exceptions the client raises, and how a gRPC status becomes one of them.

Every ``tritonclient`` exception is turned into a :class:`PoseClientError` subclass with a
message written for the person at the terminal; the original exception stays attached as
``__cause__`` for debugging.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from tritonclient.utils import InferenceServerException

from posetriton.core.contract import REQUEST_PARAMETERS, parse_error

# Triton may prefix a message with the request id; the ensemble prefix and the image index are the contract's.
_REQUEST_ID = re.compile(r"^\[request id: [^\]]*\] ")
# gRPC reports a certificate the client cannot verify as a failed TLS handshake.
_TLS_FAILURE = re.compile(r"tls handshake|certificate_verify_failed|ssl_error", re.IGNORECASE)

# Triton's refusal of a call without the header its --grpc-restricted-protocol names.
_RESTRICTED = re.compile(r"protocol is restricted, expecting header '([^']+)'")

# gRPC statuses worth another try: the server (or the path to it) is momentarily unavailable.
TRANSIENT_STATUSES = frozenset({"UNAVAILABLE"})
# Answers of a server that is up but full (a step's bounded queue, a request that waited past its timeout, the
# preprocess step's admission before decoding, the tracker's stream cap): UNAVAILABLE, or RESOURCE_EXHAUSTED.
_BUSY = re.compile(
    r"exceeds maximum queue size|request timeout expired|open streams, its limit|server busy", re.IGNORECASE
)
BUSY_STATUSES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})


class PoseClientError(Exception):
    """Base of every error this client raises about the server or the inputs; ``str()`` is a one-line message."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # The gRPC status name (e.g. "UNAVAILABLE") when the error came from the server.
        self.status = status

    @property
    def transient(self) -> bool:
        """Whether trying again later may succeed (gRPC ``UNAVAILABLE``); the client retries only these."""
        return self.status in TRANSIENT_STATUSES


class ServerUnavailableError(PoseClientError):
    """Nothing answers at the URL, or the server is not live."""


class AccessDeniedError(PoseClientError):
    """The server refused the call for a missing or wrong header (Triton's ``--grpc-restricted-protocol``)."""

    @property
    def transient(self) -> bool:
        return False  # Triton reports it as UNAVAILABLE, but retrying with the same headers cannot help


class ServerBusyError(PoseClientError):
    """The server is up but full: a step's queue is at its bound, or the request waited past its deadline
    there and was dropped uncomputed. Transient: the client retries it with backoff within the caller's deadline."""

    @property
    def transient(self) -> bool:
        return True


class ModelNotReadyError(PoseClientError):
    """The server answers but does not serve the requested model (unknown, not loaded, or still loading)."""


class DeadlineExceededError(PoseClientError):
    """The server did not answer within the client's timeout (the gRPC deadline)."""


class InvalidInputError(PoseClientError):
    """An image (or the request) was refused; ``index``/``image`` say which image when known.

    ``reason`` is the explanation without the server's prefixes; ``server_message`` is the
    server's text unchanged (``None`` when the client refused the image before sending it).
    """

    def __init__(
        self,
        reason: str,
        *,
        index: int | None = None,
        image: str | None = None,
        server_message: str | None = None,
        status: str | None = None,
    ) -> None:
        super().__init__(f"{image}: {reason}" if image else reason, status)
        self.reason = reason
        self.index = index
        self.image = image
        self.server_message = server_message


def grpc_status(exc: InferenceServerException) -> str:
    """``"UNAVAILABLE"`` for ``StatusCode.UNAVAILABLE``; ``""`` when tritonclient gave no status."""
    return str(exc.status() or "").removeprefix("StatusCode.")


def translate(
    exc: InferenceServerException,
    *,
    url: str,
    model: str,
    timeout_s: float,
    names: Sequence[str] = (),
    indices: Sequence[int] = (),
) -> PoseClientError:
    """Map a gRPC status to the error hierarchy, with a message that says what to do about it.

    ``names`` are the images of the failed request and ``indices`` their positions in the
    caller's call (a call may be split into several requests), so a refused image is named
    and indexed as the caller knows it.
    """
    status = grpc_status(exc)
    message = str(exc.message() or exc)
    if status == "INVALID_ARGUMENT":
        return invalid_input(message, names, indices or range(len(names)), status)
    if status in BUSY_STATUSES and (_BUSY.search(message) or status == "RESOURCE_EXHAUSTED"):
        return ServerBusyError(f"Triton at {url} is busy and refused the request for now: {message}", status)
    restricted = _RESTRICTED.search(message)
    if restricted:
        return AccessDeniedError(
            f"Triton at {url} refused the call: {message}; pass it with headers={{{restricted.group(1)!r}: ...}}",
            status,
        )
    if status == "NOT_FOUND" or (status == "UNAVAILABLE" and "model" in message.lower()):
        return ModelNotReadyError(f"model {model!r} is not served at {url}: {message}", status)
    if status == "UNAVAILABLE":
        hint = (
            "the TLS handshake failed: root_certificates must name the CA that signed the server's certificate"
            if _TLS_FAILURE.search(message)
            else "is the server running (posetriton serve), is this its gRPC port, and does the client's TLS "
            "(ssl, and for mutual TLS private_key + certificate_chain) match the server's?"
        )
        return ServerUnavailableError(f"cannot reach Triton's gRPC endpoint at {url} ({message}); {hint}", status)
    if status == "DEADLINE_EXCEEDED":
        return DeadlineExceededError(
            f"Triton at {url} did not answer within {timeout_s:g} s; raise the timeout or send smaller batches",
            status,
        )
    return PoseClientError(f"Triton at {url} failed the request ({status or 'no status'}): {message}", status)


def invalid_input(message: str, names: Sequence[str], indices: Sequence[int], status: str) -> InvalidInputError:
    """Name the refused image: the server says "image I of N: ..." for batches and nothing for a single image.

    ``index`` stays None when the request itself was refused (a threshold, the batch size), so
    a caller does not blame, or retry, the images.
    """
    parsed = parse_error(_REQUEST_ID.sub("", message))
    reason, local = parsed.reason, parsed.index
    if local is None and len(names) == 1 and not is_request_level(reason):
        local = 0
    known = local is not None and 0 <= local < len(names)
    return InvalidInputError(
        reason,
        index=indices[local] if known and local is not None else local,
        image=names[local] if known and local is not None else None,
        server_message=message,
        status=status,
    )


def is_request_level(reason: str) -> bool:
    """Whether a server message is about the request as a whole (a request parameter, the batch size) rather
    than about one image: it starts with a declared parameter's name (ContractError's wording) or says so."""
    return _request_level_pattern(tuple(REQUEST_PARAMETERS)).match(reason) is not None


@functools.cache
def _request_level_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    # Keyed by the declared names, so that a parameter group registered at run time is recognised too.
    parameter = "|".join(map(re.escape, names))
    return re.compile(rf"^(({parameter}) must|(unknown )?request parameter|inference request batch-size)")
