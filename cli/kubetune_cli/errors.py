"""Exit codes of the ``kubetune`` command, and how API and network errors become them.

Every API error is shown as the API's own OpenAI-style message (never a traceback), so a script
can branch on the exit code and a person can read the reason.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, NoReturn

import openai
import typer
from rich.console import Console

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


class ExitCode(IntEnum):
    """What ``kubetune`` exits with."""

    OK = 0
    API_ERROR = 1  # the API answered with an error (4xx/5xx)
    USAGE = 2  # bad command line (click's own code)
    UNREACHABLE = 3  # no answer from the base URL: connection refused, DNS, timeout
    JOB_FAILED = 4  # `jobs watch` / `jobs create --watch`: the job failed
    JOB_CANCELLED = 5  # ... or was cancelled
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


def fail(message: str, code: ExitCode) -> NoReturn:
    """Print ``message`` on stderr and exit with ``code``."""
    stderr.print(f"[bold red]Error:[/] {message}", markup=True)
    raise typer.Exit(int(code))


def _error_fields(exc: openai.APIStatusError) -> dict[str, Any]:
    """The inside of the ``{"error": {...}}`` envelope (the SDK unwraps it into ``body``)."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner
    return {}


def describe_status_error(exc: openai.APIStatusError) -> str:
    """``<message> (HTTP <status>, param: <p>, code: <c>)`` from an API error."""
    fields = _error_fields(exc)
    message = fields.get("message") or exc.message
    details = [f"HTTP {exc.status_code}"]
    if fields.get("param"):
        details.append(f"param: {fields['param']}")
    if fields.get("code"):
        details.append(f"code: {fields['code']}")
    return f"{message} ({', '.join(details)})"


def describe_connection_error(exc: openai.APIConnectionError, base_url: str) -> str:
    """A connection failure in words, with the base URL that was tried."""
    cause = exc.__cause__ or exc
    reason = str(cause) or type(cause).__name__
    if isinstance(exc, openai.APITimeoutError):
        reason = "the request timed out"
    return (
        f"cannot reach kubetune at {base_url} ({reason}). Is the server running? "
        "Start one locally with `kubetune serve`, or pass --base-url / set KUBETUNE_BASE_URL."
    )
