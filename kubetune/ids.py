"""Identifiers for files, jobs, checkpoints and events.

Ids look like OpenAI's (``file-…``, ``ftjob-…``, ``ftckpt-…``, ``ftevent-…``) but are lowercase
base36, because job ids become Kubernetes object names, which must be DNS-1123 labels.

The body is a fixed-width base36 millisecond timestamp followed by random base36 characters, so
ids of one kind sort by creation time as plain strings. That makes ``after=<id>`` cursor
pagination a simple string comparison in every backend.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from enum import StrEnum
from typing import Final

_ALPHABET: Final = "0123456789abcdefghijklmnopqrstuvwxyz"
# 36**9 ms is about 3,200 years past the epoch: nine characters always suffice.
_TIME_WIDTH: Final = 9
_RANDOM_WIDTH: Final = 14  # 36**14 ≈ 2**72 values: collisions are not a practical concern.
BODY_LENGTH: Final = _TIME_WIDTH + _RANDOM_WIDTH


class IdKind(StrEnum):
    """The prefixes of kubetune's object ids."""

    FILE = "file"
    JOB = "ftjob"
    CHECKPOINT = "ftckpt"
    EVENT = "ftevent"
    UPLOAD = "upload"
    PART = "part"


ID_PATTERNS: Final[dict[IdKind, str]] = {
    kind: rf"^{kind.value}-[0-9a-z]{{{BODY_LENGTH}}}$" for kind in IdKind
}
_COMPILED: Final = {kind: re.compile(pattern) for kind, pattern in ID_PATTERNS.items()}


def _base36(value: int, width: int) -> str:
    digits = []
    while value:
        value, rem = divmod(value, 36)
        digits.append(_ALPHABET[rem])
    return "".join(reversed(digits)).rjust(width, "0")[-width:]


class _MonotonicBodies:
    """Id bodies that strictly increase within this process, even within one millisecond.

    Several events written in the same millisecond must still list in the order they were
    made; as ULIDs do, a body made in the same (or an earlier, if the clock stepped back)
    millisecond as the previous one reuses its time and increments its random part.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0

    def next(self, now_ms: int) -> str:
        with self._lock:
            if now_ms <= self._last_ms:
                now_ms = self._last_ms
                random_part = self._last_random + 1
            else:
                random_part = secrets.randbelow(36**_RANDOM_WIDTH // 2)
            self._last_ms, self._last_random = now_ms, random_part
        return _base36(now_ms, _TIME_WIDTH) + _base36(random_part, _RANDOM_WIDTH)


_BODIES = _MonotonicBodies()


def new_id(kind: IdKind, *, now_ms: int | None = None) -> str:
    """Return a new, time-ordered id of the given kind, e.g. ``ftjob-0mhx5k2ab3c…``.

    Ids made by one process strictly increase; ids from different processes are ordered by
    their millisecond.
    """
    if now_ms is not None:  # an explicit time (tests) gets an independent random part
        body = _base36(now_ms, _TIME_WIDTH) + _base36(
            secrets.randbelow(36**_RANDOM_WIDTH), _RANDOM_WIDTH
        )
        return f"{kind.value}-{body}"
    return f"{kind.value}-{_BODIES.next(int(time.time() * 1000))}"


def new_file_id() -> str:
    """Return a new ``file-…`` id."""
    return new_id(IdKind.FILE)


def new_job_id() -> str:
    """Return a new ``ftjob-…`` id; it is a valid Kubernetes object name."""
    return new_id(IdKind.JOB)


def new_checkpoint_id() -> str:
    """Return a new ``ftckpt-…`` id."""
    return new_id(IdKind.CHECKPOINT)


def new_event_id() -> str:
    """Return a new ``ftevent-…`` id."""
    return new_id(IdKind.EVENT)


def is_valid_id(value: str, kind: IdKind) -> bool:
    """Tell whether ``value`` is a well-formed id of ``kind``."""
    return bool(_COMPILED[kind].match(value))


def short_id(value: str) -> str:
    """Return the part of an id used in fine-tuned model names (``ft:…:<short-id>``).

    The random tail, not the timestamp, so two jobs started in the same second still differ.
    """
    _, _, body = value.partition("-")
    return body[-8:]


def id_timestamp(value: str) -> float:
    """Unix time (seconds) at which an id was made, read back from its time prefix."""
    _, _, body = value.partition("-")
    return int(body[:_TIME_WIDTH], 36) / 1000.0


def default_seed(job_id: str) -> int:
    """The seed a job uses when none was given: stable per job, so a restart reuses it."""
    import hashlib

    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:4], "big") & 0x7FFFFFFF


def results_file_id(job_id: str) -> str:
    """The id of a job's results file (purpose ``fine-tune-results``): derived from the job
    id, so every writer (operator, local executor, API) names it the same without talking.
    """
    _, _, body = job_id.partition("-")
    return f"{IdKind.FILE.value}-{body}"


# Webhooks (OpenAI's shapes: ``evt_…`` events). Event and message ids are derived, not drawn,
# so a repeated terminal transition (operator restart) names the same event and delivery.
WEBHOOK_ENDPOINT_ID_PATTERN: Final = r"^we_[0-9a-f]{32}$"
WEBHOOK_EVENT_ID_PATTERN: Final = r"^evt_[0-9a-f]{32}$"
WEBHOOK_MESSAGE_ID_PATTERN: Final = r"^wh_[0-9a-f]{32}$"


def _digest32(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:32]


def new_webhook_endpoint_id() -> str:
    """Return a new random ``we_…`` webhook endpoint id."""
    return f"we_{secrets.token_hex(16)}"


def static_webhook_endpoint_id(org: str, url: str) -> str:
    """The id of an endpoint configured in settings: stable across restarts."""
    return "we_" + _digest32("\n".join(("static", org, url)))


def webhook_event_id(org: str, job_id: str, event_type: str) -> str:
    """The ``evt_…`` id of a job's webhook event: one per (org, job, type), never two."""
    return "evt_" + _digest32("\n".join((org, job_id, event_type)))


def webhook_message_id(event_id: str, endpoint_id: str) -> str:
    """The ``webhook-id`` of one event sent to one endpoint (the same on every retry)."""
    return "wh_" + _digest32("\n".join((event_id, endpoint_id)))
