"""What the web app accepts, checked before a byte is decoded: the size of the upload and its image type.

The type is read from the leading bytes (the signature), never from a file name or a header the
browser chose, and nothing is written to disk: an upload is read into memory up to the limit and
refused as soon as it goes past it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from posetriton.core.contract import REQUEST_PARAMETERS, ContractError, request_parameters

# Signatures of the formats the served models decode (JPEG, PNG, WebP, BMP, GIF).
_SIGNATURES: tuple[tuple[str, bytes, int], ...] = (
    ("image/jpeg", b"\xff\xd8\xff", 0),
    ("image/png", b"\x89PNG\r\n\x1a\n", 0),
    ("image/gif", b"GIF87a", 0),
    ("image/gif", b"GIF89a", 0),
    ("image/bmp", b"BM", 0),
    ("image/webp", b"WEBP", 8),  # RIFF....WEBP
)
ACCEPTED_TYPES = tuple(dict.fromkeys(kind for kind, _, _ in _SIGNATURES))
# Enough for a 24-megapixel JPEG straight from a phone.
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20


class UploadRefused(ValueError):
    """An upload the app will not pass on; ``status`` is the HTTP status that says why (413, 415)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def image_type(head: bytes) -> str | None:
    """The MIME type the leading bytes announce, or None when they are not an image format the models decode."""
    for kind, signature, offset in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature and (offset == 0 or head[:4] == b"RIFF"):
            return kind
    return None


def check_image(data: bytes, max_bytes: int) -> str:
    """The image type of ``data``; UploadRefused when it is too large, empty or not an accepted format."""
    if len(data) > max_bytes:
        raise UploadRefused(too_large_message(len(data), max_bytes), 413)
    kind = image_type(data[:16])
    if kind is None:
        what = "an empty upload" if not data else f"{len(data)} bytes starting {data[:8]!r}"
        raise UploadRefused(f"not an image this server accepts ({what}); send {', '.join(ACCEPTED_TYPES)}", 415)
    return kind


def too_large_message(size: int | None, max_bytes: int) -> str:
    got = f"{size / 2**20:.1f} MiB" if size is not None else "more"
    return f"the upload is too large ({got}); the limit is {max_bytes / 2**20:g} MiB"


async def read_limited(chunks: AsyncIterator[bytes], declared_length: str | None, max_bytes: int) -> bytes:
    """The whole body, refused with 413 from its Content-Length alone or as soon as it passes ``max_bytes``."""
    if declared_length is not None and declared_length.isdigit() and int(declared_length) > max_bytes:
        raise UploadRefused(too_large_message(int(declared_length), max_bytes), 413)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise UploadRefused(too_large_message(None, max_bytes), 413)
    return bytes(body)


def parameters_from_query(
    query: Mapping[str, str], limits: Mapping[str, float | None] | None = None
) -> dict[str, int | float]:
    """The request parameters a query string sets (absent or empty: the model's default), each checked by its
    declaration against the model's ``limits``; other query keys (``model``, ``mode``) are not parameters."""
    given = {name: _number(text) for name in REQUEST_PARAMETERS if (text := query.get(name, "").strip())}
    return checked_parameters(given, limits)


def checked_parameters(values: Mapping[str, Any], limits: Mapping[str, float | None] | None = None) -> dict[str, Any]:
    """``values`` by wire name, checked: ContractError names an unknown name or the first value out of range."""
    unknown = sorted(set(values) - set(REQUEST_PARAMETERS))
    if unknown:  # before the call, where a name like "limits" would be taken for its keyword
        raise ContractError(f"unknown request parameter(s) {unknown}; accepted: {list(REQUEST_PARAMETERS)}")
    return request_parameters(limits=limits, **values)


def _number(text: str) -> float | str:
    """A number from a query string; text that is not one is returned as it is, for the declaration to refuse by
    name (``conf must be a number, got 'high'``)."""
    try:
        return float(text)
    except ValueError:
        return text
