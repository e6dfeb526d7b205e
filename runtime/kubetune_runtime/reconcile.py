"""Pure decisions of the reconcile loop: which phase a job moves to, its conditions, its error.

Called by the job driver (:mod:`kubetune_runtime.driver`) for every runtime: the lifecycle is
decided once, not copied.
Nothing here does I/O: the job driver gathers what it observed (the FineTuneJob, its workload,
the trainer's events, whether the adapter is stored) and these functions say what the status
becomes and which transitions happened (each transition becomes a Kubernetes Event). Being pure
is what makes every step safe to repeat: the same observation always gives the same status.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from kubetune.events import EventLevel, JobEvent
from kubetune.finetunejob import (
    MAX_CONDITIONS,
    Condition,
    ConditionStatus,
    ConditionType,
    ErrorKind,
    FineTuneJobStatus,
    Hyperparameters,
    JobError,
    JobPhase,
    MethodType,
)
from kubetune.lifecycle import (
    ALLOWED_TRANSITIONS,
    TERMINAL_PHASES,
    WORKER_PHASES,
    is_terminal,
    progress_text,
    run_seconds,
)
from kubetune.trainer_config import TrainerConfig
from kubetune.trainer_events import TrainerEventKind, event_kind
from kubetune_runtime.observed import Observed
from kubetune_runtime.progress import fold_events, trainer_error

# The training controller's condition types, copied into the FineTuneJob's conditions as the
# controller wrote them (reason, message and transition time included), so `kubectl describe
# ftj` shows what happened to the pods without looking at the workload.
MIRRORED_CONDITIONS: Final = frozenset(
    {
        ConditionType.CREATED,
        ConditionType.RUNNING,
        ConditionType.RESTARTING,
        ConditionType.SUCCEEDED,
        ConditionType.FAILED,
        ConditionType.SUSPENDED,
    }
)

_MAX_MESSAGE: Final = 2048
_MAX_REASON: Final = 128
# The training-operator's "has reached the specified backoff limit", JobSet's "jobset failed due
# to reaching max number of restarts"; a deadline exceeded, worded by either.
_BACKOFF_RE: Final = re.compile(r"backoff ?limit|max(imum)? number of restarts", re.IGNORECASE)
_DEADLINE_RE: Final = re.compile(r"deadline", re.IGNORECASE)


@dataclass(frozen=True)
class Transition:
    """One phase change, reported as a Kubernetes Event (and, for some, a job event)."""

    source: JobPhase | None
    target: JobPhase
    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class Notice:
    """Something worth an event that is not a phase change: a restart, a refused adapter.

    ``job_event``: also one of the job's own events (OpenAI's list), for what a user waits on.
    """

    reason: str
    message: str
    warning: bool = False
    job_event: bool = False


@dataclass(frozen=True)
class Outcome:
    """The status a reconcile pass decided on, the transitions that led there, and notices."""

    status: FineTuneJobStatus
    transitions: tuple[Transition, ...] = ()
    notices: tuple[Notice, ...] = field(default=())


# ---------------------------------------------------------------------------------------------
# Lifecycle paths
# ---------------------------------------------------------------------------------------------


def transition_path(current: JobPhase | None, target: JobPhase) -> list[JobPhase] | None:
    """The shortest sequence of allowed moves from ``current`` to ``target`` (excluding
    ``current``); ``[]`` when already there, None when the lifecycle forbids it.

    The operator observes the world at intervals, so it may first see a job that already ran
    and succeeded while it was queued: it then reports queued → running → succeeded, each an
    allowed move, instead of a jump the lifecycle (and clients that rely on it) never expects.
    """
    if current == target:
        return []
    seen: set[JobPhase | None] = {current}
    queue: deque[tuple[JobPhase | None, list[JobPhase]]] = deque([(current, [])])
    while queue:
        phase, path = queue.popleft()
        for nxt in sorted(ALLOWED_TRANSITIONS[phase]):
            if nxt in seen:
                continue
            if nxt == target:
                return [*path, nxt]
            # Never route through a terminal phase: nothing leaves one.
            if nxt not in TERMINAL_PHASES:
                seen.add(nxt)
                queue.append((nxt, [*path, nxt]))
    return None


# ---------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------


def _clip(text: str | None, limit: int) -> str | None:
    return text[:limit] if text else None


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: ConditionStatus,
    *,
    reason: str | None,
    message: str | None,
    now: datetime,
    transitioned_at: datetime | None = None,
) -> list[Condition]:
    """``conditions`` with ``type_`` set; its transition time moves only when status changes.

    The list stays ordered by first appearance and bounded (the CRD allows MAX_CONDITIONS).
    """
    result = list(conditions)
    current = next((i for i, c in enumerate(result) if c.type == type_), None)
    when = transitioned_at or now
    if current is not None and result[current].status == status:
        when = result[current].last_transition_time or when
    condition = Condition(
        type=type_,
        status=status,
        reason=_clip(reason, _MAX_REASON),
        message=_clip(message, _MAX_MESSAGE),
        last_transition_time=when,
    )
    if current is None:
        result.append(condition)
    else:
        result[current] = condition
    return result[-MAX_CONDITIONS:]


def parse_time(value: Any) -> datetime | None:
    """A Kubernetes timestamp (RFC 3339, ``Z`` for UTC) as a datetime; None if absent or bad."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def mirror_conditions(
    conditions: Sequence[Condition], workload: Sequence[Mapping[str, Any]], *, now: datetime
) -> list[Condition]:
    """Copy the workload's conditions (MIRRORED_CONDITIONS) into the FineTuneJob's."""
    result = list(conditions)
    for raw in workload:
        type_ = raw.get("type")
        if type_ not in MIRRORED_CONDITIONS:
            continue
        try:
            status = ConditionStatus(raw.get("status", "Unknown"))
        except ValueError:
            status = ConditionStatus.UNKNOWN
        result = set_condition(
            result,
            type_,
            status,
            reason=raw.get("reason"),
            message=raw.get("message"),
            now=now,
            transitioned_at=parse_time(raw.get("lastTransitionTime")),
        )
    return result


def condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    """The condition of ``type_``, if present."""
    return next((c for c in conditions if c.type == type_), None)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def failure_error(observed: Observed, events: Sequence[JobEvent]) -> JobError:
    """Why a job whose workload failed failed, and whose fault it is.

    The trainer reports bad input with an error event before it exits with its user-error
    code (not retried): that makes it the user's error. Without such an event the pods failed
    for a reason of the platform's (backoff limit reached after OOM kills or lost nodes, the
    deadline, a crash): an infrastructure error carrying the training controller's message.
    """
    reported = trainer_error(events)
    if reported is not None and reported.kind is ErrorKind.USER:
        return reported
    message = observed.message or "The training pods failed"
    said = f"{observed.reason or ''} {message}"
    if _BACKOFF_RE.search(said) or observed.reason == "ReachedMaxRestarts":
        code = "backoff_limit_exceeded"
        if "backoff limit" not in message.lower():  # JobSet says "max number of restarts"
            message = f"The trainer kept failing and reached the backoff limit: {message}"
    elif _DEADLINE_RE.search(said):
        code = "deadline_exceeded"
    elif reported is not None:
        # An internal error the trainer reported (exit code 1): keep its own code and message.
        return reported
    else:
        code = "training_failed"
    return JobError(code=code, message=message[:4096], kind=ErrorKind.INFRASTRUCTURE)


def user_error(code: str, message: str, param: str | None = None) -> JobError:
    """A user error found by the operator itself (files, model, settings)."""
    return JobError(code=code, message=message[:4096], param=param, kind=ErrorKind.USER)


# ---------------------------------------------------------------------------------------------
# Phase changes
# ---------------------------------------------------------------------------------------------


