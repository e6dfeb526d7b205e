"""The kopf handlers of merges (:mod:`kubetune_operator.merges`): thin, each a reconcile of one
FineTuneJob with its merge Jobs.

- An index of merge Jobs by the FineTuneJob that owns them (kopf keeps it from its watch).
- A FineTuneJob that asks for a merge (its annotations) is reconciled whenever it changes,
  on operator start included: its missing merge Jobs are created.
- A merge Job that ended reconciles its FineTuneJob: the Job is deleted, a failure told.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from kubetune.finetunejob import GROUP, PLURAL, VERSION, FineTuneJob, merges_requested
from kubetune_operator.context import OperatorContext
from kubetune_operator.merges import COMPONENT_LABEL, MERGE_COMPONENT, MergeJobView, merge_job_view

MERGE_JOBS: Any = {COMPONENT_LABEL: MERGE_COMPONENT}


def asks_for_a_merge(annotations: kopf.Annotations, **_: Any) -> bool:
    """Whether a FineTuneJob asks for a merge not yet tried."""
    return bool(merges_requested(dict(annotations)))


def register_merges(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Register the merge handlers in ``registry``."""

    @kopf.index("batch", "v1", "jobs", id="merge_jobs", registry=registry, labels=MERGE_JOBS)
    def merge_jobs(
        namespace: str | None, body: kopf.Body, **_: Any
    ) -> dict[tuple[str | None, str], MergeJobView]:
        """Merge Jobs by the FineTuneJob they merge a model of."""
        view = merge_job_view(body)
        return {(namespace, view.owner): view}

    @kopf.on.event(
        GROUP, VERSION, PLURAL, id="merge_models", registry=registry, when=asks_for_a_merge
    )
    async def merge_models(body: kopf.Body, namespace: str | None, **kwargs: Any) -> None:
        """Create the merge Jobs a FineTuneJob asks for (create-or-get: idempotent)."""
        job = FineTuneJob.from_manifest(dict(body))
        index: kopf.Index[tuple[str | None, str], MergeJobView] = kwargs["merge_jobs"]
        views = {v.name: v for v in index.get((namespace, job.metadata.name), [])}
        await asyncio.to_thread(ctx.merges.reconcile, job, views)

    @kopf.on.event("batch", "v1", "jobs", id="merge_ended", registry=registry, labels=MERGE_JOBS)
    async def merge_ended(body: kopf.Body, namespace: str | None, **_: Any) -> None:
        """A merge Job that ended: delete it and tell a failure on its FineTuneJob."""
        view = merge_job_view(body)
        if view.outcome == "running" or not view.owner or namespace is None:
            return
        raw = await asyncio.to_thread(ctx.kube.get_job, namespace, view.owner)
        await asyncio.to_thread(
            ctx.merges.reconcile, FineTuneJob.from_manifest(raw), {view.name: view}
        )
