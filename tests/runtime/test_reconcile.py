"""The reconcile loop's decisions (pure functions, no cluster)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from kubetune.events import EventType, JobEvent
from kubetune.finetunejob import (
    Condition,
    ConditionStatus,
    ErrorKind,
    FineTuneJobStatus,
    JobError,
    JobPhase,
)
from kubetune.lifecycle import can_transition, run_seconds
from kubetune.trainer_events import TrainerEventKind, message_data
from kubetune_runtime.observed import Observed
from kubetune_runtime.reconcile import (
    advance,
    cancel,
    fail,
    failure_error,
    mirror_conditions,
    observe_training,
    set_condition,
    status_patch,
    transition_path,
    usage_delta,
    user_error,
    validated,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)


def status(phase: JobPhase | None = None, **fields: object) -> FineTuneJobStatus:
    return FineTuneJobStatus.model_validate({"phase": phase, **fields})


def metrics_event(step: int, total: int = 20) -> JobEvent:
    return JobEvent(
        message=f"Step {step}/{total}",
        type=EventType.METRICS,
        data={"step": step, "total_steps": total, "train_loss": 1.0 / step},
    )


def message(kind: TrainerEventKind, text: str = "", **data: object) -> JobEvent:
    return JobEvent(message=text or kind.value, data=message_data(kind, **data))


def workload_conditions(*true: str, false: tuple[str, ...] = ()) -> list[dict[str, str]]:
    conditions = [
        {
            "type": t,
            "status": "True",
            "reason": f"PyTorchJob{t}",
            "message": f"{t}.",
            "lastTransitionTime": "2026-01-02T03:00:00Z",
        }
        for t in true
    ]
    conditions += [{"type": t, "status": "False", "reason": f"PyTorchJob{t}"} for t in false]
    return conditions


def seen(
    phase: JobPhase, *true: str, false: tuple[str, ...] = (), restarting: bool = False
) -> Observed:
    """What a runtime observes: a phase, and its workload's conditions (true, then false)."""
    return Observed(phase, None, None, restarting, tuple(workload_conditions(*true, false=false)))


# -- lifecycle paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "target", "path"),
    [
        (JobPhase.QUEUED, JobPhase.QUEUED, []),
        (None, JobPhase.VALIDATING_FILES, [JobPhase.VALIDATING_FILES]),
        (JobPhase.QUEUED, JobPhase.SUCCEEDED, [JobPhase.RUNNING, JobPhase.SUCCEEDED]),
        (JobPhase.QUEUED, JobPhase.PAUSING, [JobPhase.RUNNING, JobPhase.PAUSING]),
        (JobPhase.PAUSED, JobPhase.RUNNING, [JobPhase.QUEUED, JobPhase.RUNNING]),
        (JobPhase.PAUSING, JobPhase.QUEUED, [JobPhase.PAUSED, JobPhase.QUEUED]),
        (JobPhase.SUCCEEDED, JobPhase.RUNNING, None),
        (JobPhase.FAILED, JobPhase.CANCELLED, None),
    ],
)
def test_transition_path_takes_only_allowed_moves(current, target, path):
    assert transition_path(current, target) == path
    steps = [current, *(path or [])]
    assert all(can_transition(a, b) for a, b in itertools.pairwise(steps))


def test_advance_stamps_start_once_and_finish_at_the_end():
    running, moves = advance(status(JobPhase.QUEUED), JobPhase.RUNNING, now=NOW)
    assert running.started_at == NOW
    assert [m.reason for m in moves] == ["Running"]
    paused, _ = advance(
        running.model_copy(update={"phase": JobPhase.PAUSED}), JobPhase.RUNNING, now=LATER
    )
    assert paused.started_at == NOW  # a resume is not a new start
    done, moves = advance(running, JobPhase.SUCCEEDED, now=LATER)
    assert done.finished_at == LATER
    assert done.estimated_finish is None
    assert advance(done, JobPhase.RUNNING, now=LATER) == (done, [])  # terminal stays


