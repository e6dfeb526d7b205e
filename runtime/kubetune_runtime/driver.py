"""The job driver: one pass over one FineTuneJob, the same for every runtime.

A pass observes the job and its workload, decides with the pure functions of
:mod:`kubetune_runtime.reconcile`, acts through the runtime, and records: the status (written
with the version it was computed from, so a stale pass never overwrites a newer one), the job's
events as OpenAI lists them, Kubernetes-style events, metrics, the webhook event of a finished
job, and where a succeeded job's model is served.

What differs per runtime is a small plugin behind :class:`Runtime` — the shape Kubeflow
Trainer v2 gives its runtime plugins: create or adopt the workload of a job, suspend or resume
it, observe it, stop it, release it. The operator drives PyTorchJobs (``kubetune_operator``),
local mode trainer subprocesses (``kubetune_local``); a TrainJob runtime is a third plugin, not
a third copy of this loop.

Passes are idempotent and level-based: killed at any point, the next pass (in this process or
a new one) finds the workload by its deterministic name and continues.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Generic, Protocol, TypeVar

from kubetune.events import EventLevel, JobEvent, write_control_events
from kubetune.finetunejob import (
    ConditionType,
    ErrorKind,
    FineTuneJob,
    FineTuneJobStatus,
    JobError,
    JobPhase,
)
from kubetune.lifecycle import is_terminal
from kubetune.settings import BaseModelEntry, Settings
from kubetune.storage_layout import StorageLayout
from kubetune.trainer_config import TrainerConfig
from kubetune_runtime.faults import Faults
from kubetune_runtime.job_inputs import (
    EventLogReader,
    JobInputError,
    adapter_stored,
    load_config_text,
    resolve_trainer_config,
    store_config,
)
from kubetune_runtime.objectstore import ObjectStore
from kubetune_runtime.observed import Observed
from kubetune_runtime.reconcile import (
    Notice,
    Outcome,
    Transition,
    advance,
    cancel,
    condition,
    fail,
    job_events,
    observe_training,
    status_patch,
    trainer_stopped,
    usage_delta,
    validated,
)
from kubetune_runtime.serving import AdapterServing, plan_serving
from kubetune_runtime.webhooks import announce_job_end

log = logging.getLogger(__name__)

# A trainer may run (or wait to run) in these phases: its workload exists.
ACTIVE_PHASES: Final = frozenset(
    {JobPhase.QUEUED, JobPhase.RUNNING, JobPhase.PAUSING, JobPhase.PAUSED}
)
# A new job is validated, queued and launched in one pass; once active, one decision per pass
# (it already walks every phase the observation implies).
MAX_MOVES_PER_PASS: Final = 3


class StatusConflict(Exception):
    """The job changed since it was read: the next pass recomputes from the fresh object."""


# ---------------------------------------------------------------------------------------------
# What the driver is plugged into
# ---------------------------------------------------------------------------------------------


class Workload(Protocol):
    """What the driver reads of a job's workload (a PyTorchJob, a trainer subprocess)."""

    @property
    def suspended(self) -> bool:
        """Whether the workload is asked to be suspended."""
        ...  # pragma: no cover - protocol

    @property
    def deleting(self) -> bool:
        """Whether it is going away (then it is created anew)."""
        ...  # pragma: no cover - protocol


W = TypeVar("W", bound=Workload)


@dataclass(frozen=True)
class TrainerDefaults:
    """What a runtime sets in every trainer config it launches."""

    image: str | None = None
    metrics_port: int | None = None  # 0: any free port (several trainers on one host)
    event_flush_seconds: float | None = None  # None: the trainer config's default
    cpu_fallback: bool = False  # a job asking for GPUs may train on the CPU (local mode)
    stop_grace_seconds: float | None = None  # the pod's terminationGracePeriodSeconds
    collective_timeout_seconds: int | None = None  # None: the trainer config's default
    writer_lease_seconds: float | None = None  # None: the trainer config's default

    def apply(self, config: TrainerConfig) -> TrainerConfig:
        """``config`` with what this runtime sets (the image and metrics port are set already)."""
        update: dict[str, object] = {"cpu_fallback": self.cpu_fallback}
        for name in (
            "event_flush_seconds",
            "stop_grace_seconds",
            "collective_timeout_seconds",
            "writer_lease_seconds",
        ):
            value = getattr(self, name)
            if value is not None:
                update[name] = value
        return config.model_copy(update=update)


