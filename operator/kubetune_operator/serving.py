"""Serving on vLLM, the operator's side: find the ready replicas, push each its desired adapters
through its adapter-sync sidecar, and say on each FineTuneJob where its model is served.

- Replicas are Pods labelled ``app.kubernetes.io/component=vllm`` (the chart's vLLM pods), read
  from kopf's index: ready (``Ready`` condition), with a pod IP and a container port named
  ``adapter-sync``. Their base model is the annotation ``kubetune.io/base-model-id`` (label
  values cannot hold every model id), else the label ``kubetune.io/base-model``.
- The desired adapters come from kopf's index of FineTuneJobs (``kubetune.serving.adapter_ref``).
- :class:`ReplicaTracker` pushes the whole desired set to one replica when it first sees the
  replica (catch-up), when the set changes, and every ``sync_seconds`` (a restarted vLLM).
- :class:`ServingState` keeps what the last push to each replica reported, in memory; the
  per-job writer turns it into ``status.servedOn``, ``servingError`` and the ``Served``
  condition with the pure :func:`serving_status`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import httpx

from kubetune.finetunejob import (
    ANNOTATION_MODEL_DELETED,
    LABEL_BASE_MODEL,
    MAX_CONDITIONS,
    ConditionStatus,
    FineTuneJob,
    FineTuneJobStatus,
    JobError,
)
from kubetune.reconcile import set_condition, status_patch
from kubetune.serving import (
    AdapterRef,
    ServingUnavailable,
    SyncResult,
    SyncState,
    adapter_ref,
    rejection_error,
)
from kubetune.settings import ServingSettings
from kubetune_operator.metrics import OperatorMetrics

log = logging.getLogger(__name__)

COMPONENT_LABEL: Final = "app.kubernetes.io/component"
VLLM_COMPONENT: Final = "vllm"
ANNOTATION_BASE_MODEL_ID: Final = "kubetune.io/base-model-id"
SIDECAR_PORT_NAME: Final = "adapter-sync"
SERVED: Final = "Served"
MAX_SERVED_ON: Final = 64  # the CRD's bound on status.servedOn
MAX_BACKOFF_SECONDS: Final = 60.0
POLL_SECONDS: Final = 0.25  # how often the loops look at the indexes (in memory)


# ---------------------------------------------------------------------------------------------
# Replicas
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replica:
    """One ready vLLM pod and where its sidecar listens."""

    name: str
    uid: str
    base_model: str
    url: str


def _ready(status: Mapping[str, Any]) -> bool:
    if status.get("phase") != "Running":
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def _sidecar_port(spec: Mapping[str, Any]) -> int | None:
    for container in spec.get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == SIDECAR_PORT_NAME and port.get("containerPort"):
                return int(port["containerPort"])
    return None


def replica_of(body: Mapping[str, Any]) -> Replica | None:
    """The replica a vLLM pod is, or None while it is not ready (or not a vLLM replica)."""
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return None
    base_model = (meta.get("annotations") or {}).get(ANNOTATION_BASE_MODEL_ID) or (
        meta.get("labels") or {}
    ).get(LABEL_BASE_MODEL)
    status = body.get("status") or {}
    ip = status.get("podIP")
    port = _sidecar_port(body.get("spec") or {})
    if not (base_model and ip and port and _ready(status)):
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return Replica(
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        base_model=str(base_model),
        url=f"http://{host}:{port}",
    )


# ---------------------------------------------------------------------------------------------
# The sidecar's client
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SidecarReport:
    """What one push reported: each adapter's result and what vLLM serves after it."""

    results: dict[str, SyncResult]
    loaded: frozenset[str]


