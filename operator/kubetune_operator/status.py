"""Moved to :mod:`kubetune.observed` (shared with the local executor); re-exported here."""

from __future__ import annotations

from kubetune.observed import (
    CREATED,
    FAILED,
    RESTARTING,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    Observed,
    classify_failure,
    observe,
)

__all__ = [
    "CREATED",
    "FAILED",
    "RESTARTING",
    "RUNNING",
    "SUCCEEDED",
    "SUSPENDED",
    "Observed",
    "classify_failure",
    "observe",
]
