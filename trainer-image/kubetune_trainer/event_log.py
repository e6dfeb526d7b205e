"""Rank 0's event log: JobEvents appended to the object store as whole, never-rewritten chunks.

Events are buffered and written as one chunk ``events/<seq>.jsonl`` when the buffer is old
enough, on anything important (checkpoints, errors, the end) and on close. A restarted trainer
continues after the highest sequence number already stored, so it never overwrites a chunk.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Final

from kubetune.events import EventLevel, EventType, JobEvent, encode_chunk
from kubetune.storage_layout import StorageLayout
from kubetune.trainer_events import TrainerEventKind, message_data
from kubetune_runtime.objectstore import ObjectStore

log = logging.getLogger(__name__)

FLUSH_SECONDS: Final = 10.0
_CHUNK_RE: Final = re.compile(r"/(\d+)\.jsonl$")


class EventLog:
    """Buffered writer of one job's trainer events (use on rank 0 only)."""

    def __init__(
        self,
        store: ObjectStore,
        layout: StorageLayout,
        org: str,
        job_id: str,
        *,
        flush_seconds: float = FLUSH_SECONDS,
    ) -> None:
        self._store = store
        self._layout = layout
        self._org = org
        self._job_id = job_id
        self._flush_seconds = flush_seconds
        self._buffer: list[JobEvent] = []
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._seq = self._next_seq()

    def _next_seq(self) -> int:
        highest = -1
        for info in self._store.list(self._layout.events_prefix(self._org, self._job_id)):
            match = _CHUNK_RE.search(info.key)
            if match:
                highest = max(highest, int(match.group(1)))
        return highest + 1

    def emit(self, event: JobEvent, *, flush: bool = False) -> None:
        """Queue ``event``; write the buffer now if asked or if it is old enough."""
        log.info("event: %s %s", event.message, event.data or "")
        with self._lock:
            self._buffer.append(event)
        if flush or time.monotonic() - self._last_flush >= self._flush_seconds:
            self.flush()

    def message(
        self,
        kind: TrainerEventKind,
        message: str,
        *,
        level: EventLevel = EventLevel.INFO,
        flush: bool = False,
        **data: Any,
    ) -> None:
        """Emit a message event of ``kind`` with ``data``."""
        self.emit(
            JobEvent(message=message, level=level, data=message_data(kind, **data)), flush=flush
        )

    def metrics(self, message: str, data: dict[str, Any]) -> None:
        """Emit a metrics event (``type: metrics``)."""
        self.emit(JobEvent(message=message, type=EventType.METRICS, data=data))

    def flush(self) -> None:
        """Write buffered events as the next chunk; a failed write keeps them for the next try."""
        with self._lock:
            events, self._buffer = self._buffer, []
            if not events:
                return
            key = self._layout.event_chunk_key(self._org, self._job_id, self._seq)
            try:
                self._store.put_bytes(key, encode_chunk(events), content_type="application/jsonl")
            except Exception:
                # Events are worth a retry but not the run: keep them and try at the next flush.
                log.warning("could not write event chunk %s", key, exc_info=True)
                self._buffer = events + self._buffer
                return
            self._seq += 1
            self._last_flush = time.monotonic()

    def close(self) -> None:
        """Write whatever is buffered."""
        self.flush()