def test_the_run_clock_counts_the_time_workers_run_across_pauses_and_preemptions():
    minute = timedelta(minutes=1)
    job, _ = advance(status(), JobPhase.RUNNING, now=NOW)  # validated, queued, running at once
    assert (job.running_since, job.run_seconds) == (NOW, 0.0)
    job, _ = advance(job, JobPhase.PAUSING, now=NOW + 2 * minute)
    assert job.running_since == NOW  # still running while it commits its checkpoint
    job, _ = advance(job, JobPhase.PAUSED, now=NOW + 3 * minute)
    assert (job.running_since, job.run_seconds) == (None, 180.0)
    job, _ = advance(job, JobPhase.RUNNING, now=NOW + 60 * minute)  # a paused hour is free
    job, _ = advance(job, JobPhase.QUEUED, now=NOW + 61 * minute)  # preempted
    job, _ = advance(job, JobPhase.RUNNING, now=NOW + 70 * minute)
    before = job
    job, _ = advance(job, JobPhase.SUCCEEDED, now=NOW + 72 * minute)
    assert (job.running_since, job.run_seconds) == (None, 180.0 + 60 + 120)
    assert run_seconds(before, NOW + 71 * minute) == 180.0 + 60 + 60  # the current run too
    # What the org is charged: the run that ended, times the GPUs; the tokens once, at the end.
    job = job.model_copy(update={"trained_tokens": 5000})
    assert usage_delta(before, job, gpus=8) == (120.0 * 8, 5000)
    assert usage_delta(job, job, gpus=8) == (0.0, 0)
    paused, _ = advance(before, JobPhase.PAUSED, now=NOW + 71 * minute)
    assert usage_delta(before, paused, gpus=2) == (120.0, 0)
    assert usage_delta(None, status(), gpus=2) == (0.0, 0)


def test_queued_condition_tracks_time_in_the_queue():
    queued, _ = advance(status(JobPhase.VALIDATING_FILES), JobPhase.QUEUED, now=NOW)
    (cond,) = [c for c in queued.conditions if c.type == "Queued"]
    assert (cond.status, cond.last_transition_time) == (ConditionStatus.TRUE, NOW)
    running, _ = advance(queued, JobPhase.RUNNING, now=LATER)
    (cond,) = [c for c in running.conditions if c.type == "Queued"]
    assert (cond.status, cond.reason, cond.last_transition_time) == (
        ConditionStatus.FALSE,
        "Running",
        LATER,
    )


# -- conditions ---------------------------------------------------------------------------------


def test_set_condition_keeps_the_transition_time_while_status_holds():
    conditions = set_condition(
        [], "Running", ConditionStatus.TRUE, reason="A", message=None, now=NOW
    )
    same = set_condition(
        conditions, "Running", ConditionStatus.TRUE, reason="B", message="m", now=LATER
    )
    assert same[0].last_transition_time == NOW
    assert same[0].reason == "B"
    flipped = set_condition(
        same, "Running", ConditionStatus.FALSE, reason="C", message=None, now=LATER
    )
    assert flipped[0].last_transition_time == LATER


def test_set_condition_stays_within_the_crd_bound():
    conditions: list[Condition] = []
    for i in range(40):
        conditions = set_condition(
            conditions, f"T{i}", ConditionStatus.TRUE, reason=None, message="x" * 5000, now=NOW
        )
    assert len(conditions) == 16
    assert all(len(c.message or "") <= 2048 for c in conditions)


def test_workload_conditions_are_mirrored_with_their_own_times():
    mirrored = mirror_conditions([], workload_conditions("Created", "Running"), now=NOW)
    assert [(c.type, c.status, c.reason) for c in mirrored] == [
        ("Created", ConditionStatus.TRUE, "PyTorchJobCreated"),
        ("Running", ConditionStatus.TRUE, "PyTorchJobRunning"),
    ]
    assert mirrored[0].last_transition_time == datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
    ignored = mirror_conditions([], [{"type": "Odd", "status": "True"}], now=NOW)
    assert ignored == []


# -- errors -------------------------------------------------------------------------------------


def failed(message: str) -> Observed:
    return Observed(JobPhase.FAILED, "PyTorchJobFailed", message, restarting=False)


