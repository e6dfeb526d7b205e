"""Merging LoRA models into their base on the cluster, for downloads of ``format=merged``.

The API asks by annotating the FineTuneJob (``kubetune.io/merge-final`` or ``…/merge-step-N``
set to ``requested``, see :mod:`kubetune_runtime.merges`). For each model of a succeeded job
that asks and is not merged yet, the operator creates a ``batch/v1`` Job, named after the job
and the model and owned by the FineTuneJob, whose one pod runs ``python -m
kubetune_trainer.merge`` in the trainer image on the job's own ConfigMap (as local mode runs it
as a child): the trainer pods' security context, credentials and model volume, no GPU. Once the
Job ended it is deleted — a merged model is its manifest in the store, not a Job — and a failed
one's reason (recorded in the store by the merge, else the Job's condition) goes on the
annotation for the API to tell.

Pure functions build the Job and read its status; :class:`ClusterMerges` is the idempotent
reconcile both handlers call (the FineTuneJob changed; one of its merge Jobs changed).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from kubetune.finetunejob import LABEL_JOB, FineTuneJob, merge_annotation
from kubetune.settings import OperatorSettings
from kubetune.storage_layout import StorageLayout
from kubetune.trainer_config import BaseModelSource, TrainerConfig
from kubetune_operator.kube import KubeClient
from kubetune_operator.manifests import child_labels, pod_template, trainer_container
from kubetune_runtime.merges import failure_annotation, merges_waiting
from kubetune_runtime.objectstore import ObjectStore

log = logging.getLogger(__name__)

COMPONENT_LABEL: Final = "app.kubernetes.io/component"
MERGE_COMPONENT: Final = "merge"
MERGE_MODULE: Final = "kubetune_trainer.merge"
# One retry for a pod lost with its node; a merge that fails on its own fails again.
MERGE_BACKOFF_LIMIT: Final = 1
MERGE_DEADLINE_SECONDS: Final = 3600
CPU_RESOURCES: Final = frozenset({"cpu", "memory", "ephemeral-storage"})

Outcome = Literal["running", "complete", "failed"]


def merge_job_name(job_name: str, step: int | None) -> str:
    """The merge Job of one model of a job: deterministic, so a retried pass never makes two."""
    return f"{job_name}-merge-{'final' if step is None else step}"


def merge_job(
    job: FineTuneJob, settings: OperatorSettings, model: BaseModelSource, step: int | None
) -> dict[str, Any]:
    """The Job that merges the final model (``step`` None) or checkpoint ``step``'s."""
    container = trainer_container(job, settings, "merge")
    container["command"] = ["python", "-m", MERGE_MODULE]
    if step is not None:
        container["args"] = [*container["args"], "--step", str(step)]
    # Merging is arithmetic on the CPU: the pod asks for the trainer's CPU, memory and scratch,
    # none of its devices (GPUs, RDMA), which are extended resources only a trainer needs.
    requests = container["resources"]["requests"]
    container["resources"] = {"requests": {k: v for k, v in requests.items() if k in CPU_RESOURCES}}
    template = pod_template(job, settings, container, model)
    template["metadata"]["labels"][COMPONENT_LABEL] = MERGE_COMPONENT
    template["spec"]["restartPolicy"] = "Never"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": merge_job_name(job.metadata.name, step),
            "namespace": job.metadata.namespace,
            "labels": {**child_labels(job), COMPONENT_LABEL: MERGE_COMPONENT},
        },
        "spec": {
            "backoffLimit": MERGE_BACKOFF_LIMIT,
            "activeDeadlineSeconds": MERGE_DEADLINE_SECONDS,
            "template": template,
        },
    }


@dataclass(frozen=True)
class MergeJobView:
    """What a merge Job says: whose, and how it ended (if it did)."""

    name: str
    owner: str  # the FineTuneJob
    outcome: Outcome
    message: str = ""


def batch_job_outcome(body: Mapping[str, Any], what: str) -> tuple[Outcome, str]:
    """How a batch/v1 Job stands, from its ``Complete``/``Failed`` condition (its own), and
    why it failed (``what`` names it in the message).
    """
    conditions = (body.get("status") or {}).get("conditions") or []
    ended = {c.get("type"): c for c in conditions if c.get("status") == "True"}
    if "Complete" in ended:
        return "complete", ""
    if "Failed" in ended:
        failed = ended["Failed"]
        return "failed", f"{what} failed ({failed.get('reason')}: {failed.get('message', '')})"
    return "running", ""


def merge_job_view(body: Mapping[str, Any]) -> MergeJobView:
    """A merge Job's outcome from its ``Complete``/``Failed`` condition (batch/v1's own)."""
    meta = body.get("metadata") or {}
    outcome, message = batch_job_outcome(body, "the merge Job")
    labels = meta.get("labels") or {}
    return MergeJobView(str(meta.get("name")), str(labels.get(LABEL_JOB, "")), outcome, message)


@dataclass
class ClusterMerges:
    """Runs the merges the API asks for as Jobs (see the module docstring)."""

    kube: KubeClient
    store: ObjectStore
    layout: StorageLayout
    settings: OperatorSettings

    def reconcile(self, job: FineTuneJob, views: Mapping[str, MergeJobView]) -> None:
        """Create the missing merge Jobs of ``job``; delete those that ended, and report a
        failed one on the job. ``views``: its merge Jobs that exist, by name.
        """
        waiting = merges_waiting(job, self.store, self.layout)
        namespace = job.metadata.namespace or ""
        for step in waiting:
            view = views.get(merge_job_name(job.metadata.name, step))
            if view is None:
                self._create(job, step)
            elif view.outcome != "running":
                # Deleted first: a failure told while its Job is still there would be told
                # again, instead of merging again, when the API asks once more.
                self.kube.delete_batch_job(namespace, view.name)
                if view.outcome == "failed":
                    value = failure_annotation(self.store, self.layout, job, step, view.message)
                    self.kube.annotate_job(
                        namespace, job.metadata.name, {merge_annotation(step): value}
                    )
        asked = {merge_job_name(job.metadata.name, step) for step in waiting}
        for name, view in views.items():
            if view.outcome != "running" and name not in asked:
                self.kube.delete_batch_job(namespace, name)  # merged, or no longer asked for

    def _create(self, job: FineTuneJob, step: int | None) -> None:
        config = TrainerConfig.model_validate_json(
            self.store.get_bytes(self.layout.job_config_key(job.spec.org, job.metadata.name))
        )
        manifest = merge_job(job, self.settings, config.base_model, step)
        self.kube.ensure_batch_job(manifest, job.to_manifest())
        log.info("merging %s: Job %s", job.metadata.name, manifest["metadata"]["name"])
