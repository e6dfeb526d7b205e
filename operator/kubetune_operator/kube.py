"""The operator's Kubernetes calls (blocking; the handlers run them in worker threads).

Children are created or adopted, never duplicated: their names are deterministic, so a create
that answers 409 means the child exists already — made by an earlier run of the same handler
(the operator died before recording it) or left without an owner — and it is taken over
instead of created again. A child that belongs to another owner (the previous FineTuneJob of
the same name, still being garbage-collected) is waited for, never touched.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast

import kopf

from kubetune import base_models
from kubetune.finetunejob import GROUP, LABEL_ORG, PLURAL, VERSION, FineTuneJob
from kubetune_runtime.driver import StatusConflict

GC_WAIT_SECONDS: Final = 10.0
API_RETRY_SECONDS: Final = 5.0


class Conflict(StatusConflict):
    """The object changed since it was read (optimistic concurrency)."""


@dataclass(frozen=True)
class Kind:
    """A custom resource kind the operator creates (a job's workload)."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        """``group/version``."""
        return f"{self.group}/{self.version}"

    def args(self, namespace: str) -> tuple[str, str, str, str]:
        """The leading arguments of ``CustomObjectsApi``'s namespaced calls."""
        return self.group, self.version, namespace, self.plural


PYTORCHJOB: Final = Kind("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")
TRAINJOB: Final = Kind("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")


def _status_of(exc: Exception) -> int | None:
    status = getattr(exc, "status", None)
    return int(status) if status is not None else None


def _retry_on_server_errors(exc: Exception, what: str) -> None:
    """Turn apiserver unavailability into kopf's TemporaryError (retried after a delay)."""
    from urllib3.exceptions import HTTPError

    status = _status_of(exc)
    if isinstance(exc, HTTPError) or (status is not None and (status >= 500 or status == 429)):
        raise kopf.TemporaryError(f"{what}: {exc}", delay=API_RETRY_SECONDS) from exc


@dataclass
class KubeClient:
    """Thin wrapper over the kubernetes client for the objects the operator touches."""

    api_client: Any

    def __post_init__(self) -> None:
        from kubernetes import client

        self.custom: Any = client.CustomObjectsApi(self.api_client)
        self.core: Any = client.CoreV1Api(self.api_client)
        self.batch: Any = client.BatchV1Api(self.api_client)

    # -- FineTuneJobs ------------------------------------------------------------------------
    def patch_job_status(
        self, namespace: str, name: str, resource_version: str | None, status: dict[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch a FineTuneJob's status, only if it is still at ``resource_version``.

        A merge patch that carries ``metadata.resourceVersion`` is a precondition: the apiserver
        refuses it (409, raised as :class:`Conflict`) when the object changed. A status computed
        from a stale view is thus never written; the next pass recomputes it from the fresh one.
        """
        from kubernetes.client.exceptions import ApiException

        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            result: dict[str, Any] = self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, body
            )
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(f"{name} changed since it was read") from exc
            _retry_on_server_errors(exc, f"patching the status of {name}")
            raise
        return result

    def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        """One FineTuneJob."""
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
        return result

    def annotate_job(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        """Merge ``annotations`` into a FineTuneJob's metadata (a job gone is fine)."""
        from kubernetes.client.exceptions import ApiException

        body = {"metadata": {"annotations": annotations}}
        try:
            self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, body
            )
        except ApiException as exc:
            if exc.status == 404:
                return
            _retry_on_server_errors(exc, f"annotating {name}")
            raise

    def list_jobs(self, namespace: str) -> list[dict[str, Any]]:
        """Every FineTuneJob in ``namespace`` (one LIST; for sweeps at startup)."""
        result = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        return list(result.get("items") or [])

    # -- registered base models (BaseModel objects) ------------------------------------------
    def list_base_models(self, namespace: str, org: str) -> list[dict[str, Any]]:
        """The org's BaseModel objects (by label; the caller checks ``spec.org``)."""
        result = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, base_models.PLURAL, label_selector=f"{LABEL_ORG}={org}"
        )
        return list(result.get("items") or [])

    def get_base_model(self, namespace: str, name: str) -> dict[str, Any] | None:
        """One BaseModel object, or None when it is gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            result: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, base_models.PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            _retry_on_server_errors(exc, f"reading BaseModel {name}")
            raise
        return result

    def patch_base_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Write a BaseModel object's status (gone is fine: it was deleted meanwhile)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, base_models.PLURAL, name, {"status": status}
            )
        except ApiException as exc:
            if exc.status == 404:
                return
            _retry_on_server_errors(exc, f"writing the status of BaseModel {name}")
            raise

    # -- children ----------------------------------------------------------------------------
    def _ensure(
        self,
        manifest: dict[str, Any],
        owner: dict[str, Any],
        *,
        create: Any,
        read: Any,
        patch: Any,
    ) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        child = copy.deepcopy(manifest)
        # kopf's own adoption: owner reference, namespace and labels from the FineTuneJob.
        kopf.adopt(child, owner=kopf.Body(cast(kopf.RawBody, owner)))
        kind, name = child["kind"], child["metadata"]["name"]
        try:
            return self._to_dict(create(child))
        except ApiException as exc:
            if exc.status != 409:
                _retry_on_server_errors(exc, f"creating {kind} {name}")
                raise
        existing = self._to_dict(read(name))
        meta = existing.get("metadata", {})
        if meta.get("deletionTimestamp"):
            raise kopf.TemporaryError(
                f"{kind} {name} is being deleted; waiting to create it anew", delay=GC_WAIT_SECONDS
            )
        refs = meta.get("ownerReferences") or []
        controller = next((r for r in refs if r.get("controller")), None)
        owner_uid = owner["metadata"]["uid"]
        if controller is None:
            # An orphan of ours (labels match by name) or left behind: take it over.
            adopted = copy.deepcopy(existing)
            kopf.append_owner_reference(adopted, owner=kopf.Body(cast(kopf.RawBody, owner)))
            refs = adopted["metadata"]["ownerReferences"]
            return self._to_dict(patch(name, {"metadata": {"ownerReferences": refs}}))
        if controller.get("uid") != owner_uid:
            raise kopf.TemporaryError(
                f"{kind} {name} belongs to another {controller.get('kind')} "
                f"(uid {controller.get('uid')}); waiting for it to be garbage-collected",
                delay=GC_WAIT_SECONDS,
            )
        return existing

    @staticmethod
    def _to_dict(obj: Any) -> dict[str, Any]:
        """The object as the apiserver sent it (camelCase), whichever client call returned it."""
        if isinstance(obj, dict):
            return obj
        # Core API calls are made with _preload_content=False: a raw urllib3 response.
        result: dict[str, Any] = json.loads(obj.data)
        return result

    def ensure_configmap(self, manifest: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
        """Create the trainer's ConfigMap, or adopt the existing one (its data is kept)."""
        namespace = manifest["metadata"]["namespace"]
        return self._ensure(
            manifest,
            owner,
            create=lambda body: self.core.create_namespaced_config_map(
                namespace, body, _preload_content=False
            ),
            read=lambda name: self.core.read_namespaced_config_map(
                name, namespace, _preload_content=False
            ),
            patch=lambda name, body: self.core.patch_namespaced_config_map(
                name, namespace, body, _preload_content=False
            ),
        )

    def ensure_workload(
        self, kind: Kind, manifest: dict[str, Any], owner: dict[str, Any]
    ) -> dict[str, Any]:
        """Create the job's workload (a PyTorchJob, a TrainJob), or adopt the existing one."""
        args = kind.args(manifest["metadata"]["namespace"])
        return self._ensure(
            manifest,
            owner,
            create=lambda body: self.custom.create_namespaced_custom_object(*args, body),
            read=lambda name: self.custom.get_namespaced_custom_object(*args, name),
            patch=lambda name, body: self.custom.patch_namespaced_custom_object(*args, name, body),
        )

    def ensure_batch_job(self, manifest: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
        """Create a batch/v1 Job (a merge), or adopt the existing one."""
        namespace = manifest["metadata"]["namespace"]
        return self._ensure(
            manifest,
            owner,
            create=lambda body: self.batch.create_namespaced_job(
                namespace, body, _preload_content=False
            ),
            read=lambda name: self.batch.read_namespaced_job(
                name, namespace, _preload_content=False
            ),
            patch=lambda name, body: self.batch.patch_namespaced_job(
                name, namespace, body, _preload_content=False
            ),
        )

    def delete_batch_job(self, namespace: str, name: str) -> None:
        """Delete a batch/v1 Job and, in the background, its pods; gone is fine."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status == 404:
                return
            _retry_on_server_errors(exc, f"deleting Job {name}")
            raise

    def patch_workload(
        self, kind: Kind, namespace: str, name: str, patch: dict[str, Any], what: str
    ) -> None:
        """Merge-patch a workload; one that is gone is recreated by the next pass."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.patch_namespaced_custom_object(*kind.args(namespace), name, patch)
        except ApiException as exc:
            if exc.status == 404:
                return
            _retry_on_server_errors(exc, f"{what} {name}")
            raise

    def delete_children(self, namespace: str, kind: Kind, workload: str, configmap: str) -> None:
        """Delete the workload (its pods go with it) and the ConfigMap; gone is fine.

        Explicit, not left to the garbage collector: cancel must stop the trainer now, and a
        cluster's GC may lag (or, in a bare test apiserver, not run at all).
        """
        from kubernetes.client.exceptions import ApiException

        calls: tuple[Callable[[], Any], ...] = (
            lambda: self.custom.delete_namespaced_custom_object(
                *kind.args(namespace), workload, propagation_policy="Background"
            ),
            lambda: self.core.delete_namespaced_config_map(configmap, namespace),
        )
        for call in calls:
            try:
                call()
            except ApiException as exc:
                if exc.status == 404:
                    continue
                _retry_on_server_errors(exc, "deleting a job's children")
                raise


@dataclass
class KubeJobStore:
    """FineTuneJobs in the apiserver, as the job driver writes them."""

    kube: KubeClient
    namespace: str

    def write_status(self, job: FineTuneJob, patch: dict[str, Any]) -> FineTuneJob:
        """Patch the status at the job's resourceVersion (see :meth:`KubeClient.patch_job_status`).

        A conflict caused by metadata alone — kopf adding its finalizer and annotations to a new
        job, the API annotating it — is retried once at the fresh version: the spec and status
        the patch was computed from are unchanged, so it is still right, and a new job's first
        pass is not wasted.
        """
        namespace = job.metadata.namespace or self.namespace
        name = job.metadata.name
        try:
            raw = self.kube.patch_job_status(namespace, name, job.metadata.resource_version, patch)
        except Conflict:
            fresh = FineTuneJob.from_manifest(self.kube.get_job(namespace, name))
            if not _same_spec_and_status(fresh, job):
                raise
            raw = self.kube.patch_job_status(
                namespace, name, fresh.metadata.resource_version, patch
            )
        return FineTuneJob.from_manifest(raw)


def _same_spec_and_status(fresh: FineTuneJob, based_on: FineTuneJob) -> bool:
    """Whether only metadata other than the generation changed between two views of a job."""
    return (
        fresh.metadata.generation == based_on.metadata.generation
        and fresh.status == based_on.status
    )
