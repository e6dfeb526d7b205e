"""The operator's runtime plugin, for any kind of workload a training controller runs.

A FineTuneJob's trainer runs as a TrainJob (Kubeflow Trainer v2, :mod:`.trainjob`) or a
PyTorchJob (Training Operator 1.x, :mod:`.pytorchjob`), with the trainer config in a ConfigMap.
What differs between the two is data and pure functions (:class:`WorkloadType`: how the object is
built, how it is suspended, what its status means); :class:`ClusterRuntime` is the one plugin of
the job driver (:class:`kubetune_runtime.driver.Runtime`) over either: it creates or adopts the
two children (deterministic names, owner references), suspends and resumes, observes, and
deletes the children on cancel. The driver does everything else.

With Kueue (``queueing.kueue``), a job with a queue is Kueue's to start and stop: its workload
is created suspended, and pause and resume go through the Kueue Workload's ``spec.active``
(:mod:`.kueue`) — the operator never writes the ``suspend`` of such a workload.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.finetunejob import FineTuneJob, JobPhase
from kubetune.settings import OperatorSettings
from kubetune.trainer_config import BaseModelSource, TrainerConfig
from kubetune_operator import kueue, manifests
from kubetune_operator.kube import Kind, KubeClient
from kubetune_operator.kueue import Admission
from kubetune_runtime.driver import TrainerDefaults
from kubetune_runtime.faults import Faults
from kubetune_runtime.observed import Observed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkloadView:
    """The parts of a workload object the operator reads (kept in kopf's index)."""

    name: str
    uid: str
    resource_version: str
    suspended: bool  # asked to be: its spec's suspend; with Kueue, its Kueue Workload inactive
    status: dict[str, Any] | None
    deleting: bool
    queue: str | None = None  # the Kueue LocalQueue it is labelled with
    admission: Admission | None = None  # its Kueue Workload (Kueue-managed only)


@dataclass(frozen=True)
class WorkloadType:
    """How one kind of workload is built, suspended and read (pure functions)."""

    kind: Kind
    build: Callable[[FineTuneJob, OperatorSettings, BaseModelSource | None], dict[str, Any]]
    is_suspended: Callable[[Mapping[str, Any]], bool]  # from the object's spec
    suspend_patch: Callable[[bool], dict[str, Any]]
    observe: Callable[[Mapping[str, Any] | None, bool], Observed]  # (status, suspend asked)

    def view(self, body: Mapping[str, Any]) -> WorkloadView:
        """Read a view from one object of this kind."""
        meta = body.get("metadata", {})
        status = body.get("status")
        return WorkloadView(
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            resource_version=meta.get("resourceVersion", ""),
            suspended=self.is_suspended(body.get("spec") or {}),
            status=dict(status) if status else None,
            deleting=bool(meta.get("deletionTimestamp")),
            queue=(meta.get("labels") or {}).get(manifests.KUEUE_QUEUE_LABEL),
        )


@dataclass
class ClusterRuntime:
    """Runs each job's trainer as a workload of one :class:`WorkloadType`."""

    workload: WorkloadType
    kube: KubeClient
    opts: OperatorSettings
    namespace: str
    faults: Faults
    kueue: bool = False  # the cluster admits queued jobs through Kueue

    @property
    def name(self) -> str:
        """``trainjob`` or ``pytorchjob``."""
        return self.workload.kind.kind.lower()

    @property
    def trainer_defaults(self) -> TrainerDefaults:
        """The image, metrics port, stop grace, collective timeout and writer lease of every
        trainer pod.
        """
        return TrainerDefaults(
            image=self.opts.trainer_image,
            metrics_port=self.opts.trainer_metrics_port,
            stop_grace_seconds=self.opts.termination_grace_seconds,
            collective_timeout_seconds=self.opts.collective_timeout_seconds,
            writer_lease_seconds=self.opts.writer_lease_seconds,
        )

    def _namespace(self, job: FineTuneJob) -> str:
        return job.metadata.namespace or self.namespace

    def managed_by_kueue(self, job: FineTuneJob) -> bool:
        """Whether Kueue starts and stops this job's workload."""
        return self.kueue and bool(job.spec.queue)

    def with_admission(self, view: WorkloadView, admission: Admission | None) -> WorkloadView:
        """A Kueue-managed workload as the driver reads it: asked to be suspended when its
        Kueue Workload is inactive (a workload without a queue is returned as it is).
        """
        if not self.kueue or view.queue is None:
            return view
        suspended = admission is not None and not admission.active
        return dataclasses.replace(view, suspended=suspended, admission=admission)

    def create(self, job: FineTuneJob, config_text: str, *, suspend: bool) -> WorkloadView:
        """Create (or adopt) the ConfigMap, then the workload, suspended as asked (always,
        when Kueue admits it).
        """
        owner = job.to_manifest()
        self.kube.ensure_configmap(manifests.config_map(job, config_text), owner)
        self.faults.hit("after-configmap-create")
        model = TrainerConfig.model_validate_json(config_text).base_model
        desired = self.workload.build(job, self.opts, model)
        managed = self.managed_by_kueue(job)
        desired = manifests.overlay(desired, self.workload.suspend_patch(suspend or managed))
        created = self.kube.ensure_workload(self.workload.kind, desired, owner)
        self.faults.hit(f"after-{self.name}-create")
        return self.with_admission(self.workload.view(created), None)

    def set_suspended(self, job: FineTuneJob, workload: WorkloadView, suspend: bool) -> None:
        """Suspend or resume the workload: its controller deletes or recreates the pods.

        Kueue-managed: deactivate or reactivate its Kueue Workload instead (one Kueue has not
        made yet is patched on the pass that sees it appear).
        """
        what = "suspending" if suspend else "resuming"
        if not self.managed_by_kueue(job):
            patch = self.workload.suspend_patch(suspend)
            self.kube.patch_workload(
                self.workload.kind, self._namespace(job), workload.name, patch, what
            )
        elif workload.admission is None:
            log.info("%s: waiting for Kueue's Workload before %s", job.metadata.name, what)
        else:
            self.kube.patch_workload(
                kueue.KUEUE_WORKLOAD,
                self._namespace(job),
                workload.admission.name,
                kueue.active_patch(not suspend),
                f"{what} through Kueue",
            )

    def observe(self, job: FineTuneJob, workload: WorkloadView, *, suspend: bool) -> Observed:
        """The phase the workload's status implies; queued through Kueue, with why it waits."""
        observed = self.workload.observe(workload.status, suspend)
        if observed.phase is JobPhase.QUEUED and self.managed_by_kueue(job):
            waiting = kueue.waiting(workload.admission, job.spec.queue or "")
            observed = dataclasses.replace(observed, waiting=waiting)
        return observed

    def stop(self, job: FineTuneJob) -> None:
        """Delete the workload (its pods go with it) and the ConfigMap."""
        self.kube.delete_children(
            self._namespace(job),
            self.workload.kind,
            manifests.workload_name(job),
            manifests.configmap_name(job),
        )

    def release(self, job: FineTuneJob) -> None:
        """Nothing: a finished workload stays for ``kubectl describe`` until its job is deleted
        (the finalizer deletes it then).
        """
