"""Local mode's vLLMs, driven the way the operator drives a cluster's replicas: the same desired
set of adapters (:func:`kubetune_runtime.adapters.desired_adapters`), the same push policy
(:class:`~kubetune_runtime.serving.ReplicaTracker`) and the same record of what each replica
reported (:class:`~kubetune_runtime.serving.ServingState`). Only the transport differs: local
mode calls vLLM through :class:`~kubetune_runtime.adapters.ReplicaAdapters` itself, where the
operator goes through each pod's adapter-sync sidecar.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from kubetune.finetunejob import FineTuneJob
from kubetune_runtime.adapters import (
    AdapterRef,
    ReplicaAdapters,
    ServingError,
    ServingUnavailable,
    SyncResult,
    SyncState,
    adapter_ref,
    desired_adapters,
)
from kubetune_runtime.serving import AdapterServing, ReplicaTracker, ServingState

log = logging.getLogger(__name__)


@dataclass
class LocalReplica:
    """One local vLLM (the only replica of its base model) and when to push it."""

    name: str
    base_model: str
    adapters: ReplicaAdapters
    tracker: ReplicaTracker


def replica_name(base_model: str) -> str:
    """The name a local vLLM goes by in ``status.servedOn``."""
    return f"local-vllm-{base_model}"


class LocalServing:
    """One vLLM per base model (``replicas``: base model id → its :class:`ReplicaAdapters`);
    a base model without one counts as having no ready replica.

    Implements the job driver's :class:`~kubetune_runtime.driver.Serving`; every method is
    blocking and called from the local runner's thread.
    """

    def __init__(
        self,
        replicas: Mapping[str, ReplicaAdapters],
        *,
        sync_seconds: float,
        checkpoint_slots: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replicas = {
            base: LocalReplica(replica_name(base), base, adapters, ReplicaTracker(sync_seconds))
            for base, adapters in replicas.items()
        }
        self.state = ServingState()
        self.checkpoint_slots = checkpoint_slots
        self._clock = clock
        for replica in self.replicas.values():
            self.state.seen(replica.name, replica.base_model)

    def publish(self, job: FineTuneJob) -> None:
        """Load the model of a job that just succeeded, so it answers as soon as it is listed;
        a refusal or an unavailable vLLM is recorded (the job still succeeds).
        """
        ref = adapter_ref(job)
        replica = self.replicas.get(job.spec.base_model)
        if ref is None or replica is None:
            return
        try:
            result = replica.adapters.ensure_loaded(ref)
        except ServingError as exc:
            state = SyncState.REJECTED
            if isinstance(exc, ServingUnavailable):
                state = SyncState.UNAVAILABLE
            result = SyncResult(state, code=exc.code, message=exc.message)
            log.warning("%s: %s", ref.name, exc.message)
        self.state.note(replica.name, replica.base_model, ref.name, result)

    def where(self, job: FineTuneJob) -> AdapterServing:
        """Where the job's model stands on its base model's vLLM."""
        model = job.status.fine_tuned_model if job.status else None
        return self.state.of(model or "", job.spec.base_model)

    def sync(self, jobs: Iterable[FineTuneJob]) -> bool:
        """Push each vLLM the adapters of succeeded, undeleted jobs when its tracker says so
        (the set changed, the resync period passed, an earlier push failed); return whether
        any replica's report changed.
        """
        desired = desired_adapters(jobs, checkpoint_slots=self.checkpoint_slots)
        before = self.state.version
        for base, replica in self.replicas.items():
            wanted = tuple(desired.get(base, ()))
            if replica.tracker.wants_push(wanted, self._clock()):
                self._push(replica, wanted)
        return self.state.version != before

    def _push(self, replica: LocalReplica, wanted: tuple[AdapterRef, ...]) -> None:
        try:
            results = replica.adapters.sync(wanted)
        except ServingUnavailable as exc:  # this vLLM only: the others still sync
            log.warning("adapter sync of %s: %s", replica.base_model, exc.message)
            replica.tracker.push_failed(self._clock())
            return
        replica.tracker.pushed_ok(wanted, results, self._clock())
        for name, result in replica.tracker.new_outcomes(results):
            log.info("adapter %s on %s: %s %s", name, replica.name, result.state, result.message)
        loaded = [n for n, r in results.items() if r.state is SyncState.LOADED]
        self.state.record(replica.name, replica.base_model, results, loaded)

    def close(self) -> None:
        """Close the HTTP clients."""
        for replica in self.replicas.values():
            replica.adapters.close()