def push(url: str, desired: Sequence[AdapterRef], timeout: float) -> SidecarReport:
    """``PUT /adapters`` the desired set to a sidecar (blocking).

    Raises :class:`ServingUnavailable` when the sidecar or its vLLM does not answer.
    """
    body = {"adapters": [ref.to_json() for ref in desired]}
    try:
        response = httpx.put(f"{url}/adapters", json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ServingUnavailable(f"adapter-sync at {url} did not answer: {exc}") from exc
    if response.status_code != 200:
        raise ServingUnavailable(
            f"adapter-sync at {url} answered {response.status_code}: {response.text[:500]}"
        )
    data = response.json()
    return SidecarReport(
        results={name: SyncResult.from_json(r) for name, r in data["results"].items()},
        loaded=frozenset(data.get("loaded") or ()),
    )


# ---------------------------------------------------------------------------------------------
# What the replicas reported
# ---------------------------------------------------------------------------------------------


@dataclass
class ReplicaState:
    """The last report of one replica."""

    base_model: str
    loaded: frozenset[str] = frozenset()
    failures: dict[str, SyncResult] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterServing:
    """Where one adapter stands across the replicas of its base model."""

    served_on: tuple[str, ...]
    replicas: int
    rejection: SyncResult | None
    problems: tuple[str, ...]


class ServingState:
    """The replicas' last reports, shared by the sync loop and the per-job status writers.

    Only touched from the operator's event loop (the blocking calls return their reports to
    it), so it needs no lock.
    """

    def __init__(self) -> None:
        self.replicas: dict[str, ReplicaState] = {}
        self.version = 0  # bumped on every change: status writers compare it

    def _changed(self) -> None:
        self.version += 1

    def seen(self, replica: Replica) -> None:
        """A ready replica (nothing known of its adapters yet)."""
        if replica.name not in self.replicas:
            self.replicas[replica.name] = ReplicaState(replica.base_model)
            self._changed()

    def record(self, replica: Replica, report: SidecarReport) -> None:
        """Keep the report of a push."""
        failures = {
            name: r
            for name, r in report.results.items()
            if r.state in (SyncState.REJECTED, SyncState.UNAVAILABLE)
        }
        new = ReplicaState(replica.base_model, report.loaded, failures)
        if self.replicas.get(replica.name) != new:
            self.replicas[replica.name] = new
            self._changed()

    def forget(self, name: str) -> None:
        """A replica that is no longer ready (or gone)."""
        if self.replicas.pop(name, None) is not None:
            self._changed()

    def of(self, name: str, base_model: str) -> AdapterServing:
        """Where adapter ``name`` of ``base_model`` is served and what went wrong."""
        mine = {pod: s for pod, s in sorted(self.replicas.items()) if s.base_model == base_model}
        served_on = tuple(pod for pod, s in mine.items() if name in s.loaded)
        rejection = next(
            (
                s.failures[name]
                for s in mine.values()
                if name in s.failures and s.failures[name].state is SyncState.REJECTED
            ),
            None,
        )
        problems = tuple(
            f"{pod}: {s.failures[name].message}"
            for pod, s in mine.items()
            if name in s.failures and s.failures[name].state is SyncState.UNAVAILABLE
        )
        return AdapterServing(served_on, len(mine), rejection, problems)

    def loaded_counts(self) -> Iterator[tuple[str, str, int]]:
        """(replica, base model, adapters loaded) for every known replica."""
        for pod, s in sorted(self.replicas.items()):
            yield pod, s.base_model, len(s.loaded)


# ---------------------------------------------------------------------------------------------
# One replica's pushes
# ---------------------------------------------------------------------------------------------


@dataclass
class ReplicaTracker:
    """When to push to one replica: new, desired set changed, periodic, or after a failure."""

    replica: Replica
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

    def pushed_ok(self, desired: tuple[AdapterRef, ...], report: SidecarReport, now: float) -> None:
        """A push answered; an adapter that is unavailable is retried soon."""
        self.failures = 0
        self.pushed = desired
        retry = any(r.state is SyncState.UNAVAILABLE for r in report.results.values())
        self.due = now + (min(5.0, self.sync_seconds) if retry else self.sync_seconds)

    def push_failed(self, now: float) -> None:
        """The sidecar did not answer: back off, then push again."""
        self.failures += 1
        self.pushed = None
        self.due = now + min(MAX_BACKOFF_SECONDS, 2.0**self.failures)

    def new_outcomes(self, report: SidecarReport) -> list[tuple[str, SyncResult]]:
        """Registrations this push made or newly failed (each failure is counted once)."""
        outcomes = []
        for name, result in report.results.items():
            previous = self.reported.get(name)
            loaded = result.state is SyncState.LOADED and result.changed
            failed = result.state in (SyncState.REJECTED, SyncState.UNAVAILABLE)
            if loaded or (failed and (previous is None or previous.message != result.message)):
                outcomes.append((name, result))
        self.reported = dict(report.results)
        return outcomes


# ---------------------------------------------------------------------------------------------
# The job's status
# ---------------------------------------------------------------------------------------------


def serving_error(rejection: SyncResult) -> JobError:
    """The user-facing error of a rejected adapter."""
    return rejection_error(rejection.code, rejection.message)


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
    served_on = list(serving.served_on[:MAX_SERVED_ON])
    error = serving_error(serving.rejection) if ref and serving.rejection else None
    has_condition = any(c.type == SERVED for c in status.conditions)
    condition: tuple[ConditionStatus, str, str] | None
    if ref is None:
        reason = "ModelDeleted" if deleted else "NotRegistered"
        if served_on:
            condition = (ConditionStatus.FALSE, reason, f"unloading from {', '.join(served_on)}")
        elif has_condition or deleted:
            condition = (ConditionStatus.FALSE, reason, "not served")
        else:
            condition = None  # never served and not meant to be: nothing to say
    elif error is not None:
        condition = (ConditionStatus.FALSE, "AdapterRejected", error.message)
    elif served_on:
        condition = (
            ConditionStatus.TRUE,
            "Loaded",
            f"{ref.name} is loaded on {len(served_on)} of {serving.replicas} ready vLLM "
            f"replicas of {ref.base_model}",
        )
    elif serving.replicas == 0:
        condition = (
            ConditionStatus.FALSE,
            "NoReplicas",
            f"no ready vLLM replica serves {ref.base_model}",
        )
    else:
        detail = "; ".join(serving.problems) or f"{serving.replicas} ready replicas"
        condition = (ConditionStatus.FALSE, "Loading", f"being loaded: {detail}")
    conditions = list(status.conditions)
    if condition is not None:
        conditions = set_condition(
            conditions, SERVED, condition[0], reason=condition[1], message=condition[2], now=now
        )[-MAX_CONDITIONS:]
    return status.model_copy(
        update={"served_on": served_on, "serving_error": error, "conditions": conditions}
    )


def became_served(old: FineTuneJobStatus, new: FineTuneJobStatus) -> bool:
    """Whether the ``Served`` condition just turned True (a Normal Event)."""

    def served(status: FineTuneJobStatus) -> bool:
        return any(c.type == SERVED and c.status is ConditionStatus.TRUE for c in status.conditions)

    return served(new) and not served(old)


def newly_rejected(old: FineTuneJobStatus, new: FineTuneJobStatus) -> JobError | None:
    """The serving error to announce (a Warning Event), once: when it appears or changes."""
    if new.serving_error is not None and new.serving_error != old.serving_error:
        return new.serving_error
    return None


def desired_for(
    index: Mapping[str, Iterable[AdapterRef]], base_model: str
) -> tuple[AdapterRef, ...]:
    """The adapters a replica of ``base_model`` should serve, from the jobs' index."""
    return tuple(sorted(set(index.get(base_model, ()))))


@dataclass(frozen=True)
class StatusPlan:
    """What a job's serving status pass writes and announces."""

    patch: dict[str, Any] | None
    resource_version: str | None
    events: tuple[tuple[str, str, str], ...]  # (type, reason, message)


def plan_status(raw: Mapping[str, Any], state: ServingState, now: datetime) -> StatusPlan:
    """The serving part of one job's status, from the replicas' last reports (pure)."""
    job = FineTuneJob.from_manifest(dict(raw))
    old = job.status or FineTuneJobStatus()
    ref = adapter_ref(job)
    name = old.fine_tuned_model or ""
    deleted = job.metadata.annotations.get(ANNOTATION_MODEL_DELETED) == "true"
    new = serving_status(old, ref, state.of(name, job.spec.model), deleted=deleted, now=now)
    events: list[tuple[str, str, str]] = []
    rejected = newly_rejected(old, new)
    if rejected is not None:
        events.append(("Warning", "AdapterRejected", rejected.message))
    if became_served(old, new):
        events.append(("Normal", "Served", f"{name} is served on {', '.join(new.served_on)}"))
    return StatusPlan(status_patch(old, new), job.metadata.resource_version, tuple(events))


# ---------------------------------------------------------------------------------------------
# The sync loop (one per operator, in a kopf daemon)
# ---------------------------------------------------------------------------------------------

ReplicaIndex = Mapping[str, Iterable[Replica]]
AdapterIndex = Mapping[str, Iterable[AdapterRef]]


def record_registrations(
    metrics: OperatorMetrics, base_model: str, outcomes: Iterable[tuple[str, SyncResult]]
) -> None:
    """Count registrations (success/failure) and time the successful ones."""
    for _, result in outcomes:
        if result.state is SyncState.LOADED:
            metrics.adapter_registration_seconds.labels(base_model).observe(result.seconds)
            metrics.adapter_registrations.labels(base_model, "success").inc()
        else:
            metrics.adapter_registrations.labels(base_model, "failure").inc()


async def _push_one(
    tracker: ReplicaTracker,
    desired: tuple[AdapterRef, ...],
    state: ServingState,
    metrics: OperatorMetrics,
    timeout: float,
) -> None:
    loop = asyncio.get_running_loop()
    replica = tracker.replica
    try:
        report = await asyncio.to_thread(push, replica.url, desired, timeout)
    except Exception as exc:  # the sidecar is down or answered nonsense: retried with backoff
        metrics.reconcile_errors.labels("serve").inc()
        log.warning("%s: adapter sync failed: %s", replica.name, exc)
        tracker.push_failed(loop.time())
        return
    tracker.pushed_ok(desired, report, loop.time())
    record_registrations(metrics, replica.base_model, tracker.new_outcomes(report))
    state.record(replica, report)


async def sync_replicas(
    replicas: ReplicaIndex,
    adapters: AdapterIndex,
    state: ServingState,
    metrics: OperatorMetrics,
    settings: ServingSettings,
    stopped: Callable[[], bool],
    wait: Callable[[float], Any],
) -> None:
    """Push every ready replica its desired adapters until ``stopped()``.

    Each replica is pushed in a task of its own, so a slow one delays no other; a replica that
    is no longer ready is forgotten (its adapters no longer count as served).
    """
    loop = asyncio.get_running_loop()
    trackers: dict[str, ReplicaTracker] = {}
    tasks: dict[str, asyncio.Task[None]] = {}
    try:
        while not stopped():
            current = {r.uid: r for rs in replicas.values() for r in rs}
            for uid in [u for u in trackers if u not in current]:
                task = tasks.pop(uid, None)
                if task is not None:
                    task.cancel()
                state.forget(trackers.pop(uid).replica.name)
            for uid, replica in current.items():
                tracker = trackers.get(uid)
                if tracker is None or tracker.replica != replica:
                    tracker = trackers[uid] = ReplicaTracker(replica, settings.sync_seconds)
                    state.seen(replica)
                if uid in tasks and not tasks[uid].done():
                    continue
                desired = desired_for(adapters, replica.base_model)
                if tracker.wants_push(desired, loop.time()):
                    tasks[uid] = asyncio.create_task(
                        _push_one(
                            tracker, desired, state, metrics, settings.request_timeout_seconds
                        )
                    )
            await wait(POLL_SECONDS)
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
