"""The job lifecycle, the same on every runtime: one suite, parametrised with the PyTorchJob
runtime (the operator on the real apiserver) and the subprocess runtime (local mode).

Each test runs the real trainer (two processes over gloo on a tiny Llama) and checks what a
user sees — phases, status, the OpenAI event list, the posted events, the webhook events — and
what the platform does — trainers started, stopped, restarted. Drift between the runtimes fails
here instead of surprising a user.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import httpx
import pytest

from kubetune.events import EventType, JobEvent
from kubetune.finetunejob import (
    MERGE_REQUESTED,
    ConditionStatus,
    ErrorKind,
    JobPhase,
    merge_annotation,
)
from kubetune.ids import new_file_id
from kubetune.trainer_config import TrainerConfig
from kubetune.trainer_events import TrainerEventKind, event_kind
from tests.harness.vllm import VllmServer
from tests.lifecycle.deployments import Deployment, wait_gone
from tests.operator.conftest import ORG, PLANNED_STEPS, sft_rows

FAST = 60.0


def kinds(deployment: Deployment, name: str, kind: TrainerEventKind) -> list[JobEvent]:
    """The trainer's events of one kind."""
    return [e for e in deployment.job_events(name) if event_kind(e) is kind]


def first_checkpoint(deployment: Deployment, name: str) -> int:
    """Wait for the trainer's first committed checkpoint (mid-run); return its step."""
    events = deployment.wait(
        lambda: kinds(deployment, name, TrainerEventKind.CHECKPOINT), f"a checkpoint of {name}"
    )
    return int(events[0].data["step"])


def only_failure_logged(deployment: Deployment, name: str) -> bool:
    """The job's event log holds just the driver's failure line (written after the status)."""
    return [e.message[:23] for e in deployment.job_events(name)] == ["The job failed: invalid"]


def webhook_event(deployment: Deployment, name: str) -> str:
    """The type of the one webhook event the job's org received about it."""
    deployment.receiver.wait_for(lambda r: bool(deployment.webhook_events(name)), timeout=60)
    (event,) = deployment.webhook_events(name)
    return str(event["type"])


def trained_steps(deployment: Deployment, name: str) -> list[int]:
    """The steps the trainer reported training, in order."""
    return [
        e.data["step"]
        for e in deployment.job_events(name)
        if e.type is EventType.METRICS and "train_loss" in e.data
    ]


def chat(vllm: VllmServer, model: str) -> str:
    """A greedy chat completion from ``model``."""
    response = httpx.post(
        f"{vllm.base_url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "What colour is the sky?"}],
            "temperature": 0,
            "max_tokens": 8,
        },
        timeout=60,
    )
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"])


