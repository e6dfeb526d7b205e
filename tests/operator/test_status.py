"""Mapping PyTorchJob conditions to FineTuneJob phases (pure)."""

import pytest

from kubetune.finetunejob import ErrorKind, JobPhase
from kubetune.observed import classify_failure, observe


def conditions(*types: str, false: tuple[str, ...] = ()):
    return {
        "conditions": [
            {"type": t, "status": "True", "reason": f"{t}Reason", "message": f"{t} message"}
            for t in types
        ]
        + [{"type": t, "status": "False"} for t in false]
    }


@pytest.mark.parametrize(
    ("status", "suspend", "phase", "restarting"),
    [
        (None, False, JobPhase.QUEUED, False),
        (conditions("Created"), False, JobPhase.QUEUED, False),
        (conditions("Created", "Running"), False, JobPhase.RUNNING, False),
        (conditions("Created", "Running"), True, JobPhase.PAUSING, False),
        (conditions("Created", "Restarting"), False, JobPhase.RUNNING, True),
        (conditions("Created", "Suspended"), True, JobPhase.PAUSED, False),
        (conditions("Created", "Suspended"), False, JobPhase.QUEUED, False),
        (conditions("Created", "Running", "Succeeded"), False, JobPhase.SUCCEEDED, False),
        (conditions("Created", "Failed", false=("Running",)), False, JobPhase.FAILED, False),
        (conditions("Created", false=("Running",)), False, JobPhase.QUEUED, False),
    ],
)
def test_phase_from_conditions(status, suspend, phase, restarting):
    observed = observe(status, suspend_requested=suspend)
    assert observed.phase is phase
    assert observed.restarting is restarting


def test_terminal_condition_carries_its_reason():
    observed = observe(conditions("Created", "Running", "Failed"), suspend_requested=False)
    assert observed.reason == "FailedReason"
    assert observed.message == "Failed message"


def test_failures_are_the_users_only_when_the_trainer_said_so():
    assert classify_failure("invalid_training_file") is ErrorKind.USER
    assert classify_failure(None) is ErrorKind.INFRASTRUCTURE
