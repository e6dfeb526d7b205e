"""Preemption and operator restarts: a job survives a SIGTERMed replica by resuming from its
last checkpoint, and an operator killed at any point never makes a second PyTorchJob.
"""

from __future__ import annotations

import re
import signal

from kubetune.events import EventType
from kubetune.finetunejob import JobPhase
from kubetune.trainer_events import TrainerEventKind
from kubetune_operator.controller import FAULT_ENV, FAULT_EXIT_CODE
from tests.operator.conftest import ORG, PLANNED_STEPS, Testbed
from tests.operator.test_job_lifecycle import first_checkpoint, kinds, reasons


def test_a_preempted_replica_restarts_and_the_job_resumes_from_its_checkpoint(
    testbed: Testbed,
) -> None:
    name = testbed.submit(checkpointing={"everySteps": 1, "keep": 2})
    first_checkpoint(testbed, name)

    # The kubelet's SIGTERM to one pod of a spot node being reclaimed.
    testbed.trainers.signal(name, "Worker", 0, signal.SIGTERM)
    status = testbed.wait_phase(name, JobPhase.SUCCEEDED)

    (preempted,) = kinds(testbed, name, TrainerEventKind.PREEMPTED)
    stopped_at = int(preempted.data["step"])
    assert 0 < stopped_at < PLANNED_STEPS, "the SIGTERM landed after the run had finished"
    (restarted,) = kinds(testbed, name, TrainerEventKind.RESTARTED)
    assert restarted.data["step"] == stopped_at
    assert status.restarts == 1
    assert reasons(testbed, name, "Succeeded")[-2:] == ["Restarted", "Succeeded"]
    (notice,) = [e for e in testbed.kube_events(name) if e.reason == "Restarted"]
    assert notice.type == "Warning"
    assert re.search(rf"resumed from step {stopped_at}\b", notice.message), notice.message

    # Every rank stopped at the same committed step (exit 143, retryable), each pod was
    # restarted once, and the resumed run trained exactly the remaining steps.
    expected = {"master-0": [143, 0], "worker-0": [143, 0]}
    testbed.wait(  # the worker pod may exit a moment after the master completed the job
        lambda: {r.name: r.exit_codes for r in testbed.trainers.replicas(name)} == expected,
        f"exit codes {expected}",
        timeout=60,
    )
    steps = [
        e.data["step"]
        for e in testbed.job_events(name)
        if e.type is EventType.METRICS and "train_loss" in e.data
    ]
    assert steps == list(range(1, PLANNED_STEPS + 1))
    assert status.step == status.total_steps == PLANNED_STEPS
    manifest = testbed.store.get_json(testbed.layout.adapter_manifest_key(ORG, name))
    assert manifest["step"] == PLANNED_STEPS
    assert len(testbed.trainers.created(name)) == 1


def test_killing_the_operator_never_duplicates_a_pytorchjob(make_testbed) -> None:
    testbed: Testbed = make_testbed()
    # Killed while a job is running: the trainer carries on without the operator.
    running = testbed.submit(checkpointing={"everySteps": 1, "keep": 2})
    testbed.wait_phase(running, JobPhase.RUNNING)
    testbed.wait(lambda: testbed.trainers.alive(running) == 2, "both replicas running")
    (first,) = testbed.pytorchjobs()
    testbed.operator.kill()

    # Killed while a job is being created: right after its PyTorchJob was created, before the
    # status records it.
    creating = testbed.submit()
    testbed.operator.start(env={FAULT_ENV: "after-pytorchjob-create"}, ready=False)
    testbed.wait(lambda: testbed.operator.returncode is not None, "the operator to die")
    assert testbed.operator.returncode == FAULT_EXIT_CODE, testbed.operator.log_tail()
    assert testbed.status(creating).phase is JobPhase.QUEUED
    assert {p["metadata"]["name"] for p in testbed.pytorchjobs()} == {running, creating}

    # A new operator adopts both and sees them through.
    testbed.operator.start()
    for name in (running, creating):
        status = testbed.wait_phase(name, JobPhase.SUCCEEDED)
        assert status.step == PLANNED_STEPS
        assert status.restarts == 0

    pytorchjobs = {p["metadata"]["name"]: p["metadata"]["uid"] for p in testbed.pytorchjobs()}
    assert pytorchjobs[running] == first["metadata"]["uid"]
    assert set(pytorchjobs) == {running, creating}
    for name in (running, creating):
        # The fixture saw each PyTorchJob created once, and its two pods started once each.
        assert testbed.trainers.created(name) == [pytorchjobs[name]]
        assert testbed.trainers.starts(name) == 2
    configmaps = {
        cm.metadata.name
        for cm in testbed.core.list_namespaced_config_map(
            testbed.namespace, label_selector="app.kubernetes.io/managed-by=kubetune-operator"
        ).items
    }
    assert configmaps == {f"{running}-config", f"{creating}-config"}
    assert reasons(testbed, creating, "Succeeded").count("Succeeded") == 1