@pytest.mark.xdist_group("vllm")
# Train, serve, then merge (a second trainer-image process): longer than the default 300 s
# when the other worker trains beside it.
@pytest.mark.timeout(600)
def test_a_job_is_validated_queued_trained_succeeds_and_is_served(
    make_deployment: Callable[..., Deployment], vllm: VllmServer
) -> None:
    deployment = make_deployment(vllm=vllm)
    name = deployment.submit()
    status = deployment.wait_phase(name, JobPhase.SUCCEEDED)

    # The result: the adapter is complete in the store and the status names the model.
    layout = deployment.layout
    config = TrainerConfig.model_validate_json(
        deployment.store.get_bytes(layout.job_config_key(ORG, name))
    )
    manifest = deployment.store.get_json(layout.adapter_manifest_key(ORG, name))
    assert status.fine_tuned_model == config.fine_tuned_model == manifest["fine_tuned_model"]
    assert status.fine_tuned_model.startswith("ft:tiny-llama:default::")
    assert manifest["step"] == status.step == status.total_steps == PLANNED_STEPS
    assert manifest["run"]["world_size"] == 2
    assert status.progress == f"{PLANNED_STEPS}/{PLANNED_STEPS}"
    assert status.started_at is not None
    assert status.finished_at is not None
    assert status.started_at <= status.finished_at
    assert (status.error, status.restarts) == (None, 0)
    assert status.trained_tokens > 0
    # The run clock stopped with the job; the run is in runSeconds (GPU-seconds: times GPUs).
    assert status.running_since is None
    assert 0 < status.run_seconds <= (status.finished_at - status.started_at).total_seconds()
    assert status.metrics is not None
    assert status.metrics.train_loss
    assert status.hyperparameters is not None
    assert (status.hyperparameters.n_epochs, status.hyperparameters.batch_size) == (2, 4)
    assert 0 < len(status.checkpoints) <= 10
    conditions = {c.type: c.status for c in status.conditions}
    assert conditions["FilesValidated"] is ConditionStatus.TRUE
    (started,) = kinds(deployment, name, TrainerEventKind.STARTED)
    assert started.data["world_size"] == 2

    # Served on vLLM: the Served condition, and the model answers there.
    served = deployment.wait_served(name)
    assert served.served_on
    assert served.serving_error is None
    assert fine_tuned_answers(vllm, served.fine_tuned_model)

    # Every transition was posted in order; the event list tells OpenAI's story; the org's
    # webhook endpoint got one signed event.
    reasons = deployment.reasons(name, "Served")
    assert [r for r in reasons if r != "Served"] == [
        "ValidatingFiles",
        "Queued",
        "Running",
        "Succeeded",
    ]
    done = "The job has successfully completed"
    messages = deployment.wait(
        lambda: (m := [e.message for e in deployment.job_events(name)]) and done in m and m,
        "the job's last event",
    )
    assert "Files validated, moving job to queued state" in messages
    assert "Fine-tuning job started" in messages
    assert f"New fine-tuned model created: {status.fine_tuned_model}" in messages
    assert messages[-1] == done
    assert webhook_event(deployment, name) == "fine_tuning.job.succeeded"

    # Merged for a download when the API asks (format=merged): the trainer image's merge runs
    # (a Job on a cluster, a child locally), publishes the whole model and is cleaned up.
    deployment.annotate(name, {merge_annotation(None): MERGE_REQUESTED})
    merged_key = layout.merged_manifest_key(ORG, name)
    deployment.wait(lambda: deployment.store.exists(merged_key), "the merged model", timeout=180)
    merged = deployment.store.get_json(merged_key)
    assert merged["model"] == status.fine_tuned_model
    assert {"config.json", "model.safetensors"} <= set(merged["files"])
    deployment.wait(lambda: deployment.merging(name) == 0, "the merge to be cleaned up")
    deployment.check_succeeded(name, status)


def fine_tuned_answers(vllm: VllmServer, model: str | None) -> bool:
    """Whether vLLM answers with the fine-tuned adapter loaded."""
    assert model is not None
    assert model in vllm.adapters()
    return bool(chat(vllm, model))


def test_cancel_stops_the_trainer_and_its_workload(deployment: Deployment) -> None:
    name = deployment.submit()
    deployment.wait_phase(name, JobPhase.RUNNING)
    deployment.wait(lambda: deployment.alive(name) >= 2, "the trainer's processes running")

    deployment.patch_spec(name, cancel=True)
    status = deployment.wait_phase(name, JobPhase.CANCELLED)

    assert status.finished_at is not None
    assert status.error is None
    cancelled = {c.type: c for c in status.conditions}["Cancelled"]
    assert cancelled.status is ConditionStatus.TRUE
    wait_gone(deployment, name)
    assert deployment.workloads(name) == 0
    assert not deployment.store.exists(deployment.layout.adapter_manifest_key(ORG, name))
    assert deployment.reasons(name, "Cancelled")[-1] == "Cancelled"
    assert webhook_event(deployment, name) == "fine_tuning.job.cancelled"