def test_a_trainer_reported_user_error_is_the_users():
    events = [
        message(
            TrainerEventKind.ERROR,
            "bad line 3",
            code="invalid_training_file",
            param="training_file",
            user_error=True,
        )
    ]
    error = failure_error(
        failed("PyTorchJob x is failed because 1 Master replica(s) failed."), events
    )
    assert (error.kind, error.code, error.param) == (
        ErrorKind.USER,
        "invalid_training_file",
        "training_file",
    )


@pytest.mark.parametrize(
    ("message_text", "code"),
    [
        (
            "Job x has failed because it has reached the specified backoff limit",
            "backoff_limit_exceeded",
        ),
        (
            "Job x has failed because it was active longer than specified deadline",
            "deadline_exceeded",
        ),
        ("PyTorchJob x is failed because 1 Worker replica(s) failed.", "training_failed"),
        ("jobset failed due to reaching max number of restarts", "backoff_limit_exceeded"),
        ("TrainJob exceeded its active deadline", "deadline_exceeded"),
        ("applying FailJobSet failure policy action", "training_failed"),
    ],
)
def test_failures_without_a_user_error_are_the_infrastructures(message_text, code):
    retried = [message(TrainerEventKind.ERROR, "S3 down", code="retryable", user_error=False)]
    error = failure_error(failed(message_text), retried if code != "training_failed" else [])
    assert (error.kind, error.code) == (ErrorKind.INFRASTRUCTURE, code)
    assert message_text in error.message  # the controller's words, kept
    if code == "backoff_limit_exceeded":  # said alike whichever controller gave up
        assert "backoff limit" in error.message


def test_an_internal_trainer_error_keeps_its_code():
    crash = [
        message(
            TrainerEventKind.ERROR,
            "Internal error: KeyError",
            code="internal_error",
            user_error=False,
        )
    ]
    error = failure_error(
        failed("PyTorchJob x is failed because 1 Master replica(s) failed."), crash
    )
    assert (error.kind, error.code) == (ErrorKind.INFRASTRUCTURE, "internal_error")


def test_operator_found_errors_fail_the_job_with_a_condition():
    outcome = fail(
        status(JobPhase.VALIDATING_FILES),
        user_error("invalid_file_format", "invalid training_file: wrong format", "training_file"),
        now=NOW,
    )
    assert outcome.status.phase is JobPhase.FAILED
    assert outcome.status.finished_at == NOW
    (cond,) = [c for c in outcome.status.conditions if c.type == "Failed"]
    assert cond.reason == "InvalidFileFormat"
    (move,) = outcome.transitions
    assert move.warning
    assert "user error invalid_file_format" in move.message


def test_cancel_is_allowed_from_a_new_job_and_never_after_the_end():
    assert cancel(status(None), now=NOW).status.phase is JobPhase.CANCELLED
    done = status(JobPhase.SUCCEEDED)
    assert cancel(done, now=NOW).transitions == ()


# -- observing a workload ----------------------------------------------------------------------


def observe_with(
    current: FineTuneJobStatus,
    observed: Observed,
    *,
    events: list[JobEvent] | None = None,
    adapter: bool = False,
):
    return observe_training(
        current,
        observed,
        events=events,
        adapter_stored=adapter,
        fine_tuned_model="ft:m:default::x",
        now=NOW,
    )


def test_success_needs_the_adapter_in_the_store():
    events = [metrics_event(s) for s in range(1, 21)]
    ok = observe_with(
        status(JobPhase.RUNNING),
        seen(JobPhase.SUCCEEDED, "Created", "Succeeded"),
        events=events,
        adapter=True,
    )
    assert ok.status.phase is JobPhase.SUCCEEDED
    assert ok.status.fine_tuned_model == "ft:m:default::x"
    assert (ok.status.step, ok.status.total_steps, ok.status.progress) == (20, 20, "20/20")
    missing = observe_with(
        status(JobPhase.RUNNING), seen(JobPhase.SUCCEEDED, "Created", "Succeeded"), events=events
    )
    assert missing.status.phase is JobPhase.FAILED
    assert missing.status.error == JobError(
        code="adapter_missing",
        message="The trainer exited successfully but the adapter is not in the object store",
        kind=ErrorKind.INFRASTRUCTURE,
    )