def _event_for(source: JobPhase | None, target: JobPhase, status: FineTuneJobStatus) -> Transition:
    """The Kubernetes Event of one move."""
    match target:
        case JobPhase.VALIDATING_FILES:
            return Transition(source, target, "ValidatingFiles", "Validating the job's files")
        case JobPhase.QUEUED if source in (JobPhase.PAUSED, JobPhase.PAUSING):
            return Transition(source, target, "Resumed", "Resumed; waiting for the trainer")
        case JobPhase.QUEUED if source is JobPhase.RUNNING:
            return Transition(
                source, target, "Requeued", "The trainer was suspended by the cluster; queued"
            )
        case JobPhase.QUEUED:
            return Transition(
                source, target, "Queued", "Files validated; waiting for the trainer to start"
            )
        case JobPhase.RUNNING:
            return Transition(source, target, "Running", "The trainer is running")
        case JobPhase.PAUSING:
            return Transition(
                source, target, "Pausing", "Pausing: the trainer commits a checkpoint and stops"
            )
        case JobPhase.PAUSED:
            return Transition(
                source,
                target,
                "Paused",
                f"Paused at step {status.step}; set spec.suspend to false to resume",
            )
        case JobPhase.SUCCEEDED:
            return Transition(
                source,
                target,
                "Succeeded",
                f"Fine-tuning finished at step {status.step}: {status.fine_tuned_model}",
            )
        case JobPhase.FAILED:
            error = status.error
            detail = f"{error.kind.value} error {error.code}: {error.message}" if error else ""
            return Transition(source, target, "Failed", f"Failed: {detail}", warning=True)
        case JobPhase.CANCELLED:
            return Transition(source, target, "Cancelled", "Cancelled; the trainer was stopped")
    raise AssertionError(f"unhandled phase {target}")  # pragma: no cover - exhaustive


def advance(
    status: FineTuneJobStatus, target: JobPhase, *, now: datetime
) -> tuple[FineTuneJobStatus, list[Transition]]:
    """Move ``status`` to ``target`` through allowed phases, stamping the timestamps.

    A move the lifecycle forbids (leaving a terminal phase) leaves the status unchanged.
    """
    path = transition_path(status.phase, target)
    if not path:
        return status, []
    transitions = []
    for phase in path:
        source = status.phase
        updates: dict[str, Any] = {"phase": phase}
        conditions = list(status.conditions)
        if phase is JobPhase.RUNNING and status.started_at is None:
            updates["started_at"] = now
        updates |= _run_clock(status, phase, now)
        if phase in TERMINAL_PHASES:
            updates["finished_at"] = now
            updates["estimated_finish"] = None
        if phase is JobPhase.PAUSED:
            updates["estimated_finish"] = None
        if phase is JobPhase.QUEUED:
            conditions = set_condition(
                conditions,
                ConditionType.QUEUED,
                ConditionStatus.TRUE,
                reason="Waiting",
                message=None,
                now=now,
            )
        elif condition(conditions, ConditionType.QUEUED) is not None:
            conditions = set_condition(
                conditions,
                ConditionType.QUEUED,
                ConditionStatus.FALSE,
                reason=phase.value.title().replace("_", ""),
                message=None,
                now=now,
            )
        updates["conditions"] = conditions
        status = status.model_copy(update=updates)
        transitions.append(_event_for(source, phase, status))
    return status, transitions


def _run_clock(status: FineTuneJobStatus, phase: JobPhase, now: datetime) -> dict[str, Any]:
    """Start the run clock when the workers start; add the run to ``runSeconds`` when they
    stop (a pause, a preemption back to the queue, the end of the job).
    """
    if phase in WORKER_PHASES and status.running_since is None:
        return {"running_since": now}
    if phase not in WORKER_PHASES and status.running_since is not None:
        return {"run_seconds": run_seconds(status, now), "running_since": None}
    return {}


def usage_delta(
    old: FineTuneJobStatus | None, new: FineTuneJobStatus, gpus: int
) -> tuple[float, int]:
    """What a status change adds to its org's usage: the GPU-seconds of a run that ended, and
    the trained tokens of a job that finished (counted once, as OpenAI reports them).
    """
    before = old or FineTuneJobStatus()
    gpu_seconds = max(0.0, new.run_seconds - before.run_seconds) * gpus
    finished = new.phase in TERMINAL_PHASES and before.phase not in TERMINAL_PHASES
    return gpu_seconds, new.trained_tokens if finished else 0


