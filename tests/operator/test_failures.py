"""Failures are reported with whose fault they are: bad input is the user's (never retried),
pods that keep dying are the infrastructure's.
"""

from __future__ import annotations

import functools
import sys

from kubetune.finetunejob import ConditionStatus, ErrorKind, JobPhase
from kubetune.ids import new_file_id
from tests.operator.conftest import Testbed, sft_rows
from tests.operator.test_job_lifecycle import reasons

FAST = 60.0


def only_failure_logged(testbed: Testbed, name: str) -> bool:
    """The job's event log holds just the operator's failure line (written after the status)."""
    return [e.message[:23] for e in testbed.job_events(name)] == ["The job failed: invalid"]


def test_files_that_do_not_fit_the_job_fail_validation_as_user_errors(testbed: Testbed) -> None:
    from tests.trainer.tiny import dpo_examples

    wrong_format = testbed.submit(rows=dpo_examples(20))  # preference data, supervised job
    missing = testbed.apply(testbed.manifest(new_file_id()))

    status = testbed.wait_phase(wrong_format, JobPhase.FAILED, timeout=FAST)
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

    status = testbed.wait_phase(missing, JobPhase.FAILED, timeout=FAST)
    assert status.error is not None
    assert (status.error.kind, status.error.code) == (ErrorKind.USER, "invalid_file")
    assert "does not exist" in status.error.message

    # Nothing was launched, and both failures were announced.
    assert testbed.pytorchjobs() == []
    for name in (wrong_format, missing):
        assert reasons(testbed, name, "Failed") == ["ValidatingFiles", "Failed"]
        (event,) = [e for e in testbed.kube_events(name) if e.reason == "Failed"]
        assert event.type == "Warning"
        assert "user error" in event.message
        failed_event = functools.partial(only_failure_logged, testbed, name)
        testbed.wait(failed_event, "the job's failure in its event log")


def test_data_the_trainer_rejects_fails_as_a_user_error_without_retries(testbed: Testbed) -> None:
    # Valid JSONL the API accepts, but with maxSeqLength 16 every example loses its reply to
    # truncation: the trainer reports it and exits with its user-error code (65, permanent).
    rows = sft_rows()
    for row in rows:
        row["messages"][0]["content"] = "Please answer. " + " ".join(["apple river stone"] * 10)
    name = testbed.submit(rows=rows, hyperparameters={"maxSeqLength": 16})

    status = testbed.wait_phase(name, JobPhase.FAILED)
    assert status.error is not None
    assert (status.error.kind, status.error.code, status.error.param) == (
        ErrorKind.USER,
        "invalid_training_file",
        "training_file",
    )
    assert "maximum sequence length" in status.error.message
    assert status.restarts == 0
    assert {c.type: c.status for c in status.conditions}["FilesValidated"] is ConditionStatus.TRUE
    # One start per replica: exit codes below 128 are never retried.
    assert testbed.trainers.starts(name) == 2
    exit_codes = [c for r in testbed.trainers.replicas(name) for c in r.exit_codes]
    assert 65 in exit_codes
    assert all(c < 128 for c in exit_codes)
    assert reasons(testbed, name, "Failed")[-1] == "Failed"


def test_pods_failing_beyond_the_backoff_limit_are_an_infrastructure_error(make_testbed) -> None:
    # Every pod is OOM-killed (exit 137, retryable) as soon as it starts.
    testbed: Testbed = make_testbed(
        entrypoint=[sys.executable, "-c", "import sys; sys.exit(137)"], backoff_limit="2"
    )
    name = testbed.submit(rows=sft_rows())

    status = testbed.wait_phase(name, JobPhase.FAILED, timeout=FAST)
    assert status.error is not None
    assert (status.error.kind, status.error.code) == (
        ErrorKind.INFRASTRUCTURE,
        "backoff_limit_exceeded",
    )
    assert "backoff limit" in status.error.message
    exit_codes = [c for r in testbed.trainers.replicas(name) for c in r.exit_codes]
    assert set(exit_codes) == {137}
    assert testbed.trainers.failures(name) == 3  # two restarts allowed (backoffLimit 2)
    conditions = {c.type: c for c in status.conditions}
    assert conditions["Failed"].status is ConditionStatus.TRUE
    assert conditions["Failed"].reason == "PyTorchJobFailed"
    reasons(testbed, name, "Failed")
    (event,) = [e for e in testbed.kube_events(name) if e.reason == "Failed"]
    assert "infrastructure error backoff_limit_exceeded" in event.message