def test_a_job_seen_late_still_walks_the_lifecycle():
    outcome = observe_with(
        status(JobPhase.QUEUED), seen(JobPhase.SUCCEEDED, "Created", "Succeeded"), adapter=True
    )
    assert [m.target for m in outcome.transitions] == [JobPhase.RUNNING, JobPhase.SUCCEEDED]


def test_pause_goes_through_pausing_to_paused():
    pausing = observe_with(status(JobPhase.RUNNING), seen(JobPhase.PAUSING, "Created", "Running"))
    assert pausing.status.phase is JobPhase.PAUSING
    paused = observe_with(
        pausing.status, seen(JobPhase.PAUSED, "Created", "Suspended", false=("Running",))
    )
    assert paused.status.phase is JobPhase.PAUSED
    assert paused.status.estimated_finish is None
    resumed = observe_with(paused.status, seen(JobPhase.QUEUED, "Created", false=("Suspended",)))
    assert resumed.status.phase is JobPhase.QUEUED
    assert [m.reason for m in resumed.transitions] == ["Resumed"]


def test_restarts_come_from_the_trainer_and_are_announced_once():
    events = [
        metrics_event(1),
        metrics_event(2),
        message(TrainerEventKind.PREEMPTED, step=2),
        message(TrainerEventKind.RESTARTED, "Restarted from step 2", step=2),
        metrics_event(3),
    ]
    first = observe_with(
        status(JobPhase.RUNNING), seen(JobPhase.RUNNING, "Created", "Running"), events=events
    )
    assert first.status.restarts == 1
    (notice,) = first.notices
    assert (notice.reason, notice.warning) == ("Restarted", True)
    assert "resumed from step 2" in notice.message
    again = observe_with(first.status, seen(JobPhase.RUNNING, "Created", "Running"), events=events)
    assert again.notices == ()


def test_terminal_jobs_do_not_change():
    done = status(JobPhase.CANCELLED)
    outcome = observe_with(
        done, seen(JobPhase.RUNNING, "Created", "Running"), events=[metrics_event(5)]
    )
    assert outcome.status == done


# -- writing ------------------------------------------------------------------------------------


def test_status_patch_sends_changes_and_nulls_for_removed_fields():
    before = status(JobPhase.RUNNING, estimatedFinish="2026-01-02T04:00:00Z", step=3)
    after = before.model_copy(update={"phase": JobPhase.PAUSED, "estimated_finish": None})
    assert status_patch(before, after) == {"phase": "paused", "estimatedFinish": None}
    assert status_patch(after, after) is None
    assert status_patch(None, status(JobPhase.VALIDATING_FILES)) == {
        "phase": "validating_files",
        "step": 0,
        "trainedTokens": 0,
        "restarts": 0,
        "runSeconds": 0.0,
        "conditions": [],
        "checkpoints": [],
        "servedOn": [],
    }


def test_a_validated_job_shows_every_resolved_hyperparameter():
    from kubetune.finetunejob import FineTuneJob, ObjectMeta
    from kubetune.ids import new_job_id
    from kubetune.settings import BaseModelEntry, Settings
    from kubetune.trainer_config import build_trainer_config

    job = FineTuneJob(
        metadata=ObjectMeta(name=new_job_id()),
        spec={
            "model": "llama",
            "trainingFile": "file-" + "0" * 23,
            "method": {"hyperparameters": {"lrSchedulerType": "cosine", "maxGradNorm": 0}},
        },
    )
    settings = Settings(models=[BaseModelEntry(id="llama", context_length=64, path="/m")])
    config = build_trainer_config(job, settings, n_train_examples=10)
    planned = validated(status(JobPhase.VALIDATING_FILES), config, now=NOW).status
    hp = planned.hyperparameters
    assert hp is not None
    assert (hp.n_epochs, hp.lr_scheduler_type, hp.max_grad_norm) == (10, "cosine", 0.0)
    assert (hp.weight_decay, hp.train_on_inputs, hp.max_seq_length) == (0.0, False, 64)
