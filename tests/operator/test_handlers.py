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
        ("running", IndexedJob("c", None, org="acme", gpus=8)),
        ("pausing", IndexedJob("d", None, org="acme", gpus=2)),
        ("running", IndexedJob("e", None, org="globex", gpus=1)),
    ]
    metrics.watch_index(lambda: index)
    created, started = now - timedelta(minutes=3), now - timedelta(minutes=1)
    times = {"created_at": created, "started_at": started}
    metrics.transitioned(JobPhase.RUNNING, org="acme", first_start=True, now=started, **times)
    metrics.transitioned(JobPhase.SUCCEEDED, org="acme", first_start=False, now=now, **times)
    metrics.used("acme", gpu_seconds=480.0, trained_tokens=0)
    metrics.used("acme", gpu_seconds=0.0, trained_tokens=1234)
    metrics.used("globex", gpu_seconds=60.0, trained_tokens=0)
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
    assert 'kubetune_operator_jobs_finished_total{org="acme",phase="succeeded"} 1.0' in text
    # Usage by org: GPUs held now (running and pausing jobs), GPU-seconds, trained tokens.
    assert 'kubetune_operator_gpus_in_use{org="acme"} 10.0' in text
    assert 'kubetune_operator_gpus_in_use{org="globex"} 1.0' in text
    assert 'kubetune_operator_gpu_seconds_total{org="acme"} 480.0' in text
    assert 'kubetune_operator_gpu_seconds_total{org="globex"} 60.0' in text
    assert 'kubetune_operator_trained_tokens_total{org="acme"} 1234.0' in text
    assert 'kubetune_operator_trained_tokens_total{org="globex"}' not in text
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
    assert (job.org, job.gpus) == ("default", 0)
    spec = {"org": "acme", "resources": {"nodes": 2, "gpusPerNode": 4}}
    assert indexed_job("b", {"phase": "running"}, spec).gpus == 8
    assert indexed_job("b", {"phase": "pausing"}, spec).gpus == 8
    assert indexed_job("b", {"phase": "queued"}, spec).gpus == 0  # no workers yet
    assert indexed_job("b", {"phase": "paused"}, spec).org == "acme"