def test_pause_checkpoints_and_resume_continues_from_there(deployment: Deployment) -> None:
    # A checkpoint every step keeps the run long enough to pause it mid-way, and makes the
    # resumed step exact.
    name = deployment.submit(checkpointing={"everySteps": 1, "keep": 2})
    first_checkpoint(deployment, name)

    deployment.patch_spec(name, suspend=True)
    paused = deployment.wait_phase(name, JobPhase.PAUSED)
    wait_gone(deployment, name)
    deployment.check_paused(name)
    (preempted,) = kinds(deployment, name, TrainerEventKind.PREEMPTED)
    stopped_at = int(preempted.data["step"])
    assert 0 < stopped_at < PLANNED_STEPS, "the pause landed after the run had finished"
    assert max(c.step for c in paused.checkpoints) == stopped_at
    assert paused.estimated_finish is None
    assert deployment.reasons(name, "Paused")[-2:] == ["Pausing", "Paused"]

    deployment.patch_spec(name, suspend=False)
    status = deployment.wait_phase(name, JobPhase.SUCCEEDED)

    (restarted,) = kinds(deployment, name, TrainerEventKind.RESTARTED)
    assert restarted.data["step"] == stopped_at
    assert status.step == status.total_steps == PLANNED_STEPS
    assert status.restarts == 1
    manifest = deployment.store.get_json(deployment.layout.adapter_manifest_key(ORG, name))
    assert manifest["step"] == PLANNED_STEPS
    assert trained_steps(deployment, name) == list(range(1, PLANNED_STEPS + 1))
    reasons = deployment.reasons(name, "Succeeded")
    assert reasons[reasons.index("Paused") :] == [
        "Paused",
        "Resumed",
        "Running",
        "Restarted",
        "Succeeded",
    ]


def test_files_that_do_not_fit_the_job_fail_validation_as_user_errors(
    deployment: Deployment,
) -> None:
    from tests.trainer.tiny import dpo_examples

    wrong_format = deployment.submit(rows=dpo_examples(20))  # preference data, supervised job
    missing = deployment.create(new_file_id())

    status = deployment.wait_phase(wrong_format, JobPhase.FAILED, timeout=FAST)
    assert status.error is not None
    assert (status.error.kind, status.error.code, status.error.param) == (
        ErrorKind.USER,
        "invalid_file_format",
        "training_file",
    )
    assert "supervised" in status.error.message
    failed = {c.type: c for c in status.conditions}["Failed"]
    assert (failed.status, failed.reason) == (ConditionStatus.TRUE, "InvalidFileFormat")
    assert status.finished_at is not None

    status = deployment.wait_phase(missing, JobPhase.FAILED, timeout=FAST)
    assert status.error is not None
    assert (status.error.kind, status.error.code) == (ErrorKind.USER, "invalid_file")
    assert "does not exist" in status.error.message

    # Nothing was launched; both failures were announced, as warnings, and logged.
    for name in (wrong_format, missing):
        assert deployment.workloads(name) == 0
        assert deployment.launches(name) == 0
        announced = deployment.announced(name, "Failed")
        assert [a.reason for a in announced] == ["ValidatingFiles", "Failed"]
        assert announced[-1].warning
        deployment.wait(
            functools.partial(only_failure_logged, deployment, name),
            "the job's failure in its event log",
        )
        assert webhook_event(deployment, name) == "fine_tuning.job.failed"


def test_data_the_trainer_rejects_fails_as_a_user_error_without_retries(
    deployment: Deployment,
) -> None:
    # Valid JSONL the API accepts, but with maxSeqLength 16 every example loses its reply to
    # truncation: the trainer reports it and exits with its user-error code (65, permanent).
    rows = sft_rows()
    for row in rows:
        row["messages"][0]["content"] = "Please answer. " + " ".join(["apple river stone"] * 10)
    name = deployment.submit(rows=rows, hyperparameters={"maxSeqLength": 16})

    status = deployment.wait_phase(name, JobPhase.FAILED)
    assert status.error is not None
    assert (status.error.kind, status.error.code, status.error.param) == (
        ErrorKind.USER,
        "invalid_training_file",
        "training_file",
    )
    assert "maximum sequence length" in status.error.message
    assert status.restarts == 0
    assert {c.type: c.status for c in status.conditions}["FilesValidated"] is ConditionStatus.TRUE
    assert deployment.launches(name) == 1  # exit codes below 128 are never retried
    assert deployment.reasons(name, "Failed")[-1] == "Failed"


