"""A FineTuneJob applied with kubectl runs the real trainer on two replicas and ends succeeded;
cancel and pause/resume do what the lifecycle says. Real apiserver, S3, operator process; the
training-operator is played by tests.harness.training_operator.
"""

from __future__ import annotations

import json
import re
import sys

from kubetune.events import JobEvent
from kubetune.finetunejob import KIND, ConditionStatus, JobPhase
from kubetune.trainer_config import TrainerConfig
from kubetune.trainer_events import TrainerEventKind, event_kind
from kubetune_operator.handlers import FINALIZER
from kubetune_operator.manifests import CONFIG_FILE, configmap_name_of
from tests.operator.conftest import ORG, PLANNED_STEPS, Testbed


def kinds(testbed: Testbed, name: str, kind: TrainerEventKind) -> list[JobEvent]:
    return [e for e in testbed.job_events(name) if event_kind(e) is kind]


def reasons(testbed: Testbed, name: str, through: str) -> list[str]:
    """The reasons of the job's Kubernetes Events, once one with reason ``through`` is there
    (kopf posts Events asynchronously, after the status that caused them is written)."""

    def posted() -> list[str] | None:
        found = [e.reason for e in testbed.kube_events(name)]
        return found if through in found else None

    result: list[str] = testbed.wait(posted, f"a {through} Event for {name}", timeout=30)
    return result


def first_checkpoint(testbed: Testbed, name: str) -> int:
    """Wait for the trainer's first committed checkpoint (mid-run); return its step."""
    events = testbed.wait(
        lambda: kinds(testbed, name, TrainerEventKind.CHECKPOINT), f"a checkpoint of {name}"
    )
    return int(events[0].data["step"])


def test_kubectl_job_trains_on_two_replicas_and_succeeds(testbed: Testbed) -> None:
    name = testbed.submit()
    status = testbed.wait_phase(name, JobPhase.SUCCEEDED)

    # The result: the adapter is complete in the store and the status names the model.
    layout = testbed.layout
    config = TrainerConfig.model_validate_json(
        testbed.store.get_bytes(layout.job_config_key(ORG, name))
    )
    manifest = testbed.store.get_json(layout.adapter_manifest_key(ORG, name))
    assert status.fine_tuned_model == config.fine_tuned_model == manifest["fine_tuned_model"]
    assert status.fine_tuned_model.startswith("ft:tiny-llama:default::")
    assert manifest["step"] == status.step == status.total_steps == PLANNED_STEPS
    assert manifest["run"]["world_size"] == 2
    assert status.progress == f"{PLANNED_STEPS}/{PLANNED_STEPS}"
    assert status.finished_at is not None
    assert status.started_at is not None
    assert status.started_at <= status.finished_at
    assert status.error is None
    assert status.restarts == 0
    assert status.trained_tokens > 0
    assert status.metrics
    assert status.metrics.train_loss
    assert status.hyperparameters
    assert status.hyperparameters.n_epochs == 2
    assert status.hyperparameters.batch_size == 4
    assert 0 < len(status.checkpoints) <= 10
    conditions = {c.type: c.status for c in status.conditions}
    assert conditions["FilesValidated"] is ConditionStatus.TRUE
    assert conditions["Succeeded"] is ConditionStatus.TRUE
    assert conditions["Running"] is ConditionStatus.FALSE
    assert status.observed_generation == testbed.job(name)["metadata"]["generation"]

    # One PyTorchJob, owned by the job, ran two replicas once each, with the stored config.
    (pytorchjob,) = testbed.pytorchjobs()
    assert pytorchjob["metadata"]["name"] == name
    (owner,) = pytorchjob["metadata"]["ownerReferences"]
    job = testbed.job(name)
    assert (owner["kind"], owner["uid"], owner["controller"]) == (
        KIND,
        job["metadata"]["uid"],
        True,
    )
    assert testbed.trainers.created(name) == [pytorchjob["metadata"]["uid"]]
    assert testbed.trainers.starts(name) == 2
    cm = testbed.core.read_namespaced_config_map(f"{name}-config", testbed.namespace)
    assert json.loads(cm.data[CONFIG_FILE]) == json.loads(
        testbed.store.get_bytes(layout.job_config_key(ORG, name))
    )
    (started,) = kinds(testbed, name, TrainerEventKind.STARTED)
    assert started.data["world_size"] == 2

    # Every transition is a Kubernetes Event; the job's event log tells the OpenAI story.
    assert reasons(testbed, name, "Succeeded") == [
        "ValidatingFiles",
        "Queued",
        "Running",
        "Succeeded",
    ]
    done = "The job has successfully completed"  # written just after the status
    messages = testbed.wait(
        lambda: (m := [e.message for e in testbed.job_events(name)]) and done in m and m,
        "the job's last event",
    )
    assert "Fine-tuning job started" in messages
    assert f"New fine-tuned model created: {status.fine_tuned_model}" in messages
    assert messages[-1] == done

    # kubectl shows it; the operator counts it.
    row = testbed.kubectl("get", "ftj", name, "-n", testbed.namespace, "--no-headers").split()
    assert row[1:4] == ["succeeded", "tiny-llama", f"{PLANNED_STEPS}/{PLANNED_STEPS}"]
    # The phase gauge follows kopf's watch of the job: wait for it to see the last status.
    metrics = testbed.wait(
        lambda: (
            (m := testbed.operator.metrics())
            and 'kubetune_operator_jobs{phase="succeeded"} 1.0' in m
            and m
        ),
        "the metrics to count the job",
    )
    assert 'kubetune_operator_jobs_finished_total{phase="succeeded"} 1.0' in metrics
    assert "kubetune_operator_queue_wait_seconds_count 1.0" in metrics
    assert 'kubetune_operator_run_seconds_count{phase="succeeded"} 1.0' in metrics


