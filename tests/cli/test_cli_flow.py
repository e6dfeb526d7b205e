"""The CLI against a live API (local mode): upload → create → watch → models list, and the
job controls. Nothing trains in the API's local backend yet, so :class:`Executor` moves the
job the way the local executor will: trainer events into the store, status into SQLite.
"""

from __future__ import annotations

import json
import tarfile
import threading
import time
from pathlib import Path

import pytest

from kubetune.events import EventLevel, JobEvent
from kubetune.finetunejob import (
    CheckpointRef,
    JobPhase,
    Metrics,
    fine_tuned_model_name,
)
from kubetune.ids import new_checkpoint_id
from kubetune.trainer_events import StepMetrics, TrainerEventKind, message_data
from kubetune_cli.errors import ExitCode
from kubetune_runtime.progress import trainer_error
from tests.api.conftest import chat_file
from tests.cli.conftest import CliProcess, Executor, global_args, run_cli, run_json

TOTAL_STEPS = 10


@pytest.fixture
def training_path(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_bytes(chat_file(12))
    return path


@pytest.fixture
def job_id(cli_api, training_path) -> str:
    """A fresh job created through the CLI."""
    g = global_args(cli_api)
    file = run_json([*g, "files", "upload", str(training_path)])
    job = run_json([*g, "jobs", "create", "--model", "tiny-llama", "--training-file", file["id"]])
    return str(job["id"])


def metrics_event(step: int, loss: float) -> JobEvent:
    data = StepMetrics(step=step, total_steps=TOTAL_STEPS, train_loss=loss, tokens_per_second=900)
    return JobEvent(
        message=f"Step {step}/{TOTAL_STEPS}",
        type="metrics",
        data=data.model_dump(exclude_none=True),
    )


def trainer_message(kind: TrainerEventKind, message: str, **data) -> JobEvent:
    return JobEvent(message=message, data=message_data(kind, **data))


def test_upload_create_watch_succeeds_then_model_is_listed(cli_api, training_path):
    g = global_args(cli_api)
    upload = run_cli([*g, "files", "upload", str(training_path)])
    assert upload.exit_code == 0, upload.output + upload.stderr
    assert "Uploaded train.jsonl as file-" in upload.stdout
    assert "Uploading train.jsonl" in upload.stderr  # the progress bar
    file_id = upload.stdout.split(" as ")[1].split()[0]

    created = run_json(
        [*g, "jobs", "create", "--model", "tiny-llama", "--training-file", file_id,
         "--epochs", "2", "--suffix", "cli",
         "-H", "lr_scheduler_type=cosine", "--hyperparameter", "weight_decay=0.01"]
    )  # fmt: skip
    job_id = created["id"]
    shown = created["method"]["supervised"]["hyperparameters"]
    assert (shown["n_epochs"], shown["lr_scheduler_type"], shown["weight_decay"]) == (
        2,
        "cosine",
        0.01,
    )
    bad = run_cli(
        [*g, "jobs", "create", "--model", "tiny-llama", "--training-file", file_id,
         "-H", "weight_decay=7"]
    )  # fmt: skip
    assert bad.exit_code == ExitCode.API_ERROR
    assert "method.supervised.hyperparameters.weight_decay" in bad.stderr

    watcher = CliProcess([*g, "jobs", "watch", job_id, "--interval", "0.1"])
    # The first poll shows the tail of the events the API wrote at creation.
    watcher.wait_for(f"Created fine-tuning job: {job_id}")

    executor = Executor(cli_api, job_id)
    executor.set(phase=JobPhase.RUNNING, started_at=executor.now())
    executor.emit([trainer_message(TrainerEventKind.STARTED, "Training started on 1 process")])
    for step in range(1, TOTAL_STEPS + 1):
        executor.emit([metrics_event(step, loss=2.0 - step / 10)])
        if step == 5:
            watcher.wait_for("Step 5/10")  # progress shows while the job runs
    executor.emit([trainer_message(TrainerEventKind.COMPLETED, "Training completed")])
    model = fine_tuned_model_name("tiny-llama", "acme", "cli", job_id)
    executor.set(phase=JobPhase.SUCCEEDED, fine_tuned_model=model, finished_at=executor.now())

    code, out, err = watcher.finish()
    assert code == ExitCode.OK, out + err
    assert "Training started on 1 process" in out
    assert "Training completed" in out
    assert "10/10" in out  # the bar's final state
    assert "loss 1.0000" in out
    assert f"Job {job_id} succeeded: fine-tuned model {model}" in out

    listed = run_cli([*g, "models", "list"])
    assert listed.exit_code == 0
    assert model in listed.stdout
    assert model in [m["id"] for m in run_json([*g, "models", "list"])]


def test_watch_exits_non_zero_when_the_job_fails(cli_api, job_id):
    executor = Executor(cli_api, job_id)
    executor.emit([metrics_event(1, loss=3.0)])
    failure = JobEvent(
        message="Line 3 has no assistant message to learn from",
        level=EventLevel.ERROR,
        data=message_data(TrainerEventKind.ERROR, code="invalid_training_file"),
    )
    executor.emit([failure])
    # What the executor does with the trainer's error event: it becomes the job's error.
    error = trainer_error([failure])
    executor.set(phase=JobPhase.FAILED, error=error, finished_at=executor.now())

    result = run_cli([*global_args(cli_api), "jobs", "watch", job_id, "--interval", "0.1"])
    assert result.exit_code == ExitCode.JOB_FAILED
    assert "Line 3 has no assistant message to learn from" in result.stdout  # the event tail
    assert f"Job {job_id} failed: Line 3 has no assistant message to learn from" in result.stdout
    assert "(invalid_training_file)" in result.stdout


def test_cancel_then_watch_exits_with_the_cancelled_code(cli_api, job_id):
    g = global_args(cli_api)
    cancelled = run_cli([*g, "jobs", "cancel", job_id])
    assert cancelled.exit_code == 0, cancelled.output
    assert "status is now cancelled" in cancelled.stdout
    watched = run_cli([*g, "jobs", "watch", job_id])
    assert watched.exit_code == ExitCode.JOB_CANCELLED
    assert "was cancelled" in watched.stdout
    again = run_cli([*g, "jobs", "cancel", job_id])
    assert again.exit_code == ExitCode.API_ERROR
    assert "cannot be cancelled" in again.stderr
    assert "HTTP 409" in again.stderr


def test_create_watch_flag_follows_the_job(cli_api, training_path):
    g = global_args(cli_api)
    file = run_json([*g, "files", "upload", str(training_path)])
    proc = CliProcess(
        [*g, "jobs", "create", "--model", "tiny-llama", "--training-file", file["id"],
         "--watch", "--interval", "0.1"]
    )  # fmt: skip
    proc.wait_for("Created job ")
    job_id = proc.stdout.split("Created job ")[1].split()[0]
    executor = Executor(cli_api, job_id)
    executor.set(phase=JobPhase.CANCELLED, finished_at=executor.now())
    code, out, err = proc.finish()
    assert code == ExitCode.JOB_CANCELLED, out + err


def test_pause_resume_get_list_events_checkpoints(cli_api, job_id):
    g = global_args(cli_api)
    executor = Executor(cli_api, job_id)
    executor.set(phase=JobPhase.RUNNING)
    paused = run_json([*g, "jobs", "pause", job_id])
    assert paused["status"] == "pausing"
    executor.set(phase=JobPhase.PAUSED)
    assert run_json([*g, "jobs", "resume", job_id])["status"] == "queued"

    got = run_json([*g, "jobs", "get", job_id])
    assert got["id"] == job_id
    assert got["adapter"]["type"] == "lora"  # kubetune's extra fields survive --json
    table = run_cli([*g, "jobs", "get", job_id])
    assert "tiny-llama" in table.stdout
    assert "lora" in table.stdout

    assert job_id in [j["id"] for j in run_json([*g, "jobs", "list", "--limit", "100"])]
    assert job_id in run_cli([*g, "jobs", "list", "--limit", "100"]).stdout

    events = run_json([*g, "jobs", "events", job_id, "--limit", "50"])
    messages = [e["message"] for e in events]
    assert messages[0] == f"Created fine-tuning job: {job_id}"  # oldest first
    assert "Fine-tuning job resumed" in messages

    ckpt = CheckpointRef(
        id=new_checkpoint_id(), step=4, created_at=executor.now(), metrics=Metrics(train_loss=0.5)
    )
    executor.set(checkpoints=[ckpt])
    checkpoints = run_json([*g, "jobs", "checkpoints", job_id])
    assert [(c["id"], c["step_number"]) for c in checkpoints] == [(ckpt.id, 4)]
    shown = run_cli([*g, "jobs", "checkpoints", job_id])
    assert ckpt.id in shown.stdout
    assert "ckpt-step-4" in shown.stdout


def test_files_list_and_rm(cli_api, training_path):
    g = global_args(cli_api)
    file = run_json([*g, "files", "upload", str(training_path)])
    assert file["id"] in [
        f["id"] for f in run_json([*g, "files", "list", "--purpose", "fine-tune"])
    ]
    assert file["id"] in run_cli([*g, "files", "list"]).stdout
    removed = run_cli([*g, "files", "rm", file["id"]])
    assert removed.exit_code == 0
    assert file["id"] not in [f["id"] for f in run_json([*g, "files", "list"])]


def test_big_files_go_through_the_uploads_api_in_parts(cli_api, tmp_path):
    g = global_args(cli_api)
    path = tmp_path / "big.jsonl"
    path.write_bytes(chat_file(60))
    assert path.stat().st_size > 4 * 2048
    uploaded = run_json([*g, "files", "upload", str(path), "--part-size", "2048"])
    assert uploaded["bytes"] == path.stat().st_size
    assert uploaded["filename"] == "big.jsonl"
    content = cli_api.client().files.content(uploaded["id"]).read()
    assert content == path.read_bytes()


def test_models_rm(cli_api, job_id):
    g = global_args(cli_api)
    model = fine_tuned_model_name("tiny-llama", "acme", None, job_id)
    Executor(cli_api, job_id).set(phase=JobPhase.SUCCEEDED, fine_tuned_model=model)
    assert run_cli([*g, "models", "rm", model]).exit_code == 0
    assert model not in [m["id"] for m in run_json([*g, "models", "list"])]


def test_models_download_extracts_the_weights_or_keeps_the_archive(cli_api, job_id, tmp_path):
    g = global_args(cli_api)
    model = fine_tuned_model_name("tiny-llama", "acme", None, job_id)
    ckpt = CheckpointRef(id=new_checkpoint_id(), step=4, created_at=Executor(cli_api, job_id).now())
    executor = Executor(cli_api, job_id)
    executor.set(phase=JobPhase.SUCCEEDED, fine_tuned_model=model, checkpoints=[ckpt])
    weights = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"w" * 3000}
    for step in (None, 4):
        prefix = executor.layout.model_prefix("acme", job_id, step)
        for name, data in {**weights, "optimizer.pt": b"o"}.items():
            executor.store.put_bytes(prefix + name, data)
        executor.store.put_bytes(executor.layout.model_manifest_key("acme", job_id, step), b"{}")

    out = tmp_path / "downloads"  # beside nothing else
    folder = out / "pirate"
    result = run_cli([*g, "models", "download", model, "-o", str(folder)])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in folder.iterdir()) == [*sorted(weights), "manifest.json"]
    assert (folder / "adapter_model.safetensors").read_bytes() == weights[
        "adapter_model.safetensors"
    ]
    assert "Downloading" in result.stderr  # the progress bar

    archive = out / "ckpt.tar"
    checkpoint = f"{model}:ckpt-step-4"
    assert (
        run_cli([*g, "models", "download", checkpoint, "--tar", "-o", str(archive)]).exit_code == 0
    )
    with tarfile.open(archive) as tar:
        assert "optimizer.pt" not in {Path(n).name for n in tar.getnames()}
        assert len(tar.getnames()) == 3

    # Refusals leave nothing behind: an existing target, another org's model, a format.
    assert run_cli([*g, "models", "download", model, "-o", str(folder)]).exit_code == ExitCode.USAGE
    other = out / "other"
    refused = run_cli(
        [*global_args(cli_api, "globex"), "models", "download", model, "-o", str(other)]
    )
    assert refused.exit_code == ExitCode.API_ERROR
    assert "model_not_found" in refused.stderr
    # A merge that failed: the reason, and nothing written.
    failed = {"kubetune.io/merge-step-4": "failed: out of memory"}
    executor.backend.annotate("acme", job_id, failed)
    refused = run_cli(
        [*g, "models", "download", checkpoint, "--format", "merged", "-o", str(other)]
    )
    assert refused.exit_code == ExitCode.API_ERROR
    assert "out of memory" in refused.stderr
    assert "merge_failed" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.tar", "pirate"]

    # A LoRA model merged on request: the CLI waits while the server has it merged (the test
    # plays local mode's merge, publishing once asked), then downloads the whole model.
    merged = {"config.json": b"{}", "model.safetensors": b"m" * 5000}

    def merge_when_asked() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = executor.backend.get("acme", job_id)
            if job.metadata.annotations.get("kubetune.io/merge-final") == "requested":
                break
            time.sleep(0.2)
        prefix = executor.layout.merged_prefix("acme", job_id)
        for name, data in merged.items():
            executor.store.put_bytes(prefix + name, data)
        executor.store.put_bytes(executor.layout.merged_manifest_key("acme", job_id), b"{}")

    merger = threading.Thread(target=merge_when_asked)
    merger.start()
    whole = out / "whole"
    result = run_cli([*g, "models", "download", model, "--format", "merged", "-o", str(whole)])
    merger.join()
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in whole.iterdir()) == sorted([*merged, "manifest.json"])
    assert (whole / "model.safetensors").read_bytes() == merged["model.safetensors"]


def test_list_json_is_plain_json(cli_api):
    result = run_cli([*global_args(cli_api), "models", "list", "--json"])
    data = json.loads(result.stdout)
    assert {"tiny-llama", "tiny-llama-2"} <= {m["id"] for m in data}
