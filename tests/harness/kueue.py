"""A stand-in for Kueue's controllers (and its job webhook) for the jobs of one namespace.

The test apiserver runs no Kueue, so this fixture plays it over real Kueue objects (the upstream
CRDs validate every one): a ``ResourceFlavor``, a ``ClusterQueue`` with a nominal quota and a
``LocalQueue`` pointing at it, and one ``Workload`` per queued job. It polls the TrainJobs or
PyTorchJobs of a namespace that carry ``kueue.x-k8s.io/queue-name``.

What it implements of the documented contract (``../shared/reference/kueue/``: "Run a
TrainJob", "Run a PyTorchJob", the Workload, admission and preemption concepts; Kueue's
``pkg/controller/jobframework`` and ``apis/kueue/v1beta2/workload_types.go``):

- The webhook: a labelled job must be created suspended. One created running is recorded as a
  violation (``flips``) and suspended, as the webhook would have done.
- One Workload per job, named ``<kind>-<job name>-<hash>`` (a SHA-1 of kind, group, name and
  uid), controlled by the job, with ``queueName``, ``active: true`` and one pod set per replica
  role with the pods' resource requests.
- Admission, best-effort FIFO by the Workloads' creation: a Workload whose requests fit the
  ClusterQueue's unused nominal quota reserves it (``QuotaReserved`` and ``Admitted`` True,
  ``status.admission``) and its job is unsuspended; one that does not fit gets ``QuotaReserved``
  False with reason ``Pending`` and Kueue's message ("couldn't assign flavors to pod set …:
  insufficient unused quota for cpu in flavor default, 4 more needed").
- Preemption (:meth:`preempt`, the test playing a higher-priority workload): ``Evicted``
  (``Preempted``) and ``Preempted`` (``InClusterQueue``) True, quota released, ``Requeued``
  True, the job suspended again; the preemptor holds the quota until :meth:`release`.
- ``spec.active: false``: an admitted Workload is evicted (``Evicted``, reason
  ``Deactivated``) and its job suspended; it is not queued until ``active`` is true again
  (``Requeued``, reason ``Reactivated``).
- A job that completed or failed finishes its Workload (``Finished``), which frees its quota;
  a deleted job takes its Workload with it (the garbage collector's part).
- Only Kueue writes a Kueue-managed job's ``suspend``: every change of it that the stand-in did
  not make is recorded in ``flips`` (and undone, as Kueue's reconciler would).

Deviations: one ClusterQueue and one flavor (no cohorts, borrowing, priorities, fair sharing or
admission checks); quota on ``cpu`` only.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

KUEUE: Final = ("kueue.x-k8s.io", "v1beta2")
QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
FLAVOR: Final = "default"
RESOURCE: Final = "cpu"


@dataclass(frozen=True)
class JobKind:
    """A job kind Kueue integrates with, and where its suspend flag and pods live."""

    group: str
    version: str
    plural: str
    kind: str

    def suspended(self, job: Mapping[str, Any]) -> bool:
        """The job's suspend flag."""
        spec = job.get("spec") or {}
        if self.kind == "PyTorchJob":
            return bool((spec.get("runPolicy") or {}).get("suspend", False))
        return bool(spec.get("suspend", False))

    def suspend_patch(self, suspend: bool) -> dict[str, Any]:
        """The merge patch Kueue's job reconciler sends."""
        if self.kind == "PyTorchJob":
            return {"spec": {"runPolicy": {"suspend": suspend}}}
        return {"spec": {"suspend": suspend}}

    def pod_sets(self, job: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The Workload's pod sets: one per replica role, with its pods' requests."""
        spec = job.get("spec") or {}
        if self.kind == "PyTorchJob":
            sets = []
            for role, replica in (spec.get("pytorchReplicaSpecs") or {}).items():
                container = replica["template"]["spec"]["containers"][0]
                sets.append(_pod_set(role.lower(), replica.get("replicas", 1), container))
            return sets
        trainer = spec.get("trainer") or {}
        container = {"name": "node", "resources": trainer.get("resourcesPerNode") or {}}
        return [_pod_set("node", trainer.get("numNodes", 1), container)]

    def finished(self, job: Mapping[str, Any]) -> bool:
        """Whether the job completed or failed."""
        done = {"Succeeded", "Complete", "Failed"}
        return any(
            c.get("type") in done and c.get("status") == "True"
            for c in (job.get("status") or {}).get("conditions") or []
        )


TRAINJOB_KIND: Final = JobKind("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")
PYTORCHJOB_KIND: Final = JobKind("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")


def _pod_set(name: str, count: int, container: Mapping[str, Any]) -> dict[str, Any]:
    requests = dict((container.get("resources") or {}).get("requests") or {})
    return {
        "name": name,
        "count": int(count),
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": container.get("name", "main"),
                        "image": container.get("image", "trainer"),
                        "resources": {"requests": requests},
                    }
                ],
                "restartPolicy": "Never",
            }
        },
    }


def workload_name(kind: JobKind, name: str, uid: str) -> str:
    """Kueue's ``GetWorkloadNameForOwnerWithGVK``: ``<kind>-<name>-<5 hex of a SHA-1>``."""
    digest = hashlib.sha1(  # noqa: S324 - Kueue's own name hash, not security
        "\n".join((kind.kind, kind.group, name, uid)).encode()
    ).hexdigest()
    return f"{kind.kind.lower()}-{name}"[: 253 - 6] + f"-{digest[:5]}"


def cpu(quantity: Any) -> float:
    """A CPU quantity ("4", "500m") in cores."""
    from kubernetes.utils import parse_quantity

    return float(parse_quantity(str(quantity)))  # type: ignore[no-untyped-call]


def requested(pod_sets: Sequence[Mapping[str, Any]]) -> float:
    """The cores a Workload's pod sets ask for."""
    total = 0.0
    for pod_set in pod_sets:
        for container in pod_set["template"]["spec"]["containers"]:
            value = ((container.get("resources") or {}).get("requests") or {}).get(RESOURCE)
            total += cpu(value or 0) * int(pod_set.get("count", 1))
    return total


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]], type_: str, status: str, reason: str, message: str
) -> list[dict[str, Any]]:
    """``apimeta.SetStatusCondition``: the transition time moves only when status changes."""
    current = next((c for c in conditions if c["type"] == type_), None)
    if current is not None and (current["status"], current["reason"], current["message"]) == (
        status,
        reason,
        message,
    ):
        return conditions
    when = current["lastTransitionTime"] if current and current["status"] == status else _now()
    new = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": when,
    }
    return [c for c in conditions if c["type"] != type_] + [new]