def trainer_stopped(events: Sequence[JobEvent]) -> bool:
    """Whether the trainer's last run ended by its own account (it stopped after committing its
    checkpoint, finished or failed), or no trainer ever started: its last lifecycle event is not
    a start.
    """
    for event in reversed(events):
        kind = event_kind(event)
        if kind in (TrainerEventKind.STARTED, TrainerEventKind.RESTARTED):
            return False
        if kind in (TrainerEventKind.PREEMPTED, TrainerEventKind.COMPLETED, TrainerEventKind.ERROR):
            return True
    return True


def restart_notices(
    before: int, status: FineTuneJobStatus, events: Sequence[JobEvent]
) -> list[Notice]:
    """A Warning event per restart the trainer reported since the last pass."""
    if status.restarts <= before:
        return []
    restarted = [e for e in events if event_kind(e) is TrainerEventKind.RESTARTED]
    notices = []
    for number, event in enumerate(restarted[before : status.restarts], start=before + 1):
        step = event.data.get("step")
        where = f"; resumed from step {step}" if step is not None else ""
        notices.append(
            Notice("Restarted", f"The trainer restarted (restart {number}){where}", warning=True)
        )
    return notices


def observe_training(
    status: FineTuneJobStatus,
    observed: Observed,
    *,
    events: Sequence[JobEvent] | None,
    adapter_stored: bool,
    fine_tuned_model: str | None,
    now: datetime,
) -> Outcome:
    """The status of a job whose workload exists, from what it and the trainer report.

    ``events`` is the trainer's whole event log when it was read on this pass (None when not:
    progress is then left as it was). On Succeeded the job succeeds only if the final adapter
    is in the store; a trainer that exited 0 without one is an infrastructure failure.
    """
    if is_terminal(status.phase):
        return Outcome(status)
    before = status.restarts
    folded = fold_events(status, events, now=now) if events is not None else status
    folded = folded.model_copy(
        update={"conditions": mirror_conditions(folded.conditions, observed.conditions, now=now)}
    )
    target = observed.phase
    if target is JobPhase.SUCCEEDED:
        if adapter_stored:
            folded = folded.model_copy(update={"fine_tuned_model": fine_tuned_model})
        else:
            target = JobPhase.FAILED
            folded = folded.model_copy(
                update={
                    "error": JobError(
                        code="adapter_missing",
                        message="The trainer exited successfully but the adapter is not in "
                        "the object store",
                        kind=ErrorKind.INFRASTRUCTURE,
                    )
                }
            )
    elif target is JobPhase.FAILED:
        folded = folded.model_copy(update={"error": failure_error(observed, events or [])})
    if target in (JobPhase.PAUSED, JobPhase.QUEUED, *TERMINAL_PHASES):
        folded = folded.model_copy(update={"estimated_finish": None})
    result, transitions = advance(folded, target, now=now)
    result, waiting = queue_wait(status, result, observed, now=now)
    notices = [*restart_notices(before, result, events or []), *waiting]
    return Outcome(result, tuple(transitions), tuple(notices))


def queue_wait(
    before: FineTuneJobStatus, status: FineTuneJobStatus, observed: Observed, *, now: datetime
) -> tuple[FineTuneJobStatus, list[Notice]]:
    """A queued job's Queued condition says why it waits (as its scheduler says), and a
    notice — an event of the job too — tells each new reason once.
    """
    waiting = observed.waiting
    if waiting is None or status.phase is not JobPhase.QUEUED:
        return status, []
    previous = condition(before.conditions, ConditionType.QUEUED)
    conditions = set_condition(
        status.conditions,
        ConditionType.QUEUED,
        ConditionStatus.TRUE,
        reason=waiting.reason,
        message=waiting.message,
        now=now,
    )
    status = status.model_copy(update={"conditions": conditions})
    repeated = (
        before.phase is JobPhase.QUEUED
        and previous is not None
        and previous.reason == waiting.reason
    )
    if repeated:
        return status, []
    notice = Notice(waiting.reason, waiting.message, warning=waiting.warning, job_event=True)
    return status, [notice]


