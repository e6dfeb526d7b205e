"""Fixtures for the operator's end-to-end tests: the operator as a process, the training-operator
played by tests.harness.training_operator, the real trainer on a tiny Llama, S3 and the real
apiserver. Each test gets its own namespace and its own object-store prefix.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.events import JobEvent, read_events
from kubetune.finetunejob import GROUP, LABEL_ORG, PLURAL, VERSION, FineTuneJobStatus, JobPhase
from kubetune.ids import new_job_id
from kubetune.lifecycle import TERMINAL_PHASES
from kubetune.settings import ObjectStoreSettings
from kubetune_operator.base_model_checks import CHECK_COMPONENT
from kubetune_operator.merges import COMPONENT_LABEL, MERGE_COMPONENT
from kubetune_runtime.objectstore import ObjectStore, S3ObjectStore
from tests.chart.chart import CHART, parse_manifests
from tests.harness.batch_jobs import BatchJobs
from tests.harness.crds import JOBSET_CRDS, KUEUE_CRDS, TRAINER_V2_CRDS
from tests.harness.files import store_training_file
from tests.harness.kube import KubeCluster
from tests.harness.kubelet import TRAINER_ENTRYPOINT
from tests.harness.kueue import PYTORCHJOB_KIND, TRAINJOB_KIND, Kueue
from tests.harness.operator import OperatorProcess
from tests.harness.paths import REPO_ROOT, free_port
from tests.harness.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Server
from tests.harness.tools import Tool, ensure_kube_tools
from tests.harness.trainer_v2 import JOBSET, TRAINER, TRAINJOBS, TrainerV2
from tests.harness.training_operator import (
    GROUP as PYTORCHJOB_GROUP,
)
from tests.harness.training_operator import (
    PLURAL as PYTORCHJOB_PLURAL,
)
from tests.harness.training_operator import (
    VERSION as PYTORCHJOB_VERSION,
)
from tests.harness.training_operator import (
    TrainingOperator,
    wait_until,
)

ORG = "default"
MODEL = "tiny-llama"
CONTEXT_LENGTH = 256
CREDENTIALS_SECRET = "trainer-env"
# 40 examples, 2 epochs of batch 4: 20 optimizer steps, a checkpoint every 5.
N_EXAMPLES = 40
PLANNED_STEPS = 20
JOB_TIMEOUT = 180.0
# What a trainer pod's image environment would hold on this host: offline, one thread each
# (two replicas share two cores).
NODE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests/trainer tiny Llama and tokenizer, saved once per session."""
    from tests.trainer.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny-llama"))


def sft_rows(n: int = N_EXAMPLES) -> list[dict[str, Any]]:
    """Chat examples the tiny model trains on."""
    from tests.trainer.tiny import sft_examples

    return sft_examples(n)


