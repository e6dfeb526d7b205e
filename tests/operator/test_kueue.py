"""Kueue admission (tests.harness.kueue plays Kueue over its real CRDs): the operator creates a
queued job's workload suspended and never writes its ``suspend`` again — Kueue starts it, stops
it when it preempts it, and the operator pauses and resumes through the Kueue Workload's
``spec.active``. Every change of ``suspend`` Kueue did not make is counted in ``kueue.flips``.

Each job of the testbed asks for 2 nodes of 4 cores; the ClusterQueue has 8: one job at a time.
"""

from __future__ import annotations

from kubetune.events import JobEvent
from kubetune.finetunejob import ConditionType, JobPhase
from kubetune.trainer_events import TrainerEventKind, event_kind
from tests.harness.kueue import is_true, wait_admitted
from tests.operator.conftest import PLANNED_STEPS, Testbed

QUEUE = "team-queue"
ONE_JOB_OF_QUOTA = 8.0


def queued_condition(testbed: Testbed, name: str) -> tuple[str | None, str | None]:
    """The reason and message of the job's Queued condition ((None, None) before it has one)."""
    status = testbed.status(name)
    cond = next((c for c in status.conditions if c.type == ConditionType.QUEUED), None)
    return (cond.reason, cond.message) if cond is not None else (None, None)


def trainer_events(testbed: Testbed, name: str, kind: TrainerEventKind) -> list[JobEvent]:
    """The trainer's events of one kind."""
    return [e for e in testbed.job_events(name) if event_kind(e) is kind]


def test_quota_for_one_job_runs_one_and_the_other_waits_with_the_reason(make_testbed) -> None:
    testbed: Testbed = make_testbed(runtime="trainjob", kueue_quota=ONE_JOB_OF_QUOTA)
    assert testbed.kueue is not None
    first = testbed.submit(queue=QUEUE)
    wait_admitted(testbed.kueue, first)
    second = testbed.submit(queue=QUEUE)
    testbed.wait_phase(first, JobPhase.RUNNING)

    # The second waits, and says why in its condition, its Events and its own event list.
    testbed.wait(
        lambda: queued_condition(testbed, second)[0] == "Pending", "the second job's reason"
    )
    _reason, message = queued_condition(testbed, second)
    assert message is not None
    assert message.startswith(f"waiting for quota in queue {QUEUE}: couldn't assign flavors")
    assert "insufficient unused quota for cpu in flavor default" in message
    assert testbed.status(second).phase is JobPhase.QUEUED
    assert f"waiting for quota in queue {QUEUE}" in " ".join(
        e.message for e in testbed.job_events(second)
    )
    assert "Pending" in [e.reason for e in testbed.kube_events(second)]
    (workload,) = [w for w in testbed.trainjobs() if w["metadata"]["name"] == second]
    assert workload["spec"]["suspend"] is True, "created suspended; only Kueue starts it"

    for name in (first, second):
        status = testbed.wait_phase(name, JobPhase.SUCCEEDED)
        assert status.step == PLANNED_STEPS
    assert testbed.kueue.admissions == [first, second]
    assert testbed.kueue.flips == []
    assert testbed.kueue.errors == []