class Runtime(Protocol[W]):
    """A runtime plugin: runs the trainer of a job somewhere.

    Every method is blocking and idempotent; the driver calls them from one pass at a time per
    job. ``create`` must create-or-adopt (deterministic names), so a pass that died after
    creating does not create twice.
    """

    @property
    def name(self) -> str:
        """The runtime's name (settings and logs)."""
        ...  # pragma: no cover - protocol

    @property
    def trainer_defaults(self) -> TrainerDefaults:
        """What this runtime sets in every trainer config."""
        ...  # pragma: no cover - protocol

    def create(self, job: FineTuneJob, config_text: str, *, suspend: bool) -> W:
        """Create the job's workload (suspended when ``suspend``), or adopt the existing one."""
        ...  # pragma: no cover - protocol

    def set_suspended(self, job: FineTuneJob, workload: W, suspend: bool) -> None:
        """Suspend (the trainer commits a checkpoint and stops) or resume the workload."""
        ...  # pragma: no cover - protocol

    def observe(self, job: FineTuneJob, workload: W, *, suspend: bool) -> Observed:
        """What the workload is doing, as a phase of the job."""
        ...  # pragma: no cover - protocol

    def stop(self, job: FineTuneJob) -> None:
        """Stop the job's trainer now and delete its workload (cancel); gone is fine."""
        ...  # pragma: no cover - protocol

    def release(self, job: FineTuneJob) -> None:
        """The job reached a terminal phase: free what only a live workload needs."""
        ...  # pragma: no cover - protocol


class JobStore(Protocol):
    """Where FineTuneJobs live (the apiserver, local mode's SQLite)."""

    def write_status(self, job: FineTuneJob, patch: dict[str, Any]) -> FineTuneJob:
        """Merge ``patch`` into the status of ``job`` if the job is still as read; return the
        job as stored. Raises :class:`StatusConflict` when it changed meanwhile.
        """
        ...  # pragma: no cover - protocol


class Serving(Protocol):
    """Where fine-tuned models are served (vLLM replicas)."""

    def publish(self, job: FineTuneJob) -> None:
        """A job just succeeded: serve its model now where that can be done in the pass
        (local mode loads it into its vLLM, so the model answers as soon as it is listed);
        elsewhere a sync loop does it shortly after.
        """
        ...  # pragma: no cover - protocol

    def where(self, job: FineTuneJob) -> AdapterServing:
        """Where the model of a succeeded job stands across its replicas."""
        ...  # pragma: no cover - protocol


class EventSink(Protocol):
    """Where transitions and notices are posted (Kubernetes Events, or the job's log)."""

    def post(self, job: FineTuneJob, event: Transition | Notice) -> None:
        """Post one event about ``job``."""
        ...  # pragma: no cover - protocol


class TransitionMetrics(Protocol):
    """Counts phase changes (the operator's Prometheus metrics)."""

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
        """Record one transition of a job of ``org`` to ``target``."""
        ...  # pragma: no cover - protocol

    def used(self, org: str, *, gpu_seconds: float, trained_tokens: int) -> None:
        """Add to ``org``'s usage (see :func:`~kubetune_runtime.reconcile.usage_delta`)."""
        ...  # pragma: no cover - protocol


# ---------------------------------------------------------------------------------------------
# Per-job memory and pass results
# ---------------------------------------------------------------------------------------------


@dataclass
class JobState:
    """What the driver keeps about one job between passes (its caller owns it)."""

    config_text: str | None = None  # as stored: what the workload is given
    config: TrainerConfig | None = None  # the same, parsed
    events: EventLogReader | None = None
    next_progress: float = 0.0
    pausing_since: float | None = None  # when a suspended workload began waiting for its trainer

    def remember(self, config_text: str) -> TrainerConfig:
        """Keep the job's stored trainer config; return it parsed."""
        self.config_text = config_text
        self.config = TrainerConfig.model_validate_json(config_text)
        return self.config


@dataclass
class PassResult:
    """What a pass did: the job as it stands now, and the events it posted."""

    job: FineTuneJob
    events: list[Transition | Notice] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        """Whether the job is over (its pass loop may stop)."""
        return self.job.status is not None and is_terminal(self.job.status.phase)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