def test_a_trainer_that_keeps_failing_is_an_infrastructure_error_after_the_backoff_limit(
    make_deployment: Callable[..., Deployment],
) -> None:
    # Every trainer is OOM-killed (exit 137, retryable) as soon as it starts.
    deployment = make_deployment(trainer_exit=137, backoff_limit=2)
    name = deployment.submit()

    status = deployment.wait_phase(name, JobPhase.FAILED, timeout=FAST)
    assert status.error is not None
    assert (status.error.kind, status.error.code) == (
        ErrorKind.INFRASTRUCTURE,
        "backoff_limit_exceeded",
    )
    assert "backoff limit" in status.error.message
    deployment.check_gave_up(name, backoff_limit=2, exit_code=137)
    assert {c.type: c.status for c in status.conditions}["Failed"] is ConditionStatus.TRUE
    (failed,) = [a for a in deployment.announced(name, "Failed") if a.reason == "Failed"]
    assert failed.warning
    assert webhook_event(deployment, name) == "fine_tuning.job.failed"


def test_a_preempted_trainer_restarts_and_resumes_exactly_from_its_checkpoint(
    deployment: Deployment,
) -> None:
    name = deployment.submit(checkpointing={"everySteps": 1, "keep": 2})
    first_checkpoint(deployment, name)

    deployment.preempt(name)
    status = deployment.wait_phase(name, JobPhase.SUCCEEDED)

    (preempted,) = kinds(deployment, name, TrainerEventKind.PREEMPTED)
    stopped_at = int(preempted.data["step"])
    assert 0 < stopped_at < PLANNED_STEPS, "the SIGTERM landed after the run had finished"
    (restarted,) = kinds(deployment, name, TrainerEventKind.RESTARTED)
    assert restarted.data["step"] == stopped_at
    assert status.restarts == 1
    announced = deployment.announced(name, "Succeeded")
    assert [a.reason for a in announced][-2:] == ["Restarted", "Succeeded"]
    assert announced[-2].warning
    messages = [e.message for e in deployment.job_events(name)]
    assert f"Restarted from step {stopped_at}" in messages

    # Every rank stopped at the same committed step, the trainer was started once more, and
    # the resumed run trained exactly the remaining steps.
    assert deployment.launches(name) == 2
    assert trained_steps(deployment, name) == list(range(1, PLANNED_STEPS + 1))
    assert status.step == status.total_steps == PLANNED_STEPS
    manifest = deployment.store.get_json(deployment.layout.adapter_manifest_key(ORG, name))
    assert manifest["step"] == PLANNED_STEPS
    assert re.fullmatch(r"ft:tiny-llama:default::\w+", status.fine_tuned_model or "")


def train_losses(deployment: Deployment, name: str) -> list[float]:
    """The training loss of each step, in order."""
    return [
        float(e.data["train_loss"])
        for e in deployment.job_events(name)
        if e.type is EventType.METRICS and "train_loss" in e.data
    ]


def test_a_job_continues_training_from_a_fine_tuned_model(deployment: Deployment) -> None:
    first = deployment.submit()
    model = deployment.wait_phase(first, JobPhase.SUCCEEDED).fine_tuned_model
    assert model is not None
    second = deployment.submit(model=model, continueFrom={"job": first})
    status = deployment.wait_phase(second, JobPhase.SUCCEEDED)

    # The second job started where the first ended, not from a fresh adapter.
    before, after = train_losses(deployment, first), train_losses(deployment, second)
    assert after[0] < before[0] - 0.5 * (before[0] - before[-1])
    # Its model is named after the base, like any other, and its adapter is a new one.
    assert re.fullmatch(r"ft:tiny-llama:default::\w+", status.fine_tuned_model or "")
    assert status.fine_tuned_model != model
    manifest = deployment.store.get_json(deployment.layout.adapter_manifest_key(ORG, second))
    assert manifest["step"] == PLANNED_STEPS
