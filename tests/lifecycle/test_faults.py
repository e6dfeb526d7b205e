"""Fault injection on the cluster runtimes: while a job trains, its operator is SIGKILLed, one
trainer replica is SIGKILLed, S3 goes away for seconds, or the apiserver is killed and
restarted. Each fault lands at a random point of the run (seeded, so a failure replays).

After every fault the job must end ``succeeded`` with exactly the planned steps, one final
adapter, one workload created once, no trainer process left, and its training file intact.

``make test`` runs one round (each fault once per runtime); ``make test-faults`` runs
``KUBETUNE_FAULT_ROUNDS`` rounds. Each test records its fault and outcome; the suite's
conftest prints the tally (faults injected, jobs recovered, lost, orphans, duplicates).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import pytest

from kubetune.finetunejob import JobPhase
from tests.harness.kube import KubeCluster
from tests.harness.s3 import S3Server
from tests.harness.tcpproxy import TcpProxy
from tests.lifecycle.deployments import ClusterDeployment
from tests.lifecycle.test_lifecycle import first_checkpoint
from tests.operator.conftest import ORG, PLANNED_STEPS, jsonl, sft_rows

FAULTS = ("operator-sigkill", "trainer-sigkill", "s3-outage", "apiserver-restart")
ROUNDS = int(os.environ.get("KUBETUNE_FAULT_ROUNDS", "1"))


@dataclass
class ProxiedS3(S3Server):
    """The session's S3 server, reached through a proxy the test can cut."""

    proxy: TcpProxy | None = None


@pytest.fixture(
    params=[
        pytest.param("trainjob", marks=pytest.mark.cluster),
        pytest.param("pytorchjob", marks=pytest.mark.cluster),
    ]
)
def runtime(request: pytest.FixtureRequest) -> str:
    """The cluster runtimes (local mode's crashes are tests/local's)."""
    return str(request.param)


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
    rng: random.Random,
) -> None:
    """One fault, at once; returns once whatever was killed has been started again."""
    if fault == "operator-sigkill":
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


def _outcome(check: Callable[[], None]) -> str:
    """``recovered``, or what went wrong (the assertion is raised after recording)."""
    try:
        check()
    except AssertionError as exc:
        text = str(exc)
        if "trainers to be gone" in text:
            return "orphans"
        if "second workload" in text:
            return "duplicates"
        return "lost"
    return "recovered"


@pytest.mark.parametrize("round_", range(ROUNDS))
@pytest.mark.parametrize("fault", FAULTS)
def test_a_job_survives_a_fault_at_a_random_point(
    deployment: ClusterDeployment,
    kube: KubeCluster,
    s3: ProxiedS3,
    runtime: str,
    fault: str,
    round_: int,
    record_property: Callable[[str, object], None],
) -> None:
    rng = random.Random(f"{runtime}/{fault}/{round_}")
    training_file = deployment.upload(jsonl(sft_rows()))
    name = deployment.create(training_file, checkpointing={"everySteps": 1, "keep": 2})
    first_checkpoint(deployment, name)
    time.sleep(rng.uniform(0, 1.5))
    if fault == "trainer-sigkill" and deployment.alive(name) < 2:
        pytest.fail(f"{name} finished before the fault could land: raise PLANNED_STEPS")
    record_property("fault", fault)
    inject(fault, deployment, name, kube, s3, rng)
    outcome = _outcome(lambda: check_recovered(deployment, name, training_file))
    record_property("fault_outcome", outcome)
    if outcome != "recovered":
        check_recovered(deployment, name, training_file)  # fails with the full story
