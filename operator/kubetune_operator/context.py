"""What the operator's handlers share, built once per process: the settings, the object store,
the Kubernetes client, the metrics, what the vLLM replicas last reported, and the job driver
with the cluster runtime plugged in (TrainJobs or PyTorchJobs, as the settings say).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, cast

import kopf

from kubetune.base_models import from_manifest, org_catalogue
from kubetune.finetunejob import FineTuneJob
from kubetune.settings import BaseModelEntry, Settings, WorkloadKind
from kubetune.storage_layout import StorageLayout
from kubetune_operator.base_model_checks import ClusterBaseModelChecks
from kubetune_operator.kube import KubeClient, KubeJobStore
from kubetune_operator.merges import ClusterMerges
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.pytorchjob import PYTORCHJOB_WORKLOAD
from kubetune_operator.trainjob import TRAINJOB_WORKLOAD
from kubetune_operator.workloads import ClusterRuntime, WorkloadType, WorkloadView
from kubetune_runtime.driver import JobDriver
from kubetune_runtime.faults import Faults
from kubetune_runtime.objectstore import ObjectStore
from kubetune_runtime.reconcile import Notice, Transition
from kubetune_runtime.serving import AdapterServing, ServingState

WORKLOADS: Final[dict[WorkloadKind, WorkloadType]] = {
    WorkloadKind.TRAINJOB: TRAINJOB_WORKLOAD,
    WorkloadKind.PYTORCHJOB: PYTORCHJOB_WORKLOAD,
}


class KubernetesEvents:
    """Posts the driver's transitions and notices as Kubernetes Events on the FineTuneJob.

    Called from a pass's worker thread: kopf queues the Event for its poster thread-safely.
    """

    def post(self, job: FineTuneJob, event: Transition | Notice) -> None:
        """Post one Event about ``job``."""
        kopf.event(
            kopf.Body(cast(kopf.RawBody, job.to_manifest())),
            type="Warning" if event.warning else "Normal",
            reason=event.reason,
            message=event.message,
        )


@dataclass
class ClusterServing:
    """Serving as the driver sees it in a cluster: the sync loop pushes the vLLM replicas on
    its own (a succeeded job enters the adapters' index), and their last reports say where
    each model stands.
    """

    state: ServingState

    def publish(self, job: FineTuneJob) -> None:
        """Nothing to do in the pass: the sync loop picks the new model up from the index."""

    def where(self, job: FineTuneJob) -> AdapterServing:
        """Where the job's model stands on the replicas of its base model."""
        model = job.status.fine_tuned_model if job.status else None
        return self.state.of(model or "", job.spec.base_model)


@dataclass
class OperatorContext:
    """Everything the handlers need (see the module docstring)."""

    settings: Settings
    store: ObjectStore
    kube: KubeClient
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    faults: Faults = field(default_factory=Faults.from_env)
    serving: ServingState = field(default_factory=ServingState)

    def __post_init__(self) -> None:
        namespace = self.settings.kubernetes.namespace
        opts = self.settings.operator
        self.runtime = ClusterRuntime(
            WORKLOADS[opts.runtime],
            self.kube,
            opts,
            namespace,
            self.faults,
            kueue=self.settings.queueing.kueue,
        )
        self.merges = ClusterMerges(
            self.kube, self.store, self.settings.object_store.layout(), opts
        )
        self.base_model_checks = ClusterBaseModelChecks(self.kube, self.store, self.settings)
        self.driver: JobDriver[WorkloadView] = JobDriver(
            settings=self.settings,
            store=self.store,
            jobs=KubeJobStore(self.kube, namespace),
            runtime=self.runtime,
            progress_seconds=opts.progress_seconds,
            # The pods' grace period, and time for the kubelet to report them gone.
            stop_grace_seconds=opts.termination_grace_seconds + 30,
            serving=ClusterServing(self.serving),
            sink=KubernetesEvents(),
            metrics=self.metrics,
            faults=self.faults,
            catalogue=self.catalogue,
        )

    def catalogue(self, org: str) -> list[BaseModelEntry]:
        """The base models ``org`` may train on: the settings' catalogue, then its ready
        BaseModel objects (read when a job is resolved: rare, and never a stale cache).
        """
        namespace = self.settings.kubernetes.namespace
        registered = [from_manifest(o) for o in self.kube.list_base_models(namespace, org)]
        return org_catalogue(self.settings.models, registered, org)

    @property
    def layout(self) -> StorageLayout:
        """The object-store key builder."""
        return self.settings.object_store.layout()
