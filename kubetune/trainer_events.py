"""What the trainer's events carry, so the operator and the API can read them without guessing.

The trainer's rank 0 writes :class:`kubetune.events.JobEvent` chunks to ``events/<seq>.jsonl``.
Metrics events (``type: metrics``) carry :class:`StepMetrics` in ``data``, as OpenAI's metrics
events do. Every other trainer event is a ``message`` whose ``data["kind"]`` is a
:class:`TrainerEventKind`; a checkpoint event's data is a :class:`CheckpointEventData`, from
which the operator builds the status' checkpoint list (:func:`checkpoint_from_event`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubetune.events import EventType, JobEvent
from kubetune.finetunejob import CheckpointRef, Metrics

KIND_KEY: Final = "kind"


class TrainerEventKind(StrEnum):
    """The kinds of message events the trainer writes."""

    STARTED = "started"
    RESTARTED = "restarted"
    WARNING = "warning"
    CHECKPOINT = "checkpoint"
    EVALUATION = "evaluation"
    PREEMPTED = "preempted"
    EARLY_STOPPED = "early_stopped"
    BEST_CHECKPOINT = "best_checkpoint"
    COMPLETED = "completed"
    ERROR = "error"


class StepMetrics(BaseModel):
    """``data`` of a metrics event: OpenAI's keys first, then kubetune's."""

    model_config = ConfigDict(extra="allow")

    step: int = Field(ge=0)
    total_steps: int | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    trained_tokens: int | None = None
    epoch: float | None = None
    mfu: float | None = None
    memory_bytes: int | None = None

    def to_metrics(self) -> Metrics:
        """The subset the FineTuneJob status keeps."""
        return Metrics(
            train_loss=self.train_loss,
            train_mean_token_accuracy=self.train_mean_token_accuracy,
            valid_loss=self.valid_loss,
            valid_mean_token_accuracy=self.valid_mean_token_accuracy,
            learning_rate=self.learning_rate,
            grad_norm=self.grad_norm,
            tokens_per_second=self.tokens_per_second,
        )


class CheckpointEventData(BaseModel):
    """``data`` of a checkpoint event: enough to list the checkpoint without reading it."""

    model_config = ConfigDict(extra="allow")

    kind: TrainerEventKind = TrainerEventKind.CHECKPOINT
    checkpoint_id: str
    step: int = Field(ge=0)
    created_at: int = Field(description="Unix time the manifest was written.")
    prefix: str = Field(description="Object-store folder of the checkpoint.")
    metrics: StepMetrics | None = None

    def to_ref(self) -> CheckpointRef:
        """The checkpoint as the FineTuneJob status lists it."""
        return CheckpointRef(
            id=self.checkpoint_id,
            step=self.step,
            created_at=datetime.fromtimestamp(self.created_at, UTC),
            metrics=self.metrics.to_metrics() if self.metrics else None,
        )


def event_kind(event: JobEvent) -> TrainerEventKind | None:
    """The trainer kind of a message event, or None for metrics and foreign events."""
    value = event.data.get(KIND_KEY)
    try:
        return TrainerEventKind(value) if isinstance(value, str) else None
    except ValueError:
        return None


def step_metrics(event: JobEvent) -> StepMetrics | None:
    """The metrics of a metrics event, or None for any other event."""
    if event.type is not EventType.METRICS:
        return None
    try:
        return StepMetrics.model_validate(event.data)
    except ValidationError:
        return None


def checkpoint_from_event(event: JobEvent) -> CheckpointRef | None:
    """The committed checkpoint a checkpoint event announces, or None for any other event."""
    if event_kind(event) is not TrainerEventKind.CHECKPOINT:
        return None
    try:
        return CheckpointEventData.model_validate(event.data).to_ref()
    except ValidationError:
        return None


def message_data(kind: TrainerEventKind, **data: Any) -> dict[str, Any]:
    """``data`` for a message event of ``kind``."""
    return {KIND_KEY: kind.value, **data}
