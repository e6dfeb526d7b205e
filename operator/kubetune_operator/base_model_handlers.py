"""The kopf handlers of registered base models (:mod:`kubetune_operator.base_model_checks`):
thin, each a reconcile of one BaseModel object with its check Job.

- An index of check Jobs by the BaseModel object they check (kopf keeps it from its watch).
- A BaseModel object is reconciled whenever it changes, on operator start included: a
  ``validating`` one gets its check Job; a deleted one's Job is deleted (a cluster's garbage
  collector would too; this one does not wait for it).
- A check Job that ended concludes its BaseModel object's check: the outcome written, the Job
  deleted; one deleted before it ended is made anew.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from kubetune import base_models
from kubetune.finetunejob import GROUP, VERSION
from kubetune_operator.base_model_checks import (
    CHECK_COMPONENT,
    CheckJobView,
    check_job_name,
    check_job_view,
)
from kubetune_operator.context import OperatorContext
from kubetune_operator.merges import COMPONENT_LABEL

CHECK_JOBS: Any = {COMPONENT_LABEL: CHECK_COMPONENT}


def register_base_model_checks(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Register the base-model check handlers in ``registry``."""

    @kopf.index("batch", "v1", "jobs", id="check_jobs", registry=registry, labels=CHECK_JOBS)
    def check_jobs(namespace: str | None, body: kopf.Body, **_: Any) -> dict[Any, CheckJobView]:
        """Check Jobs by the BaseModel object they check."""
        view = check_job_view(body)
        return {(namespace, view.model_object): view}

    @kopf.on.event(GROUP, VERSION, base_models.PLURAL, id="check_base_model", registry=registry)
    async def check_base_model(
        body: kopf.Body, namespace: str | None, type: str | None, **kwargs: Any
    ) -> None:
        """Create the check Job of a validating BaseModel (create-or-get: idempotent)."""
        name = body["metadata"]["name"]
        if namespace is None:
            return
        if type == "DELETED" or body["metadata"].get("deletionTimestamp"):
            await asyncio.to_thread(ctx.kube.delete_batch_job, namespace, check_job_name(name))
            return
        index: kopf.Index[tuple[str | None, str], CheckJobView] = kwargs["check_jobs"]
        views = list(index.get((namespace, name), []))
        await asyncio.to_thread(
            ctx.base_model_checks.reconcile, dict(body), next(iter(views), None)
        )

    @kopf.on.event("batch", "v1", "jobs", id="check_ended", registry=registry, labels=CHECK_JOBS)
    async def check_ended(
        body: kopf.Body, namespace: str | None, type: str | None, **_: Any
    ) -> None:
        """A check Job that ended: write its BaseModel's outcome and delete the Job. One
        deleted before it ended (by hand, or with its node's namespace) is made anew.
        """
        view = check_job_view(body)
        deleted = type == "DELETED"
        if (view.outcome == "running" and not deleted) or not view.model_object or not namespace:
            return
        obj = await asyncio.to_thread(ctx.kube.get_base_model, namespace, view.model_object)
        if obj is None:  # the model was deleted: its Job goes too
            await asyncio.to_thread(ctx.kube.delete_batch_job, namespace, view.name)
        elif deleted:
            await asyncio.to_thread(ctx.base_model_checks.reconcile, obj, None)
        else:
            await asyncio.to_thread(ctx.base_model_checks.job_ended, obj, view)
