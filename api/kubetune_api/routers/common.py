"""Things every router declares the same way."""

from __future__ import annotations

from typing import Any

from kubetune_api.protocol import ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Invalid request",
        401: "Missing or invalid API key",
        404: "Not found",
        409: "Invalid state for this operation",
        413: "Payload too large",
        429: "Rate limit exceeded",
    }.items()
}
