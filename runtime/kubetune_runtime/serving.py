"""Serving policy shared by every runtime: when to push a vLLM replica its adapters, and what a
succeeded job's status says about where its model is served.

- :class:`ReplicaTracker` decides when one replica is pushed the whole desired set: when first
  seen (catch-up), when the set changes, every ``sync_seconds`` (a vLLM that restarted on its
  own), sooner when an adapter was unavailable, and with backoff when the push itself failed.
  The operator keeps one per vLLM pod (pushing through its adapter-sync sidecar), local mode
  one per local vLLM (pushing directly).
- :class:`ServingState` keeps what each replica last reported (operator: its sidecars; local
  mode: its vLLMs) and answers where one adapter stands.
- :func:`serving_status` is pure: from :class:`AdapterServing` (where one adapter stands across
  the replicas of its base model) it derives ``servedOn``, ``servingError`` and the ``Served``
  condition; :func:`plan_serving` adds the notices a change deserves. The job driver records
  both, so a job reads the same wherever it ran.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from kubetune.finetunejob import (
    ANNOTATION_MODEL_DELETED,
    MAX_CONDITIONS,
    ConditionStatus,
    ConditionType,
    FineTuneJob,
    FineTuneJobStatus,
    JobError,
)
from kubetune_runtime.adapters import (
    AdapterRef,
    SyncResult,
    SyncState,
    adapter_ref,
    rejection_error,
)
from kubetune_runtime.reconcile import Notice, set_condition

MAX_SERVED_ON: Final = 64  # the CRD's bound on status.servedOn
MAX_BACKOFF_SECONDS: Final = 60.0
UNAVAILABLE_RETRY_SECONDS: Final = 5.0


@dataclass(frozen=True)
class AdapterServing:
    """Where one adapter stands across the ready replicas of its base model."""

    served_on: tuple[str, ...] = ()
    replicas: int = 0
    rejection: SyncResult | None = None
    problems: tuple[str, ...] = ()


@dataclass
class ReplicaTracker:
    """When to push one replica its desired adapters, and which outcomes are news."""

    sync_seconds: float
    pushed: tuple[AdapterRef, ...] | None = None
    due: float = 0.0
    failures: int = 0
    reported: dict[str, SyncResult] = field(default_factory=dict)

    def wants_push(self, desired: tuple[AdapterRef, ...], now: float) -> bool:
        """Whether to push ``desired`` now."""
        if self.failures:
            return now >= self.due  # backing off
        return desired != self.pushed or now >= self.due

    def pushed_ok(
        self, desired: tuple[AdapterRef, ...], results: Mapping[str, SyncResult], now: float
    ) -> None:
        """A push answered; an adapter that is unavailable is retried soon."""
        self.failures = 0
        self.pushed = desired
        retry = any(r.state is SyncState.UNAVAILABLE for r in results.values())
        wait = min(UNAVAILABLE_RETRY_SECONDS, self.sync_seconds) if retry else self.sync_seconds
        self.due = now + wait

    def push_failed(self, now: float) -> None:
        """The replica did not answer: back off, then push again."""
        self.failures += 1
        self.pushed = None
        self.due = now + min(MAX_BACKOFF_SECONDS, 2.0**self.failures)

    def new_outcomes(self, results: Mapping[str, SyncResult]) -> list[tuple[str, SyncResult]]:
        """Registrations this push made or newly failed (each failure is counted once)."""
        outcomes = []
        for name, result in results.items():
            previous = self.reported.get(name)
            loaded = result.state is SyncState.LOADED and result.changed
            failed = result.state in (SyncState.REJECTED, SyncState.UNAVAILABLE)
            if loaded or (failed and (previous is None or previous.message != result.message)):
                outcomes.append((name, result))
        self.reported = dict(results)
        return outcomes


@dataclass(frozen=True)
class ReplicaState:
    """The last report of one replica."""

    base_model: str
    loaded: frozenset[str] = frozenset()
    failures: Mapping[str, SyncResult] = field(default_factory=dict)


_FAILED: Final = (SyncState.REJECTED, SyncState.UNAVAILABLE)


class ServingState:
    """The replicas' last reports, by replica name; read by the job driver's passes (worker
    threads) while the sync loop writes, hence the lock.
    """

    def __init__(self) -> None:
        self._replicas: dict[str, ReplicaState] = {}
        self._lock = threading.Lock()
        self.version = 0  # bumped on every change: status writers compare it

    def _put(self, name: str, state: ReplicaState) -> None:
        with self._lock:
            if self._replicas.get(name) != state:
                self._replicas[name] = state
                self.version += 1

    def seen(self, name: str, base_model: str) -> None:
        """A ready replica (nothing known of its adapters yet)."""
        if name not in self._replicas:
            self._put(name, ReplicaState(base_model))

    def record(
        self,
        name: str,
        base_model: str,
        results: Mapping[str, SyncResult],
        loaded: Iterable[str],
    ) -> None:
        """Keep the report of a push: every adapter's result, and what vLLM serves after it."""
        failures = {n: r for n, r in results.items() if r.state in _FAILED}
        self._put(name, ReplicaState(base_model, frozenset(loaded), failures))

    def note(self, name: str, base_model: str, adapter: str, result: SyncResult) -> None:
        """Add one adapter's result (a single load) to what the replica last reported."""
        with self._lock:
            old = self._replicas.get(name, ReplicaState(base_model))
        failures = {n: r for n, r in old.failures.items() if n != adapter}
        loaded = old.loaded - {adapter}
        if result.state is SyncState.LOADED:
            loaded |= {adapter}
        elif result.state in _FAILED:
            failures[adapter] = result
        self._put(name, ReplicaState(base_model, loaded, failures))

    def forget(self, name: str) -> None:
        """A replica that is no longer ready (or gone)."""
        with self._lock:
            if self._replicas.pop(name, None) is not None:
                self.version += 1

    def of(self, adapter: str, base_model: str) -> AdapterServing:
        """Where ``adapter`` of ``base_model`` is served and what went wrong."""
        with self._lock:
            mine = sorted((n, s) for n, s in self._replicas.items() if s.base_model == base_model)
        served_on = tuple(n for n, s in mine if adapter in s.loaded)
        failed = [(n, s.failures[adapter]) for n, s in mine if adapter in s.failures]
        rejection = next((r for _, r in failed if r.state is SyncState.REJECTED), None)
        problems = tuple(f"{n}: {r.message}" for n, r in failed if r.state is SyncState.UNAVAILABLE)
        return AdapterServing(served_on, len(mine), rejection, problems)

    def loaded_counts(self) -> Iterator[tuple[str, str, int]]:
        """(replica, base model, adapters loaded) for every known replica."""
        with self._lock:
            replicas = sorted(self._replicas.items())
        for name, s in replicas:
            yield name, s.base_model, len(s.loaded)


