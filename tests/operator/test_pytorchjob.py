"""The PyTorchJob runtime's pure part: mapping a PyTorchJob's conditions to a job's phase."""

import pytest

from kubetune.finetunejob import JobPhase
from kubetune_operator.pytorchjob import PYTORCHJOB_WORKLOAD, observe


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


def test_the_conditions_are_handed_on_to_be_mirrored():
    status = conditions("Created", "Running", false=("Suspended",))
    observed = observe(status, suspend_requested=False)
    assert [c["type"] for c in observed.conditions] == ["Created", "Running", "Suspended"]
    assert observe(None, suspend_requested=False).conditions == ()


def test_the_view_reads_what_the_driver_needs():
    body = {
        "metadata": {"name": "j", "uid": "u", "resourceVersion": "7", "deletionTimestamp": "x"},
        "spec": {"runPolicy": {"suspend": True}},
        "status": conditions("Created"),
    }
    view = PYTORCHJOB_WORKLOAD.view(body)
    assert (view.name, view.uid, view.resource_version) == ("j", "u", "7")
    assert view.suspended
    assert view.deleting
    assert view.status == conditions("Created")
    assert not PYTORCHJOB_WORKLOAD.view({"metadata": {"name": "j"}}).suspended
