"""The local executor: the operator's reconcile loop for jobs in SQLite, trainers as subprocesses.

A background thread looks at every unfinished job each ``poll_seconds`` and moves it with the
pure functions the operator uses (:mod:`kubetune.reconcile`): validating_files (the operator's
file checks, the trainer config stored once) → queued → running (``python -m
kubetune_trainer.launch --config …`` with the training-operator's environment) → succeeded,
failed, cancelled or paused. Where the operator reads a PyTorchJob's conditions, this reads its
own trainer's exit status, with the same ``restartPolicy: ExitCode`` meaning.

Stopping the server stops the trainers with SIGTERM (each commits a checkpoint) but leaves their
jobs ``running``: the next start relaunches them and they resume from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from kubetune.events import EventLevel, JobEvent, write_control_events
from kubetune.finetunejob import FineTuneJob, FineTuneJobStatus, JobPhase
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
from kubetune.observed import Observed
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
from kubetune.trainer_config import TrainerConfig
from kubetune.webhooks import WebhookSender, announce_job_end
from kubetune_api.backends.local import LocalJobBackend
from kubetune_api.executor.policy import Relaunch, after_exit, startable, trainer_env
from kubetune_api.executor.process import ChildProcess
from kubetune_api.executor.serving import LocalServing

log = logging.getLogger("kubetune.executor")

LOCAL_EVENT_FLUSH_SECONDS: Final = 1.0

TRAINER_MODULE: Final = "kubetune_trainer.launch"
# A new job is validated, queued and started in one pass; an active one moves once per pass.
MAX_MOVES_PER_PASS: Final = 3
ACTIVE: Final = frozenset({JobPhase.QUEUED, JobPhase.RUNNING, JobPhase.PAUSING, JobPhase.PAUSED})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Trainer:
    """The trainer process of one job, and how often it was relaunched."""

    process: ChildProcess
    relaunches: int = 0


@dataclass
class _JobState:
    """What the executor keeps about one unfinished job between passes."""

    config_text: str | None = None
    events: EventLogReader | None = None
    next_progress: float = 0.0
    trainer: _Trainer | None = None
    relaunches: int = 0
    stopping: list[ChildProcess] = field(default_factory=list)

    @property
    def config(self) -> TrainerConfig:
        """The job's stored trainer config."""
        assert self.config_text is not None
        return TrainerConfig.model_validate_json(self.config_text)


