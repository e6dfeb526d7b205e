"""The PyTorchJob workload (Training Operator 1.x, ``kubeflow.org/v1``), for clusters not yet on
Kubeflow Trainer v2: one Master and ``nodes - 1`` Workers with ``restartPolicy: ExitCode``,
suspended through ``runPolicy.suspend``, read from the training-operator's conditions.

Pure functions; :class:`~kubetune_operator.workloads.ClusterRuntime` acts on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from kubetune.finetunejob import ConditionType, FineTuneJob, JobPhase
from kubetune.settings import OperatorSettings
from kubetune.trainer_config import BaseModelSource
from kubetune_operator.kube import PYTORCHJOB
from kubetune_operator.manifests import (
    KUEUE_QUEUE_LABEL,
    child_labels,
    owner_reference,
    pod_template,
    trainer_container,
    workload_name,
)
from kubetune_operator.workloads import WorkloadType
from kubetune_runtime.observed import Observed

CONTAINER_NAME: Final = "pytorch"  # the training-operator looks for this container name
METRICS_PORT_NAME: Final = "metrics"


def _replica(
    job: FineTuneJob,
    settings: OperatorSettings,
    replicas: int,
    *,
    metrics: bool,
    model: BaseModelSource | None,
) -> dict[str, Any]:
    container = trainer_container(job, settings, CONTAINER_NAME)
    port = settings.trainer_metrics_port
    if metrics and port:
        # Rank 0 (the Master) serves the trainer's metrics; the chart's PodMonitor scrapes it.
        container["ports"] = [{"name": METRICS_PORT_NAME, "containerPort": port}]
    return {
        "replicas": replicas,
        # Exit codes tell retryable (e.g. 143 after a committed SIGTERM checkpoint) from
        # permanent failures; the training-operator restarts only the former.
        "restartPolicy": "ExitCode",
        "template": pod_template(job, settings, container, model),
    }


def pytorchjob(
    job: FineTuneJob, settings: OperatorSettings, model: BaseModelSource | None = None
) -> dict[str, Any]:
    """The PyTorchJob that runs the trainer: one Master and ``nodes - 1`` Workers."""
    nodes = job.spec.resources.nodes
    labels = child_labels(job)
    if job.spec.queue:
        labels[KUEUE_QUEUE_LABEL] = job.spec.queue
    run_policy: dict[str, Any] = {
        "backoffLimit": settings.backoff_limit,
        "cleanPodPolicy": "None",
        "suspend": job.spec.suspend,
    }
    if settings.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = settings.active_deadline_seconds
    scheduling: dict[str, Any] = {}
    if settings.priority_class:
        scheduling["priorityClass"] = settings.priority_class
    if settings.scheduler_name:
        # Gang scheduling: the training-operator makes a PodGroup that needs every pod at once.
        scheduling["minAvailable"] = nodes
    if scheduling:
        run_policy["schedulingPolicy"] = scheduling
    replica_specs = {"Master": _replica(job, settings, 1, metrics=True, model=model)}
    if nodes > 1:
        replica_specs["Worker"] = _replica(job, settings, nodes - 1, metrics=False, model=model)
    if settings.scheduler_name:
        for replica in replica_specs.values():
            replica["template"]["spec"]["schedulerName"] = settings.scheduler_name
    return {
        "apiVersion": PYTORCHJOB.api_version,
        "kind": PYTORCHJOB.kind,
        "metadata": {
            "name": workload_name(job),
            "namespace": job.metadata.namespace,
            "labels": labels,
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {
            # An integer as a string: the CRD types it as string, torchrun wants a number.
            "nprocPerNode": str(max(1, job.spec.resources.gpus_per_node)),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replica_specs,
        },
    }


def observe(status: Mapping[str, Any] | None, suspend_requested: bool) -> Observed:
    """The phase a PyTorchJob's conditions imply.

    Terminal conditions win over everything; then Suspended, Running/Restarting and Created.
    A PyTorchJob with no conditions yet is queued (created, waiting for its pods).
    """
    conditions = tuple((status or {}).get("conditions") or ())
    true = {c["type"]: c for c in conditions if c.get("status") == "True"}

    def seen(phase: JobPhase, cond: Mapping[str, Any], *, restarting: bool = False) -> Observed:
        return Observed(phase, cond.get("reason"), cond.get("message"), restarting, conditions)

    for kind, phase in (
        (ConditionType.SUCCEEDED, JobPhase.SUCCEEDED),
        (ConditionType.FAILED, JobPhase.FAILED),
    ):
        if kind in true:
            return seen(phase, true[kind])
    if ConditionType.SUSPENDED in true:
        phase = JobPhase.PAUSED if suspend_requested else JobPhase.QUEUED
        return seen(phase, true[ConditionType.SUSPENDED])
    if ConditionType.RESTARTING in true:
        return seen(JobPhase.RUNNING, true[ConditionType.RESTARTING], restarting=True)
    if ConditionType.RUNNING in true:
        phase = JobPhase.PAUSING if suspend_requested else JobPhase.RUNNING
        return seen(phase, true[ConditionType.RUNNING])
    return Observed(JobPhase.QUEUED, None, None, False, conditions)


PYTORCHJOB_WORKLOAD: Final = WorkloadType(
    kind=PYTORCHJOB,
    build=pytorchjob,
    is_suspended=lambda spec: bool((spec.get("runPolicy") or {}).get("suspend", False)),
    suspend_patch=lambda suspend: {"spec": {"runPolicy": {"suspend": suspend}}},
    observe=observe,
)
