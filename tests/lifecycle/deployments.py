"""The two places a FineTuneJob runs, behind one interface, so one suite covers both runtimes.

- :class:`ClusterDeployment`: the operator as a real process on the real apiserver, the
  PyTorchJob runtime, the training-operator played by ``tests.harness.training_operator``, S3;
  jobs are applied with kubectl.
- :class:`LocalDeployment`: local mode's runner (the job driver with the subprocess runtime) on
  its SQLite store and local object store; jobs are stored as the API stores them.

Both run the real trainer (two processes over gloo), deliver webhooks to a loopback receiver
that verifies every signature, and, when given a vLLM, serve the result on it. What only one
runtime has (a PyTorchJob, a trainer folder) is checked by its own ``check_*`` methods.
"""

from __future__ import annotations

import json
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.events import JobEvent, read_events
from kubetune.finetunejob import (
    GROUP,
    KIND,
    LABEL_JOB,
    PLURAL,
    VERSION,
    ConditionStatus,
    FineTuneJob,
    FineTuneJobStatus,
    JobPhase,
)
from kubetune.settings import Settings
from kubetune.storage_layout import StorageLayout
from kubetune.trainer_config import TrainerConfig
from kubetune_api.backends.local import LocalJobBackend
from kubetune_local.runner import LocalRunner
from kubetune_local.runtime import SubprocessRuntime
from kubetune_operator.manifests import CONFIG_FILE, configmap_name_of
from kubetune_runtime.objectstore import ObjectStore
from kubetune_runtime.reconcile import Notice, Transition
from tests.harness.files import store_training_file
from tests.harness.training_operator import wait_until
from tests.local.server import processes_using
from tests.operator.conftest import (
    JOB_TIMEOUT,
    ORG,
    PLANNED_STEPS,
    Testbed,
    job_manifest,
    jsonl,
    sft_rows,
    wait_for_phase,
)
from tests.webhooks.receiver import Receiver


@dataclass(frozen=True)
class Announced:
    """One transition or notice posted about a job: a Kubernetes Event on the cluster."""

    reason: str
    warning: bool


