"""The TrainJob workload (Kubeflow Trainer v2, ``trainer.kubeflow.org/v1alpha1``, on JobSet).

A TrainJob references the ClusterTrainingRuntime the chart ships (``settings.training_runtime``:
pod security, volumes, the metrics port, the failure policy, gang scheduling) and adds what is
the job's own: the trainer image and arguments, nodes, processes per node and resources through
``spec.trainer``, and, through a runtime patch of its own manager, the ConfigMap with the
trainer config and the job's labels. Trainer v2 merges the two into a JobSet whose ``node``
replicated job runs one pod per node with ``PET_*`` set for torchrun.

Suspended through ``spec.suspend``; read from the TrainJob's conditions (``Suspended``,
``Complete``, ``Failed``) and its ``jobsStatus``. Pure functions;
:class:`~kubetune_operator.workloads.ClusterRuntime` acts on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from kubetune.finetunejob import ConditionType, FineTuneJob, JobPhase
from kubetune.settings import OperatorSettings
from kubetune.trainer_config import BaseModelSource
from kubetune_operator.kube import TRAINJOB
from kubetune_operator.manifests import (
    CONFIG_FILE,
    CONFIG_MOUNT,
    KUEUE_QUEUE_LABEL,
    child_labels,
    configmap_name,
    model_volume,
    node_selector,
    overlay,
    owner_reference,
    profile_of,
    profile_overlay,
    resources,
    tolerations,
    workload_name,
)
from kubetune_operator.workloads import WorkloadType
from kubetune_runtime.observed import Observed

NODE: Final = "node"  # the replicated job and trainer container of Trainer v2's torch runtimes
PATCH_MANAGER: Final = "kubetune.io/operator"
RUNTIME_KIND: Final = "ClusterTrainingRuntime"
# Trainer v2's condition types, and the training controller's names they are mirrored under.
COMPLETE: Final = "Complete"
MIRRORED_AS: Final = {COMPLETE: ConditionType.SUCCEEDED.value}


def _pod_patch(
    job: FineTuneJob, settings: OperatorSettings, model: BaseModelSource | None
) -> dict[str, Any]:
    """What the job adds to the runtime's pod template: its config, its labels, its GPU type,
    its base model's volume and its hardware profile.
    """
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": configmap_name(job)}}]
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}]
    weights = model_volume(model)
    if weights is not None:
        volumes.append(weights[0])
        mounts.append(weights[1])
    spec: dict[str, Any] = {
        "volumes": volumes,
        "containers": [{"name": NODE, "volumeMounts": mounts}],
    }
    selector = node_selector(job, settings)
    if selector:
        spec["nodeSelector"] = selector
    patch = {"metadata": {"labels": child_labels(job)}, "spec": spec}
    profile = profile_of(job, settings)
    if profile is not None:
        patch = overlay(patch, profile_overlay(profile, NODE))
        if profile.tolerations:
            # A patched list replaces the runtime's: the settings' tolerations come along.
            patch["spec"]["tolerations"] = tolerations(job, settings)
    return patch


def training_runtime(job: FineTuneJob, settings: OperatorSettings) -> str:
    """The ClusterTrainingRuntime of the job: the chart's, or the one the chart renders for a
    hardware profile with a runtime class (``<runtime>-<profile>``; a runtime patch cannot set
    ``runtimeClassName``).
    """
    profile = profile_of(job, settings)
    if profile is not None and profile.runtime_class_name:
        return f"{settings.training_runtime}-{profile.name}"
    return settings.training_runtime


def trainjob(
    job: FineTuneJob, settings: OperatorSettings, model: BaseModelSource | None = None
) -> dict[str, Any]:
    """The TrainJob that runs the trainer on ``nodes`` pods of one process per GPU."""
    labels = child_labels(job)
    if job.spec.queue:
        labels[KUEUE_QUEUE_LABEL] = job.spec.queue
    patch = {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": NODE,
                            "template": {"spec": {"template": _pod_patch(job, settings, model)}},
                        }
                    ]
                }
            }
        },
    }
    spec: dict[str, Any] = {
        "runtimeRef": {
            "apiGroup": TRAINJOB.group,
            "kind": RUNTIME_KIND,
            "name": training_runtime(job, settings),
        },
        "suspend": job.spec.suspend,
        "trainer": {
            "image": settings.trainer_image,
            "args": ["--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}"],
            "numNodes": job.spec.resources.nodes,
            "numProcPerNode": max(1, job.spec.resources.gpus_per_node),
            "resourcesPerNode": resources(job, settings),
            "env": [{"name": "KUBETUNE_JOB_ID", "value": job.metadata.name}],
        },
        "runtimePatches": [patch],
    }
    if settings.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = settings.active_deadline_seconds
    return {
        "apiVersion": TRAINJOB.api_version,
        "kind": TRAINJOB.kind,
        "metadata": {
            "name": workload_name(job),
            "namespace": job.metadata.namespace,
            "labels": labels,
            "ownerReferences": [owner_reference(job)],
        },
        "spec": spec,
    }


def _ready(status: Mapping[str, Any]) -> bool:
    """Whether the trainer's pods are all up (the ``node`` job counts as ready)."""
    for job in status.get("jobsStatus") or []:
        if job.get("name") == NODE:
            return int(job.get("ready") or 0) > 0
    return False


def observe(status: Mapping[str, Any] | None, suspend_requested: bool) -> Observed:
    """The phase a TrainJob's status implies.

    Complete and Failed win over everything; then Suspended; then the ``node`` job being ready
    means running. Anything else is queued: created, waiting for its JobSet, for admission, or
    for its pods. Its conditions are handed on under the training controller's names
    (``Complete`` as ``Succeeded``), to be mirrored into the FineTuneJob.
    """
    status = status or {}
    conditions = tuple(
        {**c, "type": MIRRORED_AS.get(c["type"], c["type"])} for c in status.get("conditions") or ()
    )
    true = {c["type"]: c for c in conditions if c.get("status") == "True"}

    def seen(phase: JobPhase, cond: Mapping[str, Any] | None) -> Observed:
        cond = cond or {}
        return Observed(phase, cond.get("reason"), cond.get("message"), False, conditions)

    if ConditionType.SUCCEEDED in true:
        return seen(JobPhase.SUCCEEDED, true[ConditionType.SUCCEEDED])
    if ConditionType.FAILED in true:
        return seen(JobPhase.FAILED, true[ConditionType.FAILED])
    if ConditionType.SUSPENDED in true:
        phase = JobPhase.PAUSED if suspend_requested else JobPhase.QUEUED
        return seen(phase, true[ConditionType.SUSPENDED])
    if _ready(status):
        return seen(JobPhase.PAUSING if suspend_requested else JobPhase.RUNNING, None)
    return seen(JobPhase.QUEUED, None)


TRAINJOB_WORKLOAD: Final = WorkloadType(
    kind=TRAINJOB,
    build=trainjob,
    is_suspended=lambda spec: bool(spec.get("suspend", False)),
    suspend_patch=lambda suspend: {"spec": {"suspend": suspend}},
    observe=observe,
)
