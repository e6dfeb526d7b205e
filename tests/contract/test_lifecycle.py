import itertools

import pytest

from kubetune.finetunejob import JobPhase
from kubetune.lifecycle import (
    ALLOWED_TRANSITIONS,
    CANCELLABLE,
    TERMINAL_PHASES,
    can_transition,
    is_terminal,
    progress_text,
)


def test_every_phase_has_a_transition_entry():
    assert set(ALLOWED_TRANSITIONS) == {None, *JobPhase}


@pytest.mark.parametrize("phase", sorted(TERMINAL_PHASES))
def test_terminal_phases_never_change(phase):
    assert is_terminal(phase)
    assert not any(can_transition(phase, other) for other in JobPhase if other != phase)


def test_the_happy_path_is_allowed():
    path: list[JobPhase | None] = [
        None,
        JobPhase.VALIDATING_FILES,
        JobPhase.QUEUED,
        JobPhase.RUNNING,
        JobPhase.SUCCEEDED,
    ]
    assert all(can_transition(a, b) for a, b in itertools.pairwise(path) if b is not None)


def test_pause_and_resume_go_through_a_checkpoint():
    assert can_transition(JobPhase.RUNNING, JobPhase.PAUSING)
    assert can_transition(JobPhase.PAUSING, JobPhase.PAUSED)
    assert can_transition(JobPhase.PAUSED, JobPhase.QUEUED)
    assert not can_transition(JobPhase.PAUSED, JobPhase.SUCCEEDED)


def test_only_unfinished_jobs_can_be_cancelled():
    assert set(JobPhase) - TERMINAL_PHASES == CANCELLABLE


def test_progress_text():
    assert progress_text(7, 20) == "7/20"
    assert progress_text(0, None) is None