def is_true(conditions: Sequence[Mapping[str, Any]], type_: str) -> bool:
    """Whether condition ``type_`` is True."""
    return any(c["type"] == type_ and c["status"] == "True" for c in conditions)


@dataclass
class Tracked:
    """What the stand-in remembers of one job."""

    name: str
    uid: str
    workload: str
    suspend: bool = True  # the value Kueue last gave the job's suspend


@dataclass
class Kueue:
    """Kueue for the labelled jobs of ``kind`` in ``namespace`` (see the module docstring)."""

    api_client: Any
    namespace: str
    kind: JobKind
    queue: str = "team-queue"
    quota: float = 8.0  # cores of the ClusterQueue's nominal quota
    poll: float = 0.2
    flips: list[str] = field(default_factory=list)  # suspend changes Kueue did not make
    errors: list[str] = field(default_factory=list)
    admissions: list[str] = field(default_factory=list)  # job names, in admission order

    def __post_init__(self) -> None:
        from kubernetes import client

        self._custom: Any = client.CustomObjectsApi(self.api_client)
        self.cluster_queue = f"{self.namespace}-cq"
        self._jobs: dict[str, Tracked] = {}
        self._held = 0.0  # quota a preemptor holds
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kueue", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Kueue:
        """Create the flavor and queues, then start reconciling."""
        self._create_queues()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop reconciling."""
        self._stop.set()
        self._thread.join(timeout=30)

    def _create_queues(self) -> None:
        from kubernetes.client.exceptions import ApiException

        flavor = {
            "apiVersion": "/".join(KUEUE),
            "kind": "ResourceFlavor",
            "metadata": {"name": FLAVOR},
        }
        cluster_queue = {
            "apiVersion": "/".join(KUEUE),
            "kind": "ClusterQueue",
            "metadata": {"name": self.cluster_queue},
            "spec": {
                "namespaceSelector": {},
                "resourceGroups": [
                    {
                        "coveredResources": [RESOURCE],
                        "flavors": [
                            {
                                "name": FLAVOR,
                                "resources": [{"name": RESOURCE, "nominalQuota": str(self.quota)}],
                            }
                        ],
                    }
                ],
            },
        }
        for plural, body in (("resourceflavors", flavor), ("clusterqueues", cluster_queue)):
            try:
                self._custom.create_cluster_custom_object(*KUEUE, plural, body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
        local_queue = {
            "apiVersion": "/".join(KUEUE),
            "kind": "LocalQueue",
            "metadata": {"name": self.queue, "namespace": self.namespace},
            "spec": {"clusterQueue": self.cluster_queue},
        }
        self._custom.create_namespaced_custom_object(
            *KUEUE, self.namespace, "localqueues", local_queue
        )

    # -- what tests do -----------------------------------------------------------------------------
    def workload_of(self, job_name: str) -> dict[str, Any] | None:
        """The Kueue Workload of the job named ``job_name``."""
        with self._lock:
            tracked = next((t for t in self._jobs.values() if t.name == job_name), None)
        if tracked is None:
            return None
        return self._get_workload(tracked.workload)

    def preempt(self, job_name: str) -> None:
        """Preempt the job's admitted Workload for a higher-priority one that holds the quota
        until :meth:`release`.
        """
        with self._lock:
            tracked = next(t for t in self._jobs.values() if t.name == job_name)
            workload = self._get_workload(tracked.workload)
            assert workload is not None
            assert is_true(_conditions(workload), "Admitted")
            self._held += requested(workload["spec"]["podSets"])
            conditions = _conditions(workload)
            message = (
                "Preempted to accommodate a workload (UID: preemptor, JobUID: preemptor) due to "
                "prioritization in the ClusterQueue"
            )
            for type_, status, reason, text in (
                ("Evicted", "True", "Preempted", message),
                ("Preempted", "True", "InClusterQueue", message),
                ("QuotaReserved", "False", "Pending", "Preempted"),
                ("Admitted", "False", "NoReservation", "The workload has no reservation"),
                ("Requeued", "True", "Preempted", message),
            ):
                conditions = set_condition(conditions, type_, status, reason, text)
            self._write_status(tracked.workload, {"conditions": conditions, "admission": None})
            self._set_suspend(tracked, True)

    def release(self) -> None:
        """The preemptor finished: its quota is free again."""
        with self._lock:
            self._held = 0.0

    # -- the control loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self._reconcile()
            except Exception as exc:  # keep playing; the test sees the error list
                self.errors.append(repr(exc))
            self._stop.wait(self.poll)

    def _reconcile(self) -> None:
        jobs = self._custom.list_namespaced_custom_object(
            self.kind.group, self.kind.version, self.namespace, self.kind.plural
        )["items"]
        seen = set()
        for job in jobs:
            labels = job["metadata"].get("labels") or {}
            if labels.get(QUEUE_LABEL) != self.queue or job["metadata"].get("deletionTimestamp"):
                continue
            seen.add(job["metadata"]["uid"])
            self._sync_job(job)
        for uid in [uid for uid in self._jobs if uid not in seen]:
            self._delete_workload(self._jobs.pop(uid).workload)
        self._admit()

    def _sync_job(self, job: Mapping[str, Any]) -> None:
        meta = job["metadata"]
        tracked = self._jobs.get(meta["uid"])
        if tracked is None:
            name = workload_name(self.kind, meta["name"], meta["uid"])
            tracked = self._jobs[meta["uid"]] = Tracked(meta["name"], meta["uid"], name)
            if not self.kind.suspended(job):
                self.flips.append(f"{meta['name']} was created running")
                self._set_suspend(tracked, True)
            self._create_workload(tracked, job)
        elif self.kind.suspended(job) != tracked.suspend:
            self.flips.append(f"{meta['name']}: suspend set to {self.kind.suspended(job)}")
            self._set_suspend(tracked, tracked.suspend)
        workload = self._get_workload(tracked.workload)
        if workload is None:
            return
        conditions = _conditions(workload)
        if self.kind.finished(job) and not is_true(conditions, "Finished"):
            conditions = set_condition(
                conditions, "Finished", "True", "Succeeded", "Job finished successfully"
            )
            self._write_status(tracked.workload, {"conditions": conditions})
        elif not workload["spec"].get("active", True):
            self._deactivate(tracked, workload)
        elif _deactivated(conditions) and _reason(conditions, "Requeued") != "Reactivated":
            conditions = set_condition(
                conditions, "Requeued", "True", "Reactivated", "The workload was reactivated"
            )
            self._write_status(tracked.workload, {"conditions": conditions})

    def _deactivate(self, tracked: Tracked, workload: Mapping[str, Any]) -> None:
        conditions = _conditions(workload)
        if _deactivated(conditions):
            return
        for type_, status, reason, text in (
            ("Evicted", "True", "Deactivated", "The workload is deactivated"),
            ("QuotaReserved", "False", "Pending", "The workload is deactivated"),
            ("Admitted", "False", "NoReservation", "The workload has no reservation"),
            ("Requeued", "False", "Deactivated", "The workload is deactivated"),
        ):
            conditions = set_condition(conditions, type_, status, reason, text)
        self._write_status(tracked.workload, {"conditions": conditions, "admission": None})
        self._set_suspend(tracked, True)

    def _admit(self) -> None:
        """Best-effort FIFO over the queue's pending, active Workloads."""
        workloads = [w for t in self._jobs.values() if (w := self._get_workload(t.workload))]
        workloads.sort(key=lambda w: (w["metadata"]["creationTimestamp"], w["metadata"]["name"]))
        used = self._held + sum(
            requested(w["spec"]["podSets"])
            for w in workloads
            if is_true(_conditions(w), "Admitted") and not is_true(_conditions(w), "Finished")
        )
        for workload in workloads:
            conditions = _conditions(workload)
            pending = not (is_true(conditions, "Admitted") or is_true(conditions, "Finished"))
            if not pending or not workload["spec"].get("active", True):
                continue
            need = requested(workload["spec"]["podSets"])
            if used + need <= self.quota:
                used += need
                self._reserve(workload, need)
            else:
                first = workload["spec"]["podSets"][0]["name"]
                message = (
                    f"couldn't assign flavors to pod set {first}: insufficient unused quota for "
                    f"{RESOURCE} in flavor {FLAVOR}, {used + need - self.quota:g} more needed"
                )
                conditions = set_condition(conditions, "QuotaReserved", "False", "Pending", message)
                if conditions != _conditions(workload):
                    self._write_status(workload["metadata"]["name"], {"conditions": conditions})

    def _reserve(self, workload: Mapping[str, Any], need: float) -> None:
        name = workload["metadata"]["name"]
        tracked = next(t for t in self._jobs.values() if t.workload == name)
        conditions = _conditions(workload)
        reserved = f"Quota reserved in ClusterQueue {self.cluster_queue}"
        conditions = set_condition(conditions, "QuotaReserved", "True", "QuotaReserved", reserved)
        conditions = set_condition(
            conditions, "Admitted", "True", "Admitted", "The workload is admitted"
        )
        for type_ in ("Evicted", "Preempted"):
            previous = next((c for c in conditions if c["type"] == type_), None)
            if previous is not None and previous["status"] == "True":
                conditions = set_condition(
                    conditions,
                    type_,
                    "False",
                    "QuotaReserved",
                    f"Previously: {previous['message']}",
                )
        admission = {
            "clusterQueue": self.cluster_queue,
            "podSetAssignments": [
                {
                    "name": pod_set["name"],
                    "count": pod_set["count"],
                    "flavors": {RESOURCE: FLAVOR},
                    "resourceUsage": {RESOURCE: f"{requested([pod_set]):g}"},
                }
                for pod_set in workload["spec"]["podSets"]
            ],
        }
        self._write_status(name, {"conditions": conditions, "admission": admission})
        self.admissions.append(tracked.name)
        self._set_suspend(tracked, False)

    # -- API calls ---------------------------------------------------------------------------------
    def _set_suspend(self, tracked: Tracked, suspend: bool) -> None:
        tracked.suspend = suspend
        self._custom.patch_namespaced_custom_object(
            self.kind.group,
            self.kind.version,
            self.namespace,
            self.kind.plural,
            tracked.name,
            self.kind.suspend_patch(suspend),
        )

    def _create_workload(self, tracked: Tracked, job: Mapping[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        body = {
            "apiVersion": "/".join(KUEUE),
            "kind": "Workload",
            "metadata": {
                "name": tracked.workload,
                "namespace": self.namespace,
                "labels": {"kueue.x-k8s.io/job-uid": tracked.uid},
                "ownerReferences": [
                    {
                        "apiVersion": f"{self.kind.group}/{self.kind.version}",
                        "kind": self.kind.kind,
                        "name": tracked.name,
                        "uid": tracked.uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": {
                "queueName": self.queue,
                "active": True,
                "podSets": self.kind.pod_sets(job),
            },
        }
        try:
            self._custom.create_namespaced_custom_object(*KUEUE, self.namespace, "workloads", body)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def _get_workload(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            result: dict[str, Any] = self._custom.get_namespaced_custom_object(
                *KUEUE, self.namespace, "workloads", name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def _write_status(self, name: str, status: Mapping[str, Any]) -> None:
        self._custom.patch_namespaced_custom_object_status(
            *KUEUE, self.namespace, "workloads", name, {"status": dict(status)}
        )

    def _delete_workload(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._custom.delete_namespaced_custom_object(*KUEUE, self.namespace, "workloads", name)
        except ApiException as exc:
            if exc.status != 404:
                raise


def _conditions(workload: Mapping[str, Any]) -> list[dict[str, Any]]:
    return copy.deepcopy(list((workload.get("status") or {}).get("conditions") or []))


def _deactivated(conditions: Sequence[Mapping[str, Any]]) -> bool:
    return is_true(conditions, "Evicted") and _reason(conditions, "Evicted") == "Deactivated"


def _reason(conditions: Sequence[Mapping[str, Any]], type_: str) -> str | None:
    return next((c.get("reason") for c in conditions if c["type"] == type_), None)


def wait_admitted(kueue: Kueue, job_name: str, timeout: float = 60.0) -> None:
    """Wait until the job's Workload is admitted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workload = kueue.workload_of(job_name)
        if workload is not None and is_true(_conditions(workload), "Admitted"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{job_name} was not admitted within {timeout}s: {kueue.errors[-3:]}")
