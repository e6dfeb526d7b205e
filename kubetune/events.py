"""Job events: what OpenAI's ``GET /fine_tuning/jobs/{id}/events`` lists.

Events come from several writers — the API and the local executor or operator (lifecycle:
"Created fine-tuning job", "Job cancelled") and rank 0 of the trainer (metrics, checkpoints,
warnings). Each writer appends whole chunks (JSONL files) to the job's ``events/`` folder and
never rewrites one, so no two writers contend for a key. Readers merge every chunk and sort by
event id, which is time-ordered (see :mod:`kubetune.ids`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from kubetune.ids import new_event_id


class EventLevel(StrEnum):
    """Severity, as in OpenAI's events."""

    INFO = "info"
    WARN = "warn"
    ERROR = "error"


class EventType(StrEnum):
    """``message`` for prose, ``metrics`` for step metrics (``data`` holds them)."""

    MESSAGE = "message"
    METRICS = "metrics"


class JobEvent(BaseModel):
    """One event, stored as one JSON line."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(default_factory=new_event_id)
    created_at: int = Field(default_factory=lambda: int(time.time()))
    level: EventLevel = EventLevel.INFO
    message: str
    type: EventType = EventType.MESSAGE
    data: dict[str, Any] = Field(default_factory=dict)


class _Store(Protocol):
    def put_bytes(self, key: str, data: bytes) -> Any: ...  # pragma: no cover - protocol

    def get_bytes(self, key: str) -> bytes: ...  # pragma: no cover - protocol

    def list(self, prefix: str) -> Iterable[Any]: ...  # pragma: no cover - protocol


def encode_chunk(events: Sequence[JobEvent]) -> bytes:
    """Serialize events as one JSONL chunk."""
    return b"".join(e.model_dump_json().encode() + b"\n" for e in events)


def decode_chunk(data: bytes) -> list[JobEvent]:
    """Parse a chunk; a torn last line (a writer died mid-upload on a store without atomic
    puts) is skipped rather than failing the whole list.
    """
    events = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            events.append(JobEvent.model_validate(json.loads(line)))
        except ValueError:
            continue
    return events


def write_control_events(store: _Store, events_prefix: str, events: Sequence[JobEvent]) -> None:
    """Append lifecycle events written by the API, operator or local executor.

    The chunk is named after its first event's id, so it is unique without coordination.
    """
    if events:
        store.put_bytes(f"{events_prefix}control-{events[0].id}.jsonl", encode_chunk(events))


def read_events(store: _Store, events_prefix: str) -> list[JobEvent]:
    """Every event of a job, oldest first."""
    events: list[JobEvent] = []
    for info in store.list(events_prefix):
        events.extend(decode_chunk(store.get_bytes(info.key)))
    events.sort(key=lambda e: e.id)
    return events


def page_newest_first(
    events: Sequence[JobEvent], *, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    """OpenAI's paging: newest first; ``after`` is the last id of the previous page."""
    newest_first = sorted(events, key=lambda e: e.id, reverse=True)
    if after is not None:
        newest_first = [e for e in newest_first if e.id < after]
    return newest_first[:limit], len(newest_first) > limit