def test_a_kueue_preemption_requeues_the_job_and_it_resumes_from_its_checkpoint(
    make_testbed,
) -> None:
    testbed: Testbed = make_testbed(runtime="trainjob", kueue_quota=ONE_JOB_OF_QUOTA)
    kueue = testbed.kueue
    assert kueue is not None
    name = testbed.submit(queue=QUEUE, checkpointing={"everySteps": 1, "keep": 2})
    testbed.wait(lambda: trainer_events(testbed, name, TrainerEventKind.CHECKPOINT), "a checkpoint")

    # Kueue preempts it for a higher-priority workload: back to queued, saying so.
    kueue.preempt(name)
    testbed.wait_phase(name, JobPhase.QUEUED)
    testbed.wait(lambda: queued_condition(testbed, name)[0] == "Preempted", "the reason")
    (preempted,) = testbed.wait(
        lambda: trainer_events(testbed, name, TrainerEventKind.PREEMPTED), "the trainer to stop"
    )
    stopped_at = int(preempted.data["step"])
    assert 0 < stopped_at < PLANNED_STEPS, "the preemption landed after the run had finished"
    messages = [e.message for e in testbed.job_events(name)]
    assert any(m.startswith("preempted by Kueue (InClusterQueue") for m in messages), messages
    assert "Preempted" in [e.reason for e in testbed.kube_events(name)]

    # The preemptor finishes; Kueue admits the job again and it resumes where it stopped.
    kueue.release()
    status = testbed.wait_phase(name, JobPhase.SUCCEEDED)
    (restarted,) = trainer_events(testbed, name, TrainerEventKind.RESTARTED)
    assert restarted.data["step"] == stopped_at
    assert status.step == status.total_steps == PLANNED_STEPS
    trained = [e.data["step"] for e in testbed.job_events(name) if "train_loss" in (e.data or {})]
    assert trained == list(range(1, PLANNED_STEPS + 1))
    assert kueue.admissions == [name, name]
    assert kueue.flips == []
    assert kueue.errors == []


def test_pause_and_resume_go_through_the_kueue_workload_not_suspend(make_testbed) -> None:
    testbed: Testbed = make_testbed(runtime="pytorchjob", kueue_quota=ONE_JOB_OF_QUOTA)
    kueue = testbed.kueue
    assert kueue is not None
    name = testbed.submit(queue=QUEUE, checkpointing={"everySteps": 1, "keep": 2})
    testbed.wait(lambda: trainer_events(testbed, name, TrainerEventKind.CHECKPOINT), "a checkpoint")

    testbed.patch_spec(name, suspend=True)
    testbed.wait_phase(name, JobPhase.PAUSED)
    workload = kueue.workload_of(name)
    assert workload is not None
    assert workload["spec"]["active"] is False
    evicted = next(c for c in workload["status"]["conditions"] if c["type"] == "Evicted")
    assert (evicted["status"], evicted["reason"]) == ("True", "Deactivated")

    testbed.patch_spec(name, suspend=False)
    status = testbed.wait_phase(name, JobPhase.SUCCEEDED)
    assert status.step == PLANNED_STEPS
    assert status.restarts == 1
    # Kueue marks its Workload finished on its own next pass, after the job's status says so.
    workload = testbed.wait(
        lambda: (
            (w := kueue.workload_of(name)) and is_true(w["status"]["conditions"], "Finished") and w
        ),
        "Kueue to finish the workload",
        timeout=30,
    )
    assert workload["spec"]["active"] is True
    assert kueue.flips == []
    assert kueue.errors == []


def test_a_job_kueue_can_never_admit_fails_after_the_queued_time_limit(make_testbed) -> None:
    # 1 core of quota for a job of 8: Kueue will never admit it.
    testbed: Testbed = make_testbed(
        runtime="trainjob",
        kueue_quota=1.0,
        env={"KUBETUNE_QUEUEING__MAX_QUEUED_SECONDS": "8"},
    )
    name = testbed.submit(queue=QUEUE)
    status = testbed.wait_phase(name, JobPhase.FAILED, timeout=60)
    assert status.error is not None
    assert status.error.code == "queue_timeout"
    assert status.error.message.startswith("The job waited longer than 8 s to start (waiting for ")
    assert "insufficient unused quota for cpu in flavor default, 7 more needed" in (
        status.error.message
    )
    assert status.started_at is None
    testbed.wait(lambda: testbed.trainjobs() == [], "the TrainJob to be deleted", timeout=30)
    # The operator posts the event after the status patch that ends the job, so wait for it.
    failed_event = f"The job failed: {status.error.message}"
    testbed.wait(
        lambda: failed_event in [e.message for e in testbed.job_events(name)],
        "the job's failure event",
        timeout=30,
    )
