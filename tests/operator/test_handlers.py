"""The operator's metrics and handler helpers (no cluster)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import generate_latest

from kubetune.finetunejob import JobPhase
from kubetune_operator.handlers import indexed_job, is_active, owner_key
from kubetune_operator.metrics import IndexedJob, OperatorMetrics


def test_metrics_use_the_declared_names_and_read_the_index() -> None:
    now = datetime.now(UTC)
    metrics = OperatorMetrics()
    index = [
        ("queued", IndexedJob("a", now - timedelta(seconds=90))),
        ("queued", IndexedJob("b", now - timedelta(seconds=30))),
        ("running", IndexedJob("c", None)),
    ]
    metrics.watch_index(lambda: index)
    created, started = now - timedelta(minutes=3), now - timedelta(minutes=1)
    metrics.transitioned(
        JobPhase.RUNNING, first_start=True, created_at=created, started_at=started, now=started
    )
    metrics.transitioned(
        JobPhase.SUCCEEDED, first_start=False, created_at=created, started_at=started, now=now
    )
    metrics.reconcile_errors.labels("supervise").inc()
    text = generate_latest(metrics.registry).decode()
    assert 'kubetune_operator_jobs{phase="queued"} 2.0' in text
    assert 'kubetune_operator_jobs{phase="failed"} 0.0' in text
    oldest = next(
        line
        for line in text.splitlines()
        if line.startswith("kubetune_operator_queue_oldest_seconds ")
    )
    assert 89 <= float(oldest.split()[1]) <= 100
    assert "kubetune_operator_queue_wait_seconds_sum 120.0" in text
    assert 'kubetune_operator_run_seconds_count{phase="succeeded"} 1.0' in text
    assert 'kubetune_operator_jobs_finished_total{phase="succeeded"} 1.0' in text
    assert 'kubetune_operator_reconcile_errors_total{handler="supervise"} 1.0' in text


def test_handler_helpers() -> None:
    assert is_active(status={"phase": "running"})
    assert is_active(status={})
    assert not is_active(status={"phase": "cancelled"})
    ref = {"kind": "FineTuneJob", "name": "ftjob-x", "controller": True}
    assert owner_key("ns", {"metadata": {"ownerReferences": [ref]}}) == ("ns", "ftjob-x")
    assert owner_key("ns", {"metadata": {"ownerReferences": [{**ref, "kind": "Job"}]}}) is None
    job = indexed_job(
        "a",
        {
            "conditions": [
                {"type": "Queued", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
            ]
        },
    )
    assert job.queued_since == datetime(2026, 1, 1, tzinfo=UTC)
