"""Things every router declares the same way."""

from __future__ import annotations

from typing import Any

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
