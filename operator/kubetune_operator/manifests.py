"""Pure functions that build the objects the operator owns for a FineTuneJob.

Every child has a deterministic name derived from the job, and an owner reference to it, so a
handler that runs twice finds (adopts) what the first run created instead of making another,
and deleting the job garbage-collects its children.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from kubetune.finetunejob import API_VERSION, KIND, LABEL_JOB, LABEL_ORG, FineTuneJob
from kubetune.settings import HardwareProfile, OperatorSettings
from kubetune.trainer_config import BaseModelSource

CONFIG_FILE: Final = "config.json"
CONFIG_MOUNT: Final = "/etc/kubetune"
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
TRAINER_UID: Final = 10001  # the trainer image's non-root user
MODEL_VOLUME: Final = "base-model"
# The patchMergeKey of the pod template's keyed lists (k8s.io/api/core/v1).
MERGE_KEYS: Final = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def workload_name_of(job_name: str) -> str:
    """The workload (TrainJob, PyTorchJob) of a FineTuneJob has the job's own name (ids are DNS
    labels).
    """
    return job_name


def configmap_name_of(job_name: str) -> str:
    """Name of the ConfigMap holding the resolved trainer config of the job ``job_name``."""
    return f"{job_name}-config"


def workload_name(job: FineTuneJob) -> str:
    """The name of ``job``'s workload."""
    return workload_name_of(job.metadata.name)


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


def node_selector(job: FineTuneJob, settings: OperatorSettings) -> dict[str, str]:
    """The settings' node selector, and the node label of the job's GPU type."""
    selector = dict(settings.node_selector)
    if job.spec.resources.gpu_type:
        selector[settings.gpu_type_label] = job.spec.resources.gpu_type
    return selector


def profile_of(job: FineTuneJob, settings: OperatorSettings) -> HardwareProfile | None:
    """The hardware profile the job selected (the API refused unknown names)."""
    name = job.spec.resources.profile
    profile = settings.hardware_profile(name)
    if name is not None and profile is None:
        raise ValueError(f"hardware profile {name!r} is not configured")
    return profile


def resources(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """A trainer pod's resources: CPU, memory and scratch requests, the GPUs as limits, and
    its hardware profile's devices (RDMA, EFA) as both.
    """
    requests: dict[str, str] = {
        "cpu": settings.cpu_request,
        "memory": settings.memory_request,
        "ephemeral-storage": settings.scratch_size,
    }
    limits: dict[str, str] = {}
    gpus = job.spec.resources.gpus_per_node
    if gpus:
        # Extended resources must be given as limits; requests default to them.
        limits[settings.gpu_resource] = str(gpus)
    profile = profile_of(job, settings)
    if profile is not None:
        requests.update(profile.resources)
        limits.update(profile.resources)
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}


def tolerations(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The settings' tolerations, then the hardware profile's."""
    profile = profile_of(job, settings)
    added = profile.tolerations if profile is not None else []
    return [t.model_dump(exclude_none=True) for t in [*settings.tolerations, *added]]


def profile_overlay(profile: HardwareProfile, container: str) -> dict[str, Any]:
    """What a hardware profile adds to a trainer pod template, as a patch of its metadata and
    of the fields of its spec a Trainer v2 runtime patch may set (``runtimeClassName`` and the
    resources are placed by each workload: it differs between them). Lists merge by name.
    """
    spec: dict[str, Any] = {}
    if profile.node_selector:
        spec["nodeSelector"] = dict(profile.node_selector)
    if profile.affinity is not None:
        spec["affinity"] = dict(profile.affinity)
    if profile.volumes:
        spec["volumes"] = [dict(v) for v in profile.volumes]
    trainer: dict[str, Any] = {"name": container}
    if profile.env:
        trainer["env"] = [{"name": k, "value": v} for k, v in profile.env.items()]
    if profile.volume_mounts:
        trainer["volumeMounts"] = [dict(m) for m in profile.volume_mounts]
    if profile.capabilities:
        trainer["securityContext"] = {"capabilities": {"add": list(profile.capabilities)}}
    spec["containers"] = [trainer]
    metadata: dict[str, Any] = {}
    if profile.labels:
        metadata["labels"] = dict(profile.labels)
    if profile.annotations:
        metadata["annotations"] = dict(profile.annotations)
    return {"metadata": metadata, "spec": spec}


def overlay(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` merged as a strategic merge patch merges a pod template:
    mappings recursively, lists of keyed items by their merge key (containers, env and volumes
    by name, volume mounts by mount path), other lists replaced.
    """
    result = dict(base)
    for key, value in patch.items():
        current = result.get(key)
        merge_key = MERGE_KEYS.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            result[key] = overlay(current, value)
        elif merge_key and isinstance(current, list) and isinstance(value, list):
            merged = {item[merge_key]: item for item in current}
            for item in value:
                name = item[merge_key]
                merged[name] = overlay(merged[name], item) if name in merged else item
            result[key] = list(merged.values())
        else:
            result[key] = value
    return result


def container_security() -> dict[str, Any]:
    """A trainer-image container's security context (restricted Pod Security)."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security() -> dict[str, Any]:
    """A trainer-image pod's security context: the image's non-root user."""
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "fsGroup": TRAINER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def trainer_container(job: FineTuneJob, settings: OperatorSettings, name: str) -> dict[str, Any]:
    """The trainer container of a workload's pods (``name``: what its controller looks for)."""
    container: dict[str, Any] = {
        "name": name,
        "image": settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}"],
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "KUBETUNE_JOB_ID", "value": job.metadata.name},
            {"name": "HOME", "value": "/home/trainer"},
        ],
        "resources": resources(job, settings),
        "securityContext": container_security(),
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


def model_volume(model: BaseModelSource | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The base model's claim as a pod volume and the trainer's mount of it: read-only at the
    model's folder, or read-write at the download cache (None: the model has no claim).
    """
    if model is None or model.volume_claim is None:
        return None
    where = model.path if model.path is not None else model.cache_dir
    assert where is not None  # the trainer config's validator: a claim has a place
    read_only = model.path is not None
    volume = {
        "name": MODEL_VOLUME,
        "persistentVolumeClaim": {"claimName": model.volume_claim, "readOnly": read_only},
    }
    return volume, {"name": MODEL_VOLUME, "mountPath": where, "readOnly": read_only}


def pod_template(
    job: FineTuneJob,
    settings: OperatorSettings,
    container: dict[str, Any],
    model: BaseModelSource | None = None,
) -> dict[str, Any]:
    """The pod every replica runs: restricted Pod Security, config mounted read-only, the base
    model's volume if it has one.
    """
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": configmap_name(job)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
            {"name": "scratch", "emptyDir": {"sizeLimit": settings.scratch_size}},
            {"name": "home", "emptyDir": {"sizeLimit": "1Gi"}},
        ],
    }
    weights = model_volume(model)
    if weights is not None:
        spec["volumes"].append(weights[0])
        container["volumeMounts"].append(weights[1])
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    selector = node_selector(job, settings)
    if selector:
        spec["nodeSelector"] = selector
    if settings.priority_class:
        spec["priorityClassName"] = settings.priority_class
    template = {"metadata": {"labels": child_labels(job)}, "spec": spec}
    profile = profile_of(job, settings)
    if profile is not None:
        template = overlay(template, profile_overlay(profile, container["name"]))
        if profile.runtime_class_name:
            spec = template["spec"]
            spec["runtimeClassName"] = profile.runtime_class_name
    if tolerations(job, settings):
        template["spec"]["tolerations"] = tolerations(job, settings)
    return template
