"""Pure functions that build the objects the operator owns for a FineTuneJob.

Every child has a deterministic name derived from the job, and an owner reference to it, so a
handler that runs twice finds (adopts) what the first run created instead of making another,
and deleting the job garbage-collects its children.
"""

from __future__ import annotations

from typing import Any, Final

from kubetune.finetunejob import API_VERSION, KIND, LABEL_JOB, LABEL_ORG, FineTuneJob
from kubetune.settings import OperatorSettings

PYTORCHJOB_API_VERSION: Final = "kubeflow.org/v1"
PYTORCHJOB_KIND: Final = "PyTorchJob"
CONTAINER_NAME: Final = "pytorch"  # the training-operator looks for this container name
CONFIG_FILE: Final = "config.json"
CONFIG_MOUNT: Final = "/etc/kubetune"
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
TRAINER_UID: Final = 10001  # the trainer image's non-root user


def pytorchjob_name_of(job_name: str) -> str:
    """The PyTorchJob of a FineTuneJob has the job's own name (ids are DNS labels)."""
    return job_name


def configmap_name_of(job_name: str) -> str:
    """Name of the ConfigMap holding the resolved trainer config of the job ``job_name``."""
    return f"{job_name}-config"


def pytorchjob_name(job: FineTuneJob) -> str:
    """The name of ``job``'s PyTorchJob."""
    return pytorchjob_name_of(job.metadata.name)


def configmap_name(job: FineTuneJob) -> str:
    """The name of ``job``'s ConfigMap."""
    return configmap_name_of(job.metadata.name)


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    """Owner reference making the FineTuneJob the controller of a child."""
    if not job.metadata.uid:
        raise ValueError("a FineTuneJob read from the apiserver has a uid")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_labels(job: FineTuneJob) -> dict[str, str]:
    """Labels every child carries, to find them without listing everything."""
    return {
        LABEL_JOB: job.metadata.name,
        LABEL_ORG: job.spec.org,
        "app.kubernetes.io/managed-by": "kubetune-operator",
    }


def config_map(job: FineTuneJob, config_json: str) -> dict[str, Any]:
    """The ConfigMap the trainer reads its resolved config from."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(job),
            "namespace": job.metadata.namespace,
            "labels": child_labels(job),
            "ownerReferences": [owner_reference(job)],
        },
        "data": {CONFIG_FILE: config_json},
    }


def _node_selector(job: FineTuneJob, settings: OperatorSettings) -> dict[str, str]:
    selector = dict(settings.node_selector)
    if job.spec.resources.gpu_type:
        selector[settings.gpu_type_label] = job.spec.resources.gpu_type
    return selector


def _resources(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    requests: dict[str, str] = {"cpu": settings.cpu_request, "memory": settings.memory_request}
    limits: dict[str, str] = {}
    gpus = job.spec.resources.gpus_per_node
    if gpus:
        # Extended resources must be given as limits; requests default to them.
        limits[settings.gpu_resource] = str(gpus)
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}


def _container(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}"],
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "KUBETUNE_JOB_ID", "value": job.metadata.name},
            {"name": "HOME", "value": "/home/trainer"},
        ],
        "resources": _resources(job, settings),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108 - a mount point in the pod
            {"name": "scratch", "mountPath": "/tmp"},  # noqa: S108 - a mount point in the pod
            {"name": "home", "mountPath": "/home/trainer"},
        ],
    }
    if settings.credentials_secret:
        # Credentials reach the trainer from a Secret, never through the FineTuneJob.
        container["envFrom"] = [{"secretRef": {"name": settings.credentials_secret}}]
    return container


def pod_template(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """The pod every replica runs: restricted Pod Security, config mounted read-only."""
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(job, settings)],
        "volumes": [
            {"name": "config", "configMap": {"name": configmap_name(job)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "home", "emptyDir": {}},
        ],
    }
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    selector = _node_selector(job, settings)
    if selector:
        spec["nodeSelector"] = selector
    if settings.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in settings.tolerations]
    if settings.priority_class:
        spec["priorityClassName"] = settings.priority_class
    return {"metadata": {"labels": child_labels(job)}, "spec": spec}


def _replica(job: FineTuneJob, settings: OperatorSettings, replicas: int) -> dict[str, Any]:
    return {
        "replicas": replicas,
        # Exit codes tell retryable (e.g. 143 after a committed SIGTERM checkpoint) from
        # permanent failures; the training-operator restarts only the former.
        "restartPolicy": "ExitCode",
        "template": pod_template(job, settings),
    }


def pytorchjob(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
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
    if settings.priority_class:
        run_policy["schedulingPolicy"] = {"priorityClass": settings.priority_class}
    replica_specs = {"Master": _replica(job, settings, 1)}
    if nodes > 1:
        replica_specs["Worker"] = _replica(job, settings, nodes - 1)
    return {
        "apiVersion": PYTORCHJOB_API_VERSION,
        "kind": PYTORCHJOB_KIND,
        "metadata": {
            "name": pytorchjob_name(job),
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
