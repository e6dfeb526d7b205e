"""Things every router declares the same way."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from kubetune_api.protocol import ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Invalid request",
        401: "Missing or invalid API key",
        403: "Not allowed (e.g. deleting a base model)",
        404: "Not found",
        409: "Invalid state for this operation",
        413: "Payload too large",
        429: "Rate limit exceeded",
        503: "A dependency (Kubernetes API, object store) is unavailable",
    }.items()
}


def content_disposition(filename: str) -> str:
    """An attachment header for any filename: an ASCII fallback plus RFC 6266's UTF-8 form."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