def _served_condition(
    ref: AdapterRef | None,
    serving: AdapterServing,
    error: JobError | None,
    *,
    deleted: bool,
    had_condition: bool,
) -> tuple[ConditionStatus, str, str] | None:
    """The ``Served`` condition's status, reason and message (None: nothing to say)."""
    served_on = serving.served_on[:MAX_SERVED_ON]
    if ref is None:
        reason = "ModelDeleted" if deleted else "NotRegistered"
        if served_on:
            return ConditionStatus.FALSE, reason, f"unloading from {', '.join(served_on)}"
        if had_condition or deleted:
            return ConditionStatus.FALSE, reason, "not served"
        return None  # never served and not meant to be
    if error is not None:
        return ConditionStatus.FALSE, "AdapterRejected", error.message
    if served_on:
        return (
            ConditionStatus.TRUE,
            "Loaded",
            f"{ref.name} is loaded on {len(served_on)} of {serving.replicas} ready vLLM "
            f"replicas of {ref.base_model}",
        )
    if serving.replicas == 0:
        return (
            ConditionStatus.FALSE,
            "NoReplicas",
            f"no ready vLLM replica serves {ref.base_model}",
        )
    detail = "; ".join(serving.problems) or f"{serving.replicas} ready replicas"
    return ConditionStatus.FALSE, "Loading", f"being loaded: {detail}"


def serving_status(
    status: FineTuneJobStatus,
    ref: AdapterRef | None,
    serving: AdapterServing,
    *,
    deleted: bool,
    now: datetime,
) -> FineTuneJobStatus:
    """The job's status with ``servedOn``, ``servingError`` and the ``Served`` condition.

    ``ref`` is None when the model should not be served (deleted, or not registered).
    """
    error = None
    if ref is not None and serving.rejection is not None:
        error = rejection_error(serving.rejection.code, serving.rejection.message)
    had_condition = any(c.type == ConditionType.SERVED for c in status.conditions)
    condition = _served_condition(ref, serving, error, deleted=deleted, had_condition=had_condition)
    conditions = list(status.conditions)
    if condition is not None:
        state, reason, message = condition
        conditions = set_condition(
            conditions, ConditionType.SERVED, state, reason=reason, message=message, now=now
        )[-MAX_CONDITIONS:]
    return status.model_copy(
        update={
            "served_on": list(serving.served_on[:MAX_SERVED_ON]),
            "serving_error": error,
            "conditions": conditions,
        }
    )


def is_served(status: FineTuneJobStatus) -> bool:
    """Whether the ``Served`` condition is True."""
    return any(
        c.type == ConditionType.SERVED and c.status is ConditionStatus.TRUE
        for c in status.conditions
    )


def plan_serving(
    job: FineTuneJob, serving: AdapterServing, *, now: datetime
) -> tuple[FineTuneJobStatus, tuple[Notice, ...]]:
    """A succeeded job's status with its serving part, and the notices the change deserves:
    a Warning when an adapter is refused (once: when the error appears or changes), a Normal
    event when the model turns served.
    """
    old = job.status or FineTuneJobStatus()
    deleted = job.metadata.annotations.get(ANNOTATION_MODEL_DELETED) == "true"
    new = serving_status(old, adapter_ref(job), serving, deleted=deleted, now=now)
    notices: list[Notice] = []
    if new.serving_error is not None and new.serving_error != old.serving_error:
        notices.append(Notice("AdapterRejected", new.serving_error.message, warning=True))
    if is_served(new) and not is_served(old):
        where = ", ".join(new.served_on)
        notices.append(Notice("Served", f"{old.fine_tuned_model} is served on {where}"))
    return new, tuple(notices)
