"""Keys before bytes: an ASGI middleware that refuses a request before its body is read.

FastAPI reads (and spools to a temporary file) a request's whole body before it runs the
dependencies that check the API key, and a size cap that trusts ``Content-Length`` is no cap
for a chunked request. So for every request that carries a body to ``/v1/``:

- the API key is checked first (401 before one byte of the body is read);
- a declared ``Content-Length`` over the path's limit is a 413 at once;
- the bytes are counted as the app reads them, and the read that crosses the limit raises a
  413 — whatever the headers said.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubetune_api.errors import APIError, PayloadTooLarge

BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
GUARDED_PREFIX: Final = "/v1/"


class BodyTooLarge(HTTPException):
    """Raised from inside the app's read of the body: answered as a 413 by its handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body exceeds {limit} bytes.")


class RequestGuard:
    """See the module docstring. ``authenticate`` raises an :class:`APIError` (401) for a
    missing or unknown key; ``limit_for`` gives a path's body limit in bytes.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticate: Callable[[str | None], object],
        limit_for: Callable[[str], int],
    ) -> None:
        self.app = app
        self.authenticate = authenticate
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the key and the declared size, then count the bytes as they are read."""
        guarded = (
            scope["type"] == "http"
            and scope["method"] in BODY_METHODS
            and scope["path"].startswith(GUARDED_PREFIX)
        )
        if not guarded:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit = self.limit_for(scope["path"])
        try:
            self.authenticate(headers.get("authorization"))
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise PayloadTooLarge(f"Request body of {declared} bytes exceeds {limit} bytes.")
        except APIError as refusal:
            await _answer(refusal, scope, receive, send)
            return
        await self.app(scope, _counting(receive, limit), send)


def _counting(receive: Receive, limit: int) -> Receive:
    received = 0

    async def counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
        return message

    return counted


async def _answer(refusal: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    from fastapi.responses import JSONResponse

    response = JSONResponse(refusal.body(), status_code=refusal.status_code)
    response.headers.update(refusal.headers)
    # The body is never read: the connection is closed rather than drained.
    response.headers["connection"] = "close"
    await response(scope, receive, send)
