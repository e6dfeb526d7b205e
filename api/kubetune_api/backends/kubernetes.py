"""Jobs as FineTuneJob custom resources (cluster mode).

The API creates FineTuneJobs and flips their ``cancel``/``suspend`` flags; the operator is the
only writer of their status. The API never touches PyTorchJobs. Ownership is the
``kubetune.io/org`` label (for server-side filtering) and ``spec.org`` (the source of truth;
both are checked, so a mislabelled object is still not shown to the wrong org).
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

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
)
from kubetune_api.backends.jobcache import JobCache
from kubetune_api.errors import NotFound, ServiceUnavailable, job_not_found


def idempotency_label(org: str, key: str) -> str:
    """A label value (≤ 63 characters) standing for an org's idempotency key."""
    return hashlib.sha256(f"{org}\0{key}".encode()).hexdigest()[:40]


class KubernetesJobBackend(JobBackend):
    """FineTuneJobs in one namespace, through the Kubernetes API."""

    def __init__(self, api_client: Any, namespace: str, *, use_cache: bool = True) -> None:
        from kubernetes import client

        self._api: Any = client.CustomObjectsApi(api_client)
        self._version: Any = client.VersionApi(api_client)
        self.namespace = namespace
        # Serializes idempotent creates in this replica; see create().
        self._create_lock = threading.Lock()
        self._cache = JobCache(self._api, namespace) if use_cache else None

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

        Idempotency keys are a label on the job. The lookup-then-create is serialized within
        this replica; two replicas receiving the same key in the same instant could both
        create, which a client retrying after a timeout does not do.
        """
        manifest = job.to_manifest()
        labels = manifest["metadata"].setdefault("labels", {})
        labels[LABEL_ORG] = job.spec.org
        if idempotency_key is None:
            created = self._create(manifest)
            return FineTuneJob.from_manifest(created), True
        label = idempotency_label(job.spec.org, idempotency_key)
        with self._create_lock:
            existing = self._list_org(job.spec.org, f"{LABEL_IDEMPOTENCY}={label}")
            if existing:
                return existing[0], False
            labels[LABEL_IDEMPOTENCY] = label
            manifest["metadata"].setdefault("annotations", {})[ANNOTATION_IDEMPOTENCY_KEY] = (
                idempotency_key[:256]
            )
            created = self._create(manifest)
        return FineTuneJob.from_manifest(created), True

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

    def count_active(self, org: str) -> int:
        """See :meth:`JobBackend.count_active`."""
        return sum(
            1
            for j in self._org_jobs(org)
            if not j.spec.cancel and not is_terminal(j.status.phase if j.status else None)
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
