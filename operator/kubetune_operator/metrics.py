"""The operator's Prometheus metrics (names declared in ``kubetune.observability``) and the
small HTTP server that exposes them with ``/healthz``.

Counters and histograms are updated as transitions happen. The per-phase job gauge and the
oldest queued job are computed at scrape time from kopf's index of FineTuneJobs, so they are
right after an operator restart too (nothing to rebuild, nothing to drift).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kubetune.finetunejob import JobPhase
from kubetune.lifecycle import TERMINAL_PHASES
from kubetune.observability import (
    OPERATOR_ADAPTER_REGISTRATION_SECONDS,
    OPERATOR_ADAPTER_REGISTRATIONS,
    OPERATOR_ADAPTERS_LOADED,
    OPERATOR_GPU_SECONDS,
    OPERATOR_GPUS_IN_USE,
    OPERATOR_JOBS,
    OPERATOR_JOBS_FINISHED,
    OPERATOR_QUEUE_OLDEST,
    OPERATOR_QUEUE_WAIT,
    OPERATOR_RECONCILE_ERRORS,
    OPERATOR_RUN_SECONDS,
    OPERATOR_TRAINED_TOKENS,
    MetricSpec,
)

# Queueing is seconds to hours; a fine-tuning run minutes to days.
QUEUE_BUCKETS: Final = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
RUN_BUCKETS: Final = (60, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 172800, 604800)
# Registering an adapter: a download and a load, milliseconds (tiny) to minutes (large).
REGISTRATION_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class IndexedJob:
    """What the FineTuneJob index keeps per job (see handlers.ftj_phases)."""

    name: str
    queued_since: datetime | None
    org: str = ""
    gpus: int = 0  # GPUs its workers hold now (running or pausing), else 0


def _counter(spec: MetricSpec, registry: CollectorRegistry) -> Counter:
    return Counter(spec.name, spec.help, spec.labels, registry=registry)


def _histogram(
    spec: MetricSpec, registry: CollectorRegistry, buckets: tuple[float, ...]
) -> Histogram:
    return Histogram(spec.name, spec.help, spec.labels, registry=registry, buckets=buckets)


class JobsCollector(Collector):
    """Jobs by phase, the oldest queued job and the GPUs in use by org, read from kopf's index
    at scrape time.
    """

    def __init__(self, snapshot: Callable[[], Iterable[tuple[str, IndexedJob]]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """Yield the two gauges."""
        counts = {phase.value: 0 for phase in JobPhase}
        oldest = 0.0
        now = time.time()
        for phase, job in self._snapshot():
            counts[phase] = counts.get(phase, 0) + 1
            if phase == JobPhase.QUEUED.value and job.queued_since is not None:
                oldest = max(oldest, now - job.queued_since.timestamp())
        jobs = GaugeMetricFamily(
            OPERATOR_JOBS.name, OPERATOR_JOBS.help, labels=OPERATOR_JOBS.labels
        )
        for phase, count in counts.items():
            jobs.add_metric([phase], count)
        yield jobs
        gpus: dict[str, int] = {}
        for _, job in self._snapshot():
            if job.gpus:
                gpus[job.org] = gpus.get(job.org, 0) + job.gpus
        in_use = GaugeMetricFamily(
            OPERATOR_GPUS_IN_USE.name, OPERATOR_GPUS_IN_USE.help, labels=OPERATOR_GPUS_IN_USE.labels
        )
        for org, count in sorted(gpus.items()):
            in_use.add_metric([org], count)
        yield in_use
        yield GaugeMetricFamily(
            OPERATOR_QUEUE_OLDEST.name, OPERATOR_QUEUE_OLDEST.help, value=oldest
        )


class AdaptersLoadedCollector(Collector):
    """Adapters loaded per vLLM replica, from the replicas' last reports at scrape time."""

    def __init__(self, snapshot: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """Yield the gauge (one series per ready replica)."""
        spec = OPERATOR_ADAPTERS_LOADED
        gauge = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
        for replica, base_model, count in self._snapshot():
            gauge.add_metric([replica, base_model], count)
        yield gauge


@dataclass
class OperatorMetrics:
    """The operator's metric objects, in a registry of their own (no process collectors)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.jobs_finished = _counter(OPERATOR_JOBS_FINISHED, self.registry)
        self.gpu_seconds = _counter(OPERATOR_GPU_SECONDS, self.registry)
        self.trained_tokens = _counter(OPERATOR_TRAINED_TOKENS, self.registry)
        self.queue_wait = _histogram(OPERATOR_QUEUE_WAIT, self.registry, QUEUE_BUCKETS)
        self.run_seconds = _histogram(OPERATOR_RUN_SECONDS, self.registry, RUN_BUCKETS)
        self.reconcile_errors = _counter(OPERATOR_RECONCILE_ERRORS, self.registry)
        self.adapter_registration_seconds = _histogram(
            OPERATOR_ADAPTER_REGISTRATION_SECONDS, self.registry, REGISTRATION_BUCKETS
        )
        self.adapter_registrations = _counter(OPERATOR_ADAPTER_REGISTRATIONS, self.registry)
        self.registry.register(AdaptersLoadedCollector(lambda: self.adapters_loaded()))
        self.adapters_loaded: Callable[[], Iterable[tuple[str, str, int]]] = lambda: ()
        self._collector: JobsCollector | None = None

    def watch_index(self, snapshot: Callable[[], Iterable[tuple[str, IndexedJob]]]) -> None:
        """Serve the per-phase gauges from ``snapshot`` (kopf's index of FineTuneJobs)."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
        self._collector = JobsCollector(snapshot)
        self.registry.register(self._collector)

    def transitioned(
        self,
        target: JobPhase,
        *,
        org: str,
        first_start: bool,
        created_at: datetime | None,
        started_at: datetime | None,
        now: datetime,
    ) -> None:
        """Record one phase change: queue wait on the first start, run time at the end."""
        if target is JobPhase.RUNNING and first_start and created_at and started_at:
            self.queue_wait.observe(max(0.0, (started_at - created_at).total_seconds()))
        if target in TERMINAL_PHASES:
            self.jobs_finished.labels(org, target.value).inc()
            if started_at is not None:
                self.run_seconds.labels(target.value).observe(
                    max(0.0, (now - started_at).total_seconds())
                )

    def used(self, org: str, *, gpu_seconds: float, trained_tokens: int) -> None:
        """Add to ``org``'s usage counters."""
        if gpu_seconds:
            self.gpu_seconds.labels(org).inc(gpu_seconds)
        if trained_tokens:
            self.trained_tokens.labels(org).inc(trained_tokens)


async def serve(metrics: OperatorMetrics, host: str, port: int) -> Any:
    """Start ``/metrics`` and ``/healthz`` on ``host:port``; returns the aiohttp runner.

    ``/healthz`` answers from the operator's own event loop, so a wedged loop fails it.
    """
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics_view(request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