def jsonl(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Rows as JSONL."""
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def wait_for_phase(
    status_of: Callable[[str], FineTuneJobStatus],
    debug: Callable[[str], str],
    name: str,
    phases: Sequence[JobPhase],
    timeout: float,
) -> FineTuneJobStatus:
    """Wait until ``status_of(name)`` is in one of ``phases``; a terminal phase not asked for
    fails at once, with ``debug(name)``.
    """

    def reached() -> FineTuneJobStatus | None:
        status = status_of(name)
        if status.phase in phases:
            return status
        if status.phase in TERMINAL_PHASES:
            raise AssertionError(
                f"{name} ended {status.phase} while waiting for {phases}\n{debug(name)}"
            )
        return None

    result: FineTuneJobStatus = wait_until(
        reached, timeout, f"{name} to reach {phases}", lambda: debug(name)
    )
    return result


def job_manifest(
    namespace: str | None, training_file: str, name: str | None = None, **spec: Any
) -> dict[str, Any]:
    """A FineTuneJob for the tiny model: 2 nodes of one CPU process each, 20 steps, a
    checkpoint every 5; ``spec`` overrides (``hyperparameters`` merges).
    """
    hyperparameters = {
        "nEpochs": 2,
        "batchSize": 4,
        "learningRateMultiplier": 1.0,
        **spec.pop("hyperparameters", {}),
    }
    metadata: dict[str, Any] = {"name": name or new_job_id(), "labels": {LABEL_ORG: ORG}}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": metadata,
        "spec": {
            "org": ORG,
            "model": MODEL,
            "trainingFile": training_file,
            "seed": 1234,
            "method": {"type": "supervised", "hyperparameters": hyperparameters},
            "adapter": {"type": "lora", "r": 8, "alpha": 16},
            "resources": {"nodes": 2, "gpusPerNode": 0},
            "checkpointing": {"everySteps": 5, "keep": 2},
            **spec,
        },
    }


@dataclass
class Testbed:
    """One test's world: namespace, store prefix, operator process, training-operator."""

    __test__ = False  # not a test class, despite its name

    namespace: str
    store: ObjectStore
    store_settings: ObjectStoreSettings
    api_client: Any
    kubectl: Tool
    operator: OperatorProcess
    trainers: Any  # TrainingOperator (PyTorchJobs) or TrainerV2 (TrainJobs), by ``runtime``
    runtime: str = "pytorchjob"
    kueue: Kueue | None = None  # the Kueue stand-in, when the testbed has one
    merges: BatchJobs | None = None  # the Job controller's stand-in, for the merge Jobs
    checks: BatchJobs | None = None  # and for the check Jobs of registered base models
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from kubernetes import client

        self.custom: Any = client.CustomObjectsApi(self.api_client)
        self.core: Any = client.CoreV1Api(self.api_client)

    @property
    def layout(self) -> Any:
        """The store's key builder (with this test's prefix)."""
        return self.store_settings.layout()

    # -- inputs --------------------------------------------------------------------------------
    def upload(self, data: bytes, *, stats: dict[str, Any] | None = None) -> str:
        """Store a file as the API does: bytes, then metadata with its validation report."""
        return store_training_file(self.store, self.layout, ORG, data, stats=stats)

    def manifest(self, training_file: str, name: str | None = None, **spec: Any) -> dict[str, Any]:
        """A FineTuneJob for the tiny model: 2 nodes, CPU, 20 steps."""
        return job_manifest(self.namespace, training_file, name, **spec)

    def apply(self, manifest: dict[str, Any]) -> str:
        """``kubectl apply -f -`` the manifest; returns the job's name."""
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
        return str(manifest["metadata"]["name"])

    def submit(self, rows: Sequence[Mapping[str, Any]] | None = None, **spec: Any) -> str:
        """Upload training data and apply a job on it."""
        return self.apply(self.manifest(self.upload(jsonl(rows or sft_rows())), **spec))

    def patch_spec(self, name: str, **fields: Any) -> None:
        """``kubectl patch --type merge`` the job's spec (how a user pauses or cancels)."""
        body = json.dumps({"spec": fields})
        self.kubectl(
            "patch", "finetunejob", name, "-n", self.namespace, "--type", "merge", "-p", body
        )

    # -- observations --------------------------------------------------------------------------
    def job(self, name: str) -> dict[str, Any]:
        """The FineTuneJob object."""
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return result

    def status(self, name: str) -> FineTuneJobStatus:
        """The job's status (empty before the operator wrote one)."""
        return FineTuneJobStatus.model_validate(self.job(name).get("status") or {})

    def pytorchjobs(self) -> list[dict[str, Any]]:
        """Every PyTorchJob in the namespace."""
        items: list[dict[str, Any]] = self.custom.list_namespaced_custom_object(
            PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, self.namespace, PYTORCHJOB_PLURAL
        )["items"]
        return items

    def trainjobs(self) -> list[dict[str, Any]]:
        """Every TrainJob in the namespace."""
        items: list[dict[str, Any]] = self.custom.list_namespaced_custom_object(
            *TRAINER, self.namespace, TRAINJOBS
        )["items"]
        return items

    def jobset(self, name: str) -> dict[str, Any]:
        """The JobSet of a TrainJob."""
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(
            *JOBSET[:2], self.namespace, JOBSET[2], name
        )
        return result

    def workloads(self) -> list[dict[str, Any]]:
        """Every workload of this testbed's runtime (TrainJobs or PyTorchJobs)."""
        return self.trainjobs() if self.runtime == "trainjob" else self.pytorchjobs()

    def pod_templates(self, name: str) -> list[dict[str, Any]]:
        """The pod templates the training controller makes the job's pods from: the JobSet's
        (a TrainJob's, merged by the Trainer v2 stand-in), or the PyTorchJob's replicas'.
        """
        if self.runtime == "trainjob":

            def jobset() -> dict[str, Any] | None:
                with contextlib.suppress(Exception):
                    return self.jobset(name)
                return None

            built = self.wait(jobset, f"the JobSet of {name}")
            return [r["template"]["spec"]["template"] for r in built["spec"]["replicatedJobs"]]
        (workload,) = self.wait(
            lambda: [w for w in self.workloads() if w["metadata"]["name"] == name],
            f"the PyTorchJob of {name}",
        )
        return [r["template"] for r in workload["spec"]["pytorchReplicaSpecs"].values()]

    def kube_events(self, name: str) -> list[Any]:
        """The Kubernetes Events about the job, oldest first."""
        events = self.core.list_namespaced_event(
            self.namespace,
            field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob",
        ).items
        # eventTime has microseconds; firstTimestamp only seconds.
        return sorted(events, key=lambda e: e.event_time or e.first_timestamp)

    def job_events(self, name: str) -> list[JobEvent]:
        """The job's event log in the store (trainer, API and operator events)."""
        return read_events(self.store, self.layout.events_prefix(ORG, name))

    def debug(self, name: str | None = None) -> str:
        """Everything useful when a wait times out."""
        parts = []
        if name is not None:
            try:
                parts.append(f"status: {json.dumps(self.job(name).get('status'), indent=1)}")
            except Exception as exc:
                parts.append(f"status: unavailable ({exc!r})")
            parts.append(f"replica logs:\n{self.trainers.logs(name)}")
        parts.append(f"fixture errors: {self.trainers.errors[-5:]}")
        if self.merges is not None:
            parts.append(f"merge Job errors: {self.merges.errors[-5:]}")
        if self.checks is not None:
            parts.append(f"check Job errors: {self.checks.errors[-5:]}")
        if self.kueue is not None:
            parts.append(f"kueue errors: {self.kueue.errors[-5:]}, flips: {self.kueue.flips}")
        parts.append(self.operator.logs())
        return "\n".join(parts)

    def wait_phase(
        self, name: str, *phases: JobPhase, timeout: float = JOB_TIMEOUT
    ) -> FineTuneJobStatus:
        """Wait until the job is in one of ``phases``; a terminal phase not asked for fails."""
        return wait_for_phase(self.status, self.debug, name, phases, timeout)

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = JOB_TIMEOUT) -> Any:
        """Wait for ``predicate`` with this testbed's debug output on timeout."""
        return wait_until(predicate, timeout, what, self.debug)


