"""Jobs as FineTuneJob custom resources (cluster mode).

The API creates FineTuneJobs and flips their ``cancel``/``suspend`` flags; the operator is the
only writer of their status. The API never touches PyTorchJobs. Ownership is the
``kubetune.io/org`` label (for server-side filtering) and ``spec.org`` (the source of truth;
both are checked, so a mislabelled object is still not shown to the wrong org).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import logging
import time
from typing import Any, Final

from kubetune import base_models as bm
from kubetune.base_models import RegisteredBaseModel
from kubetune.finetunejob import (
    GROUP,
    LABEL_ORG,
    PLURAL,
    VERSION,
    FineTuneJob,
    FineTuneJobStatus,
)
from kubetune.lifecycle import is_terminal
from kubetune_api.backends.base import (
    ANNOTATION_IDEMPOTENCY_KEY,
    LABEL_IDEMPOTENCY,
    JobBackend,
    JobPage,
    OrgUsage,
    same_request,
)
from kubetune_api.backends.jobcache import JobCache
from kubetune_api.errors import NotFound, ServiceUnavailable, job_not_found

log = logging.getLogger(__name__)
ANNOTATION_CLAIMED_JOB: Final = "kubetune.io/job"
# A claim's job appears within a create's round trip; one older than this whose job never
# appeared was left by a replica that died in between, and is released.
CLAIM_WAIT_SECONDS: Final = 5.0
CLAIM_STALE_SECONDS: Final = 30.0
CLAIM_ATTEMPTS: Final = 3


def idempotency_label(org: str, key: str) -> str:
    """A label value (≤ 63 characters) standing for an org's idempotency key."""
    return hashlib.sha256(f"{org}\0{key}".encode()).hexdigest()[:40]


def claim_name(label: str) -> str:
    """The Lease that claims an idempotency key for one job."""
    return f"kubetune-idempotency-{label}"


