"""The kopf handlers: thin, each delegating to a pure function or to one reconcile pass.

- An index of PyTorchJobs by owning FineTuneJob (kopf keeps it current from its watch), so a
  pass reads its PyTorchJob's status from memory, and an index of FineTuneJobs by phase for the
  metrics.
- One daemon per active FineTuneJob runs the reconcile loop: a pass whenever the job or its
  PyTorchJob changes, and at least every ``reconcile_seconds``. kopf never runs two daemons of
  one object at once, so each job has exactly one writer of its status in this process; the
  status precondition (resourceVersion) protects against another process.
- A deletion handler (kopf's finalizer) deletes the children explicitly.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final

import kopf

from kubetune.finetunejob import GROUP, KIND, PLURAL, VERSION, JobPhase
from kubetune.lifecycle import is_terminal
from kubetune.reconcile import QUEUED, Transition, parse_time
from kubetune.webhooks import WebhookSender
from kubetune_operator import manifests
from kubetune_operator.controller import (
    JobReconciler,
    OperatorContext,
    PyTorchJobView,
    sweep_finished,
)
from kubetune_operator.kube import PYTORCHJOB_GROUP, PYTORCHJOB_PLURAL, PYTORCHJOB_VERSION
from kubetune_operator.metrics import IndexedJob, serve
from kubetune_operator.serving_handlers import register_serving

log = logging.getLogger(__name__)

FINALIZER: Final = "kubetune.io/operator"
ANNOTATION_PREFIX: Final = "operator.kubetune.io"
POLL_SECONDS: Final = 0.25  # how often a daemon looks for changes (in memory, no API call)
MAX_BACKOFF_SECONDS: Final = 60.0


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


def indexed_job(name: str, status: Any) -> IndexedJob:
    """What the FineTuneJob index keeps for the metrics."""
    queued_since = None
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == QUEUED and cond.get("status") == "True":
            queued_since = parse_time(cond.get("lastTransitionTime"))
    return IndexedJob(name=name, queued_since=queued_since)


def register(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Register every handler of the operator in ``registry`` (no global state)."""
    opts = ctx.settings.operator

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """Log in the way the kubernetes client does (kubeconfig or in-cluster)."""
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(id="configure", registry=registry)
    async def configure(
        settings: kopf.OperatorSettings,
        memo: Any,
        **kwargs: Any,
    ) -> None:
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
        # Daemons must stop promptly (operator shutdown, peering pauses): they poll every
        # POLL_SECONDS and a pass takes seconds at most.
        settings.watching.server_timeout = 600

        # kopf passes indexes as keyword arguments named after their functions.
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

    # Explicit ids: kopf passes an index to handlers under its id, and nested functions would
    # otherwise get "register.<locals>.…" ids.
    @kopf.index(
        PYTORCHJOB_GROUP,
        PYTORCHJOB_VERSION,
        PYTORCHJOB_PLURAL,
        id="pytorchjob_by_job",
        registry=registry,
    )
    def pytorchjob_by_job(
        namespace: str | None, body: kopf.Body, **_: Any
    ) -> dict[tuple[str | None, str], PyTorchJobView] | None:
        """PyTorchJobs by the FineTuneJob that controls them."""
        key = owner_key(namespace, body)
        return {key: PyTorchJobView.from_body(body)} if key else None

    @kopf.index(GROUP, VERSION, PLURAL, id="finetunejob_phases", registry=registry)
    def finetunejob_phases(
        name: str, status: kopf.Status, **_: Any
    ) -> dict[str, IndexedJob] | None:
        """FineTuneJobs by phase (the metrics' job gauge)."""
        phase = _phase(status)
        return {phase.value: indexed_job(name, status)} if phase else None

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
        """The reconcile loop of one job, until it reaches a terminal phase."""
        by_job: kopf.Index[tuple[str | None, str], PyTorchJobView] = kwargs["pytorchjob_by_job"]
        namespace = namespace or ctx.settings.kubernetes.namespace  # FineTuneJobs are namespaced
        reconciler = JobReconciler(ctx, namespace, name)
        loop = asyncio.get_running_loop()

        def post(transition: Transition) -> None:
            # Called from the pass's thread: kopf queues the Event thread-safely.
            kopf.event(
                body,
                type="Warning" if transition.warning else "Normal",
                reason=transition.reason,
                message=transition.message,
            )

        seen: tuple[Any, ...] | None = None
        due = 0.0  # next periodic pass
        not_before = 0.0  # retry delay after a failed pass
        failures = 0
        while not stopped:
            views: Iterable[PyTorchJobView] = by_job.get((namespace, name), [])
            view = next(iter(views), None)
            key = (body.get("metadata", {}).get("resourceVersion"), view and view.resource_version)
            now = loop.time()
            if now >= not_before and (key != seen or now >= due):
                try:
                    result = await asyncio.to_thread(
                        reconciler.run_pass, copy.deepcopy(dict(body)), view, post
                    )
                except kopf.TemporaryError as exc:
                    ctx.metrics.reconcile_errors.labels("supervise").inc()
                    logger.warning(f"Reconcile will be retried: {exc}")
                    not_before = now + (exc.delay or opts.reconcile_seconds)
                except Exception:
                    ctx.metrics.reconcile_errors.labels("supervise").inc()
                    failures += 1
                    logger.exception("Reconcile failed; retrying with backoff")
                    not_before = now + min(MAX_BACKOFF_SECONDS, 2.0**failures)
                else:
                    failures = 0
                    if result.terminal:
                        return
                    seen = key
                    due = now + opts.reconcile_seconds
            # A plain sleep, not ``stopped.wait()``: kopf's wait makes two tasks and a timer per
            # call, which with hundreds of daemons polling was a third of a core at idle
            # (benchmarks/operator_bench.py); the loop sees ``stopped`` within POLL_SECONDS.
            await asyncio.sleep(POLL_SECONDS)

    if ctx.settings.webhooks.enabled:
        register_webhook_sender(registry, ctx)
    register_serving(registry, ctx)

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="delete_children", registry=registry)
    def delete_children(name: str, namespace: str | None, **_: Any) -> None:
        """Delete the PyTorchJob and ConfigMap of a deleted job.

        Its store data is kept: the adapter may be served, and the API decides about files.
        """
        try:
            ctx.kube.delete_children(
                namespace or ctx.settings.kubernetes.namespace,
                manifests.pytorchjob_name_of(name),
                manifests.configmap_name_of(name),
            )
        except kopf.TemporaryError:
            ctx.metrics.reconcile_errors.labels("delete").inc()
            raise