def install_training_runtime(
    kube: KubeCluster, namespace: str, settings: Mapping[str, str], profiles: str | None = None
) -> str:
    """Render the chart's ClusterTrainingRuntime for one test (named after its namespace, with
    its backoff limit and grace period, and one per hardware profile with a runtime class) and
    create them, with the Trainer v2 and JobSet CRDs; returns the main one's name.
    """
    kube.ensure_crds(TRAINER_V2_CRDS + JOBSET_CRDS)
    values = [
        f"fullnameOverride={namespace}",
        f"trainer.metricsPort={settings.get('trainer_metrics_port', '9400')}",
        f"trainer.credentialsSecret={CREDENTIALS_SECRET}",
        f"trainer.maxRestarts={settings.get('backoff_limit', '6')}",
        f"trainer.terminationGracePeriodSeconds={settings.get('termination_grace_seconds', '60')}",
    ]
    helm = Tool(ensure_kube_tools()["helm"], {"KUBECONFIG": "/dev/null"})
    args = ["template", "kt", str(CHART), "--show-only", "templates/trainer-runtime.yaml"]
    for value in values:
        args += ["--set", value]
    if profiles is not None:
        args += ["--set-json", f"trainer.hardwareProfiles={profiles}"]
    runtime, *per_profile = parse_manifests(helm(*args))
    for body in (runtime, *per_profile):
        kube.create_cluster_object(body)
    return str(runtime["metadata"]["name"])


