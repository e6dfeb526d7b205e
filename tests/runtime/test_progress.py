"""Folding trainer events into a FineTuneJob status."""

from datetime import UTC, datetime

from kubetune.events import EventType, JobEvent
from kubetune.finetunejob import MAX_CHECKPOINTS_IN_STATUS, ErrorKind, FineTuneJobStatus
from kubetune.ids import new_checkpoint_id
from kubetune.trainer_events import TrainerEventKind, message_data
from kubetune_runtime.progress import fold_events, trainer_error

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def metrics(step: int, at: int, **values: float) -> JobEvent:
    return JobEvent(
        message=f"step {step}",
        type=EventType.METRICS,
        created_at=at,
        data={"step": step, "total_steps": 100, "trained_tokens": step * 10, **values},
    )


def checkpoint(step: int) -> JobEvent:
    return JobEvent(
        message=f"checkpoint at {step}",
        created_at=step,
        data=message_data(
            TrainerEventKind.CHECKPOINT,
            checkpoint_id=new_checkpoint_id(),
            step=step,
            created_at=step,
            prefix=f"ck/{step}/",
        ),
    )


def test_latest_step_metrics_and_progress():
    events = [metrics(1, 100, train_loss=2.0, valid_loss=3.0), metrics(2, 110, train_loss=1.5)]
    status = fold_events(FineTuneJobStatus(), events, now=NOW)
    assert status.step == 2
    assert status.total_steps == 100
    assert status.progress == "2/100"
    assert status.trained_tokens == 20
    assert status.metrics is not None
    assert status.metrics.train_loss == 1.5
    assert status.metrics.valid_loss == 3.0  # kept from the last event that had it


def test_estimated_finish_follows_the_step_rate():
    events = [metrics(10, 1000), metrics(20, 1100)]  # 10 s per step, 80 steps to go
    status = fold_events(FineTuneJobStatus(), events, now=NOW)
    assert status.estimated_finish is not None
    assert (status.estimated_finish - NOW).total_seconds() == 800


def test_checkpoints_are_bounded_newest_first_and_restarts_counted():
    events = [checkpoint(s) for s in range(1, 15)]
    events.insert(
        5,
        JobEvent(
            message="Resumed from step 4", data=message_data(TrainerEventKind.RESTARTED, step=4)
        ),
    )
    status = fold_events(FineTuneJobStatus(), events, now=NOW)
    assert [c.step for c in status.checkpoints] == list(
        range(14, 14 - MAX_CHECKPOINTS_IN_STATUS, -1)
    )
    assert status.restarts == 1


def test_folding_is_idempotent():
    events = [metrics(1, 100, train_loss=2.0), checkpoint(1), metrics(2, 110, train_loss=1.0)]
    once = fold_events(FineTuneJobStatus(), events, now=NOW)
    assert fold_events(once, events, now=NOW) == once


def test_a_trainer_error_is_a_user_error_naming_the_param():
    events = [
        JobEvent(
            message="line 3: messages[1].role 'robot' is not allowed",
            level="error",
            data=message_data(
                TrainerEventKind.ERROR, code="invalid_training_file", param="training_file"
            ),
        )
    ]
    error = trainer_error(events)
    assert error is not None
    assert error.kind is ErrorKind.USER
    assert error.code == "invalid_training_file"
    assert "line 3" in error.message
    assert trainer_error([metrics(1, 1)]) is None
