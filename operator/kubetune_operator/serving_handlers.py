"""The kopf handlers of serving: thin, over :mod:`kubetune_operator.serving`.

- Two indexes: ready vLLM replicas by base model (Pods; an index needs no finalizer, so the
  vLLM pods are never patched) and the adapters to serve by base model (FineTuneJobs).
- One sync loop per operator pushes each replica its desired set. Standalone, it is a task from
  startup to cleanup; with peering, a daemon on the KopfPeering object, so kopf stops it on the
  replicas that peering pauses (a daemon per vLLM pod would put kopf's finalizer on the pods).
- One status writer per succeeded FineTuneJob (a daemon: one writer per job, and the job's
  ``supervise`` daemon has stopped at the terminal phase) records ``servedOn``,
  ``servingError`` and the ``Served`` condition, with the resourceVersion precondition.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, Final

import kopf
from pydantic import ValidationError

from kubetune.finetunejob import GROUP, PLURAL, VERSION, FineTuneJob, JobPhase
from kubetune.serving import AdapterRef, adapter_ref
from kubetune_operator.controller import OperatorContext
from kubetune_operator.kube import Conflict
from kubetune_operator.serving import (
    COMPONENT_LABEL,
    POLL_SECONDS,
    VLLM_COMPONENT,
    Replica,
    ServingState,
    plan_status,
    replica_of,
    sync_replicas,
)

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS: Final = 60.0


def is_succeeded(status: Any, **_: Any) -> bool:
    """Filter for the status writer: only a succeeded job has a model to serve."""
    return bool((status or {}).get("phase") == JobPhase.SUCCEEDED.value)


def job_adapter(body: Any) -> AdapterRef | None:
    """The adapter a FineTuneJob object wants served (None while it is being deleted)."""
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return None
    try:
        return adapter_ref(FineTuneJob.from_manifest(dict(body)))
    except ValidationError:
        return None


def register_serving(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Register the serving handlers in ``registry``."""
    serving = ctx.settings.serving
    peering = ctx.settings.operator.peering
    state = ServingState()
    ctx.metrics.adapters_loaded = state.loaded_counts
    # httpx logs every request at INFO: one line per replica per sync.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    @kopf.index(
        "",
        "v1",
        "pods",
        id="vllm_replicas",
        registry=registry,
        labels={COMPONENT_LABEL: VLLM_COMPONENT},
    )
    def vllm_replicas(body: kopf.Body, **_: Any) -> dict[str, Replica]:
        """Ready vLLM replicas by base model."""
        # {} and not None: kopf keeps an object's previous entry when its indexer returns None.
        replica = replica_of(body)
        return {replica.base_model: replica} if replica else {}

    @kopf.index(GROUP, VERSION, PLURAL, id="served_adapters", registry=registry)
    def served_adapters(body: kopf.Body, **_: Any) -> dict[str, AdapterRef]:
        """Adapters to serve by base model (a deleted model's entry is dropped: see above)."""
        ref = job_adapter(body)
        return {ref.base_model: ref} if ref else {}

    def loop(
        kwargs: dict[str, Any], stopped: Callable[[], bool], wait: Any
    ) -> Coroutine[Any, Any, None]:
        return sync_replicas(
            kwargs["vllm_replicas"],
            kwargs["served_adapters"],
            state,
            ctx.metrics,
            serving,
            stopped,
            wait,
        )

    @kopf.on.startup(id="serving_sync", registry=registry)
    async def start_sync(settings: kopf.OperatorSettings, memo: Any, **kwargs: Any) -> None:
        """Standalone: run the sync loop as a task until cleanup."""
        if not settings.peering.standalone:
            return
        stop = asyncio.Event()

        async def wait(seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)

        memo["serving_stop"] = stop
        memo["serving_task"] = asyncio.create_task(loop(kwargs, stop.is_set, wait))

    @kopf.on.cleanup(id="serving_sync_stop", registry=registry)
    async def stop_sync(memo: Any, **_: Any) -> None:
        """Stop the standalone sync loop."""
        stop, task = memo.get("serving_stop"), memo.get("serving_task")
        if stop is not None and task is not None:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)

    if peering is not None:

        @kopf.daemon(
            "kopf.dev",
            "v1",
            "kopfpeerings",
            id="serving_sync",
            registry=registry,
            when=lambda name, **_: name == peering,
            cancellation_timeout=10,
        )
        async def sync_daemon(stopped: kopf.DaemonStopped, **kwargs: Any) -> None:
            """With peering: the sync loop, on the replica that acts."""
            await loop(kwargs, lambda: bool(stopped), stopped.wait)

    @kopf.daemon(
        GROUP,
        VERSION,
        PLURAL,
        id="publish_serving",
        registry=registry,
        when=is_succeeded,
        cancellation_timeout=10,
    )
    async def publish_serving(
        body: kopf.Body,
        name: str,
        namespace: str | None,
        stopped: kopf.DaemonStopped,
        logger: kopf.Logger,
        **_: Any,
    ) -> None:
        """Keep a succeeded job's servedOn, servingError and Served condition current."""
        namespace = namespace or ctx.settings.kubernetes.namespace
        loop_time = asyncio.get_running_loop().time
        seen: tuple[Any, ...] | None = None
        not_before, failures = 0.0, 0
        while not stopped:
            key = (body.get("metadata", {}).get("resourceVersion"), state.version)
            if key != seen and loop_time() >= not_before:
                try:
                    plan = plan_status(copy.deepcopy(dict(body)), state, datetime.now(UTC))
                    if plan.patch is not None:
                        await asyncio.to_thread(
                            ctx.kube.patch_job_status,
                            namespace,
                            name,
                            plan.resource_version,
                            plan.patch,
                        )
                        for type_, reason, message in plan.events:
                            kopf.event(body, type=type_, reason=reason, message=message)
                except Conflict:
                    pass  # the newer object is on its way; recomputed from it
                except Exception:
                    ctx.metrics.reconcile_errors.labels("serving_status").inc()
                    failures += 1
                    logger.exception("Writing the serving status failed; retrying")
                    not_before = loop_time() + min(MAX_BACKOFF_SECONDS, 2.0**failures)
                else:
                    seen, failures = key, 0
            await stopped.wait(POLL_SECONDS)