class Deployment(ABC):
    """A runtime with everything around it, as the lifecycle suite drives and observes it."""

    runtime: str
    store: ObjectStore
    layout: StorageLayout
    receiver: Receiver

    # -- what a user does ----------------------------------------------------------------------
    def upload(self, data: bytes) -> str:
        """Store a training file as the API does (bytes, then metadata with its report)."""
        return store_training_file(self.store, self.layout, ORG, data)

    def submit(self, rows: Sequence[Mapping[str, Any]] | None = None, **spec: Any) -> str:
        """Upload training data and create a job on it; returns the job's id."""
        return self.create(self.upload(jsonl(rows or sft_rows())), **spec)

    @abstractmethod
    def create(self, training_file: str, **spec: Any) -> str:
        """Create a job on an uploaded file."""

    @abstractmethod
    def patch_spec(self, name: str, **fields: bool) -> None:
        """Set ``cancel`` or ``suspend``, as the API and ``kubectl patch`` do."""

    # -- what a user sees ----------------------------------------------------------------------
    @abstractmethod
    def annotate(self, name: str, annotations: dict[str, str]) -> None:
        """Annotate the job, as the API does (a merge, a deleted model)."""

    @abstractmethod
    def merging(self, name: str) -> int:
        """Merges of the job's models under way (Jobs on a cluster, children locally)."""

    @abstractmethod
    def status(self, name: str) -> FineTuneJobStatus:
        """The job's status (empty before the first pass)."""

    def job_events(self, name: str) -> list[JobEvent]:
        """The job's event log (OpenAI's events list)."""
        return read_events(self.store, self.layout.events_prefix(ORG, name))

    @abstractmethod
    def posted(self, name: str) -> list[Announced]:
        """The transitions and notices posted about the job so far, oldest first."""

    def announced(self, name: str, through: str, timeout: float = 30) -> list[Announced]:
        """What was posted about the job, once one with reason ``through`` is there (posting
        may trail the status that caused it).
        """

        def posted() -> list[Announced] | None:
            found = self.posted(name)
            return found if through in [a.reason for a in found] else None

        result: list[Announced] = self.wait(posted, f"a {through} event for {name}", timeout)
        return result

    def reasons(self, name: str, through: str) -> list[str]:
        """The reasons of :meth:`announced`."""
        return [a.reason for a in self.announced(name, through)]

    def webhook_events(self, name: str) -> list[dict[str, Any]]:
        """The verified webhook events the receiver got about the job."""
        return [e for e in self.receiver.events() if e["data"]["id"] == name]

    # -- what only the platform sees -----------------------------------------------------------
    @abstractmethod
    def launches(self, name: str) -> int:
        """How many times the job's trainer was started (restarts included)."""

    @abstractmethod
    def alive(self, name: str) -> int:
        """Trainer processes of the job running now."""

    @abstractmethod
    def workloads(self, name: str) -> int:
        """The job's workloads that exist now (PyTorchJobs, local workloads)."""

    @abstractmethod
    def preempt(self, name: str, sig: int = signal.SIGTERM) -> None:
        """SIGTERM to a trainer, as a spot node's reclaim (or a laptop's shutdown) sends it;
        SIGKILL for a crash (the OOM killer, a lost node).
        """

    @abstractmethod
    def check_succeeded(self, name: str, status: FineTuneJobStatus) -> None:
        """What only this runtime shows of a succeeded job."""

    @abstractmethod
    def check_paused(self, name: str) -> None:
        """What only this runtime shows of a paused job."""

    @abstractmethod
    def check_gave_up(self, name: str, *, backoff_limit: int, exit_code: int) -> None:
        """The trainer failed with ``exit_code`` once more than ``backoff_limit`` allows."""

    @abstractmethod
    def debug(self, name: str | None = None) -> str:
        """Everything useful when a wait times out."""

    @abstractmethod
    def close(self) -> None:
        """Stop whatever this deployment started."""

    # -- waiting -------------------------------------------------------------------------------
    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = JOB_TIMEOUT) -> Any:
        """Wait for ``predicate`` to return something truthy; fail with the debug output."""
        return wait_until(predicate, timeout, what, self.debug)

    def wait_phase(
        self, name: str, *phases: JobPhase, timeout: float = JOB_TIMEOUT
    ) -> FineTuneJobStatus:
        """Wait until the job is in one of ``phases``; a terminal phase not asked for fails."""
        return wait_for_phase(self.status, self.debug, name, phases, timeout)

    def wait_served(self, name: str, timeout: float = 60) -> FineTuneJobStatus:
        """Wait until the job's ``Served`` condition is True."""

        def served() -> FineTuneJobStatus | None:
            status = self.status(name)
            cond = {c.type: c for c in status.conditions}.get("Served")
            return status if cond is not None and cond.status is ConditionStatus.TRUE else None

        result: FineTuneJobStatus = self.wait(served, f"{name} to be served", timeout)
        return result


# ---------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------


