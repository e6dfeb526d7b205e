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

from kubetune.finetunejob import GROUP, PLURAL, VERSION
from kubetune_operator.manifests import PYTORCHJOB_API_VERSION

PYTORCHJOB_GROUP, PYTORCHJOB_VERSION = PYTORCHJOB_API_VERSION.split("/")
PYTORCHJOB_PLURAL: Final = "pytorchjobs"
GC_WAIT_SECONDS: Final = 10.0
API_RETRY_SECONDS: Final = 5.0


class Conflict(Exception):
    """The object changed since it was read (optimistic concurrency)."""


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

    # -- FineTuneJobs ------------------------------------------------------------------------
    def patch_job_status(
        self,
        namespace: str,
        name: str,
        resource_version: str | None,
        status: dict[str, Any],
        *,
        based_on: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Merge-patch a FineTuneJob's status, only if it is still at ``resource_version``.

        A merge patch that carries ``metadata.resourceVersion`` is a precondition: the apiserver
        refuses it (409) when the object changed. A status computed from a stale view is thus
        never written; the next pass recomputes it from the fresh one. With ``based_on`` (the
        object the status was computed from), a conflict caused by metadata alone — kopf adding
        its finalizer and annotations to a new job, the API annotating it — is retried once at
        the fresh version: the spec and status it was computed from are unchanged, so the
        status is still right, and a new job's first pass is not wasted.
        """
        try:
            return self._patch_status(namespace, name, resource_version, status)
        except Conflict:
            if based_on is None:
                raise
            fresh = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name
            )
            if not _same_spec_and_status(fresh, based_on):
                raise
            return self._patch_status(namespace, name, fresh["metadata"]["resourceVersion"], status)

    def list_jobs(self, namespace: str) -> list[dict[str, Any]]:
        """Every FineTuneJob in ``namespace`` (one LIST; for sweeps at startup)."""
        result = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        return list(result.get("items") or [])

    def _patch_status(
        self, namespace: str, name: str, resource_version: str | None, status: dict[str, Any]
    ) -> dict[str, Any]:
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

    def ensure_pytorchjob(self, manifest: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
        """Create the PyTorchJob, or adopt the existing one."""
        namespace = manifest["metadata"]["namespace"]
        args = (PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, namespace, PYTORCHJOB_PLURAL)
        return self._ensure(
            manifest,
            owner,
            create=lambda body: self.custom.create_namespaced_custom_object(*args, body),
            read=lambda name: self.custom.get_namespaced_custom_object(*args, name),
            patch=lambda name, body: self.custom.patch_namespaced_custom_object(*args, name, body),
        )

    def set_pytorchjob_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        """Suspend (the training-operator deletes the pods) or resume a PyTorchJob."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.patch_namespaced_custom_object(
                PYTORCHJOB_GROUP,
                PYTORCHJOB_VERSION,
                namespace,
                PYTORCHJOB_PLURAL,
                name,
                {"spec": {"runPolicy": {"suspend": suspend}}},
            )
        except ApiException as exc:
            if exc.status == 404:
                return  # recreated on the next pass, with the right suspend flag
            _retry_on_server_errors(exc, f"suspending {name}")
            raise

    def delete_children(self, namespace: str, pytorchjob: str, configmap: str) -> None:
        """Delete the PyTorchJob (its pods go with it) and the ConfigMap; gone is fine.

        Explicit, not left to the garbage collector: cancel must stop the trainer now, and a
        cluster's GC may lag (or, in a bare test apiserver, not run at all).
        """
        from kubernetes.client.exceptions import ApiException

        calls: tuple[Callable[[], Any], ...] = (
            lambda: self.custom.delete_namespaced_custom_object(
                PYTORCHJOB_GROUP,
                PYTORCHJOB_VERSION,
                namespace,
                PYTORCHJOB_PLURAL,
                pytorchjob,
                propagation_policy="Background",
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


def _same_spec_and_status(fresh: dict[str, Any], based_on: dict[str, Any]) -> bool:
    """Whether only metadata other than the generation changed between two views of a job."""
    generation = (fresh.get("metadata") or {}).get("generation")
    return generation == (based_on.get("metadata") or {}).get("generation") and (
        fresh.get("status") or {}
    ) == (based_on.get("status") or {})
