"""Local mode's vLLM, driven the way the operator drives a cluster's: with
:class:`kubetune.serving.ReplicaAdapters`, from the same desired set of adapters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Final

from kubetune.finetunejob import ErrorKind, FineTuneJob, JobError
from kubetune.serving import (
    AdapterRef,
    AdapterRejected,
    ReplicaAdapters,
    ServingUnavailable,
    SyncResult,
    SyncState,
    desired_adapters,
    rejection_error,
)

log = logging.getLogger(__name__)

RESYNC_SECONDS: Final = 30.0


class LocalServing:
    """One vLLM per base model (``replicas``: base model id → its :class:`ReplicaAdapters`)."""

    def __init__(self, replicas: Mapping[str, ReplicaAdapters], *, name: str = "local") -> None:
        self.replicas = dict(replicas)
        self.name = name
        self._synced: tuple[tuple[str, tuple[AdapterRef, ...]], ...] | None = None
        self._synced_at = 0.0

    def load(self, job: FineTuneJob, model: str) -> tuple[list[str], JobError | None]:
        """Serve the adapter of ``job`` (which just succeeded as ``model``).

        Returns where it is served and, when it cannot be, why (the job still succeeded).
        """
        replica = self.replicas.get(job.spec.model)
        if replica is None or not job.spec.serving.register_adapter:
            return [], None
        ref = AdapterRef(
            name=model, org=job.spec.org, job_id=job.metadata.name, base_model=job.spec.model
        )
        try:
            replica.ensure_loaded(ref)
        except AdapterRejected as exc:
            return [], rejection_error(exc.code, exc.message)
        except ServingUnavailable as exc:
            # The next sync retries; the model answers 503 until then.
            log.warning("%s: %s", job.metadata.name, exc.message)
            return [], JobError(code=exc.code, message=exc.message, kind=ErrorKind.INFRASTRUCTURE)
        return [self.name], None

    def sync(
        self, jobs: Iterable[FineTuneJob], *, force: bool = False
    ) -> dict[str, SyncResult] | None:
        """Make every vLLM serve exactly the adapters of succeeded, undeleted jobs; return
        where each adapter stands (by model name), or None when nothing was due.

        Runs when that set changed (a model was deleted), when forced (start-up catch-up) and
        every RESYNC_SECONDS (a vLLM that restarted on its own).
        """
        desired = desired_adapters(jobs)
        key = tuple(sorted((base, tuple(refs)) for base, refs in desired.items()))
        due = time.monotonic() - self._synced_at > RESYNC_SECONDS
        if not force and not due and key == self._synced:
            return None
        states: dict[str, SyncResult] = {}
        for base, replica in self.replicas.items():
            try:
                results = replica.sync(desired.get(base, []))
            except ServingUnavailable as exc:  # this vLLM only: the others still sync
                log.warning("adapter sync of %s: %s", base, exc.message)
                continue
            for name, result in results.items():
                states[name] = result
                if result.changed or result.message:
                    log.info("adapter %s on %s: %s %s", name, base, result.state, result.message)
        self._synced, self._synced_at = key, time.monotonic()
        return states

    def status_update(self, job: FineTuneJob, result: SyncResult | None) -> dict[str, object]:
        """The ``servedOn``/``servingError`` change a sync result makes to a succeeded job
        (empty when it makes none): a load that failed only because vLLM was away clears its
        error once the adapter is loaded.
        """
        status = job.status
        if status is None or result is None:
            return {}
        update: dict[str, object] = {}
        if result.state is SyncState.LOADED:
            if status.served_on != [self.name]:
                update["served_on"] = [self.name]
            if status.serving_error is not None and status.serving_error.kind is not ErrorKind.USER:
                update["serving_error"] = None
        elif result.state is SyncState.UNLOADED and status.served_on:
            update["served_on"] = []
        return update

    def close(self) -> None:
        """Close the HTTP clients."""
        for replica in self.replicas.values():
            replica.close()