@dataclass
class JobDriver(Generic[W]):
    """Drives jobs through one runtime; shared by every job of a process (thread-safe as long
    as each job has one pass at a time, as its caller guarantees).
    """

    settings: Settings
    store: ObjectStore
    jobs: JobStore
    runtime: Runtime[W]
    progress_seconds: float
    # The longest a trainer takes to commit its checkpoint after SIGTERM (its grace period).
    stop_grace_seconds: float = 600.0
    serving: Serving | None = None
    sink: EventSink | None = None
    metrics: TransitionMetrics | None = None
    faults: Faults = field(default_factory=Faults)
    clock: Callable[[], float] = time.monotonic
    # The base models an org may train on, when more than the settings' catalogue (the models
    # registered at run time, kubetune.base_models); None: the settings' catalogue.
    catalogue: Callable[[str], list[BaseModelEntry]] | None = None

    @property
    def layout(self) -> StorageLayout:
        """The object-store key builder."""
        return self.settings.object_store.layout()

    def _now(self) -> datetime:
        return datetime.now(UTC)

    # -- one pass ------------------------------------------------------------------------------
    def run_pass(self, state: JobState, job: FineTuneJob, workload: W | None) -> PassResult:
        """Reconcile ``job`` once, given its workload as last seen (None: not seen)."""
        result = PassResult(job)
        try:
            for _ in range(MAX_MOVES_PER_PASS):
                status = result.job.status or FineTuneJobStatus()
                if is_terminal(status.phase):
                    break
                outcome = self._decide(state, result.job, status, workload)
                moved = self._record(result, outcome)
                if not moved or status.phase in ACTIVE_PHASES:
                    break
        except StatusConflict as exc:
            log.debug("%s: %s; the next pass recomputes", job.metadata.name, exc)
        if result.terminal:
            self.runtime.release(result.job)
            self.faults.hit("before-webhook-announce")
            self.announce_end(result.job)
        return result

    def _decide(
        self, state: JobState, job: FineTuneJob, status: FineTuneJobStatus, workload: W | None
    ) -> Outcome:
        now = self._now()
        if job.spec.cancel:
            if status.phase in ACTIVE_PHASES:
                self.runtime.stop(job)
            return cancel(status, now=now)
        if status.phase is None:
            moved, transitions = advance(status, JobPhase.VALIDATING_FILES, now=now)
            return Outcome(moved, tuple(transitions))
        if status.phase is JobPhase.VALIDATING_FILES:
            return self._validate(state, job, status, now)
        return self._supervise(state, job, status, workload, now)

    # -- validating_files ----------------------------------------------------------------------
    def _resolve(self, job: FineTuneJob) -> TrainerConfig:
        defaults = self.runtime.trainer_defaults
        settings = self.settings
        if self.catalogue is not None:
            settings = settings.model_copy(update={"models": self.catalogue(job.spec.org)})
        config = resolve_trainer_config(
            self.store,
            self.layout,
            job,
            settings,
            image=defaults.image,
            metrics_port=defaults.metrics_port,
        )
        return defaults.apply(config)

    def _validate(
        self, state: JobState, job: FineTuneJob, status: FineTuneJobStatus, now: datetime
    ) -> Outcome:
        try:
            config = self._resolve(job)
        except JobInputError as exc:
            return fail(status, exc.error, now=now)
        key = self.layout.job_config_key(job.spec.org, job.metadata.name)
        return validated(status, state.remember(store_config(self.store, key, config)), now=now)

    def _load_config(self, state: JobState, job: FineTuneJob) -> TrainerConfig:
        """The job's stored trainer config (rebuilt if the store lost it)."""
        if state.config is not None:
            return state.config
        key = self.layout.job_config_key(job.spec.org, job.metadata.name)
        text = load_config_text(self.store, key)
        if text is None:
            log.warning("%s: the trainer config is missing from the store; rebuilding", key)
            text = store_config(self.store, key, self._resolve(job))
        return state.remember(text)

    # -- queued / running / pausing / paused ---------------------------------------------------
    def _supervise(
        self,
        state: JobState,
        job: FineTuneJob,
        status: FineTuneJobStatus,
        workload: W | None,
        now: datetime,
    ) -> Outcome:
        try:
            config = self._load_config(state, job)
        except JobInputError as exc:
            return fail(status, exc.error, now=now)
        assert state.config_text is not None
        # A pause that has begun completes before a resume is honoured: the lifecycle goes
        # pausing → paused → queued, and the trainer's checkpoint is committed either way.
        suspend = job.spec.suspend or status.phase is JobPhase.PAUSING
        if workload is None or workload.deleting:
            workload = self.runtime.create(job, state.config_text, suspend=suspend)
        if workload.suspended != suspend:
            self.runtime.set_suspended(job, workload, suspend)
        observed = self.runtime.observe(job, workload, suspend=suspend)
        timed_out = self._queue_timeout(job, status, observed, now)
        if timed_out is not None:
            return timed_out
        events = self._events_if_due(state, job, status, observed)
        observed = self._pause_complete(state, status, observed, events)
        stored = observed.phase is JobPhase.SUCCEEDED and adapter_stored(
            self.store, self.layout, job.spec.org, job.metadata.name
        )
        outcome = observe_training(
            status,
            observed,
            events=events,
            adapter_stored=stored,
            fine_tuned_model=config.fine_tuned_model,
            now=now,
        )
        if outcome.status.phase is JobPhase.SUCCEEDED:
            outcome = self._with_serving(job, outcome, now)
        return outcome

    def _queue_timeout(
        self, job: FineTuneJob, status: FineTuneJobStatus, observed: Observed, now: datetime
    ) -> Outcome | None:
        """A job that has waited in queued longer than ``queueing.max_queued_seconds`` (since
        it last entered queued) fails with why it waited, and its workload is deleted.
        """
        limit = self.settings.queueing.max_queued_seconds
        still_queued = status.phase is JobPhase.QUEUED and observed.phase is JobPhase.QUEUED
        if limit is None or not still_queued:
            return None
        queued = condition(status.conditions, ConditionType.QUEUED)
        since = queued.last_transition_time if queued is not None else None
        if since is None or (now - since).total_seconds() < limit:
            return None
        self.runtime.stop(job)
        why = observed.waiting.message if observed.waiting else "the trainer did not start"
        error = JobError(
            code="queue_timeout",
            message=f"The job waited longer than {limit:g} s to start ({why}); ask for fewer "
            "GPUs or another queue, or ask the cluster's operators about its quota",
            kind=ErrorKind.INFRASTRUCTURE,
        )
        return fail(status, error, now=now)

    def give_up(self, job: FineTuneJob, failures: int, last_error: Exception) -> PassResult:
        """Fail a job whose passes have failed ``failures`` times in a row (the operator's
        retry cap): its workload is deleted and the error says what kept failing.
        """
        result = PassResult(job)
        status = job.status or FineTuneJobStatus()
        if is_terminal(status.phase):
            return result
        try:
            self.runtime.stop(job)
        except Exception:  # the job fails all the same; its finalizer deletes what is left
            log.warning("%s: could not stop the workload", job.metadata.name, exc_info=True)
        error = JobError(
            code="reconcile_failed",
            message=f"The operator failed {failures} times in a row to run the job; the last "
            f"error: {last_error}"[:4096],
            kind=ErrorKind.INFRASTRUCTURE,
        )
        self._record(result, fail(status, error, now=self._now()))
        if result.terminal:
            self.runtime.release(result.job)
            self.announce_end(result.job)
        return result

    def _pause_complete(
        self,
        state: JobState,
        status: FineTuneJobStatus,
        observed: Observed,
        events: list[JobEvent] | None,
    ) -> Observed:
        """A pause is complete once the trainer has stopped by its own account (it commits its
        checkpoint first), or its grace period is over: a workload may report suspended while
        its pods still terminate (a TrainJob says so as soon as it is asked to suspend).
        """
        pausing = observed.phase is JobPhase.PAUSED and status.phase in (
            JobPhase.RUNNING,
            JobPhase.PAUSING,
        )
        if not pausing or events is None or trainer_stopped(events):
            state.pausing_since = None
            return observed
        clock = self.clock()
        if state.pausing_since is None:
            state.pausing_since = clock
        if clock - state.pausing_since > self.stop_grace_seconds:
            return observed  # killed before it could say so: paused all the same
        return dataclasses.replace(observed, phase=JobPhase.PAUSING)

    def _events_if_due(
        self, state: JobState, job: FineTuneJob, status: FineTuneJobStatus, observed: Observed
    ) -> list[JobEvent] | None:
        """The trainer's whole event log, when progress is due or the phase moves.

        No trainer has run while a job waits for its first start: nothing to read (saves a
        listing of the store per queued job every ``progress_seconds``).
        """
        never_ran = status.started_at is None and observed.phase is JobPhase.QUEUED
        clock = self.clock()
        due = clock >= state.next_progress or observed.phase is not status.phase
        if never_ran or not due:
            return None
        if state.events is None:
            prefix = self.layout.events_prefix(job.spec.org, job.metadata.name)
            state.events = EventLogReader(self.store, prefix)
        state.next_progress = clock + self.progress_seconds
        return state.events.read()

    def _with_serving(self, job: FineTuneJob, outcome: Outcome, now: datetime) -> Outcome:
        """A job that just succeeded: serve its model where the runtime can do it at once, and
        say where it stands in the same status write.
        """
        if self.serving is None:
            return outcome
        succeeded = job.model_copy(update={"status": outcome.status})
        self.serving.publish(succeeded)
        status, notices = plan_serving(succeeded, self.serving.where(succeeded), now=now)
        return Outcome(status, outcome.transitions, (*outcome.notices, *notices))

    # -- recording -----------------------------------------------------------------------------
    def _record(self, result: PassResult, outcome: Outcome) -> bool:
        """Write the status if it changed, then post what happened; True if the phase moved."""
        job = result.job
        wanted = outcome.status.model_copy(update={"observed_generation": job.metadata.generation})
        patch = status_patch(job.status, wanted)
        if patch is None:
            return False
        result.job = self.jobs.write_status(job, patch)
        status = result.job.status or wanted
        now = self._now()
        first_start = (job.status is None or job.status.started_at is None) and (
            status.started_at is not None
        )
        control: list[JobEvent] = []
        for transition in outcome.transitions:
            log.info("%s: %s → %s", job.metadata.name, transition.source, transition.target)
            if self.metrics is not None:
                self.metrics.transitioned(
                    transition.target,
                    org=job.spec.org,
                    first_start=first_start,
                    created_at=job.metadata.creation_timestamp,
                    started_at=status.started_at,
                    now=now,
                )
            control.extend(job_events(transition, status))
        control.extend(notice_event(n) for n in outcome.notices if n.job_event)
        self._count_usage(job, status)
        self._post(result, (*outcome.transitions, *outcome.notices))
        self._write_events(result.job, control)
        return bool(outcome.transitions)

    def _count_usage(self, job: FineTuneJob, status: FineTuneJobStatus) -> None:
        """Add what the status change used to the org's usage metrics."""
        if self.metrics is None:
            return
        gpu_seconds, tokens = usage_delta(job.status, status, job.spec.resources.gpus)
        if gpu_seconds or tokens:
            self.metrics.used(job.spec.org, gpu_seconds=gpu_seconds, trained_tokens=tokens)

    def _post(self, result: PassResult, events: Iterable[Transition | Notice]) -> None:
        for event in events:
            result.events.append(event)
            if self.sink is not None:
                self.sink.post(result.job, event)

    def _write_events(self, job: FineTuneJob, events: list[JobEvent]) -> None:
        if not events:
            return
        prefix = self.layout.events_prefix(job.spec.org, job.metadata.name)
        try:
            write_control_events(self.store, prefix, events)
        except Exception:  # the status is written; a lost job event is only a log line
            log.warning("%s: could not write job events", job.metadata.name, exc_info=True)

    # -- after the end -------------------------------------------------------------------------
    def serving_pass(self, job: FineTuneJob) -> PassResult:
        """Bring a succeeded job's ``servedOn``, ``servingError`` and ``Served`` condition up
        to date with where its model stands now (the serving loops call it on every change).
        """
        result = PassResult(job)
        succeeded = job.status is not None and job.status.phase is JobPhase.SUCCEEDED
        if self.serving is None or not succeeded:
            return result
        status, notices = plan_serving(job, self.serving.where(job), now=self._now())
        patch = status_patch(job.status, status)
        if patch is not None:
            result.job = self.jobs.write_status(job, patch)
            self._post(result, notices)
        return result

    def announce_end(self, job: FineTuneJob) -> int:
        """Queue the webhook event of a job in a terminal phase; how many were new.

        Idempotent (derived ids), so every pass that ends terminal may call it; if the store
        fails, the exception makes the caller retry the pass, which queues it then.
        """
        written = announce_job_end(self.store, self.layout, self.settings.webhooks, job)
        if written:
            log.info("%s: %d webhook delivery(ies) queued", job.metadata.name, len(written))
        return len(written)

    def sweep_finished(self, jobs: Iterable[FineTuneJob], *, now: datetime) -> int:
        """Queue the events of jobs that finished recently, in case a process died between
        recording a terminal phase and queueing its event (no pass runs for a finished job).
        Idempotent; returns how many deliveries were new.
        """
        horizon = now - timedelta(hours=self.settings.webhooks.sweep_hours)
        queued = 0
        for job in jobs:
            finished = job.status.finished_at if job.status else None
            if finished is not None and finished >= horizon:
                queued += self.announce_end(job)
        return queued


def notice_event(notice: Notice) -> JobEvent:
    """A notice as a job event, for runtimes without Kubernetes Events (local mode)."""
    level = EventLevel.WARN if notice.warning else EventLevel.INFO
    return JobEvent(message=notice.message, level=level, data={"reason": notice.reason})