class LocalExecutor:
    """Runs local mode's jobs; :meth:`start` and :meth:`stop` follow the app's lifespan."""

    def __init__(
        self,
        settings: Settings,
        backend: LocalJobBackend,
        store: ObjectStore,
        *,
        serving: LocalServing | None = None,
        python: str = sys.executable,
    ) -> None:
        self.settings = settings
        self.opts = settings.local
        self.backend = backend
        self.store = store
        self.layout = settings.object_store.layout()
        self.serving = serving
        self.python = python
        # The trainer opens the store from its config: name the folder the API uses.
        self._trainer_settings = settings.model_copy(
            update={
                "object_store": settings.object_store.model_copy(
                    update={"local_root": settings.store_root()}
                )
            }
        )
        self._jobs: dict[str, _JobState] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._webhooks: threading.Thread | None = None
        self._clock = time.monotonic

    # -- lifecycle of the executor -------------------------------------------------------------
    def start(self) -> None:
        """Start the background loop (catch up serving first, then resume unfinished jobs)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="local-executor", daemon=True)
        self._thread.start()
        if self.settings.webhooks.enabled:
            # The same sender as the operator's: local mode's webhooks are delivered alike.
            sender = WebhookSender(self.store, self.settings)
            self._webhooks = threading.Thread(
                target=sender.run_forever, args=(self._stop,), name="webhooks", daemon=True
            )
            self._webhooks.start()
        log.info("local executor started (%d trainer(s) at once)", self.opts.max_running_jobs)

    def stop(self) -> None:
        """Stop the loop, then the trainers: each gets SIGTERM, commits its checkpoint and
        exits; their jobs stay ``running`` and resume on the next start.
        """
        self._stop.set()
        for thread in (self._thread, self._webhooks):
            if thread is not None:
                thread.join()
        processes = [p for state in self._jobs.values() for p in self._processes(state)]
        for process in processes:
            process.terminate()
        for process in processes:
            code = process.stop(self.opts.trainer_grace_seconds)
            log.info("%s stopped (exit %s)", process.name, code)
        self._jobs.clear()
        if self.serving is not None:
            self.serving.close()

    @staticmethod
    def _processes(state: _JobState) -> list[ChildProcess]:
        running = [state.trainer.process] if state.trainer is not None else []
        return [*running, *state.stopping]

    def _loop(self) -> None:
        if self.serving is not None:
            self._sync_serving(force=True)
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # one bad pass must not end local mode's executor
                log.exception("local executor pass failed; retrying")
            self._stop.wait(self.opts.poll_seconds)

    # -- one pass over every job ---------------------------------------------------------------
    def run_once(self) -> None:
        """Reconcile every unfinished job once, then the served adapters."""
        jobs = self.backend.scan(unfinished=True)
        running = sum(1 for s in self._jobs.values() if s.trainer is not None)
        may_start = set(startable(jobs, running, self.opts.max_running_jobs))
        for job in jobs:
            self._reconcile(job, may_start=job.metadata.name in may_start)
        self._reap()
        if self.serving is not None:
            self._sync_serving(force=False)

    def _sync_serving(self, *, force: bool) -> None:
        assert self.serving is not None
        jobs = self.backend.scan(unfinished=False)
        states = self.serving.sync(jobs, force=force)
        if states is None:
            return
        for job in jobs:
            model = job.status.fine_tuned_model if job.status else None
            update = self.serving.status_update(job, states.get(model or ""))
            if update and job.status is not None:
                status = job.status.model_copy(update=update)
                self.backend.update_status(job.spec.org, job.metadata.name, status)

    def _reap(self) -> None:
        """Kill trainers that outlived their grace period after a cancel."""
        for state in self._jobs.values():
            for process in list(state.stopping):
                if process.poll() is not None:
                    state.stopping.remove(process)
                elif process.overdue(self.opts.trainer_grace_seconds):
                    process.kill()

    def _reconcile(self, job: FineTuneJob, *, may_start: bool) -> None:
        name = job.metadata.name
        state = self._jobs.setdefault(name, _JobState())
        for _ in range(MAX_MOVES_PER_PASS):
            status = job.status or FineTuneJobStatus()
            if is_terminal(status.phase):
                break
            outcome = self._decide(job, status, state, may_start=may_start)
            job, moved = self._record(job, outcome)
            if not moved or (job.status and job.status.phase in ACTIVE - {JobPhase.QUEUED}):
                break
        current = job.status.phase if job.status else None
        if is_terminal(current) and not state.stopping:
            self._forget(name)

    def _forget(self, name: str) -> None:
        self._jobs.pop(name, None)
        shutil.rmtree(self._workdir(name), ignore_errors=True)

    # -- decisions ------------------------------------------------------------------------------
    def _now(self) -> datetime:
        return datetime.now(UTC)

    def _decide(
        self, job: FineTuneJob, status: FineTuneJobStatus, state: _JobState, *, may_start: bool
    ) -> Outcome:
        now = self._now()
        if job.spec.cancel:
            if state.trainer is not None:
                state.trainer.process.terminate()  # killed by _reap if it does not stop
                state.stopping.append(state.trainer.process)
                state.trainer = None
            return cancel(status, now=now)
        if status.phase is None:
            moved, transitions = advance(status, JobPhase.VALIDATING_FILES, now=now)
            return Outcome(moved, tuple(transitions))
        if status.phase is JobPhase.VALIDATING_FILES:
            return self._validate(job, status, state, now)
        return self._supervise(job, status, state, may_start=may_start, now=now)

    def _validate(
        self, job: FineTuneJob, status: FineTuneJobStatus, state: _JobState, now: datetime
    ) -> Outcome:
        try:
            config = self._resolve(job)
        except JobInputError as exc:
            return fail(status, exc.error, now=now)
        key = self.layout.job_config_key(job.spec.org, job.metadata.name)
        state.config_text = store_config(self.store, key, config)
        return validated(status, state.config, now=now)

    def _resolve(self, job: FineTuneJob) -> TrainerConfig:
        config = resolve_trainer_config(
            self.store,
            self.layout,
            job,
            self._trainer_settings,
            image=None,
            metrics_port=0,  # several trainers may share this machine: any free port
        )
        # A local folder takes a write a second; progress bars then move step by step.
        return config.model_copy(update={"event_flush_seconds": LOCAL_EVENT_FLUSH_SECONDS})

    def _load_config(self, job: FineTuneJob, state: _JobState) -> None:
        """The job's stored trainer config (rebuilt if the store lost it)."""
        if state.config_text is not None:
            return
        key = self.layout.job_config_key(job.spec.org, job.metadata.name)
        text = load_config_text(self.store, key)
        if text is None:
            log.warning("%s: the trainer config is missing from the store; rebuilding", key)
            text = store_config(self.store, key, self._resolve(job))
        state.config_text = text

    def _supervise(
        self,
        job: FineTuneJob,
        status: FineTuneJobStatus,
        state: _JobState,
        *,
        may_start: bool,
        now: datetime,
    ) -> Outcome:
        try:
            self._load_config(job, state)
        except JobInputError as exc:
            return fail(status, exc.error, now=now)
        # A pause that has begun completes before a resume is honoured (pausing → paused).
        suspend = job.spec.suspend or status.phase is JobPhase.PAUSING
        observed = self._observe(job, state, suspend=suspend, may_start=may_start)
        events = None
        clock = self._clock()
        if clock >= state.next_progress or observed.phase is not status.phase:
            events = self._read_events(job, state)
            state.next_progress = clock + self.opts.progress_seconds
        config = state.config
        stored = observed.phase is JobPhase.SUCCEEDED and adapter_stored(
            self.store, self.layout, job.spec.org, job.metadata.name
        )
        outcome = observe_training(
            status,
            observed,
            pytorchjob_status=None,
            events=events,
            adapter_stored=stored,
            fine_tuned_model=config.fine_tuned_model,
            now=now,
        )
        if outcome.status.phase is JobPhase.SUCCEEDED and status.phase is not JobPhase.SUCCEEDED:
            outcome = self._serve(job, outcome)
        return outcome

    def _observe(
        self, job: FineTuneJob, state: _JobState, *, suspend: bool, may_start: bool
    ) -> Observed:
        """What the job's trainer is doing, in the operator's terms (a PyTorchJob's phase)."""
        trainer = state.trainer
        if trainer is None:
            if suspend:
                return Observed(JobPhase.PAUSED, "Suspended", None, restarting=False)
            if not may_start:
                return Observed(JobPhase.QUEUED, None, None, restarting=False)
            state.trainer = _Trainer(self._launch(job, state), relaunches=state.relaunches)
            return Observed(JobPhase.RUNNING, "Running", None, restarting=False)
        returncode = trainer.process.poll()
        if returncode is None:
            if suspend:
                trainer.process.terminate()
                return Observed(JobPhase.PAUSING, "Suspending", None, restarting=False)
            return Observed(JobPhase.RUNNING, "Running", None, restarting=False)
        decision = after_exit(
            returncode,
            suspend_requested=suspend,
            relaunches=trainer.relaunches,
            backoff_limit=self.opts.backoff_limit,
        )
        if isinstance(decision, Relaunch):
            log.warning(
                "%s: the trainer exited %d; relaunching", job.metadata.name, decision.exit_code
            )
            state.relaunches = trainer.relaunches + 1
            state.trainer = _Trainer(self._launch(job, state), relaunches=state.relaunches)
            return Observed(JobPhase.RUNNING, "Restarting", None, restarting=True)
        if decision.phase is not JobPhase.SUCCEEDED and decision.phase is not JobPhase.PAUSED:
            log.warning(
                "%s: %s\n%s", job.metadata.name, decision.message, trainer.process.log_tail()
            )
        state.trainer = None
        return decision

    def _serve(self, job: FineTuneJob, outcome: Outcome) -> Outcome:
        """Load the new model on the local vLLM before the job is reported succeeded, so the
        model answers as soon as it is listed; a refusal is recorded, not silent.
        """
        model = outcome.status.fine_tuned_model
        if self.serving is None or model is None:
            return outcome
        served_on, error = self.serving.load(job, model)
        status = outcome.status.model_copy(update={"served_on": served_on, "serving_error": error})
        if error is not None:
            self._write_events(
                job,
                [
                    JobEvent(
                        message=f"The fine-tuned model cannot be served: {error.message}",
                        level=EventLevel.ERROR,
                        data={"code": error.code},
                    )
                ],
            )
        return Outcome(status, outcome.transitions, outcome.notices)

    # -- the trainer ----------------------------------------------------------------------------
    def _workdir(self, job_id: str) -> Path:
        return self.settings.data_dir / "trainers" / job_id

    def _launch(self, job: FineTuneJob, state: _JobState) -> ChildProcess:
        """Start the trainer as the training-operator starts a one-node PyTorchJob's pod."""
        assert state.config_text is not None
        workdir = self._workdir(job.metadata.name)
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "config.json"  # the ConfigMap, mounted
        config_path.write_text(state.config_text)
        env = trainer_env(os.environ, job, workdir=workdir / "scratch", master_port=_free_port())
        attempt = state.relaunches
        return ChildProcess(
            f"trainer {job.metadata.name}",
            [self.python, "-m", TRAINER_MODULE, "--config", str(config_path)],
            env=env,
            cwd=workdir,
            log_path=self.settings.data_dir / "logs" / f"{job.metadata.name}-{attempt}.log",
        )

    def _read_events(self, job: FineTuneJob, state: _JobState) -> list[JobEvent]:
        if state.events is None:
            prefix = self.layout.events_prefix(job.spec.org, job.metadata.name)
            state.events = EventLogReader(self.store, prefix)
        return state.events.read()

    # -- recording ------------------------------------------------------------------------------
    def _record(self, job: FineTuneJob, outcome: Outcome) -> tuple[FineTuneJob, bool]:
        """Write the status if it changed, then its job events; True if the phase moved."""
        if status_patch(job.status, outcome.status) is None:
            return job, False
        stored = self.backend.update_status(job.spec.org, job.metadata.name, outcome.status)
        events: list[JobEvent] = []
        for transition in outcome.transitions:
            log.info("%s: %s → %s", job.metadata.name, transition.source, transition.target)
            events.extend(job_events(transition, outcome.status))
        events.extend(_notice_event(n) for n in outcome.notices)
        self._write_events(job, events)
        if stored.status is not None and is_terminal(stored.status.phase):
            announce_job_end(self.store, self.layout, self.settings.webhooks, stored)
        return stored, bool(outcome.transitions)

    def _write_events(self, job: FineTuneJob, events: list[JobEvent]) -> None:
        if not events:
            return
        prefix = self.layout.events_prefix(job.spec.org, job.metadata.name)
        try:
            write_control_events(self.store, prefix, events)
        except Exception:  # the status is written; a lost job event is only a log line
            log.warning("%s: could not write job events", job.metadata.name, exc_info=True)


def _notice_event(notice: Transition) -> JobEvent:
    """A restart, which the operator posts as a Kubernetes Event, in the job's own log (local
    mode has no other place to show it).
    """
    return JobEvent(message=notice.message, level=EventLevel.WARN, data={"reason": notice.reason})
