"""Checking the base models an org registers at run time, on the cluster
(:mod:`kubetune.base_models`).

The API creates a ``BaseModel`` object, ``validating``. For each such object the operator
creates a ``batch/v1`` Job named after it and owned by it, whose one pod runs ``python -m
kubetune_trainer.inspect_model PATH`` in the trainer image, as a trainer would read the model:
the trainers' security context, service account and credentials, the model's claim mounted
read-only at its path (a ``store:`` folder is downloaded to the pod's scratch), no GPU, offline.
The pod leaves its answer in the object store (the operator reads no pod logs, as for merges);
once the Job ended the operator writes the object's status — ``ready`` with the report, or
``failed`` with the reason — then deletes the Job and the answer.

Pure functions build the Job and read its status; :class:`ClusterBaseModelChecks` holds the
idempotent reconciles the handlers call (the BaseModel changed; its check Job ended).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from kubetune.base_models import (
    BaseModelPhase,
    RegisteredBaseModel,
    from_manifest,
    inspected,
    status_of,
)
from kubetune.finetunejob import LABEL_ORG
from kubetune.settings import Settings
from kubetune.trainer_config import STORE_SCHEME
from kubetune_operator.kube import KubeClient
from kubetune_operator.manifests import MODEL_VOLUME, container_security, pod_security
from kubetune_operator.merges import COMPONENT_LABEL, Outcome, batch_job_outcome
from kubetune_runtime.objectstore import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

CHECK_COMPONENT: Final = "base-model-check"
# The BaseModel object a check Job checks (owner references are not selectable).
LABEL_BASE_MODEL_OBJECT: Final = "kubetune.io/base-model-object"
INSPECT_MODULE: Final = "kubetune_trainer.inspect_model"
# One retry for a pod lost with its node; a folder that fails its check fails it again.
CHECK_BACKOFF_LIMIT: Final = 1
CHECK_DEADLINE_SECONDS: Final = 1800
# Loading a config and a tokenizer; a store folder's weights are only downloaded, never loaded.
CHECK_MEMORY: Final = "4Gi"
CHECK_LIMITS: Final = {"memory": CHECK_MEMORY}
OFFLINE_ENV: Final = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def check_job_name(name: str) -> str:
    """The check Job of the BaseModel object ``name`` (deterministic: create-or-get)."""
    return f"{name}-check"


def check_job(
    name: str, namespace: str, model: RegisteredBaseModel, settings: Settings
) -> dict[str, Any]:
    """The Job that checks ``model`` (the BaseModel object ``name``)."""
    opts = settings.operator
    report_key = settings.object_store.layout().base_model_check_key(model.org, name)
    env = {"PYTHONUNBUFFERED": "1", "HOME": "/home/trainer", **OFFLINE_ENV}
    container: dict[str, Any] = {
        "name": "check",
        "image": opts.trainer_image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": ["python", "-m", INSPECT_MODULE],
        "args": [
            model.path,
            "--report-key",
            report_key,
            "--object-store",
            settings.object_store.model_dump_json(exclude={"local_root"}),
        ],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": {"requests": {"cpu": "1", "memory": CHECK_MEMORY}, "limits": CHECK_LIMITS},
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "scratch", "mountPath": "/tmp"},  # noqa: S108 - a mount point in the pod
            {"name": "home", "mountPath": "/home/trainer"},
        ],
    }
    if opts.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": opts.credentials_secret}}]
    volumes: list[dict[str, Any]] = [
        {"name": "scratch", "emptyDir": {"sizeLimit": opts.scratch_size}},
        {"name": "home", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    if model.volume_claim is not None and not model.path.startswith(STORE_SCHEME):
        claim = {"claimName": model.volume_claim, "readOnly": True}
        volumes.append({"name": MODEL_VOLUME, "persistentVolumeClaim": claim})
        container["volumeMounts"].append(
            {"name": MODEL_VOLUME, "mountPath": model.path, "readOnly": True}
        )
    labels = {
        LABEL_ORG: model.org,
        COMPONENT_LABEL: CHECK_COMPONENT,
        LABEL_BASE_MODEL_OBJECT: name,
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": pod_security(),
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": volumes,
    }
    if opts.service_account:
        pod["serviceAccountName"] = opts.service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": check_job_name(name), "namespace": namespace, "labels": labels},
        "spec": {
            "backoffLimit": CHECK_BACKOFF_LIMIT,
            "activeDeadlineSeconds": CHECK_DEADLINE_SECONDS,
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


@dataclass(frozen=True)
class CheckJobView:
    """What a check Job says: which BaseModel object (and which incarnation of it) it checks,
    and how it ended (if it did).
    """

    name: str
    model_object: str
    owner_uid: str
    outcome: Outcome
    message: str = ""


def check_job_view(body: Mapping[str, Any]) -> CheckJobView:
    """A check Job's view from its labels, owner and ``Complete``/``Failed`` condition."""
    meta = body.get("metadata") or {}
    refs: list[dict[str, Any]] = meta.get("ownerReferences") or []
    owner = next((r for r in refs if r.get("controller")), {})
    outcome, message = batch_job_outcome(body, "the check Job")
    return CheckJobView(
        name=str(meta.get("name")),
        model_object=str((meta.get("labels") or {}).get(LABEL_BASE_MODEL_OBJECT, "")),
        owner_uid=str(owner.get("uid", "")),
        outcome=outcome,
        message=message,
    )


