"""Two trainers of one job never both write it: the trainer holds the job's writer lease, waits
while another replica holds it, and refuses to commit once another trainer took it over.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.settings import ObjectStoreSettings
from kubetune.trainer_events import TrainerEventKind
from kubetune_runtime.lease import SLOT_ENV, LeaseRecord, WriterLease
from kubetune_runtime.objectstore import LocalObjectStore
from kubetune_trainer import exit_codes
from tests.trainer.harness import ORG, REPO, Job, make_job, trainer_env
from tests.trainer.tiny import jsonl, sft_examples

pytestmark = pytest.mark.trainer


def _job(tiny_model: Path, store: LocalObjectStore, root: Path, **overrides: Any) -> Job:
    return make_job(
        store,
        ObjectStoreSettings(local_root=root / "store"),
        tiny_model,
        root / "job",
        jsonl(sft_examples(40)),
        **overrides,
    )


def start_trainer(job: Job, *, slot: str) -> subprocess.Popen[bytes]:
    """The trainer of ``job`` as the replica ``slot``, in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(job.config_path)],
        env=trainer_env(job.workdir, {SLOT_ENV: slot}),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _committed_steps(job: Job) -> list[int]:
    from kubetune_trainer.checkpoints import CheckpointStore

    return CheckpointStore(job.store, job.layout, ORG, job.config.job_id).committed_steps()


def test_a_trainer_whose_lease_was_taken_over_commits_nothing_more(
    tiny_model: Path, tmp_path: Path
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    job = _job(
        tiny_model,
        store,
        tmp_path,
        total_steps=60,
        hyperparameters={"n_epochs": 6},
        checkpointing={"every_steps": 5, "keep": 20},
    )
    key = job.layout.writer_lease_key(ORG, job.config.job_id)
    proc = start_trainer(job, slot="replica-a")
    try:
        deadline = time.monotonic() + 120
        while not _committed_steps(job) and time.monotonic() < deadline:
            time.sleep(0.01)
        # Another replica takes the job over (as after the first one's lease expired).
        usurper = WriterLease(store, key, ttl_seconds=600, slot="replica-b")
        current = store.get_versioned(key)
        assert current is not None
        store.put_if(key, usurper_record(usurper), expected_tag=current.tag)
        taken_at = _committed_steps(job)
        code = proc.wait(120)
    finally:
        proc.kill()
    assert taken_at, "the trainer committed no checkpoint in time"
    assert code == exit_codes.RETRYABLE_ERROR
    assert _committed_steps(job) == taken_at  # nothing committed after the takeover
    assert max(taken_at) < 60
    assert not store.exists(job.layout.adapter_manifest_key(ORG, job.config.job_id))
    errors = [e for e in job.events() if e.data.get("code") == "lease_lost"]
    assert errors
    assert "replica-b" in errors[-1].message
    lease_now = store.get_versioned(key)
    assert lease_now is not None
    assert LeaseRecord.decode(lease_now.data).holder == usurper.holder  # left alone


def usurper_record(usurper: WriterLease) -> bytes:
    return LeaseRecord(
        holder=usurper.holder, slot=usurper.slot, renewed_at=time.time(), ttl_seconds=600
    ).encode()


def test_a_trainer_waits_for_the_replica_holding_the_lease_then_finds_its_result(
    tiny_model: Path, tmp_path: Path
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    job = _job(tiny_model, store, tmp_path)
    key = job.layout.writer_lease_key(ORG, job.config.job_id)
    other = WriterLease(store, key, ttl_seconds=600, slot="replica-b")
    other.acquire()
    proc = start_trainer(job, slot="replica-a")
    try:
        deadline = time.monotonic() + 60
        while not job.kinds() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.kinds() == [TrainerEventKind.WARNING]  # waiting, and nothing else
        assert other.holder in job.events()[0].message
        assert proc.poll() is None
        # The other replica publishes the result and lets go.
        store.put_json(job.layout.adapter_manifest_key(ORG, job.config.job_id), {"step": 20})
        other.release()
        code = proc.wait(60)
    finally:
        proc.kill()
        other.release()
    assert code == exit_codes.SUCCESS
    assert job.kinds() == [TrainerEventKind.WARNING, TrainerEventKind.COMPLETED]
    assert _committed_steps(job) == []  # it trained nothing


def test_a_rank_waiting_for_a_finished_rank_0_ends_once_the_result_is_published(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A worker restarted just before rank 0 published joins a rank 0 that will never come:
    it must end with success once the result is there, not hold its node until the timeout.
    """
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    from kubetune_trainer.main import RESULT_POLL_SECONDS
    from tests.harness.paths import free_port

    store = LocalObjectStore(tmp_path / "store")
    job = _job(tiny_model, store, tmp_path, collective_timeout_seconds=600)
    port = free_port()
    # The master's agent store, with no rank 0 ever joining it.
    master_store = TCPStore("127.0.0.1", port, world_size=2, is_master=True, wait_for_workers=False)
    log_path = tmp_path / "rank1.log"
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune_trainer", "--config", str(job.config_path)],
            env=trainer_env(job.workdir, env),
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while b"joining the job's other ranks" not in log_path.read_bytes():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the rank never started to join"
            time.sleep(0.1)
        time.sleep(RESULT_POLL_SECONDS + 1)
        assert proc.poll() is None, "the rank did not wait for rank 0"
        # Rank 0 (in the pod that never restarted) publishes the result and exits.
        store.put_json(job.layout.adapter_manifest_key(ORG, job.config.job_id), {"step": 20})
        code = proc.wait(RESULT_POLL_SECONDS * 4)
    finally:
        proc.kill()
        del master_store
    assert code == exit_codes.SUCCESS, log_path.read_text()
    assert store.get_versioned(job.layout.writer_lease_key(ORG, job.config.job_id)) is None
