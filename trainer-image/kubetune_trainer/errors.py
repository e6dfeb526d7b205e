"""Errors that end a run with a specific exit code."""

from __future__ import annotations


class UserError(Exception):
    """Input the user must fix; ends the run with ``exit_codes.USER_ERROR`` (not retried).

    ``code`` is machine-readable (it becomes the job's ``error.code``), ``param`` names the
    request field at fault, as OpenAI's job errors do.
    """

    def __init__(self, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class RetryableError(Exception):
    """A transient failure worth a restart (``exit_codes.RETRYABLE_ERROR``)."""


class InfrastructureError(Exception):
    """The node cannot run the job (no usable GPU): ends the run with
    ``exit_codes.INTERNAL_ERROR`` (not retried) and an infrastructure error naming the cause.
    """

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