@dataclass
class ClusterBaseModelChecks:
    """Checks the registered base models with Jobs (see the module docstring)."""

    kube: KubeClient
    store: ObjectStore
    settings: Settings

    def reconcile(self, obj: Mapping[str, Any], job: CheckJobView | None) -> None:
        """The BaseModel object changed: a ``validating`` one without a check Job gets one; a
        Job left by a deleted object of the same name, or by a check already told, goes.
        ``job``: its check Job, if one exists.
        """
        meta = obj["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        model = from_manifest(obj)
        if job is not None and (
            job.owner_uid != meta.get("uid") or model.phase is not BaseModelPhase.VALIDATING
        ):
            self.kube.delete_batch_job(namespace, job.name)
        elif job is None and model.phase is BaseModelPhase.VALIDATING:
            self.kube.ensure_batch_job(check_job(name, namespace, model, self.settings), dict(obj))
            log.info("checking base model %s of %s: Job %s", model.id, model.org, name)

    def job_ended(self, obj: Mapping[str, Any], job: CheckJobView) -> None:
        """The check Job ended: write the outcome, then delete the Job and its answer. Only
        this handler concludes (kopf runs one handler at a time per Job), so two passes never
        read the answer one of them already deleted.
        """
        meta = obj["metadata"]
        model = from_manifest(obj)
        if job.owner_uid != meta.get("uid") or model.phase is not BaseModelPhase.VALIDATING:
            self.kube.delete_batch_job(meta["namespace"], job.name)
        else:
            self._conclude(meta["name"], meta["namespace"], model, job)

    def _conclude(
        self, name: str, namespace: str, model: RegisteredBaseModel, job: CheckJobView
    ) -> None:
        key = self.settings.object_store.layout().base_model_check_key(model.org, name)
        try:
            answer = self.store.get_json(key)
        except (ObjectNotFound, ValueError):
            answer = None
        outcome = inspected(model, answer, None if answer is not None else 1)
        if answer is None and job.message:
            outcome = outcome.model_copy(update={"message": job.message})
        if outcome.phase is BaseModelPhase.VALIDATING:  # inspected: ready as far as we check
            outcome = outcome.model_copy(update={"phase": BaseModelPhase.READY})
        status = status_of(outcome, checked_at=datetime.now(UTC)).to_wire()
        self.kube.patch_base_model_status(namespace, name, status)
        self.kube.delete_batch_job(namespace, job.name)
        self.store.delete(key)
        log.info(
            "base model %s of %s: %s %s", model.id, model.org, outcome.phase, outcome.message or ""
        )
