"""Typed API errors and the one place they become OpenAI's error envelope.

Services raise these; :func:`install_error_handlers` maps them (and FastAPI's own validation
errors, and anything unexpected) to ``{"error": {"message", "type", "param", "code"}}`` with the
status code OpenAI uses for the same situation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from kubetune.finetunejob import SpecError
from kubetune_api.protocol import ErrorBody, ErrorResponse
from kubetune_runtime.objectstore import store_unavailable

log = logging.getLogger(__name__)


class APIError(Exception):
    """Base of every error the API answers on purpose."""

    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON envelope."""
        return ErrorResponse(
            error=ErrorBody(
                message=self.message, type=self.error_type, param=self.param, code=self.code
            )
        ).model_dump()


class InvalidRequest(APIError):
    """400: the request is malformed or names something unusable."""

    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(APIError):
    """401: no API key, or an unknown one."""

    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(APIError):
    """403: the key is valid but may not do this."""

    status_code = 403
    error_type = "invalid_request_error"
    default_code = "permission_denied"


class NotFound(APIError):
    """404: no such object *for this org* (another org's objects are indistinguishable)."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class Conflict(APIError):
    """409: the object is in a state where this is impossible; retrying will not help."""

    status_code = 409
    error_type = "invalid_request_error"
    default_code = "invalid_state"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        # The SDK retries 409 by default; this header tells it not to.
        self.headers.setdefault("x-should-retry", "false")


class PayloadTooLarge(APIError):
    """413: the request body exceeds a limit."""

    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimited(APIError):
    """429: the org sent too many requests; ``retry-after`` says when to come back."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class QuotaExceeded(APIError):
    """429: the org's share of the cluster is used up (OpenAI's ``insufficient_quota`` type);
    retrying at once will not help, so the SDK is told not to.
    """

    status_code = 429
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("x-should-retry", "false")


class ServiceUnavailable(APIError):
    """503: a dependency (apiserver, object store) is unreachable; retrying may help."""

    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


class UpstreamError(APIError):
    """An error the inference server (vLLM) answered, passed on with its status and details."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        error_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.status_code = status_code
        self.error_type = error_type or (
            "invalid_request_error" if status_code < 500 else "server_error"
        )


# Pydantic puts the tried union member into an error's location (``n_epochs.literal['auto']``,
# ``n_epochs.int``): those are not parameter names.
_UNION_TAGS = frozenset({"int", "float", "str", "bool", "dict", "list", "none"})


def _is_param_part(part: str) -> bool:
    if part in ("body", "query", "path", "header") or part in _UNION_TAGS:
        return False
    return not any(ch in part for ch in "[]-")


def job_not_found(job_id: str) -> NotFound:
    """The 404 for a job id the caller's org does not have."""
    return NotFound(f"No fine-tuning job found with id {job_id}", param="fine_tuning_job_id")


def _param_from_loc(loc: Sequence[int | str]) -> str | None:
    parts = [str(p) for p in loc if _is_param_part(str(p))]
    if not parts:
        return None
    out = parts[0]
    for part in parts[1:]:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def validation_error(errors: Sequence[Any]) -> InvalidRequest:
    """Turn pydantic/FastAPI validation errors into one 400 naming the first bad parameter."""
    first = errors[0] if errors else {}
    cause = (first.get("ctx") or {}).get("error")
    param = cause.param if isinstance(cause, SpecError) else _param_from_loc(first.get("loc", ()))
    messages = []
    for err in errors[:5]:
        where = _param_from_loc(err.get("loc", ()))
        text = str(err.get("msg", "invalid value"))
        messages.append(f"{where}: {text}" if where else text)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return InvalidRequest("Invalid request: " + "; ".join(messages) + more, param=param)


STORE_RETRY_AFTER_SECONDS: Final = 5


def unexpected_error(exc: BaseException) -> APIError:
    """The error an exception no handler knew becomes: a 503 with ``Retry-After`` when the
    object store is unreachable or overloaded (a brownout passes), else a 500.
    """
    if store_unavailable(exc):
        return ServiceUnavailable(
            "The object store is unavailable; retry in a few seconds.",
            headers={"retry-after": str(STORE_RETRY_AFTER_SECONDS)},
        )
    return APIError("The server had an error while processing your request.")


def _respond(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


HTTP_METHODS: Final = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route of ``app`` serves on the request's path: each method is asked
    of the router as a request of its own (routers included in the app match as a whole).
    """
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**scope, "method": method})[0] is Match.FULL for route in app.routes)
    ]


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error OpenAI's envelope."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return _respond(exc)

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _respond(validation_error(exc.errors()))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        mapped: dict[int, type[APIError]] = {
            401: AuthenticationFailed,
            403: PermissionDenied,
            404: NotFound,
            409: Conflict,
            413: PayloadTooLarge,
            429: RateLimited,
        }
        cls = mapped.get(exc.status_code, InvalidRequest if exc.status_code < 500 else APIError)
        err = cls(str(exc.detail))
        err.status_code = exc.status_code  # e.g. 405 keeps its own status
        err.headers.update(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path; a path served by
            # several routes (GET and POST /v1/files) allows all of theirs.
            err.headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
        return _respond(err)

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _respond(unexpected_error(exc))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
