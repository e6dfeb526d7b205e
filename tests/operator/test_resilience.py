"""Operator restarts: an operator killed at any point never makes a second workload (TrainJob or
PyTorchJob), and the next one adopts what the dead one created (a preempted trainer's resume is
tests/lifecycle's).
"""

from __future__ import annotations

import pytest

from kubetune.finetunejob import JobPhase
from kubetune_runtime.faults import FAULT_ENV, FAULT_EXIT_CODE
from tests.operator.conftest import PLANNED_STEPS, Testbed


@pytest.mark.parametrize("runtime", ["trainjob", "pytorchjob"])
def test_killing_the_operator_never_duplicates_a_workload(make_testbed, runtime: str) -> None:
    testbed: Testbed = make_testbed(runtime=runtime)
    # Killed while a job is running: the trainer carries on without the operator.
    running = testbed.submit(checkpointing={"everySteps": 1, "keep": 2})
    testbed.wait_phase(running, JobPhase.RUNNING)
    testbed.wait(lambda: testbed.trainers.alive(running) == 2, "both replicas running")
    (first,) = testbed.workloads()
    testbed.operator.kill()

    # Killed while a job is being created: right after its workload was created, before the
    # status records it.
    creating = testbed.submit()
    testbed.operator.start(env={FAULT_ENV: f"after-{runtime}-create"}, ready=False)
    testbed.wait(lambda: testbed.operator.returncode is not None, "the operator to die")
    assert testbed.operator.returncode == FAULT_EXIT_CODE, testbed.operator.log_tail()
    assert testbed.status(creating).phase is JobPhase.QUEUED
    assert {w["metadata"]["name"] for w in testbed.workloads()} == {running, creating}

    # A new operator adopts both and sees them through.
    testbed.operator.start()
    for name in (running, creating):
        status = testbed.wait_phase(name, JobPhase.SUCCEEDED)
        assert status.step == PLANNED_STEPS
        assert status.restarts == 0

    workloads = {w["metadata"]["name"]: w["metadata"]["uid"] for w in testbed.workloads()}
    assert workloads[running] == first["metadata"]["uid"]
    assert set(workloads) == {running, creating}
    for name in (running, creating):
        # The fixture saw each workload created once, and its two pods started once each.
        assert testbed.trainers.created(name) == [workloads[name]]
        assert testbed.trainers.starts(name) == 2
    configmaps = {
        cm.metadata.name
        for cm in testbed.core.list_namespaced_config_map(
            testbed.namespace, label_selector="app.kubernetes.io/managed-by=kubetune-operator"
        ).items
    }
    assert configmaps == {f"{running}-config", f"{creating}-config"}
    posted = testbed.wait(
        lambda: (r := [e.reason for e in testbed.kube_events(creating)]) and "Succeeded" in r and r,
        "the Succeeded Event",
        timeout=30,
    )
    assert posted.count("Succeeded") == 1