def test_cancel_stops_the_trainer_and_deletes_the_pytorchjob(testbed: Testbed) -> None:
    name = testbed.submit()
    testbed.wait_phase(name, JobPhase.RUNNING)
    testbed.wait(lambda: testbed.trainers.alive(name) == 2, "both replicas running")

    testbed.patch_spec(name, cancel=True)
    status = testbed.wait_phase(name, JobPhase.CANCELLED)

    assert status.finished_at is not None
    assert status.error is None
    assert testbed.pytorchjobs() == []
    configmaps = testbed.core.list_namespaced_config_map(testbed.namespace).items
    assert configmap_name_of(name) not in {cm.metadata.name for cm in configmaps}
    testbed.wait(lambda: testbed.trainers.alive(name) == 0, "the replicas to stop", timeout=60)
    assert not testbed.store.exists(testbed.layout.adapter_manifest_key(ORG, name))
    assert reasons(testbed, name, "Cancelled")[-1] == "Cancelled"
    cancelled = {c.type: c for c in status.conditions}["Cancelled"]
    assert cancelled.status is ConditionStatus.TRUE


def test_pause_checkpoints_and_resume_continues_from_there(testbed: Testbed) -> None:
    # A checkpoint every step keeps the run long enough to pause it mid-way, and makes the
    # resumed step exact.
    name = testbed.submit(checkpointing={"everySteps": 1, "keep": 2})
    first_checkpoint(testbed, name)

    testbed.patch_spec(name, suspend=True)
    paused = testbed.wait_phase(name, JobPhase.PAUSED)
    (pytorchjob,) = testbed.pytorchjobs()
    assert pytorchjob["spec"]["runPolicy"]["suspend"] is True
    assert {c["type"]: c["status"] for c in pytorchjob["status"]["conditions"]}[
        "Suspended"
    ] == "True"
    assert testbed.trainers.alive(name) == 0
    (preempted,) = kinds(testbed, name, TrainerEventKind.PREEMPTED)
    stopped_at = int(preempted.data["step"])
    assert 0 < stopped_at < PLANNED_STEPS, "the pause landed after the run had finished"
    assert max(c.step for c in paused.checkpoints) == stopped_at
    assert paused.estimated_finish is None
    assert reasons(testbed, name, "Paused")[-2:] == ["Pausing", "Paused"]

    testbed.patch_spec(name, suspend=False)
    status = testbed.wait_phase(name, JobPhase.SUCCEEDED)

    (restarted,) = kinds(testbed, name, TrainerEventKind.RESTARTED)
    assert restarted.data["step"] == stopped_at
    assert status.step == status.total_steps == PLANNED_STEPS
    assert status.restarts == 1
    manifest = testbed.store.get_json(testbed.layout.adapter_manifest_key(ORG, name))
    assert manifest["step"] == PLANNED_STEPS
    assert testbed.trainers.created(name) == [pytorchjob["metadata"]["uid"]]
    events = reasons(testbed, name, "Succeeded")
    assert events[events.index("Paused") :] == [
        "Paused",
        "Resumed",
        "Running",
        "Restarted",
        "Succeeded",
    ]
    restarted_event = next(e for e in testbed.kube_events(name) if e.reason == "Restarted")
    assert re.search(rf"resumed from step {stopped_at}\b", restarted_event.message)


def test_deleting_a_job_deletes_its_children_through_the_finalizer(make_testbed) -> None:
    # Replicas that just wait (no trainer needed to see what deletion does).
    testbed: Testbed = make_testbed(
        entrypoint=[sys.executable, "-c", "import time; time.sleep(600)"]
    )
    name = testbed.submit()
    testbed.wait_phase(name, JobPhase.RUNNING)
    testbed.wait(lambda: testbed.trainers.alive(name) == 2, "both replicas running")
    assert FINALIZER in testbed.job(name)["metadata"]["finalizers"]

    testbed.kubectl("delete", "finetunejob", name, "-n", testbed.namespace, "--wait=true")

    # No garbage collector runs in the test apiserver: the finalizer deleted the children.
    assert testbed.pytorchjobs() == []
    configmaps = testbed.core.list_namespaced_config_map(testbed.namespace).items
    assert configmap_name_of(name) not in {cm.metadata.name for cm in configmaps}
    testbed.wait(lambda: testbed.trainers.alive(name) == 0, "the replicas to stop", timeout=60)
