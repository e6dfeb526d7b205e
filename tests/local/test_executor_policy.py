"""The local executor's pure decisions: exit codes, the trainer's environment, who starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.finetunejob import (
    ErrorKind,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    JobError,
    JobPhase,
    ObjectMeta,
)
from kubetune.observed import Observed
from kubetune.serving import SyncResult, SyncState
from kubetune_api.executor.policy import Relaunch, after_exit, startable, trainer_env
from kubetune_api.executor.serving import LocalServing


def _job(name: str, phase: JobPhase | None, **spec: object) -> FineTuneJob:
    return FineTuneJob(
        metadata=ObjectMeta(name=name),
        spec=FineTuneJobSpec.model_validate(
            {"org": "acme", "model": "tiny-llama", "training_file": "file-" + "0" * 23, **spec}
        ),
        status=FineTuneJobStatus(phase=phase) if phase else None,
    )


@pytest.mark.parametrize(
    ("returncode", "suspend", "relaunches", "expected"),
    [
        (0, False, 0, JobPhase.SUCCEEDED),
        (65, False, 0, JobPhase.FAILED),  # the user's input: never retried
        (1, False, 0, JobPhase.FAILED),
        (143, True, 0, JobPhase.PAUSED),  # SIGTERM for a pause, checkpoint committed
        (-15, True, 0, JobPhase.PAUSED),  # killed by SIGTERM before it could exit itself
        (143, False, 0, Relaunch),  # preempted: resume from the checkpoint
        (129, False, 2, Relaunch),
        (137, False, 3, JobPhase.FAILED),  # backoff limit spent
    ],
)
def test_after_exit_follows_the_exit_code_policy(
    returncode: int, suspend: bool, relaunches: int, expected: object
) -> None:
    decision = after_exit(
        returncode, suspend_requested=suspend, relaunches=relaunches, backoff_limit=3
    )
    if expected is Relaunch:
        assert decision == Relaunch(128 - returncode if returncode < 0 else returncode)
    else:
        assert isinstance(decision, Observed)
        assert decision.phase is expected


def test_backoff_failure_is_classified_as_such() -> None:
    decision = after_exit(143, suspend_requested=False, relaunches=1, backoff_limit=1)
    assert isinstance(decision, Observed)
    assert "backoff limit" in (decision.message or "")


def test_trainer_env_is_a_one_node_pytorchjob(tmp_path: Path) -> None:
    host = {"PATH": "/bin", "AWS_ACCESS_KEY_ID": "k", "SECRET_OF_THE_API": "x", "HOME": "/h"}
    env = trainer_env(
        host,
        _job("ftjob-0000000000000000000000a", JobPhase.QUEUED),
        workdir=tmp_path,
        master_port=1234,
    )
    assert env["PET_NNODES"] == env["PET_NPROC_PER_NODE"] == env["WORLD_SIZE"] == "1"
    assert env["MASTER_PORT"] == "1234"
    assert env["KUBETUNE_JOB_ID"] == "ftjob-0000000000000000000000a"
    assert env["KUBETUNE_TRAINER_WORKDIR"] == str(tmp_path)
    assert env["AWS_ACCESS_KEY_ID"] == "k"  # store credentials, as the chart's Secret gives
    assert "SECRET_OF_THE_API" not in env
    two = _job(
        "ftjob-000000000000000000000b", JobPhase.QUEUED, resources={"nodes": 1, "gpus_per_node": 2}
    )
    assert trainer_env(host, two, workdir=tmp_path, master_port=1)["PET_NPROC_PER_NODE"] == "2"


def test_startable_resumes_interrupted_jobs_first_within_the_limit() -> None:
    jobs = [
        _job("ftjob-0000000000000000000001", JobPhase.QUEUED),
        _job(
            "ftjob-0000000000000000000002", JobPhase.RUNNING
        ),  # its trainer stopped with the server
        _job("ftjob-0000000000000000000003", JobPhase.PAUSED, suspend=True),
        _job("ftjob-0000000000000000000004", JobPhase.QUEUED, cancel=True),
        _job("ftjob-0000000000000000000005", JobPhase.VALIDATING_FILES),
        _job("ftjob-0000000000000000000006", JobPhase.PAUSED),  # resume asked for
    ]
    assert startable(jobs, running=0, limit=1) == ["ftjob-0000000000000000000002"]
    assert startable(jobs, running=0, limit=5) == [
        "ftjob-0000000000000000000002",
        "ftjob-0000000000000000000001",
        "ftjob-0000000000000000000006",
    ]
    assert startable(jobs, running=1, limit=1) == []


def _served_job(served_on: list[str], error: JobError | None) -> FineTuneJob:
    job = _job("ftjob-" + "1" * 23, JobPhase.SUCCEEDED)
    assert job.status is not None
    job.status = job.status.model_copy(
        update={
            "fine_tuned_model": "ft:tiny-llama:acme::x",
            "served_on": served_on,
            "serving_error": error,
        }
    )
    return job


def test_a_sync_records_where_a_model_is_served_and_clears_a_transient_error() -> None:
    serving = LocalServing({})
    away = JobError(code="serving_unavailable", message="vLLM away", kind=ErrorKind.INFRASTRUCTURE)
    job = _served_job([], away)
    loaded = SyncResult(SyncState.LOADED, changed=True)
    assert serving.status_update(job, loaded) == {"served_on": ["local"], "serving_error": None}
    # A user's error (the rank) stays: loading it cannot have succeeded.
    rank = JobError(code="adapter_rank_too_large", message="r 32 > 16", kind=ErrorKind.USER)
    assert serving.status_update(_served_job([], rank), SyncResult(SyncState.REJECTED)) == {}
    # Unloaded (the model was deleted): no longer served anywhere.
    unloaded = SyncResult(SyncState.UNLOADED, changed=True)
    assert serving.status_update(_served_job(["local"], None), unloaded) == {"served_on": []}
    # Already as recorded: nothing to write.
    assert serving.status_update(_served_job(["local"], None), loaded) == {}
    assert serving.status_update(job, None) == {}