def fail(status: FineTuneJobStatus, error: JobError, *, now: datetime) -> Outcome:
    """The job failed before any trainer ran (its files, its model): a Failed condition too."""
    failed = status.model_copy(
        update={
            "error": error,
            "conditions": set_condition(
                status.conditions,
                ConditionType.FAILED,
                ConditionStatus.TRUE,
                reason="".join(part.title() for part in error.code.split("_")),
                message=error.message,
                now=now,
            ),
        }
    )
    result, transitions = advance(failed, JobPhase.FAILED, now=now)
    return Outcome(result, tuple(transitions))


def cancel(status: FineTuneJobStatus, *, now: datetime) -> Outcome:
    """The job was cancelled (its workload is being stopped)."""
    cancelled = status.model_copy(
        update={
            "conditions": set_condition(
                status.conditions,
                ConditionType.CANCELLED,
                ConditionStatus.TRUE,
                reason="CancelRequested",
                message="spec.cancel is true",
                now=now,
            )
        }
    )
    result, transitions = advance(cancelled, JobPhase.CANCELLED, now=now)
    return Outcome(result, tuple(transitions))


def status_patch(old: FineTuneJobStatus | None, new: FineTuneJobStatus) -> dict[str, Any] | None:
    """A JSON merge patch from ``old`` to ``new`` (None when nothing changed).

    Fields that disappeared are sent as null so the merge removes them; lists are replaced
    whole, as merge patches do.
    """
    before = old.to_wire() if old is not None else {}
    after = new.to_wire()
    if before == after:
        return None
    patch: dict[str, Any] = {k: v for k, v in after.items() if before.get(k) != v}
    for key in before.keys() - after.keys():
        patch[key] = None
    return patch


def validated(status: FineTuneJobStatus, config: TrainerConfig, *, now: datetime) -> Outcome:
    """The job's files passed and its trainer config is stored: plan it and queue it."""
    hp = config.hyperparameters
    planned = status.model_copy(
        update={
            "total_steps": config.total_steps,
            "progress": progress_text(status.step, config.total_steps),
            "hyperparameters": Hyperparameters(
                n_epochs=hp.n_epochs,
                batch_size=hp.batch_size,
                learning_rate_multiplier=hp.learning_rate_multiplier,
                beta=hp.beta,
                n_evals=config.n_evals,
                warmup_ratio=hp.warmup_ratio,
                max_seq_length=config.max_seq_length,
                lr_scheduler_type=hp.lr_scheduler,
                weight_decay=hp.weight_decay,
                max_grad_norm=hp.max_grad_norm,
                train_on_inputs=hp.train_on_inputs
                if config.method is MethodType.SUPERVISED
                else None,
                packing=hp.packing if config.method is MethodType.SUPERVISED else None,
                early_stopping_patience=hp.early_stopping_patience,
                early_stopping_threshold=hp.early_stopping_threshold
                if hp.early_stopping_patience
                else None,
                use_best_checkpoint=hp.use_best_checkpoint,
            ),
            "conditions": set_condition(
                status.conditions,
                ConditionType.FILES_VALIDATED,
                ConditionStatus.TRUE,
                reason="Valid",
                message=f"{config.n_train_examples} training examples",
                now=now,
            ),
        }
    )
    result, transitions = advance(planned, JobPhase.QUEUED, now=now)
    return Outcome(result, tuple(transitions))


def job_events(transition: Transition, status: FineTuneJobStatus) -> list[JobEvent]:
    """The job events (OpenAI's event list) an executor adds for one phase change, worded as
    OpenAI's. Requests the API handles itself (cancel, pause, resume) are logged by the API.
    """
    match transition.target:
        case JobPhase.QUEUED if transition.source is JobPhase.VALIDATING_FILES:
            return [JobEvent(message="Files validated, moving job to queued state")]
        case JobPhase.RUNNING:
            return [JobEvent(message="Fine-tuning job started")]
        case JobPhase.PAUSED:
            return [JobEvent(message=f"Fine-tuning job paused at step {status.step}")]
        case JobPhase.SUCCEEDED:
            return [
                JobEvent(message=f"New fine-tuned model created: {status.fine_tuned_model}"),
                JobEvent(message="The job has successfully completed"),
            ]
        case JobPhase.FAILED:
            detail = status.error.message if status.error else "unknown error"
            return [JobEvent(message=f"The job failed: {detail}", level=EventLevel.ERROR)]
    return []
