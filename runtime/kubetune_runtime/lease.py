"""The writer lease: one trainer at a time writes a job's checkpoints and result.

Two trainers of one job can run at once without any bug of ours: a node cut off from the
apiserver keeps running its pod while the controller starts a replacement elsewhere, a second
``make run`` opens the same data folder, an operator runs a job by hand. Both would write the
same checkpoints. So the trainer that writes (rank 0) holds a lease, one small object beside the
job's other objects (``jobs/<id>/writer-lease.json``), swapped only by compare-and-swap
(:meth:`~kubetune_runtime.objectstore.ObjectStore.put_if`: S3's conditional writes, a lock
locally):

- **Taking it.** Free (none, released, or expired): take it. Held by the same *slot*: take it at
  once, the holder is a predecessor. A slot is the replica's stable identity, its hostname: the
  pod of a PyTorchJob's master or of a JobSet's indexed Job keeps its hostname across
  restarts, and Kubernetes never runs two pods of one name at once, so an older holder with the
  same hostname is a crashed container, or a pod on a lost node whose replacement now runs
  (which then must stop writing). Held live by another slot: wait until it is released or
  expires.
- **Keeping it.** A thread renews it every third of its time to live; every write that
  publishes (a checkpoint's manifest, the final result) first checks and renews it
  (:meth:`WriterLease.ensure_held`), and refuses with :class:`LeaseLost` when another writer
  holds it now. The check is a compare-and-swap on the lease itself, so between it and the write
  only a same-slot successor can take over (an expiry would need the time to live to pass).
- **Giving it back.** Released on every clean ending (success, preemption, a user error), so
  only a hard crash (SIGKILL, out-of-memory, a lost node) makes a writer in another slot wait
  for the expiry.

Expiry compares wall clocks of different hosts: keep the time to live well above their skew.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Final

from kubetune_runtime.objectstore import ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)

SLOT_ENV: Final = "KUBETUNE_WRITER_SLOT"
"""Overrides the slot (the hostname): for tests that run replicas on one host."""


class LeaseLost(Exception):
    """Another writer holds the job's lease: this one must not write."""

    def __init__(self, key: str, holder: str | None) -> None:
        super().__init__(f"another trainer ({holder or 'unknown'}) holds the lease {key}")
        self.key = key
        self.holder = holder


@dataclass(frozen=True)
class LeaseRecord:
    """The lease object's body."""

    holder: str | None  # None: released
    slot: str
    renewed_at: float  # wall-clock seconds
    ttl_seconds: float

    def live(self, now: float) -> bool:
        """Whether a holder holds it at ``now``."""
        return self.holder is not None and now < self.renewed_at + self.ttl_seconds

    def encode(self) -> bytes:
        """The JSON body."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaseRecord:
        """Parse a body; an unreadable one counts as released (it holds nobody)."""
        try:
            raw = json.loads(data)
            return cls(
                holder=raw["holder"],
                slot=str(raw["slot"]),
                renewed_at=float(raw["renewed_at"]),
                ttl_seconds=float(raw["ttl_seconds"]),
            )
        except (ValueError, KeyError, TypeError):
            return cls(holder=None, slot="", renewed_at=0.0, ttl_seconds=0.0)


def default_slot() -> str:
    """The stable identity of this replica: :data:`SLOT_ENV`, else its hostname."""
    return os.environ.get(SLOT_ENV) or os.environ.get("HOSTNAME") or socket.gethostname()


class WriterLease:
    """One writer's hold on one job's lease (see the module docstring). Thread-safe."""

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        *,
        ttl_seconds: float,
        slot: str | None = None,
        clock: Callable[[], float] = time.time,
        poll_seconds: float = 2.0,
    ) -> None:
        self.store = store
        self.key = key
        self.ttl = ttl_seconds
        self.slot = slot or default_slot()
        self.holder = f"{self.slot}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._clock = clock
        self._poll = poll_seconds
        self._lock = threading.Lock()
        self._tag: str | None = None  # the version this writer wrote last, while it holds it
        self._lost: LeaseLost | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- taking ----------------------------------------------------------------------------
    def try_acquire(self) -> LeaseRecord | None:
        """Take the lease if it may be taken now; else the record of the live holder."""
        with self._lock:
            while True:
                current = self.store.get_versioned(self.key)
                record = LeaseRecord.decode(current.data) if current else None
                if record is not None and not self._may_take(record):
                    return record
                try:
                    self._tag = self.store.put_if(
                        self.key,
                        self._record().encode(),
                        expected_tag=current.tag if current else None,
                    )
                except PreconditionFailed:
                    continue  # another writer swapped it in between: read it again
                self._lost = None
                return None

    def acquire(self, on_wait: Callable[[LeaseRecord], None] | None = None) -> None:
        """Take the lease, waiting while another slot holds it; then keep it renewed.

        ``on_wait`` is told about the holder once, when the wait begins.
        """
        told = False
        while (holder := self.try_acquire()) is not None:
            if not told and on_wait is not None:
                on_wait(holder)
            told = True
            left = holder.renewed_at + holder.ttl_seconds - self._clock()
            time.sleep(min(max(left, 0.05), self._poll))
        self._start_renewer()

    def _may_take(self, record: LeaseRecord) -> bool:
        # A record of this holder has this slot too: the slot test covers it.
        return not record.live(self._clock()) or record.slot == self.slot

    def _record(self, *, held: bool = True) -> LeaseRecord:
        return LeaseRecord(
            holder=self.holder if held else None,
            slot=self.slot,
            renewed_at=self._clock() if held else 0.0,
            ttl_seconds=self.ttl,
        )

    # -- keeping ---------------------------------------------------------------------------
    def ensure_held(self) -> None:
        """Renew the lease now; :class:`LeaseLost` when another writer holds it.

        Call it right before each write that publishes. Store errors propagate (the caller's
        retry policy decides); they do not count as losing the lease.
        """
        with self._lock:
            if self._lost is not None:
                raise self._lost
            if self._tag is None:
                raise LeaseLost(self.key, None)
            try:
                self._tag = self.store.put_if(
                    self.key, self._record().encode(), expected_tag=self._tag
                )
            except PreconditionFailed:
                current = self.store.get_versioned(self.key)
                holder = LeaseRecord.decode(current.data).holder if current else None
                self._lost = LeaseLost(self.key, holder)
                self._tag = None
                raise self._lost from None

    @property
    def held(self) -> bool:
        """Whether this writer still holds the lease, as far as it knows."""
        return self._tag is not None and self._lost is None

    def _start_renewer(self) -> None:
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="writer-lease", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.ensure_held()
            except LeaseLost as exc:
                log.error("%s: this trainer must stop writing", exc)
                return
            except Exception as exc:  # the store is down: the next write's check decides
                log.warning("could not renew the writer lease %s: %s", self.key, exc)

    # -- giving back -----------------------------------------------------------------------
    def release(self) -> None:
        """Stop renewing and mark the lease free, if this writer still holds it."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        with self._lock:
            if self._tag is None or self._lost is not None:
                return
            try:
                self.store.put_if(
                    self.key, self._record(held=False).encode(), expected_tag=self._tag
                )
            except PreconditionFailed:
                pass  # taken over meanwhile: it is someone else's now
            except Exception as exc:
                log.warning("could not release the writer lease %s: %s", self.key, exc)
            self._tag = None
