"""Serving on vLLM, the operator's side: find the ready replicas, push each its desired adapters
through its adapter-sync sidecar, and keep what they report.

- Replicas are Pods labelled ``app.kubernetes.io/component=vllm`` (the chart's vLLM pods), read
  from kopf's index: their ``vllm`` container ready (the pod itself turns Ready only after the
  first push: the sidecar's readiness gate), with a pod IP and a container port named
  ``adapter-sync``. Their base model is the annotation ``kubetune.io/base-model-id`` (label
  values cannot hold every model id), else the label ``kubetune.io/base-model``.
- The desired adapters come from kopf's index of FineTuneJobs
  (``kubetune_runtime.adapters.job_adapters``: a job's final adapter and the checkpoints asked
  for), chosen per base model by ``choose_adapters``.
- A :class:`~kubetune_runtime.serving.ReplicaTracker` per replica says when to push it the whole
  desired set (the same policy as local mode's).
- :class:`ServingState` keeps what the last push to each replica reported, in memory; the job
  driver turns it into ``status.servedOn``, ``servingError`` and the ``Served`` condition.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import httpx

from kubetune.finetunejob import LABEL_BASE_MODEL
from kubetune.settings import ServingSettings
from kubetune_operator.metrics import OperatorMetrics
from kubetune_runtime.adapters import (
    AdapterRef,
    JobAdapters,
    ServingUnavailable,
    SyncResult,
    SyncState,
    choose_adapters,
)
from kubetune_runtime.serving import ReplicaTracker, ServingState

log = logging.getLogger(__name__)

COMPONENT_LABEL: Final = "app.kubernetes.io/component"
VLLM_COMPONENT: Final = "vllm"
ANNOTATION_BASE_MODEL_ID: Final = "kubetune.io/base-model-id"
SIDECAR_PORT_NAME: Final = "adapter-sync"
VLLM_CONTAINER: Final = "vllm"  # the chart's vLLM container
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
    """Whether vLLM is up: its container is ready. Not the pod: the pod turns Ready only once
    the sidecar has had the operator's first push (its readiness probe), which this enables.
    A status without container statuses falls back to the pod's Ready condition.
    """
    if status.get("phase") != "Running":
        return False
    for container in status.get("containerStatuses") or []:
        if container.get("name") == VLLM_CONTAINER:
            return bool(container.get("ready"))
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


def desired_for(
    index: Mapping[str, Iterable[JobAdapters]], base_model: str, checkpoint_slots: int
) -> tuple[AdapterRef, ...]:
    """The adapters a replica of ``base_model`` should serve, from the jobs' index."""
    chosen = choose_adapters(index.get(base_model, ()), checkpoint_slots=checkpoint_slots)
    return tuple(chosen.get(base_model, ()))


# ---------------------------------------------------------------------------------------------
# The sync loop (one per operator, in a kopf daemon)
# ---------------------------------------------------------------------------------------------

ReplicaIndex = Mapping[str, Iterable[Replica]]
AdapterIndex = Mapping[str, Iterable[JobAdapters]]


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


@dataclass
class ReplicaSync:
    """One ready replica, when to push it, and the push in flight."""

    replica: Replica
    tracker: ReplicaTracker
    task: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        """Whether a push to it is still running."""
        return self.task is not None and not self.task.done()


async def _push_one(
    sync: ReplicaSync,
    desired: tuple[AdapterRef, ...],
    state: ServingState,
    metrics: OperatorMetrics,
    timeout: float,
) -> None:
    loop = asyncio.get_running_loop()
    replica, tracker = sync.replica, sync.tracker
    try:
        report = await asyncio.to_thread(push, replica.url, desired, timeout)
    except Exception as exc:  # the sidecar is down or answered nonsense: retried with backoff
        metrics.reconcile_errors.labels("serve").inc()
        log.warning("%s: adapter sync failed: %s", replica.name, exc)
        tracker.push_failed(loop.time())
        return
    tracker.pushed_ok(desired, report.results, loop.time())
    record_registrations(metrics, replica.base_model, tracker.new_outcomes(report.results))
    state.record(replica.name, replica.base_model, report.results, report.loaded)


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
    syncs: dict[str, ReplicaSync] = {}
    try:
        while not stopped():
            current = {r.uid: r for rs in replicas.values() for r in rs}
            for uid in [u for u in syncs if u not in current]:
                gone = syncs.pop(uid)
                if gone.task is not None:
                    gone.task.cancel()
                state.forget(gone.replica.name)
            for uid, replica in current.items():
                sync = syncs.get(uid)
                if sync is None or sync.replica != replica:
                    sync = syncs[uid] = ReplicaSync(replica, ReplicaTracker(settings.sync_seconds))
                    state.seen(replica.name, replica.base_model)
                desired = desired_for(adapters, replica.base_model, settings.checkpoint_slots)
                if not sync.busy and sync.tracker.wants_push(desired, loop.time()):
                    sync.task = asyncio.create_task(
                        _push_one(sync, desired, state, metrics, settings.request_timeout_seconds)
                    )
            await wait(POLL_SECONDS)
    finally:
        tasks = [s.task for s in syncs.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
