"""``benchmarks/operator_bench.py`` on a handful of jobs: every FineTuneJob gets exactly one
PyTorchJob and the figures are numbers that make sense. Timings are not asserted.
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.operator_bench import Distribution, check, report_lines, run_bench
from tests.harness.kube import KubeCluster
from tests.harness.s3 import S3Server

JOBS = 5


def _sane(dist: Distribution | None) -> Distribution:
    assert dist is not None
    assert dist.count == JOBS
    values = (dist.min_s, dist.p50_s, dist.p90_s, dist.p99_s, dist.max_s, dist.mean_s)
    assert all(math.isfinite(v) for v in values)
    assert dist.min_s <= dist.p50_s <= dist.p90_s <= dist.p99_s <= dist.max_s
    return dist


def test_bench_creates_one_pytorchjob_per_finetunejob(
    kube: KubeCluster, s3: S3Server, namespace: str, tmp_path: Path
) -> None:
    bench = run_bench(kube, s3, namespace, tmp_path, jobs=JOBS, threads=4, idle_seconds=1)

    assert check(bench) == [], "\n".join(report_lines(bench))
    assert not bench.timed_out
    assert bench.create_errors == 0
    assert bench.pytorchjobs == JOBS
    assert bench.pytorchjob_owners == JOBS
    assert bench.duplicate_pytorchjobs == 0
    assert bench.orphan_pytorchjobs == 0
    assert bench.jobs_without_pytorchjob == 0
    assert bench.phases == {"queued": JOBS}
    assert bench.reconcile_errors == 0
    assert bench.metrics_jobs_by_phase == {"queued": JOBS}

    reconcile = _sane(bench.reconcile_latency)
    queued = _sane(bench.queued_latency)
    _sane(bench.server_latency)
    # A job is queued before its PyTorchJob is created (one pass, in that order).
    assert queued.min_s <= reconcile.max_s
    assert reconcile.min_s >= 0
    assert bench.all_pytorchjobs_s is not None
    assert bench.all_queued_s is not None
    assert 0 < bench.all_queued_s <= bench.all_pytorchjobs_s
    assert bench.all_pytorchjobs_s >= reconcile.max_s - bench.create_wall_s

    assert 0 < bench.operator_rss_idle_mib <= bench.operator_rss_peak_mib
    assert 0 < bench.operator_rss_end_mib <= bench.operator_rss_peak_mib
    assert bench.operator_cpu_launch_s > 0
    assert bench.operator_cpu_idle_s >= 0
    assert len(report_lines(bench)) > 5
