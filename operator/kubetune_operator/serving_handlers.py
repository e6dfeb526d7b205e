"""The kopf handlers of serving: thin, over :mod:`kubetune_operator.serving` and the job driver.

- Two indexes: ready vLLM replicas by base model (Pods; an index needs no finalizer, so the
  vLLM pods are never patched) and the adapters to serve by base model (FineTuneJobs).
- One sync loop per operator pushes each replica its desired set, where this operator acts
  (:func:`~kubetune_operator.loops.on_active_peer`; a daemon per vLLM pod would put kopf's
  finalizer on the pods).
- One status writer per succeeded FineTuneJob (a daemon: one writer per job, and the job's
  ``supervise`` daemon has stopped at the terminal phase) runs the driver's serving pass:
  ``servedOn``, ``servingError`` and the ``Served`` condition, whenever the job or what the
  replicas reported changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Callable
from typing import Any

import kopf
from pydantic import ValidationError

from kubetune.finetunejob import GROUP, PLURAL, VERSION, FineTuneJob, JobPhase
from kubetune_operator.context import OperatorContext
from kubetune_operator.loops import ChangePoller, Wait, failure_logger, on_active_peer
from kubetune_operator.serving import (
    COMPONENT_LABEL,
    VLLM_COMPONENT,
    Replica,
    replica_of,
    sync_replicas,
)
from kubetune_runtime.adapters import JobAdapters, job_adapters
from kubetune_runtime.driver import StatusConflict

log = logging.getLogger(__name__)


def is_succeeded(status: Any, **_: Any) -> bool:
    """Filter for the status writer: only a succeeded job has a model to serve."""
    return bool((status or {}).get("phase") == JobPhase.SUCCEEDED.value)


def body_adapters(body: Any) -> JobAdapters:
    """The adapters a FineTuneJob object wants served (none while it is being deleted)."""
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return JobAdapters()
    try:
        return job_adapters(FineTuneJob.from_manifest(dict(body)))
    except ValidationError:
        return JobAdapters()


def register_serving(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Register the serving handlers in ``registry``."""
    ctx.metrics.adapters_loaded = ctx.serving.loaded_counts
    # httpx logs every request at INFO: one line per replica per sync.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    _register_indexes(registry)

    async def sync(stopped: Callable[[], bool], wait: Wait, kwargs: dict[str, Any]) -> None:
        await sync_replicas(
            kwargs["vllm_replicas"],
            kwargs["served_adapters"],
            ctx.serving,
            ctx.metrics,
            ctx.settings.serving,
            stopped,
            wait,
        )

    on_active_peer(
        registry,
        id="serving_sync",
        peering=ctx.settings.operator.peering,
        loop=sync,
        stop_timeout=10,
    )
    _register_status_writer(registry, ctx)


def _register_indexes(registry: kopf.OperatorRegistry) -> None:
    """The ready vLLM replicas and the adapters to serve, each by base model."""

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
    def served_adapters(body: kopf.Body, **_: Any) -> dict[str, JobAdapters]:
        """Adapters to serve by base model (a deleted model's entry is dropped: see above)."""
        offered = body_adapters(body)
        return {offered.base_model: offered} if offered.base_model else {}


def _register_status_writer(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """The serving-status writer of each succeeded job."""

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
        body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any
    ) -> None:
        """Keep a succeeded job's servedOn, servingError and Served condition current."""

        def key() -> tuple[Any, ...]:
            return body.get("metadata", {}).get("resourceVersion"), ctx.serving.version

        async def one_pass() -> bool:
            job = FineTuneJob.from_manifest(copy.deepcopy(dict(body)))
            # A conflict: the newer object is on its way, and recomputed from.
            with contextlib.suppress(StatusConflict):
                await asyncio.to_thread(ctx.driver.serving_pass, job)
            return False

        poller = ChangePoller(
            None, failure_logger(ctx.metrics.reconcile_errors, "serving_status", logger)
        )
        await poller.run(key, one_pass, lambda: bool(stopped))