def operator_env(
    kube: KubeCluster, s3: S3Server, namespace: str, model: Path, **settings: str
) -> dict[str, str]:
    """The operator's environment: cluster, store (own prefix), catalogue, fast polling."""
    env = {
        **kube.env(),
        **s3.env(),
        "KUBETUNE_MODE": "kubernetes",
        "KUBETUNE_KUBERNETES__NAMESPACE": namespace,
        "KUBETUNE_OBJECT_STORE__PREFIX": namespace,
        "KUBETUNE_MODELS": json.dumps(
            [{"id": MODEL, "path": str(model), "context_length": CONTEXT_LENGTH}]
        ),
        # The training-operator stand-in runs PyTorchJobs; make_testbed(runtime="trainjob")
        # switches to Kubeflow Trainer v2's TrainJobs and its stand-in.
        "KUBETUNE_OPERATOR__RUNTIME": "pytorchjob",
        "KUBETUNE_OPERATOR__CREDENTIALS_SECRET": CREDENTIALS_SECRET,
        "KUBETUNE_OPERATOR__RECONCILE_SECONDS": "1",
        "KUBETUNE_OPERATOR__PROGRESS_SECONDS": "0.5",
        "KUBETUNE_OPERATOR__TRAINER_METRICS_PORT": "0",
        "KUBETUNE_OPERATOR__TERMINATION_GRACE_SECONDS": "60",
        "KUBETUNE_LIMITS__MIN_EXAMPLES": "10",
    }
    env.update({f"KUBETUNE_OPERATOR__{k.upper()}": v for k, v in settings.items()})
    return env


@pytest.fixture
def make_testbed(
    kube: KubeCluster,
    kube_api: Any,
    namespace: str,
    s3: S3Server,
    kubectl: Tool,
    tiny_model: Path,
    tmp_path: Path,
) -> Iterator[Callable[..., Testbed]]:
    """Build this test's testbed: ``make_testbed(entrypoint=..., **operator_settings)``."""
    from kubernetes import client

    made: list[Testbed] = []
    # The trainer pods' credentials, as a Secret the operator's settings name (envFrom).
    core: Any = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": CREDENTIALS_SECRET},
            "stringData": {
                "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION,
            },
        },
    )

    def make(
        *,
        entrypoint: Sequence[str] = TRAINER_ENTRYPOINT,
        start_operator: bool = True,
        runtime: str = "pytorchjob",
        kueue_quota: float | None = None,
        env: Mapping[str, str] | None = None,
        **settings: str,
    ) -> Testbed:
        store_settings = ObjectStoreSettings(
            backend="s3",
            bucket=s3.bucket,
            prefix=namespace,
            endpoint_url=s3.endpoint_url,
            region=REGION,
        )
        (tmp_path / "pods").mkdir(exist_ok=True)
        controller: type[TrainerV2 | TrainingOperator] = TrainingOperator
        if runtime == "trainjob":
            profiles = (env or {}).get("KUBETUNE_OPERATOR__HARDWARE_PROFILES")
            name = install_training_runtime(kube, namespace, settings, profiles)
            settings = {**settings, "runtime": "trainjob", "training_runtime": name}
            controller = TrainerV2
        trainers = controller(
            kube.api_client(),
            namespace,
            tmp_path / "pods",
            entrypoint=entrypoint,
            node_env=NODE_ENV,
        ).start()
        operator_environment = {
            **operator_env(kube, s3, namespace, tiny_model, **settings),
            **(env or {}),
        }
        kueue = None
        if kueue_quota is not None:
            # Kueue admits the jobs of the testbed's queue, with this many cores of quota.
            kube.ensure_crds(KUEUE_CRDS)
            kind = TRAINJOB_KIND if runtime == "trainjob" else PYTORCHJOB_KIND
            kueue = Kueue(kube.api_client(), namespace, kind, quota=kueue_quota).start()
            operator_environment["KUBETUNE_QUEUEING__KUEUE"] = "true"
        operator = OperatorProcess(operator_environment, tmp_path)
        merges = BatchJobs(
            kube.api_client(),
            namespace,
            tmp_path / "merges",
            node_env=NODE_ENV,
            labels={COMPONENT_LABEL: MERGE_COMPONENT},
            poll=0.5,
        ).start()
        # In the trainers' folder: one host, so both see the same volume claims.
        checks = BatchJobs(
            kube.api_client(),
            namespace,
            tmp_path / "pods",
            node_env=NODE_ENV,
            labels={COMPONENT_LABEL: CHECK_COMPONENT},
            poll=0.5,
        ).start()
        testbed = Testbed(
            namespace=namespace,
            store=S3ObjectStore(s3.bucket, client=s3.client(), internal_prefix=namespace),
            store_settings=store_settings,
            api_client=kube.api_client(),
            kubectl=kubectl,
            operator=operator,
            trainers=trainers,
            runtime=runtime,
            kueue=kueue,
            merges=merges,
            checks=checks,
        )
        made.append(testbed)
        if start_operator:
            operator.start()
        return testbed

    yield make
    for testbed in made:
        testbed.operator.stop()
        testbed.trainers.stop()
        for jobs in (testbed.merges, testbed.checks):
            if jobs is not None:
                jobs.stop()
        if testbed.kueue is not None:
            testbed.kueue.stop()


