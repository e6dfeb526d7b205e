"""One reconcile pass over one FineTuneJob: observe, decide (``reconcile``), act, record.

A pass is idempotent and level-based: it reads the job, its PyTorchJob and the trainer's
events, creates or adopts whatever should exist, and writes the status the pure functions in
``kubetune_operator.reconcile`` decide on. Killed at any point, the next pass — in this process
or a new one — finds the children by their deterministic names and continues; the status is
written with the resourceVersion it was computed from, so a stale pass never overwrites a
newer one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from kubetune.events import JobEvent, write_control_events
from kubetune.finetunejob import (
    FineTuneJob,
    FineTuneJobStatus,
    JobPhase,
)
from kubetune.job_inputs import (
    EventLogReader,
    JobInputError,
    adapter_stored,
    load_config_text,
    resolve_trainer_config,
    store_config,
)
from kubetune.lifecycle import is_terminal
from kubetune.objectstore import ObjectStore
from kubetune.observed import observe
from kubetune.reconcile import (
    Outcome,
    Transition,
    advance,
    cancel,
    fail,
    job_events,
    observe_training,
    status_patch,
    validated,
)
from kubetune.settings import Settings
from kubetune.storage_layout import StorageLayout
from kubetune.trainer_config import TrainerConfig
from kubetune.webhooks import announce_job_end
from kubetune_operator import manifests
from kubetune_operator.kube import Conflict, KubeClient
from kubetune_operator.metrics import OperatorMetrics

log = logging.getLogger(__name__)

# Test and chaos hook: the operator exits abruptly (as if SIGKILLed) at the named point, e.g.
# KUBETUNE_OPERATOR_FAULT=after-pytorchjob-create. Proves a pass can die anywhere and the next
# one adopts what the dead one created.
FAULT_ENV: Final = "KUBETUNE_OPERATOR_FAULT"
FAULT_EXIT_CODE: Final = 137
ACTIVE_PHASES: Final = frozenset(
    {JobPhase.QUEUED, JobPhase.RUNNING, JobPhase.PAUSING, JobPhase.PAUSED}
)


@dataclass
class OperatorContext:
    """Everything a reconcile pass needs, built once per operator process."""

    settings: Settings
    store: ObjectStore
    kube: KubeClient
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    faults: frozenset[str] = field(
        default_factory=lambda: frozenset(filter(None, os.environ.get(FAULT_ENV, "").split(",")))
    )

    @property
    def layout(self) -> StorageLayout:
        """The object-store key builder."""
        return self.settings.object_store.layout()

    def fault(self, point: str) -> None:
        """Exit the process abruptly if the fault ``point`` was asked for (tests only)."""
        if point in self.faults:
            log.warning("fault injection: exiting at %s", point)
            os._exit(FAULT_EXIT_CODE)


@dataclass(frozen=True)
class PyTorchJobView:
    """The parts of a PyTorchJob the operator reads (kept in kopf's index)."""

    name: str
    uid: str
    resource_version: str
    suspend: bool
    status: dict[str, Any] | None
    deleting: bool

    @classmethod
    def from_body(cls, body: Any) -> PyTorchJobView:
        """Read one from a PyTorchJob object."""
        meta = body.get("metadata", {})
        run_policy = (body.get("spec") or {}).get("runPolicy") or {}
        status = body.get("status")
        return cls(
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            resource_version=meta.get("resourceVersion", ""),
            suspend=bool(run_policy.get("suspend", False)),
            status=dict(status) if status else None,
            deleting=bool(meta.get("deletionTimestamp")),
        )


Emit = Callable[[Transition], None]
"""Posts one transition as a Kubernetes Event."""


@dataclass
class PassResult:
    """What a pass did: the transitions it recorded, and whether the job is over."""

    events: list[Transition] = field(default_factory=list)
    terminal: bool = False


def announce_terminal(ctx: OperatorContext, job: FineTuneJob) -> int:
    """Queue the webhook event of a job in a terminal phase (idempotent); how many were new."""
    written = announce_job_end(ctx.store, ctx.layout, ctx.settings.webhooks, job)
    if written:
        log.info("%s: %d webhook delivery(ies) queued", job.metadata.name, len(written))
    return len(written)


def sweep_finished(ctx: OperatorContext, namespace: str, *, now: datetime) -> int:
    """Queue the events of jobs that finished recently, in case a process died between
    recording a terminal phase and queueing its event (kopf restarts no daemon for a finished
    job, so no pass would). Idempotent; returns how many deliveries were new.
    """
    horizon = now - timedelta(hours=ctx.settings.webhooks.sweep_hours)
    queued = 0
    for raw in ctx.kube.list_jobs(namespace):
        job = FineTuneJob.from_manifest(raw)
        finished = job.status.finished_at if job.status else None
        if finished is not None and finished >= horizon:
            queued += announce_terminal(ctx, job)
    return queued


class JobReconciler:
    """Reconciles one FineTuneJob; one instance per job, used by one daemon at a time."""

    def __init__(
        self,
        ctx: OperatorContext,
        namespace: str,
        name: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ctx = ctx
        self.namespace = namespace
        self.name = name
        self._clock = clock
        self._next_progress = 0.0
        self._config: TrainerConfig | None = None
        self._config_text: str | None = None
        self._events: EventLogReader | None = None
        self._raw: dict[str, Any] = {}
        self._job: FineTuneJob | None = None
        self._emit: Emit | None = None

    # -- one pass ------------------------------------------------------------------------------
    def run_pass(
        self,
        raw: dict[str, Any],
        pytorchjob: PyTorchJobView | None,
        emit: Emit | None = None,
    ) -> PassResult:
        """Reconcile once from the job object ``raw`` and its PyTorchJob (from kopf's index).

        ``emit`` posts each transition as soon as its status is written, so a process killed
        later in the pass has already announced what it recorded.
        """
        self._emit = emit
        self._load(raw)
        result = PassResult()
        try:
            # A new job is validated, queued and launched in one pass; once it is active, one
            # decision per pass (it already walks every phase the observation implies).
            for _ in range(3):
                job = self._current
                status = job.status or FineTuneJobStatus()
                if is_terminal(status.phase):
                    break
                outcome = self._decide(job, status, pytorchjob)
                if not self._write(outcome, result) or status.phase in ACTIVE_PHASES:
                    break
        except Conflict as exc:
            log.debug("%s: %s; the next pass recomputes", self.name, exc)
        current = self._current.status
        result.terminal = current is not None and is_terminal(current.phase)
        if current is not None and result.terminal:
            self._announce(current)
        return result

    def _announce(self, status: FineTuneJobStatus) -> None:
        """Queue the job's terminal webhook event once its phase is recorded.

        Idempotent (derived ids), so every pass that ends terminal may call it; if the store
        fails, the exception makes the daemon retry the pass, which queues it then.
        """
        self.ctx.fault("before-webhook-announce")
        announce_terminal(self.ctx, self._current.model_copy(update={"status": status}))

    @property
    def _current(self) -> FineTuneJob:
        assert self._job is not None
        return self._job

    def _load(self, raw: dict[str, Any]) -> None:
        self._raw = raw
        self._job = FineTuneJob.from_manifest(raw)

    def _now(self) -> datetime:
        return datetime.now(UTC)

    def _decide(
        self, job: FineTuneJob, status: FineTuneJobStatus, pytorchjob: PyTorchJobView | None
    ) -> Outcome:
        now = self._now()
        phase = status.phase
        if job.spec.cancel:
            if phase in ACTIVE_PHASES:
                self.ctx.kube.delete_children(
                    self.namespace, manifests.pytorchjob_name(job), manifests.configmap_name(job)
                )
            return cancel(status, now=now)
        if phase is None:
            status, transitions = advance(status, JobPhase.VALIDATING_FILES, now=now)
            return Outcome(status, tuple(transitions))
        if phase is JobPhase.VALIDATING_FILES:
            return self._validate(job, status, now)
        return self._supervise(job, status, pytorchjob, now)

    # -- validating_files ----------------------------------------------------------------------
    def _build_config(self, job: FineTuneJob) -> TrainerConfig:
        opts = self.ctx.settings.operator
        return resolve_trainer_config(
            self.ctx.store,
            self.ctx.layout,
            job,
            self.ctx.settings,
            image=opts.trainer_image,
            metrics_port=opts.trainer_metrics_port,
        )

    def _validate(self, job: FineTuneJob, status: FineTuneJobStatus, now: datetime) -> Outcome:
        try:
            config = self._build_config(job)
        except JobInputError as exc:
            return fail(status, exc.error, now=now)
        key = self.ctx.layout.job_config_key(job.spec.org, job.metadata.name)
        self._remember_config(store_config(self.ctx.store, key, config))
        return validated(status, self._require_config(), now=now)

    def _remember_config(self, text: str) -> None:
        self._config_text = text
        self._config = TrainerConfig.model_validate_json(text)

    def _require_config(self) -> TrainerConfig:
        assert self._config is not None
        return self._config

    def _load_config(self, job: FineTuneJob) -> None:
        """The job's stored trainer config (rebuilt if the store lost it)."""
        if self._config_text is not None:
            return
        key = self.ctx.layout.job_config_key(job.spec.org, job.metadata.name)
        text = load_config_text(self.ctx.store, key)
        if text is None:
            log.warning("%s: the trainer config is missing from the store; rebuilding", self.name)
            text = store_config(self.ctx.store, key, self._build_config(job))
        self._remember_config(text)

    # -- queued / running / pausing / paused ---------------------------------------------------
    def _ensure_children(self, job: FineTuneJob, suspend: bool) -> PyTorchJobView:
        assert self._config_text is not None
        cm = manifests.config_map(job, self._config_text)
        self.ctx.kube.ensure_configmap(cm, self._raw)
        self.ctx.fault("after-configmap-create")
        desired = manifests.pytorchjob(job, self.ctx.settings.operator)
        desired["spec"]["runPolicy"]["suspend"] = suspend
        created = self.ctx.kube.ensure_pytorchjob(desired, self._raw)
        self.ctx.fault("after-pytorchjob-create")
        return PyTorchJobView.from_body(created)

    def _supervise(
        self,
        job: FineTuneJob,
        status: FineTuneJobStatus,
        pytorchjob: PyTorchJobView | None,
        now: datetime,
    ) -> Outcome:
        try:
            self._load_config(job)
        except JobInputError as exc:
            return fail(status, exc.error, now=now)
        config = self._require_config()
        # A pause that has begun completes before a resume is honoured: the lifecycle goes
        # pausing → paused → queued, and the trainer's checkpoint is committed either way.
        suspend = job.spec.suspend or status.phase is JobPhase.PAUSING
        if pytorchjob is None or pytorchjob.deleting:
            pytorchjob = self._ensure_children(job, suspend)
        if pytorchjob.suspend != suspend:
            self.ctx.kube.set_pytorchjob_suspend(self.namespace, pytorchjob.name, suspend)
        observed = observe(pytorchjob.status, suspend_requested=suspend)
        events = None
        clock = self._clock()
        # No trainer has run while a job waits for its first start: nothing to read (saves an
        # S3 LIST per queued job every progress_seconds).
        never_ran = status.started_at is None and observed.phase is JobPhase.QUEUED
        due = clock >= self._next_progress or observed.phase is not status.phase
        if due and not never_ran:
            events = self._read_events(job)
            self._next_progress = clock + self.ctx.settings.operator.progress_seconds
        stored = observed.phase is JobPhase.SUCCEEDED and adapter_stored(
            self.ctx.store, self.ctx.layout, job.spec.org, job.metadata.name
        )
        return observe_training(
            status,
            observed,
            pytorchjob_status=pytorchjob.status,
            events=events,
            adapter_stored=stored,
            fine_tuned_model=config.fine_tuned_model,
            now=now,
        )

    def _read_events(self, job: FineTuneJob) -> list[JobEvent]:
        if self._events is None:
            prefix = self.ctx.layout.events_prefix(job.spec.org, job.metadata.name)
            self._events = EventLogReader(self.ctx.store, prefix)
        return self._events.read()

    # -- recording -----------------------------------------------------------------------------
    def _write(self, outcome: Outcome, result: PassResult) -> bool:
        """Write the status if it changed; record transitions. True if the phase moved."""
        job = self._current
        patch = status_patch(
            job.status,
            outcome.status.model_copy(update={"observed_generation": job.metadata.generation}),
        )
        if patch is None:
            return False
        raw = self.ctx.kube.patch_job_status(
            self.namespace, self.name, job.metadata.resource_version, patch, based_on=self._raw
        )
        self._load(raw)
        now = self._now()
        status = self._current.status or outcome.status
        control: list[JobEvent] = []
        first_start = (job.status is None or job.status.started_at is None) and (
            outcome.status.started_at is not None
        )
        for transition in outcome.transitions:
            log.info("%s: %s → %s", self.name, transition.source, transition.target)
            self.ctx.metrics.transitioned(
                transition.target,
                first_start=first_start,
                created_at=job.metadata.creation_timestamp,
                started_at=outcome.status.started_at,
                now=now,
            )
            control.extend(job_events(transition, status))
        for event in (*outcome.transitions, *outcome.notices):
            result.events.append(event)
            if self._emit is not None:
                self._emit(event)
        if control:
            prefix = self.ctx.layout.events_prefix(job.spec.org, job.metadata.name)
            try:
                write_control_events(self.ctx.store, prefix, control)
            except Exception:  # the status is written; a lost job event is only a log line
                log.warning("%s: could not write job events", self.name, exc_info=True)
        return bool(outcome.transitions)
