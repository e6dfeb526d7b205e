"""The job lifecycle as pure functions, shared by the operator and the local executor.

Phases and the moves between them are data here, so both executors agree on them and the API can
answer an impossible request (cancel a finished job, resume a running one) with 409 before it
writes anything.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from kubetune.finetunejob import FineTuneJobStatus, JobPhase

TERMINAL_PHASES: Final = frozenset({JobPhase.SUCCEEDED, JobPhase.FAILED, JobPhase.CANCELLED})

# None is "no phase yet": a FineTuneJob the operator has not seen.
ALLOWED_TRANSITIONS: Final[dict[JobPhase | None, frozenset[JobPhase]]] = {
    None: frozenset({JobPhase.VALIDATING_FILES, JobPhase.CANCELLED}),
    JobPhase.VALIDATING_FILES: frozenset({JobPhase.QUEUED, JobPhase.FAILED, JobPhase.CANCELLED}),
    JobPhase.QUEUED: frozenset(
        {JobPhase.RUNNING, JobPhase.PAUSED, JobPhase.FAILED, JobPhase.CANCELLED}
    ),
    JobPhase.RUNNING: frozenset(
        {JobPhase.PAUSING, JobPhase.SUCCEEDED, JobPhase.FAILED, JobPhase.CANCELLED, JobPhase.QUEUED}
    ),
    JobPhase.PAUSING: frozenset({JobPhase.PAUSED, JobPhase.FAILED, JobPhase.CANCELLED}),
    JobPhase.PAUSED: frozenset({JobPhase.QUEUED, JobPhase.CANCELLED}),
    JobPhase.SUCCEEDED: frozenset(),
    JobPhase.FAILED: frozenset(),
    JobPhase.CANCELLED: frozenset(),
}

CANCELLABLE: Final = frozenset(
    p
    for p, targets in ALLOWED_TRANSITIONS.items()
    if p is not None and JobPhase.CANCELLED in targets
)
PAUSABLE: Final = frozenset({JobPhase.QUEUED, JobPhase.RUNNING})
# Phases in which the job's workers hold their nodes (and GPUs): what usage counts.
WORKER_PHASES: Final = frozenset({JobPhase.RUNNING, JobPhase.PAUSING})
RESUMABLE: Final = frozenset({JobPhase.PAUSED, JobPhase.PAUSING})


def can_transition(current: JobPhase | None, target: JobPhase) -> bool:
    """Tell whether a job in phase ``current`` may move to ``target``."""
    return current == target or target in ALLOWED_TRANSITIONS[current]


def is_terminal(phase: JobPhase | None) -> bool:
    """Tell whether a job in ``phase`` will never change again."""
    return phase in TERMINAL_PHASES


def progress_text(step: int, total_steps: int | None) -> str | None:
    """Render progress for ``kubectl get ftj`` (``"120/400"``), or None before planning."""
    if total_steps is None:
        return None
    return f"{step}/{total_steps}"


def run_seconds(status: FineTuneJobStatus, now: datetime) -> float:
    """Seconds the job's workers have run in all, up to ``now`` (the current run included)."""
    current = 0.0
    if status.running_since is not None:
        current = max(0.0, (now - status.running_since).total_seconds())
    return status.run_seconds + current
