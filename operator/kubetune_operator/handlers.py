"""The kopf handlers: thin, each delegating to the job driver or to a pure function.

- An index of workloads (TrainJobs or PyTorchJobs) by owning FineTuneJob (kopf keeps it current
  from its watch), so a pass reads its workload's status from memory, and an index of
  FineTuneJobs by phase for the metrics.
- One daemon per active FineTuneJob runs the job driver's passes: whenever the job or its
  workload changes, and at least every ``reconcile_seconds``. kopf never runs two daemons of
  one object at once, so each job has exactly one writer of its status in this process; the
  status precondition (resourceVersion) protects against another process.
- With Kueue, an index of Kueue's Workloads by the workload they admit: a pass reads whether
  its job is admitted, and why not, from memory too.
- A deletion handler (kopf's finalizer) deletes the children explicitly; a job whose passes
  keep failing fails after ``max_reconcile_failures`` of them in a row.
- The webhook sender, the serving handlers (:mod:`kubetune_operator.serving_handlers`) and the
  merge handlers (:mod:`kubetune_operator.merge_handlers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final

import kopf
from pydantic import ValidationError

from kubetune.finetunejob import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    ConditionType,
    FineTuneJob,
    JobPhase,
    Resources,
)
from kubetune.lifecycle import WORKER_PHASES, is_terminal
from kubetune_operator.base_model_handlers import register_base_model_checks
from kubetune_operator.context import OperatorContext
from kubetune_operator.kueue import KUEUE_WORKLOAD, Admission, admission, owner_name
from kubetune_operator.loops import ChangePoller, Wait, failure_logger, on_active_peer
from kubetune_operator.merge_handlers import register_merges
from kubetune_operator.metrics import IndexedJob, serve
from kubetune_operator.serving_handlers import register_serving
from kubetune_operator.workloads import WorkloadView
from kubetune_runtime.driver import JobState
from kubetune_runtime.reconcile import parse_time
from kubetune_runtime.webhooks import WebhookSender

log = logging.getLogger(__name__)

FINALIZER: Final = "kubetune.io/operator"
ANNOTATION_PREFIX: Final = "operator.kubetune.io"


def _phase(status: Any) -> JobPhase | None:
    value = (status or {}).get("phase")
    try:
        return JobPhase(value) if value else None
    except ValueError:
        return None


def is_active(status: Any, **_: Any) -> bool:
    """Filter for the daemon: a job whose phase can still change has a daemon."""
    return not is_terminal(_phase(status))


def owner_key(namespace: str | None, body: Any) -> tuple[str | None, str] | None:
    """The (namespace, FineTuneJob name) owning an object, from its controller reference."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and ref.get("name"):
            return namespace, str(ref["name"])
    return None


def indexed_job(name: str, status: Any, spec: Any = None) -> IndexedJob:
    """What the FineTuneJob index keeps for the metrics."""
    queued_since = None
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == ConditionType.QUEUED and cond.get("status") == "True":
            queued_since = parse_time(cond.get("lastTransitionTime"))
    spec = spec or {}
    gpus = 0
    if _phase(status) in WORKER_PHASES:
        with contextlib.suppress(ValidationError):  # the CRD's schema keeps this from failing
            gpus = Resources.model_validate(spec.get("resources") or {}).gpus
    return IndexedJob(name, queued_since, org=str(spec.get("org") or "default"), gpus=gpus)


def register(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Register every handler of the operator in ``registry`` (no global state)."""
    _register_process(registry, ctx)
    _register_indexes(registry, ctx)
    _register_jobs(registry, ctx)
    if ctx.settings.webhooks.enabled:
        register_webhook_sender(registry, ctx)
    register_serving(registry, ctx)
    register_merges(registry, ctx)
    register_base_model_checks(registry, ctx)


def _register_process(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Login, kopf's settings, and the metrics endpoint."""
    opts = ctx.settings.operator

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """Log in the way the kubernetes client does (kubeconfig or in-cluster)."""
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(id="configure", registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: Any, **kwargs: Any) -> None:
        """Configure kopf and start the metrics endpoint."""
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix=ANNOTATION_PREFIX
        )
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
        )
        # Our own Events say what happened; kopf's per-handler "succeeded" notes would bury them.
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 600
        # kopf passes indexes as keyword arguments named after their handlers' ids.
        phases: kopf.Index[str, IndexedJob] = kwargs["finetunejob_phases"]

        def snapshot() -> Iterable[tuple[str, IndexedJob]]:
            return [(phase, job) for phase, jobs in phases.items() for job in jobs]

        ctx.metrics.watch_index(snapshot)
        memo["metrics_runner"] = await serve(ctx.metrics, opts.metrics_host, opts.metrics_port)

    @kopf.on.cleanup(id="stop_metrics", registry=registry)
    async def stop_metrics(memo: Any, **_: Any) -> None:
        """Stop the metrics endpoint."""
        runner = memo.get("metrics_runner")
        if runner is not None:
            await runner.cleanup()


