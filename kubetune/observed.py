"""What a job's trainer run looks like from outside, reduced to what the job's status needs.

:class:`Observed` is the common currency of both executors: the operator derives it from a
PyTorchJob's conditions (:func:`observe`), the local executor from its trainer subprocess. The
pure lifecycle functions in :mod:`kubetune.reconcile` take it from there, so a job reads the same
wherever it ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from kubetune.finetunejob import ErrorKind, JobPhase

# The training-operator's condition types (kubeflow.org/v1 JobConditionType).
CREATED: Final = "Created"
RUNNING: Final = "Running"
RESTARTING: Final = "Restarting"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
SUSPENDED: Final = "Suspended"


@dataclass(frozen=True)
class Observed:
    """What a PyTorchJob's status says, reduced to what the FineTuneJob needs."""

    phase: JobPhase
    reason: str | None
    message: str | None
    restarting: bool


def _true_conditions(pytorchjob_status: dict[str, Any] | None) -> list[dict[str, Any]]:
    conditions = (pytorchjob_status or {}).get("conditions") or []
    return [c for c in conditions if c.get("status") == "True"]


def observe(pytorchjob_status: dict[str, Any] | None, *, suspend_requested: bool) -> Observed:
    """The phase a PyTorchJob's conditions imply.

    Terminal conditions win over everything; then Suspended, Running/Restarting and Created.
    A job whose PyTorchJob has no conditions yet is queued (created, waiting for admission).
    """
    true = {c["type"]: c for c in _true_conditions(pytorchjob_status)}
    for kind, phase in ((SUCCEEDED, JobPhase.SUCCEEDED), (FAILED, JobPhase.FAILED)):
        if kind in true:
            cond = true[kind]
            return Observed(phase, cond.get("reason"), cond.get("message"), restarting=False)
    if SUSPENDED in true:
        cond = true[SUSPENDED]
        phase = JobPhase.PAUSED if suspend_requested else JobPhase.QUEUED
        return Observed(phase, cond.get("reason"), cond.get("message"), restarting=False)
    if RESTARTING in true:
        cond = true[RESTARTING]
        return Observed(JobPhase.RUNNING, cond.get("reason"), cond.get("message"), restarting=True)
    if RUNNING in true:
        cond = true[RUNNING]
        phase = JobPhase.PAUSING if suspend_requested else JobPhase.RUNNING
        return Observed(phase, cond.get("reason"), cond.get("message"), restarting=False)
    return Observed(JobPhase.QUEUED, None, None, restarting=False)


def classify_failure(trainer_error_code: str | None) -> ErrorKind:
    """A failure is the user's when the trainer reported a user error (bad data, unknown
    model) before exiting; anything else (OOM, node loss, backoff exhausted) is infra.
    """
    return ErrorKind.USER if trainer_error_code else ErrorKind.INFRASTRUCTURE
