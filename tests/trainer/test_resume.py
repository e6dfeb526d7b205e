"""Preemption: SIGTERM → checkpoint committed → exit 143, and the restart resumes exactly."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune.settings import ObjectStoreSettings
from kubetune.trainer_events import TrainerEventKind, checkpoint_from_event, event_kind
from kubetune_runtime.objectstore import LocalObjectStore, S3ObjectStore
from tests.harness.s3 import S3Server
from tests.trainer.conftest import TRAIN, VALID
from tests.trainer.harness import ORG, REPO, Job, make_job, max_abs_diff, trainer_env
from tests.trainer.tiny import jsonl, sft_examples

pytestmark = pytest.mark.trainer
FAULT = {"KUBETUNE_TRAINER_FAULT_SIGTERM_AT_STEP": "7"}


def test_sigterm_at_step_7_then_restart_matches_an_uninterrupted_run(
    reference_run: Job,
    s3: S3Server,
    s3_store: tuple[S3ObjectStore, ObjectStoreSettings],
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    store, settings = s3_store
    job = make_job(store, settings, tiny_model, tmp_path / "job", TRAIN, VALID)
    assert job.run(env={**s3.env(), **FAULT}) == 143
    # The preempted run stopped at step 7 with a committed checkpoint of step 7.
    committed = [c.step for e in job.events() if (c := checkpoint_from_event(e))]
    assert committed == [5, 7]
    assert store.exists(job.layout.checkpoint_manifest_key(ORG, job.config.job_id, 7))
    assert max(job.step_losses()) == 7
    assert job.kinds()[-1] is TrainerEventKind.PREEMPTED

    assert job.run(env=s3.env()) == 0
    restarted = next(e for e in job.events() if event_kind(e) is TrainerEventKind.RESTARTED)
    assert restarted.data["step"] == 7
    assert restarted.message == "Restarted from step 7"
    # Bit for bit the same run: every step's loss after the resume, and the final adapter.
    reference, resumed = reference_run.step_losses(), job.step_losses()
    assert sorted(resumed) == list(range(1, 21))
    assert [resumed[s] for s in range(8, 21)] == [reference[s] for s in range(8, 21)]
    assert max_abs_diff(reference_run.adapter_tensors(), job.adapter_tensors()) <= 1e-6
    kept = {
        info.key.split("/")[-2]
        for info in store.list(job.layout.checkpoints_prefix(ORG, job.config.job_id))
    }
    assert kept == {"step-0000000015", "step-0000000020"}  # keep=2


def test_external_sigterm_commits_the_current_step_and_exits_143(
    tiny_model: Path, local_store: tuple[LocalObjectStore, ObjectStoreSettings], tmp_path: Path
) -> None:
    """The kubelet's SIGTERM, from outside, in the middle of a long run."""
    store, settings = local_store
    job = make_job(
        store,
        settings,
        tiny_model,
        tmp_path / "job",
        jsonl(sft_examples(40)),
        hyperparameters={"n_epochs": 50},
        total_steps=500,
        checkpointing={"every_steps": 3, "keep": 10},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(job.config_path)],
        env=trainer_env(job.workdir),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        prefix = job.layout.checkpoints_prefix(ORG, job.config.job_id)
        deadline = time.monotonic() + 120
        while not any(i.key.endswith("manifest.json") for i in store.list(prefix)):
            assert proc.poll() is None, "the trainer ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.terminate()  # SIGTERM
        assert proc.wait(timeout=120) == 143
    finally:
        proc.kill()
    events = job.events()
    assert event_kind(events[-1]) is TrainerEventKind.PREEMPTED
    stopped = events[-1].data["step"]
    assert 3 <= stopped < 500
    last = [c.step for e in events if (c := checkpoint_from_event(e))][-1]
    assert last == stopped  # the step it stopped at is committed, manifest and all
    assert store.exists(job.layout.checkpoint_manifest_key(ORG, job.config.job_id, stopped))


def test_a_damaged_checkpoint_is_skipped_for_the_one_before_it(
    reference_run: Job,
    tiny_model: Path,
    local_store: tuple[LocalObjectStore, ObjectStoreSettings],
    tmp_path: Path,
) -> None:
    store, settings = local_store
    job = make_job(store, settings, tiny_model, tmp_path / "job", TRAIN, VALID)
    assert job.run(env=FAULT) == 143  # checkpoints of steps 5 and 7 committed
    manifest = store.get_json(job.layout.checkpoint_manifest_key(ORG, job.config.job_id, 7))
    files = manifest["files"]
    assert "adapter_model.safetensors" in files
    assert "kubetune_state.json" in files
    assert all(len(digest) == 64 for digest in files.values())
    # The store loses the end of step 7's weights (a torn upload, a damaged object).
    key = job.layout.checkpoint_prefix(ORG, job.config.job_id, 7) + "adapter_model.safetensors"
    store.put_bytes(key, store.get_bytes(key)[:-100])

    assert job.run() == 0
    warning = next(
        e
        for e in job.events()
        if event_kind(e) is TrainerEventKind.WARNING and "does not match" in e.message
    )
    assert warning.message == (
        "The checkpoint of step 7 does not match its manifest (adapter_model.safetensors); "
        "resuming from the one before it"
    )
    restarted = next(e for e in job.events() if event_kind(e) is TrainerEventKind.RESTARTED)
    assert restarted.data["step"] == 5
    # From step 5 the run is the uninterrupted one again, to the bit (CPU, fp32).
    reference, resumed = reference_run.step_losses(), job.step_losses()
    assert [resumed[s] for s in range(6, 21)] == [reference[s] for s in range(6, 21)]
    assert max_abs_diff(reference_run.adapter_tensors(), job.adapter_tensors()) <= 1e-6