def _register_indexes(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """The in-memory indexes the job daemons and the metrics read."""
    workload = ctx.runtime.workload
    kind = workload.kind

    # Explicit ids: kopf passes an index to handlers under its id, and nested functions would
    # otherwise get "register.<locals>.…" ids.
    @kopf.index(kind.group, kind.version, kind.plural, id="workload_by_job", registry=registry)
    def workload_by_job(
        namespace: str | None, body: kopf.Body, **_: Any
    ) -> dict[tuple[str | None, str], WorkloadView] | None:
        """The workloads (TrainJobs or PyTorchJobs) by the FineTuneJob that controls them."""
        key = owner_key(namespace, body)
        return {key: workload.view(body)} if key else None

    if ctx.runtime.kueue:

        @kopf.index(
            KUEUE_WORKLOAD.group,
            KUEUE_WORKLOAD.version,
            KUEUE_WORKLOAD.plural,
            id="admission_by_workload",
            registry=registry,
        )
        def admission_by_workload(
            namespace: str | None, body: kopf.Body, **_: Any
        ) -> dict[tuple[str | None, str], Admission] | None:
            """Kueue's Workloads by the TrainJob or PyTorchJob they admit."""
            owner = owner_name(body, kind)
            return {(namespace, owner): admission(body)} if owner else None

    @kopf.index(GROUP, VERSION, PLURAL, id="finetunejob_phases", registry=registry)
    def finetunejob_phases(
        name: str, status: kopf.Status, spec: kopf.Spec, **_: Any
    ) -> dict[str, IndexedJob] | None:
        """FineTuneJobs by phase (the metrics' job and GPU gauges)."""
        phase = _phase(status)
        return {phase.value: indexed_job(name, status, spec)} if phase else None


def _register_jobs(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """The per-job daemon that runs the driver, and the finalizer that deletes children."""
    opts = ctx.settings.operator

    @kopf.daemon(
        GROUP,
        VERSION,
        PLURAL,
        id="supervise",
        registry=registry,
        when=is_active,
        # Stopping (terminal phase, shutdown, peering pause) first asks the loop to exit, which
        # it does after the pass in progress: a pass runs in a thread, and cancelling only its
        # awaiting coroutine would leave the thread writing status behind kopf's back.
        cancellation_backoff=30,
        cancellation_timeout=30,
    )
    async def supervise(
        body: kopf.Body,
        name: str,
        namespace: str | None,
        stopped: kopf.DaemonStopped,
        logger: kopf.Logger,
        **kwargs: Any,
    ) -> None:
        """The driver's passes over one job, until it reaches a terminal phase."""
        by_job: kopf.Index[tuple[str | None, str], WorkloadView] = kwargs["workload_by_job"]
        admissions: kopf.Index[tuple[str | None, str], Admission] | None = kwargs.get(
            "admission_by_workload"
        )
        state = JobState()

        def workload() -> WorkloadView | None:
            view = next(iter(by_job.get((namespace, name), [])), None)
            if view is None or admissions is None:
                return view
            admitted = next(iter(admissions.get((namespace, view.name), [])), None)
            return ctx.runtime.with_admission(view, admitted)

        def key() -> tuple[Any, ...]:
            view = workload()
            admitted = view and view.admission
            return (
                body.get("metadata", {}).get("resourceVersion"),
                view and view.resource_version,
                admitted and admitted.resource_version,
            )

        def job() -> FineTuneJob:
            return FineTuneJob.from_manifest(copy.deepcopy(dict(body)))

        async def one_pass() -> bool:
            result = await asyncio.to_thread(ctx.driver.run_pass, state, job(), workload())
            return result.terminal

        async def give_up(failures: int, exc: Exception) -> bool:
            result = await asyncio.to_thread(ctx.driver.give_up, job(), failures, exc)
            return result.terminal

        poller = ChangePoller(
            opts.reconcile_seconds,
            failure_logger(ctx.metrics.reconcile_errors, "supervise", logger),
            max_failures=opts.max_reconcile_failures,
            give_up=give_up,
        )
        await poller.run(key, one_pass, lambda: bool(stopped))

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="delete_children", registry=registry)
    def delete_children(body: kopf.Body, **_: Any) -> None:
        """Delete the workload and ConfigMap of a deleted job.

        Its store data is kept: the adapter may be served, and the API decides about files.
        """
        try:
            ctx.runtime.stop(FineTuneJob.from_manifest(dict(body)))
        except kopf.TemporaryError:
            ctx.metrics.reconcile_errors.labels("delete").inc()
            raise


def register_webhook_sender(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Deliver webhooks where this operator acts, and nowhere else.

    One sender object lives across peering pauses, so what it remembers as delivered survives
    them. Each start first sweeps the jobs that finished recently, for an event a process that
    died between the status write and the queueing never queued.
    """
    sender = WebhookSender(ctx.store, ctx.settings)
    namespace = ctx.settings.kubernetes.namespace

    def sweep() -> None:
        try:
            jobs = [FineTuneJob.from_manifest(raw) for raw in ctx.kube.list_jobs(namespace)]
            queued = ctx.driver.sweep_finished(jobs, now=datetime.now(UTC))
        except Exception:  # the sender still runs; only a crash-window event may be missing
            log.exception("webhook sweep of finished jobs failed")
        else:
            if queued:
                log.info("webhook sweep queued %d delivery(ies) of finished jobs", queued)

    async def send(stopped: Any, wait: Wait, _: dict[str, Any]) -> None:
        await asyncio.to_thread(sweep)
        while not stopped():
            try:
                await asyncio.to_thread(sender.run_once)
            except Exception:  # a store outage must not end the sender
                log.exception("webhook sender pass failed")
            await wait(ctx.settings.webhooks.poll_seconds)

    on_active_peer(
        registry,
        id="webhook_sender",
        peering=ctx.settings.operator.peering,
        loop=send,
        stop_timeout=ctx.settings.webhooks.timeout_seconds + 5,
    )
