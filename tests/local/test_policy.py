"""The subprocess runtime's pure decisions: exit codes, the trainer's environment, who starts,
the workload's conditions."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from kubetune.finetunejob import ConditionType, JobPhase
from kubetune_local.policy import (
    Relaunch,
    Waiting,
    admissible,
    after_exit,
    trainer_env,
    update_conditions,
)
from kubetune_runtime.observed import Observed


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
    env = trainer_env(host, "ftjob-0000000000000000000000a", 1, workdir=tmp_path, master_port=1234)
    assert env["PET_NNODES"] == env["PET_NPROC_PER_NODE"] == env["WORLD_SIZE"] == "1"
    assert env["MASTER_PORT"] == "1234"
    assert env["KUBETUNE_JOB_ID"] == "ftjob-0000000000000000000000a"
    assert env["KUBETUNE_TRAINER_WORKDIR"] == str(tmp_path)
    assert env["AWS_ACCESS_KEY_ID"] == "k"  # store credentials, as the chart's Secret gives
    assert "SECRET_OF_THE_API" not in env
    two = trainer_env(host, "ftjob-000000000000000000000b", 2, workdir=tmp_path, master_port=1)
    assert two["PET_NPROC_PER_NODE"] == two["WORLD_SIZE"] == "2"


def test_interrupted_trainers_are_admitted_first_then_the_oldest_within_the_limit() -> None:
    waiting = [
        Waiting("ftjob-0000000000000000000003", resume_first=False),
        Waiting("ftjob-0000000000000000000002", resume_first=True),  # stopped with the server
        Waiting("ftjob-0000000000000000000001", resume_first=False),
    ]
    assert admissible(waiting, running=0, limit=1) == ["ftjob-0000000000000000000002"]
    assert admissible(waiting, running=0, limit=5) == [
        "ftjob-0000000000000000000002",
        "ftjob-0000000000000000000001",
        "ftjob-0000000000000000000003",
    ]
    assert admissible(waiting, running=1, limit=1) == []
    assert admissible(waiting, running=3, limit=1) == []


NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
LATER = datetime(2026, 1, 2, 3, 9, 0, tzinfo=UTC)


def test_conditions_follow_the_training_operators_rules() -> None:
    created = update_conditions([], ConditionType.CREATED, True, "Created", "", now=NOW)
    running = update_conditions(created, ConditionType.RUNNING, True, "Running", "", now=NOW)
    # The same condition again keeps its transition time.
    again = update_conditions(running, ConditionType.RUNNING, True, "Running", "", now=LATER)
    assert again == running
    # Running and Restarting replace each other.
    restarting = update_conditions(
        running, ConditionType.RESTARTING, True, "Restarting", "exit 143", now=LATER
    )
    assert [c["type"] for c in restarting] == ["Created", "Restarting"]
    running = update_conditions(restarting, ConditionType.RUNNING, True, "Running", "", now=LATER)
    assert [c["type"] for c in running] == ["Created", "Running"]
    assert running[-1]["lastTransitionTime"] == "2026-01-02T03:09:00Z"
    # The end turns Running False; nothing changes after a failure.
    failed = update_conditions(running, ConditionType.FAILED, True, "Failed", "exit 1", now=LATER)
    assert {c["type"]: c["status"] for c in failed} == {
        "Created": "True",
        "Running": "False",
        "Failed": "True",
    }
    assert (
        update_conditions(failed, ConditionType.RUNNING, True, "Running", "", now=LATER) == failed
    )
