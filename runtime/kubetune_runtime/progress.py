"""Fold the trainer's events into a FineTuneJob's status (pure; shared by the operator and the
local executor, so a job reads the same wherever it ran).

The status keeps a bounded summary — latest step and metrics, the newest checkpoints, restart
count, an estimated finish — while the full log stays in the object store.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from kubetune.events import JobEvent
from kubetune.finetunejob import (
    MAX_CHECKPOINTS_IN_STATUS,
    CheckpointRef,
    ErrorKind,
    FineTuneJobStatus,
    JobError,
    Metrics,
)
from kubetune.lifecycle import progress_text
from kubetune.trainer_events import (
    TrainerEventKind,
    checkpoint_from_event,
    event_kind,
    step_metrics,
)


def _merge(latest: Metrics | None, update: Metrics) -> Metrics:
    """Newer values win; a metric the newer event lacks (e.g. valid loss) keeps its last value."""
    if latest is None:
        return update
    fields = update.model_dump(exclude_none=True)
    return latest.model_copy(update=fields)


def _estimated_finish(
    points: list[tuple[int, int]], total_steps: int | None, now: datetime
) -> datetime | None:
    """Linear estimate from the step rate between the first and last metrics of this run."""
    if total_steps is None or len(points) < 2:
        return None
    (t0, s0), (t1, s1) = points[0], points[-1]
    if s1 <= s0 or t1 <= t0:
        return None
    seconds_per_step = (t1 - t0) / (s1 - s0)
    remaining = max(0, total_steps - s1) * seconds_per_step
    return now + timedelta(seconds=remaining)


def trainer_error(events: Sequence[JobEvent]) -> JobError | None:
    """The user error the trainer reported before it stopped, if any (not retried)."""
    for event in reversed(events):
        if event_kind(event) is TrainerEventKind.ERROR:
            code = str(event.data.get("code") or "trainer_error")
            param = event.data.get("param")
            return JobError(
                code=code[:128],
                message=event.message[:4096] or code,
                param=str(param)[:256] if param else None,
                kind=ErrorKind.USER
                if event.data.get("user_error", True)
                else ErrorKind.INFRASTRUCTURE,
            )
    return None


def fold_events(
    status: FineTuneJobStatus, events: Sequence[JobEvent], *, now: datetime | None = None
) -> FineTuneJobStatus:
    """The status updated with everything the trainer reported in ``events`` (oldest first).

    Idempotent: folding the same events twice gives the same status, so the operator can
    re-read the whole log on every pass.
    """
    now = now or datetime.now(UTC)
    metrics: Metrics | None = status.metrics
    step, total, trained, epoch = (
        status.step,
        status.total_steps,
        status.trained_tokens,
        status.epoch,
    )
    checkpoints: dict[str, CheckpointRef] = {c.id: c for c in status.checkpoints}
    restarts = 0
    run_points: list[tuple[int, int]] = []
    for event in events:
        kind = event_kind(event)
        if kind is TrainerEventKind.RESTARTED:
            restarts += 1
            run_points = []  # the rate of the current run only
        checkpoint = checkpoint_from_event(event)
        if checkpoint is not None:
            checkpoints[checkpoint.id] = checkpoint
        values = step_metrics(event)
        if values is None:
            continue
        step = max(step, values.step)
        total = values.total_steps or total
        trained = max(trained, values.trained_tokens or 0)
        epoch = values.epoch if values.epoch is not None else epoch
        metrics = _merge(metrics, values.to_metrics())
        run_points.append((event.created_at, values.step))
    newest = sorted(checkpoints.values(), key=lambda c: c.step, reverse=True)
    return status.model_copy(
        update={
            "step": step,
            "total_steps": total,
            "progress": progress_text(step, total),
            "trained_tokens": trained,
            "epoch": epoch,
            "metrics": metrics,
            "checkpoints": newest[:MAX_CHECKPOINTS_IN_STATUS],
            "restarts": max(status.restarts, restarts),
            "estimated_finish": _estimated_finish(run_points, total, now),
        }
    )