@dataclass
class ClusterDeployment(Deployment):
    """The operator's testbed (see ``tests/operator/conftest.py``); its runtime's controller is
    played by a stand-in. What differs by runtime is in the two subclasses.
    """

    testbed: Testbed
    receiver: Receiver

    def __post_init__(self) -> None:
        self.store = self.testbed.store
        self.layout = self.testbed.layout

    def create(self, training_file: str, **spec: Any) -> str:
        """``kubectl apply`` the job."""
        return self.testbed.apply(job_manifest(self.testbed.namespace, training_file, **spec))

    def patch_spec(self, name: str, **fields: bool) -> None:
        """``kubectl patch --type merge``."""
        self.testbed.patch_spec(name, **fields)

    def annotate(self, name: str, annotations: dict[str, str]) -> None:
        """``kubectl annotate``, as a merge patch."""
        self.testbed.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            self.testbed.namespace,
            PLURAL,
            name,
            {"metadata": {"annotations": annotations}},
        )

    def merging(self, name: str) -> int:
        """The job's merge Jobs in the apiserver (deleted once they ended)."""
        jobs = self.testbed.custom.list_namespaced_custom_object(
            "batch", "v1", self.testbed.namespace, "jobs", label_selector=f"{LABEL_JOB}={name}"
        )["items"]
        return len(jobs)

    def status(self, name: str) -> FineTuneJobStatus:
        """From the apiserver."""
        return self.testbed.status(name)

    def posted(self, name: str) -> list[Announced]:
        """The job's Kubernetes Events."""
        return [Announced(e.reason, e.type == "Warning") for e in self.testbed.kube_events(name)]

    def alive(self, name: str) -> int:
        """Trainer pods whose process runs."""
        return int(self.testbed.trainers.alive(name))

    def workloads(self, name: str) -> int:
        """The job's workloads (TrainJobs or PyTorchJobs)."""
        return sum(1 for w in self.testbed.workloads() if w["metadata"]["name"] == name)

    def check_succeeded(self, name: str, status: FineTuneJobStatus) -> None:
        """One workload, owned by the job, created once and run with the stored config;
        kubectl and the operator's metrics show the job.
        """
        testbed = self.testbed
        (workload,) = testbed.workloads()
        (owner,) = workload["metadata"]["ownerReferences"]
        uid = testbed.job(name)["metadata"]["uid"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == (KIND, uid, True)
        assert testbed.trainers.created(name) == [workload["metadata"]["uid"]]
        configmap = testbed.core.read_namespaced_config_map(
            configmap_name_of(name), testbed.namespace
        )
        stored = self.store.get_bytes(self.layout.job_config_key(ORG, name))
        assert json.loads(configmap.data[CONFIG_FILE]) == json.loads(stored)
        assert status.observed_generation == testbed.job(name)["metadata"]["generation"]
        row = testbed.kubectl("get", "ftj", name, "-n", testbed.namespace, "--no-headers")
        progress = f"{PLANNED_STEPS}/{PLANNED_STEPS}"
        assert row.split()[1:4] == ["succeeded", "tiny-llama", progress]
        metrics = self.wait(
            lambda: (
                (m := testbed.operator.metrics())
                and 'kubetune_operator_jobs{phase="succeeded"} 1.0' in m
                and m
            ),
            "the metrics to count the job",
        )
        assert (
            'kubetune_operator_jobs_finished_total{org="default",phase="succeeded"} 1.0' in metrics
        )
        tokens = 'kubetune_operator_trained_tokens_total{org="default"} '
        (line,) = [x for x in metrics.splitlines() if x.startswith(tokens)]
        assert float(line.removeprefix(tokens)) == status.trained_tokens  # the org's usage
        assert "kubetune_operator_queue_wait_seconds_count 1.0" in metrics
        self.check_workload_succeeded(name, workload)

    @abstractmethod
    def check_workload_succeeded(self, name: str, workload: dict[str, Any]) -> None:
        """What only this runtime's workload shows of a succeeded job."""

    def debug(self, name: str | None = None) -> str:
        """Status, pod logs, the operator's log."""
        return self.testbed.debug(name)

    def close(self) -> None:
        """Nothing: the operator testbed's fixture stops the operator and the trainers."""


@dataclass
class PyTorchJobDeployment(ClusterDeployment):
    """The PyTorchJob runtime; the training-operator is ``tests.harness.training_operator``."""

    runtime: str = "pytorchjob"

    def launches(self, name: str) -> int:
        """Starts of the replica started most often (each replica is a pod)."""
        return max((r.starts for r in self.testbed.trainers.replicas(name)), default=0)

    def preempt(self, name: str, sig: int = signal.SIGTERM) -> None:
        """The kubelet's SIGTERM to the worker pod."""
        self.testbed.trainers.signal(name, "Worker", 0, sig)

    def check_workload_succeeded(self, name: str, workload: dict[str, Any]) -> None:
        """Its two pods (a Master, a Worker) started once each."""
        assert self.testbed.trainers.starts(name) == 2

    def check_gave_up(self, name: str, *, backoff_limit: int, exit_code: int) -> None:
        """Pod failures, counted as the training-operator counts them against backoffLimit."""
        assert self.testbed.trainers.failures(name) == backoff_limit + 1
        codes = {c for r in self.testbed.trainers.replicas(name) for c in r.exit_codes}
        assert codes == {exit_code}

    def check_paused(self, name: str) -> None:
        """The PyTorchJob is suspended and the training-operator says so."""
        (pytorchjob,) = self.testbed.pytorchjobs()
        assert pytorchjob["spec"]["runPolicy"]["suspend"] is True
        conditions = {c["type"]: c["status"] for c in pytorchjob["status"]["conditions"]}
        assert conditions["Suspended"] == "True"


@dataclass
class TrainJobDeployment(ClusterDeployment):
    """The TrainJob runtime on the chart's ClusterTrainingRuntime; Kubeflow Trainer v2 and
    JobSet are ``tests.harness.trainer_v2``.
    """

    runtime: str = "trainjob"

    def launches(self, name: str) -> int:
        """Starts of the node pod started most often."""
        return max((p.starts for p in self.testbed.trainers.pods(name)), default=0)

    def preempt(self, name: str, sig: int = signal.SIGTERM) -> None:
        """The kubelet's SIGTERM to the second node's pod."""
        self.testbed.trainers.signal(name, 1, sig)

    def check_workload_succeeded(self, name: str, workload: dict[str, Any]) -> None:
        """Its JobSet ran two node pods once each, from the chart's runtime with the job's patch:
        its config, its labels, the metrics port, the torch environment.
        """
        assert [p.starts for p in self.testbed.trainers.pods(name)] == [1, 1]
        jobset = self.testbed.jobset(name)
        (node,) = jobset["spec"]["replicatedJobs"]
        assert (
            node["template"]["spec"]["completions"],
            node["template"]["spec"]["parallelism"],
        ) == (2, 2)
        pod = node["template"]["spec"]["template"]
        assert pod["metadata"]["labels"]["kubetune.io/job"] == name
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["config"]["configMap"]["name"] == configmap_name_of(name)
        (container,) = pod["spec"]["containers"]
        assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in container["ports"]
        env = {e["name"] for e in container["env"]}
        assert {"PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "KUBETUNE_JOB_ID"} <= env
        assert container["envFrom"] == [{"secretRef": {"name": "trainer-env"}}]

    def check_gave_up(self, name: str, *, backoff_limit: int, exit_code: int) -> None:
        """The JobSet was restarted maxRestarts times, then failed."""
        jobset = self.testbed.jobset(name)
        assert jobset["status"]["restarts"] == backoff_limit
        failed = {c["type"]: c for c in jobset["status"]["conditions"]}["Failed"]
        assert failed["reason"] == "ReachedMaxRestarts"
        codes = [c for p in self.testbed.trainers.pods(name) for c in p.exit_codes]
        # Each attempt failed with the trainer's code; a JobSet restart recreates every job, so
        # a node whose trainer had not exited yet was stopped by it (SIGTERM: 143) - JobSet's
        # documented restart, not a second failure.
        assert codes.count(exit_code) >= backoff_limit + 1
        assert set(codes) <= {exit_code, 128 + signal.SIGTERM}

    def check_paused(self, name: str) -> None:
        """The TrainJob and its JobSet are suspended, and Trainer v2 says so."""
        (trainjob,) = self.testbed.trainjobs()
        assert trainjob["spec"]["suspend"] is True
        conditions = {c["type"]: c for c in trainjob["status"]["conditions"]}
        assert (conditions["Suspended"]["status"], conditions["Suspended"]["reason"]) == (
            "True",
            "Suspended",
        )
        assert self.testbed.jobset(name)["spec"]["suspend"] is True


# ---------------------------------------------------------------------------------------------
# Local mode
# ---------------------------------------------------------------------------------------------


@dataclass
class Recorder:
    """The runner's event sink, recording what passes through (local mode has no Kubernetes
    Events; its sink writes notices into the job's log).
    """

    inner: Any
    posted: list[tuple[str, Announced]] = field(default_factory=list)

    def post(self, job: FineTuneJob, event: Transition | Notice) -> None:
        """Record, then post as local mode does."""
        self.posted.append((job.metadata.name, Announced(event.reason, event.warning)))
        self.inner.post(job, event)


@dataclass
class LocalDeployment(Deployment):
    """Local mode's runner in this process; its trainers are child processes."""

    settings: Settings
    receiver: Receiver
    runtime: str = "subprocess"
    trainer: Path | None = None  # an executable run instead of the Python interpreter

    def __post_init__(self) -> None:
        data = self.settings.data_dir
        self.backend = LocalJobBackend(data / "jobs.sqlite3")
        from kubetune_runtime.objectstore import LocalObjectStore

        self.store = LocalObjectStore(self.settings.store_root())
        self.layout = self.settings.object_store.layout()
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        python = str(self.trainer) if self.trainer is not None else None
        self.subprocesses = SubprocessRuntime(
            self.settings.local, data, host_env=env, **({"python": python} if python else {})
        )
        self.runner = LocalRunner(
            self.settings, self.backend, self.store, runtime=self.subprocesses
        )
        self.recorder = Recorder(self.runner.driver.sink)
        self.runner.driver.sink = self.recorder
        self.runner.start()

    def create(self, training_file: str, **spec: Any) -> str:
        """Store the job in SQLite, as the API does."""
        job = FineTuneJob.from_manifest(job_manifest(None, training_file, **spec))
        self.backend.create(job, None)
        return job.metadata.name

    def patch_spec(self, name: str, **fields: bool) -> None:
        """Set the flags in SQLite, as the API does."""
        self.backend.patch_spec(ORG, name, **fields)

    def annotate(self, name: str, annotations: dict[str, str]) -> None:
        """In SQLite, as the API does."""
        self.backend.annotate(ORG, name, annotations)

    def merging(self, name: str) -> int:
        """1 while the runner's merge child runs for the job."""
        running = self.runner.merges.running
        return int(running is not None and running.job.metadata.name == name)

    def status(self, name: str) -> FineTuneJobStatus:
        """From SQLite."""
        job = self.backend.get(ORG, name)
        return (job.status if job else None) or FineTuneJobStatus()

    def posted(self, name: str) -> list[Announced]:
        """What the driver posted through the runner's sink."""
        return [a for job, a in list(self.recorder.posted) if job == name]

    def launches(self, name: str) -> int:
        """Trainer logs: one per start."""
        return len(list((self.settings.data_dir / "logs").glob(f"{name}-*.log")))

    def alive(self, name: str) -> int:
        """Live processes started for the job (the launcher and torchrun's workers)."""
        return len(processes_using(self.subprocesses.workdir(name)))

    def workloads(self, name: str) -> int:
        """1 while the runtime holds a workload for the job."""
        return 0 if self.subprocesses.lookup(name) is None else 1

    def preempt(self, name: str, sig: int = signal.SIGTERM) -> None:
        """SIGTERM to the trainer's main process."""
        workload = self.subprocesses.lookup(name)
        assert workload is not None, f"{name} has no workload"
        assert workload.process is not None, f"{name} runs no trainer"
        os.kill(workload.process.pid, sig)

    def check_succeeded(self, name: str, status: FineTuneJobStatus) -> None:
        """The trainer ran once and its folder is gone with it; the config is the stored one."""
        assert self.launches(name) == 1
        config = TrainerConfig.model_validate_json(
            self.store.get_bytes(self.layout.job_config_key(ORG, name))
        )
        assert config.event_flush_seconds == 1.0  # local mode's progress bars move per step
        assert config.object_store.local_root == self.settings.store_root()
        self.wait(
            lambda: not self.subprocesses.workdir(name).exists(), "the trainer's folder to go"
        )

    def check_gave_up(self, name: str, *, backoff_limit: int, exit_code: int) -> None:
        """Every launch failed: the first and ``backoff_limit`` relaunches."""
        assert self.launches(name) == backoff_limit + 1

    def check_paused(self, name: str) -> None:
        """The workload is suspended and runs no trainer."""
        workload = self.subprocesses.lookup(name)
        assert workload is not None
        assert workload.suspended
        assert workload.process is None

    def debug(self, name: str | None = None) -> str:
        """Status and the trainer's logs."""
        parts = []
        if name is not None:
            parts.append(f"status: {self.status(name).model_dump_json(indent=1)}")
            for log in sorted((self.settings.data_dir / "logs").glob(f"{name}-*.log")):
                parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop the runner (trainers get SIGTERM)."""
        self.runner.stop()


def wait_gone(deployment: Deployment, name: str, timeout: float = 60) -> None:
    """Wait until no trainer process of the job is left."""
    deployment.wait(lambda: deployment.alive(name) == 0, "the trainers to stop", timeout)


def settle(seconds: float) -> None:
    """Let asynchronous work that should not happen get its chance to (then assert it did not)."""
    time.sleep(seconds)