@pytest.fixture
def testbed(make_testbed: Callable[..., Testbed]) -> Testbed:
    """The default testbed: the real trainer, operator running."""
    return make_testbed()


def new_name() -> str:
    """A fresh job name."""
    return new_job_id()


def unique(prefix: str) -> str:
    """A short unique DNS label."""
    return f"{prefix}-{secrets.token_hex(3)}"


# kopf peering: the KopfPeering CRD and the object two replicas share.
PEERING_CRD = REPO_ROOT / "crds" / "kopf-peering.yaml"
PEERING = "kubetune-operator"


def make_peered_testbed(make_testbed: Callable[..., Testbed]) -> Testbed:
    """A testbed whose operator (not started) peers, with the higher priority (200)."""
    return make_testbed(start_operator=False, peering=PEERING, peering_priority="200")


@contextlib.contextmanager
def peered_operators(
    testbed: Testbed, kube: KubeCluster, workdir: Path
) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    """Start the testbed's operator (the leader) and a follower with the same settings and
    priority 100; yield both once both keep alive in the peering object; stop both after.

    Settings the test adds to ``testbed.operator.env`` before entering reach both replicas.
    """
    from kubernetes import client

    kube.apply_crds((PEERING_CRD,))
    custom: Any = client.CustomObjectsApi(testbed.api_client)
    peering = ("kopf.dev", "v1", testbed.namespace, "kopfpeerings")
    custom.create_namespaced_custom_object(
        *peering,
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}},
    )
    leader = testbed.operator
    (workdir / "follower").mkdir()
    follower = OperatorProcess(
        {
            **leader.env,
            "KUBETUNE_OPERATOR__PEERING_PRIORITY": "100",
            "KUBETUNE_OPERATOR__METRICS_PORT": str(free_port()),
        },
        workdir / "follower",
    )
    leader.start()
    follower.start()
    try:

        def peers() -> int:
            obj = custom.get_namespaced_custom_object(*peering, PEERING)
            return len(obj.get("status") or {})

        # Both replicas keep their keep-alives in the peering object; the follower starts
        # paused (kopf pauses until it has seen its peers) and stays so.
        testbed.wait(lambda: peers() == 2, "both replicas to join the peering", timeout=60)
        yield leader, follower
    finally:
        follower.stop()
        leader.stop()


def wait_resumed(testbed: Testbed, operator: OperatorProcess) -> None:
    """Wait until a paused replica resumes (its peer with the higher priority left)."""
    testbed.wait(
        lambda: "Resuming operations" in operator.logs(), "the follower to resume", timeout=60
    )