class KubernetesJobBackend(JobBackend):
    """FineTuneJobs in one namespace, through the Kubernetes API."""

    merges_models = True  # the operator runs kubetune_trainer.merge as a Job
    registers_base_models = True  # as BaseModel objects, which the operator checks with a Job

    def __init__(self, api_client: Any, namespace: str, *, use_cache: bool = True) -> None:
        from kubernetes import client

        self._api: Any = client.CustomObjectsApi(api_client)
        self._leases: Any = client.CoordinationV1Api(api_client)
        self._version: Any = client.VersionApi(api_client)
        self.namespace = namespace
        self._cache = JobCache(self._api, namespace) if use_cache else None

    def close(self) -> None:
        """Stop the job cache's watch."""
        if self._cache is not None:
            self._cache.stop()

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                raise NotFound("No such fine-tuning job", param="fine_tuning_job_id") from exc
            if exc.status is not None and exc.status >= 500:
                raise ServiceUnavailable("The Kubernetes API is unavailable") from exc
            raise
        except HTTPError as exc:
            raise ServiceUnavailable("The Kubernetes API is unreachable") from exc

    def _parse(self, obj: dict[str, Any], org: str) -> FineTuneJob | None:
        job = FineTuneJob.from_manifest(obj)
        return job if job.spec.org == org else None

    def _org_jobs(self, org: str) -> list[FineTuneJob]:
        """The org's jobs from the cache when it is current, else from the apiserver."""
        snapshot = self._call(self._cache.snapshot) if self._cache is not None else None
        if snapshot is None:
            return self._list_org(org)
        return [
            j for j in snapshot if j.spec.org == org and j.metadata.labels.get(LABEL_ORG) == org
        ]

    def _remember(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self._cache is not None:
            self._cache.upsert(obj)
        return obj

    def _list_org(self, org: str, extra_selector: str = "") -> list[FineTuneJob]:
        selector = f"{LABEL_ORG}={org}" + (f",{extra_selector}" if extra_selector else "")
        result = self._call(
            self._api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            label_selector=selector,
        )
        jobs = [self._parse(item, org) for item in result.get("items", [])]
        return [j for j in jobs if j is not None]

    def _create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = self._remember(
            self._call(
                self._api.create_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                manifest,
            )
        )
        return created

    def create(self, job: FineTuneJob, idempotency_key: str | None) -> tuple[FineTuneJob, bool]:
        """See :meth:`JobBackend.create`.

        An idempotency key is claimed first with a Lease named after the org and the key: the
        apiserver lets one create of that name succeed, so of two replicas (or two requests)
        with the same key exactly one creates the job; the other finds the claim, waits for
        the job it names and returns it. The Lease is then owned by the job, and goes with it.
        """
        manifest = job.to_manifest()
        labels = manifest["metadata"].setdefault("labels", {})
        labels[LABEL_ORG] = job.spec.org
        if idempotency_key is None:
            created = self._create(manifest)
            return FineTuneJob.from_manifest(created), True
        label = idempotency_label(job.spec.org, idempotency_key)
        existing = self._list_org(job.spec.org, f"{LABEL_IDEMPOTENCY}={label}")
        if existing:  # the usual retry: the job is there already
            return same_request(existing[0], job), False
        for _ in range(CLAIM_ATTEMPTS):
            holder = self._claim(label, job)
            if holder is None:
                break
            found = self._await_claimed(job.spec.org, holder)
            if found is not None:
                return same_request(found, job), False
        else:
            raise ServiceUnavailable("Another request with this Idempotency-Key is in progress")
        labels[LABEL_IDEMPOTENCY] = label
        manifest["metadata"].setdefault("annotations", {})[ANNOTATION_IDEMPOTENCY_KEY] = (
            idempotency_key[:256]
        )
        created = self._create(manifest)
        self._own_claim(label, created)
        return FineTuneJob.from_manifest(created), True

    def _claim(self, label: str, job: FineTuneJob) -> dict[str, Any] | None:
        """Create the key's Lease naming ``job``; None when this call made it, else the Lease
        another request made.
        """
        from kubernetes.client.exceptions import ApiException

        body = {
            "metadata": {
                "name": claim_name(label),
                "labels": {LABEL_ORG: job.spec.org, LABEL_IDEMPOTENCY: label},
                "annotations": {ANNOTATION_CLAIMED_JOB: job.metadata.name},
            },
            "spec": {"holderIdentity": job.metadata.name},
        }
        try:
            self._call(self._leases.create_namespaced_lease, self.namespace, body)
            return None
        except ApiException as exc:
            if exc.status != 409:
                raise
        try:
            lease: Any = self._call(
                self._leases.read_namespaced_lease, claim_name(label), self.namespace
            )
        except NotFound:
            return {}  # released in between: claim again
        return dict(lease.to_dict())

    def _await_claimed(self, org: str, lease: dict[str, Any]) -> FineTuneJob | None:
        """The job a claim names, once its creator made it; None when the claim was released
        (its creator died before creating the job, or it was released in between).
        """
        metadata = lease.get("metadata") or {}
        job_id = (metadata.get("annotations") or {}).get(ANNOTATION_CLAIMED_JOB)
        if not job_id:
            return None
        deadline = time.monotonic() + CLAIM_WAIT_SECONDS
        while time.monotonic() < deadline:
            found = self.get(org, job_id)
            if found is not None:
                return found
            time.sleep(0.1)
        created = metadata.get("creation_timestamp")
        if created is not None and time.time() - created.timestamp() > CLAIM_STALE_SECONDS:
            self._release(metadata)
        return None

    def _release(self, metadata: dict[str, Any]) -> None:
        """Delete a stale claim (only the one read: a newer claim of the key stays)."""
        from kubernetes.client import V1DeleteOptions, V1Preconditions

        options = V1DeleteOptions(preconditions=V1Preconditions(uid=metadata.get("uid")))
        try:
            self._call(
                self._leases.delete_namespaced_lease, metadata["name"], self.namespace, body=options
            )
        except NotFound:
            pass
        except Exception:
            log.warning("could not release the stale claim %s", metadata.get("name"))

    def _own_claim(self, label: str, created: dict[str, Any]) -> None:
        """Make the job the claim's owner, so the claim is deleted with the job."""
        meta = created["metadata"]
        owner = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "name": meta["name"],
            "uid": meta["uid"],
        }
        patch = {"metadata": {"ownerReferences": [owner]}}
        try:
            self._call(
                self._leases.patch_namespaced_lease, claim_name(label), self.namespace, patch
            )
        except Exception:  # the job exists: a claim left without owner only costs an object
            log.warning("could not hand the claim %s to job %s", claim_name(label), meta["name"])

    def get(self, org: str, job_id: str) -> FineTuneJob | None:
        """See :meth:`JobBackend.get`."""
        try:
            obj = self._call(
                self._api.get_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                job_id,
            )
        except NotFound:
            return None
        return self._parse(obj, org)

    def list(
        self, org: str, *, after: str | None, limit: int, metadata: dict[str, str] | None = None
    ) -> JobPage:
        """See :meth:`JobBackend.list`. The apiserver cannot sort, so the org's jobs are
        listed by label and paged here (ids sort by creation time).
        """
        jobs = sorted(self._org_jobs(org), key=lambda j: j.metadata.name, reverse=True)
        if after is not None:
            jobs = [j for j in jobs if j.metadata.name < after]
        if metadata:
            jobs = [
                j for j in jobs if all(j.spec.metadata.get(k) == v for k, v in metadata.items())
            ]
        return JobPage(jobs=jobs[:limit], has_more=len(jobs) > limit)

    def active_usage(self, org: str) -> OrgUsage:
        """See :meth:`JobBackend.active_usage`."""
        return OrgUsage.of(
            [
                j
                for j in self._org_jobs(org)
                if not j.spec.cancel and not is_terminal(j.status.phase if j.status else None)
            ]
        )

    def _patch(
        self, org: str, job_id: str, body: dict[str, Any], *, status: bool = False
    ) -> FineTuneJob:
        if self.get(org, job_id) is None:
            raise job_not_found(job_id)
        fn = (
            self._api.patch_namespaced_custom_object_status
            if status
            else self._api.patch_namespaced_custom_object
        )
        obj = self._remember(self._call(fn, GROUP, VERSION, self.namespace, PLURAL, job_id, body))
        return FineTuneJob.from_manifest(obj)

    def patch_spec(
        self, org: str, job_id: str, *, cancel: bool | None = None, suspend: bool | None = None
    ) -> FineTuneJob:
        """See :meth:`JobBackend.patch_spec`."""
        spec = {k: v for k, v in {"cancel": cancel, "suspend": suspend}.items() if v is not None}
        return self._patch(org, job_id, {"spec": spec})

    def annotate(self, org: str, job_id: str, annotations: dict[str, str]) -> FineTuneJob:
        """See :meth:`JobBackend.annotate`."""
        return self._patch(org, job_id, {"metadata": {"annotations": annotations}})

    def update_status(self, org: str, job_id: str, status: FineTuneJobStatus) -> FineTuneJob:
        """See :meth:`JobBackend.update_status`."""
        return self._patch(org, job_id, {"status": status.to_wire()}, status=True)

    def ready(self) -> bool:
        """See :meth:`JobBackend.ready`."""
        self._call(self._version.get_code)
        return True

    # -- registered base models: BaseModel objects ---------------------------------------------
    def _base_model_call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self._call(fn, GROUP, VERSION, self.namespace, bm.PLURAL, *args, **kwargs)

    def _parse_base_model(self, obj: dict[str, Any], org: str | None) -> RegisteredBaseModel | None:
        try:
            model = bm.from_manifest(obj)
        except ValueError:  # an object kubectl wrote by hand, wrongly: not one to list
            log.warning("ignoring the malformed BaseModel %s", obj.get("metadata", {}).get("name"))
            return None
        return model if org is None or model.org == org else None

    def base_models(self, org: str | None = None) -> builtins.list[RegisteredBaseModel]:
        """See :meth:`JobBackend.base_models`."""
        selector = f"{LABEL_ORG}={org}" if org is not None else None
        found = self._base_model_call(
            self._api.list_namespaced_custom_object, label_selector=selector
        )
        models = [self._parse_base_model(item, org) for item in found.get("items", [])]
        return sorted((m for m in models if m is not None), key=lambda m: m.id)

    def get_base_model(self, org: str, model_id: str) -> RegisteredBaseModel | None:
        """See :meth:`JobBackend.get_base_model`."""
        try:
            obj = self._base_model_call(
                self._api.get_namespaced_custom_object, bm.resource_name(org, model_id)
            )
        except NotFound:
            return None
        model = self._parse_base_model(obj, org)
        return model if model is not None and model.id == model_id else None

    def add_base_model(self, model: RegisteredBaseModel) -> bool:
        """See :meth:`JobBackend.add_base_model`: the apiserver lets one create of the name
        succeed, so two replicas registering the same name cannot both win.
        """
        from kubernetes.client.exceptions import ApiException

        manifest = bm.to_manifest(model, self.namespace)
        try:
            self._base_model_call(self._api.create_namespaced_custom_object, manifest)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def put_base_model(self, model: RegisteredBaseModel) -> None:
        """See :meth:`JobBackend.put_base_model` (the operator's part on a cluster)."""
        body = {"status": bm.status_of(model).to_wire()}
        with contextlib.suppress(NotFound):
            self._base_model_call(
                self._api.patch_namespaced_custom_object_status,
                bm.resource_name(model.org, model.id),
                body,
            )

    def delete_base_model(self, org: str, model_id: str) -> bool:
        """See :meth:`JobBackend.delete_base_model`; its check Job goes with it (owned)."""
        if self.get_base_model(org, model_id) is None:
            return False
        try:
            self._base_model_call(
                self._api.delete_namespaced_custom_object, bm.resource_name(org, model_id)
            )
        except NotFound:
            return False
        return True