def register_webhook_sender(registry: kopf.OperatorRegistry, ctx: OperatorContext) -> None:
    """Run one webhook sender where this operator acts, and nowhere else.

    Standalone, the operator is the only replica: the sender is a thread from startup to
    cleanup. With peering, it runs inside a kopf daemon on the KopfPeering object itself: kopf
    stops every daemon of a replica that peering pauses and respawns them when it resumes, so
    the sender runs exactly on the replica whose handlers run (a plain asyncio task or thread
    would keep sending on a paused replica). kopf adds its finalizer to that object, as to any
    object with a daemon. One sender object lives across pauses, so what it remembers as
    delivered survives them.
    """
    sender = WebhookSender(ctx.store, ctx.settings)
    peering = ctx.settings.operator.peering
    stop = threading.Event()

    def sweep() -> None:
        try:
            queued = sweep_finished(ctx, ctx.settings.kubernetes.namespace, now=datetime.now(UTC))
        except Exception:  # the sender still runs; only a crash-window event may be missing
            log.exception("webhook sweep of finished jobs failed")
        else:
            if queued:
                log.info("webhook sweep queued %d delivery(ies) of finished jobs", queued)

    def sweep_then_send() -> None:
        sweep()
        sender.run_forever(stop)

    @kopf.on.startup(id="webhook_sender", registry=registry)
    def start_sender(settings: kopf.OperatorSettings, **_: Any) -> None:
        """Start the thread when standalone; with peering, the daemon below sends."""
        if settings.peering.standalone:
            threading.Thread(target=sweep_then_send, name="webhook-sender", daemon=True).start()
        elif settings.peering.name != peering:
            log.error("webhooks are not sent: set KUBETUNE_OPERATOR__PEERING for peering")

    @kopf.on.cleanup(id="webhook_sender_stop", registry=registry)
    def stop_sender(**_: Any) -> None:
        """Stop the thread (a POST in flight finishes within the timeout)."""
        stop.set()

    if peering is None:
        return

    @kopf.daemon(
        "kopf.dev",
        "v1",
        "kopfpeerings",
        id="webhook_sender",
        registry=registry,
        when=lambda name, **_: name == peering,
        cancellation_timeout=ctx.settings.webhooks.timeout_seconds + 5,
    )
    async def send_webhooks(stopped: kopf.DaemonStopped, **_: Any) -> None:
        """Deliver due webhooks until kopf stops this daemon (pause, shutdown)."""
        await asyncio.to_thread(sweep)
        while not stopped:
            try:
                await asyncio.to_thread(sender.run_once)
            except Exception:  # a store outage must not end the daemon
                log.exception("webhook sender pass failed")
            await stopped.wait(ctx.settings.webhooks.poll_seconds)
