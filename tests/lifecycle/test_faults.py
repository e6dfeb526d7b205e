"""Fault injection on the cluster runtimes: while a job trains, its operator is SIGKILLed, one
trainer replica is SIGKILLed, S3 goes away for seconds, the apiserver is killed and restarted,
or the API a client is polling is SIGKILLed and started again. Each fault lands at a random
point of the run (seeded, so a failure replays).

After every fault the job must end ``succeeded`` with exactly the planned steps, one final
adapter, one workload created once, no trainer process left, and its training file intact;
after the API's crash the restarted API must show the job, its events and its file.

``make test`` runs a sample (each fault but the operator's SIGKILL once, the runtimes taking
turns); ``make test-faults`` runs ``KUBETUNE_FAULT_ROUNDS`` rounds (from
``KUBETUNE_FAULT_FIRST_ROUND``, 0) of every fault on every runtime. Each test records its fault
and outcome; the root conftest prints the tally (faults injected, jobs recovered, lost,
orphans, duplicates).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest

from kubetune.finetunejob import JobPhase
from tests.harness.api import ApiServer, backend_env, start_api
from tests.harness.kube import KubeCluster
from tests.harness.s3 import S3Server
from tests.harness.tcpproxy import TcpProxy
from tests.lifecycle.deployments import ClusterDeployment
from tests.lifecycle.test_lifecycle import first_checkpoint
from tests.operator.conftest import ORG, PLANNED_STEPS, jsonl, sft_rows

FAULTS = ("operator-sigkill", "trainer-sigkill", "s3-outage", "apiserver-restart", "api-sigkill")
# The operator's SIGKILL is left out of the sample: tests/operator/test_resilience.py kills it
# mid-job on both runtimes in every make test.
SAMPLE_FAULTS = tuple(f for f in FAULTS if f != "operator-sigkill")
RUNTIMES = ("trainjob", "pytorchjob")
# Without KUBETUNE_FAULT_ROUNDS (make test): the sample.
FULL_SIZE = "KUBETUNE_FAULT_ROUNDS" in os.environ
ROUNDS = int(os.environ.get("KUBETUNE_FAULT_ROUNDS", "1"))
# Rounds are seeded by their number: a long run can be split (rounds 0-3, then 4-5) and still
# inject exactly the faults of one run.
FIRST_ROUND = int(os.environ.get("KUBETUNE_FAULT_FIRST_ROUND", "0"))


def fault_cases() -> list[tuple[str, str, int]]:
    """(runtime, fault, round) to run: every fault on every runtime per round at full size;
    in the sample, each of :data:`SAMPLE_FAULTS` once, the runtimes taking turns (the
    trainer's SIGKILL lands on the TrainJob, whose JobSet restarts every node).
    """
    if not FULL_SIZE:
        return [(RUNTIMES[i % 2], fault, 0) for i, fault in enumerate(SAMPLE_FAULTS)]
    return [
        (runtime, fault, round_)
        for round_ in range(FIRST_ROUND, ROUNDS)
        for fault in FAULTS
        for runtime in RUNTIMES
    ]


@dataclass
class ProxiedS3(S3Server):
    """The session's S3 server, reached through a proxy the test can cut."""

    proxy: TcpProxy | None = None


@pytest.fixture
def runtime(request: pytest.FixtureRequest) -> str:
    """The cluster runtime of the case (local mode's crashes are tests/local's)."""
    return str(request.param)


@dataclass
class ApiReplica:
    """The API in Kubernetes mode over the test's namespace and store: what a fault kills."""

    data_dir: Path
    env: dict[str, str]
    server: ApiServer | None = None
    start_count: int = 0

    def start(self) -> ApiServer:
        """Start it (again, after a crash: same settings, same data folder)."""
        self.server = start_api(self.data_dir, self.env, "kubernetes", orgs=(ORG,))
        self.start_count += 1
        return self.server

    def client(self) -> Any:
        """The OpenAI SDK for the test's org, on the replica running now."""
        assert self.server is not None
        return self.server.client(ORG)

    def crash_and_restart(self, down_seconds: float) -> None:
        """SIGKILL it, leave it down a while, start it again."""
        assert self.server is not None
        self.server.kill()
        time.sleep(down_seconds)
        self.start()

    def stop(self) -> None:
        """Stop it for good."""
        if self.server is not None:
            self.server.stop()


@pytest.fixture
def api(
    deployment: ClusterDeployment, kube: KubeCluster, s3: ProxiedS3, tmp_path: Path
) -> Iterator[ApiReplica]:
    """An API replica serving the test's jobs, not started until a test asks."""
    testbed = deployment.testbed
    env = backend_env(
        "kubernetes",
        s3_env=s3.env(),
        kubeconfig=kube.kubeconfig,
        namespace=testbed.namespace,
        prefix=testbed.store_settings.prefix,
    )
    replica = ApiReplica(tmp_path / "api", env)
    yield replica
    replica.stop()


@pytest.fixture
def s3(s3: S3Server) -> Iterator[ProxiedS3]:
    """Everything of this test (operator, trainer pods, the test's own store) reaches S3
    through a proxy, so an outage is an outage for all of them.
    """
    host, port = s3.endpoint_url.removeprefix("http://").split(":")
    proxy = TcpProxy(host, int(port)).start()
    values = {f.name: getattr(s3, f.name) for f in fields(S3Server)}
    yield ProxiedS3(**{**values, "endpoint_url": proxy.url}, proxy=proxy)
    proxy.stop()


def inject(
    fault: str,
    deployment: ClusterDeployment,
    name: str,
    kube: KubeCluster,
    s3: ProxiedS3,
    api: ApiReplica,
    rng: random.Random,
) -> None:
    """One fault, at once; returns once whatever was killed has been started again."""
    if fault == "api-sigkill":
        api.crash_and_restart(rng.uniform(0, 2))
    elif fault == "operator-sigkill":
        deployment.testbed.operator.kill()
        time.sleep(rng.uniform(0, 2))
        deployment.testbed.operator.start()
    elif fault == "trainer-sigkill":
        deployment.preempt(name, signal.SIGKILL)
    elif fault == "s3-outage":
        assert s3.proxy is not None
        s3.proxy.cut()
        time.sleep(rng.uniform(2, 6))
        s3.proxy.restore()
    elif fault == "apiserver-restart":
        kube.restart_apiserver(down_seconds=rng.uniform(0, 3))
    else:
        raise ValueError(fault)


def check_recovered(deployment: ClusterDeployment, name: str, training_file: str) -> None:
    """The invariants every fault must leave intact."""
    status = deployment.wait_phase(name, JobPhase.SUCCEEDED)
    assert status.step == status.total_steps == PLANNED_STEPS
    manifest = deployment.store.get_json(deployment.layout.adapter_manifest_key(ORG, name))
    assert manifest["step"] == PLANNED_STEPS
    assert len(deployment.testbed.trainers.created(name)) == 1, "a second workload was created"
    assert deployment.workloads(name) == 1
    deployment.wait(lambda: deployment.alive(name) == 0, f"{name}'s trainers to be gone", 60)
    meta = deployment.layout.file_meta_key(ORG, training_file)
    assert deployment.store.head(meta) is not None, "the training file was lost"


def check_shown_by_api(
    deployment: ClusterDeployment, api: ApiReplica, name: str, training_file: str
) -> None:
    """A restarted API shows the job as it ended, its events and its training file."""
    assert api.start_count == 2, "the API was not restarted"
    client = api.client()

    def succeeded() -> bool:
        return bool(client.fine_tuning.jobs.retrieve(name).status == "succeeded")

    deployment.wait(succeeded, f"the restarted API to show {name} succeeded", 60)
    job = client.fine_tuning.jobs.retrieve(name)
    assert job.fine_tuned_model, "the restarted API lost the job's model"
    events = client.fine_tuning.jobs.list_events(name, limit=100).data
    assert any(e.type == "metrics" for e in events), "the restarted API lost the job's events"
    assert client.files.retrieve(training_file).id == training_file
    assert api.server is not None
    assert api.server.schema_violations == []


def outcome_of(failure: AssertionError | None) -> str:
    """``recovered``, or which invariant a failed check broke."""
    if failure is None:
        return "recovered"
    text = str(failure)
    if "trainers to be gone" in text:
        return "orphans"
    if "second workload" in text:
        return "duplicates"
    return "lost"


@pytest.mark.cluster
@pytest.mark.parametrize(("runtime", "fault", "round_"), fault_cases(), indirect=["runtime"])
def test_a_job_survives_a_fault_at_a_random_point(
    deployment: ClusterDeployment,
    kube: KubeCluster,
    s3: ProxiedS3,
    api: ApiReplica,
    runtime: str,
    fault: str,
    round_: int,
    record_property: Callable[[str, object], None],
) -> None:
    rng = random.Random(f"{runtime}/{fault}/{round_}")
    training_file = deployment.upload(jsonl(sft_rows()))
    name = deployment.create(training_file, checkpointing={"everySteps": 1, "keep": 2})
    if fault == "api-sigkill":
        api.start()
    first_checkpoint(deployment, name)
    if fault == "api-sigkill":  # the API serves the running job until it crashes
        assert api.start_count == 1
        assert api.client().fine_tuning.jobs.retrieve(name).status == "running"
    time.sleep(rng.uniform(0, 1.5))
    if fault == "trainer-sigkill" and deployment.alive(name) < 2:
        pytest.fail(f"{name} finished before the fault could land: raise PLANNED_STEPS")
    record_property("fault", fault)
    inject(fault, deployment, name, kube, s3, api, rng)
    try:
        check_recovered(deployment, name, training_file)
        if fault == "api-sigkill":
            check_shown_by_api(deployment, api, name, training_file)
    except AssertionError as failure:
        record_property("fault_outcome", outcome_of(failure))
        raise
    record_property("fault_outcome", outcome_of(None))
