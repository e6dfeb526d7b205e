"""Local mode's job loop: the job driver with the subprocess runtime, over the jobs in SQLite.

A background thread sweeps every ``poll_seconds``: it admits waiting trainers, runs one driver
pass per unfinished job (jobs that were running first, so an interrupted job resumes before new
work starts), reaps stopped trainers, then syncs the local vLLMs and brings every succeeded
job's serving status up to date. It is the operator's per-job daemons and serving loops on one
thread; the passes themselves are the operator's own (:class:`kubetune_runtime.driver.JobDriver`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune.base_models import org_catalogue
from kubetune.events import write_control_events
from kubetune.finetunejob import (
    ANNOTATION_MODEL_DELETED,
    FineTuneJob,
    FineTuneJobStatus,
    JobPhase,
)
from kubetune.settings import Settings
from kubetune_api.backends.local import LocalJobBackend
from kubetune_local.base_models import LocalBaseModelChecks
from kubetune_local.merges import LocalMerges
from kubetune_local.runtime import LocalWorkload, SubprocessRuntime
from kubetune_local.serving import LocalServing
from kubetune_runtime.adapters import ReplicaAdapters
from kubetune_runtime.driver import JobDriver, JobState, notice_event
from kubetune_runtime.faults import Faults
from kubetune_runtime.objectstore import ObjectStore
from kubetune_runtime.reconcile import Notice, Transition
from kubetune_runtime.vllm_launch import default_vllm_python
from kubetune_runtime.webhooks import WebhookSender

log = logging.getLogger(__name__)


class SqliteJobStore:
    """The driver's job store over local mode's SQLite backend.

    Only this process writes statuses, so there is nothing to conflict with: the API changes a
    job's spec and annotations, which a status write keeps.
    """

    def __init__(self, backend: LocalJobBackend) -> None:
        self.backend = backend

    def write_status(self, job: FineTuneJob, patch: dict[str, Any]) -> FineTuneJob:
        """Apply the merge patch to the job's status and store it."""
        wire = job.status.to_wire() if job.status is not None else {}
        wire.update(patch)
        status = FineTuneJobStatus.model_validate({k: v for k, v in wire.items() if v is not None})
        return self.backend.update_status(job.spec.org, job.metadata.name, status)


class JobLog:
    """Where local mode posts what a cluster shows as Kubernetes Events: warnings (a restart, a
    refused adapter) go into the job's own event log. Transitions are there already, worded as
    OpenAI's; a Normal notice (the model is served) would come after "The job has successfully
    completed", which OpenAI's clients take for the last event.
    """

    def __init__(self, store: ObjectStore, settings: Settings) -> None:
        self.store = store
        self.layout = settings.object_store.layout()

    def post(self, job: FineTuneJob, event: Transition | Notice) -> None:
        """Log a warning notice as a job event."""
        # A notice the driver writes as a job event already (job_event) is not written twice.
        if isinstance(event, Notice) and event.warning and not event.job_event:
            prefix = self.layout.events_prefix(job.spec.org, job.metadata.name)
            write_control_events(self.store, prefix, [notice_event(event)])


def trainer_settings(settings: Settings) -> Settings:
    """The settings trainer configs are resolved with: the trainer opens the store from its
    config, so it names the very folder local mode uses.
    """
    store = settings.object_store.model_copy(update={"local_root": settings.store_root()})
    return settings.model_copy(update={"object_store": store})


def local_serving(settings: Settings, store: ObjectStore) -> LocalServing:
    """The local vLLMs (``settings.serving.vllm_urls``), none when vLLM does not run."""
    opts = settings.serving
    replicas = {
        base: ReplicaAdapters(
            store,
            settings.object_store.layout(),
            url,
            opts.adapter_dir,
            opts.vllm_model,
            opts.max_lora_rank,
            timeout=opts.request_timeout_seconds,
            api_key=opts.vllm_api_key.get_secret_value() if opts.vllm_api_key else None,
        )
        for base, url in opts.vllm_urls.items()
    }
    return LocalServing(
        replicas, sync_seconds=opts.sync_seconds, checkpoint_slots=opts.checkpoint_slots
    )


def installed_vllm_python() -> Path | None:
    """The vLLM venv's interpreter, when vLLM is installed."""
    python = default_vllm_python()
    return python if python.exists() else None


class LocalRunner:
    """Runs local mode's jobs; :meth:`start` and :meth:`stop` follow the server's lifetime."""

    def __init__(
        self,
        settings: Settings,
        backend: LocalJobBackend,
        store: ObjectStore,
        *,
        runtime: SubprocessRuntime | None = None,
        serving: LocalServing | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.store = store
        self.runtime = runtime or SubprocessRuntime(settings.local, settings.data_dir)
        self.serving = serving or local_serving(settings, store)
        self.driver: JobDriver[LocalWorkload] = JobDriver(
            settings=trainer_settings(settings),
            store=store,
            jobs=SqliteJobStore(backend),
            runtime=self.runtime,
            progress_seconds=settings.local.progress_seconds,
            stop_grace_seconds=settings.local.trainer_grace_seconds + 10,
            serving=self.serving,
            sink=JobLog(store, settings),
            faults=Faults.from_env(),
            catalogue=lambda org: org_catalogue(settings.models, backend.base_models(org), org),
        )
        self.merges = LocalMerges(
            backend,
            store,
            settings.object_store.layout(),
            settings.data_dir,
            python=self.runtime.python,
            host_env=self.runtime.host_env,
        )
        self.base_model_checks = LocalBaseModelChecks(
            backend,
            settings.data_dir,
            python=self.runtime.python,
            host_env=self.runtime.host_env,
            vllm_python=installed_vllm_python,
        )
        self._states: dict[str, JobState] = {}
        self._serving_keys: dict[str, tuple[int, str | None]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifetime ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the job loop and, with webhooks on, the sender (the operator's own)."""
        self._stop.clear()
        self._threads = [threading.Thread(target=self._loop, name="local-jobs", daemon=True)]
        if self.settings.webhooks.enabled:
            sender = WebhookSender(self.store, self.settings)
            self._threads.append(
                threading.Thread(
                    target=self._send_webhooks, args=(sender,), name="webhooks", daemon=True
                )
            )
        for thread in self._threads:
            thread.start()
        log.info("local jobs: %d trainer(s) at once", self.settings.local.max_running_jobs)

    def stop(self) -> None:
        """Stop the loop, then the trainers: each gets SIGTERM, commits its checkpoint and
        exits; their jobs stay ``running`` and resume on the next start.
        """
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self.runtime.shutdown()
        self.merges.close()
        self.base_model_checks.close()
        self._states.clear()
        self.serving.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # one bad sweep must not end local mode's jobs
                log.exception("local job sweep failed; retrying")
            self._stop.wait(self.settings.local.poll_seconds)

    def _send_webhooks(self, sender: WebhookSender) -> None:
        try:
            self.driver.sweep_finished(self.backend.scan(unfinished=False), now=datetime.now(UTC))
        except Exception:  # the sender still runs; only a crash-window event may be missing
            log.exception("webhook sweep of finished jobs failed")
        sender.run_forever(self._stop)

    # -- one sweep -----------------------------------------------------------------------------
    def run_once(self) -> None:
        """Check a registered base model, admit, pass over every unfinished job, reap, then
        serve.
        """
        self.base_model_checks.sync()
        self.runtime.admit()
        for job in by_resume_order(self.backend.scan(unfinished=True)):
            name = job.metadata.name
            state = self._states.setdefault(name, JobState())
            if self.driver.run_pass(state, job, self.runtime.lookup(name)).terminal:
                self._states.pop(name, None)
        self.runtime.reap()
        self._serve()

    def _serve(self) -> None:
        """Sync the vLLMs and the merges asked for, then the serving status of each succeeded
        job whose model or deletion changed since its last serving pass (as the operator's
        status writers do).
        """
        jobs = self.backend.scan(unfinished=False)
        self.serving.sync(jobs)
        self.merges.sync(jobs)
        for job in jobs:
            if job.status is None or job.status.phase is not JobPhase.SUCCEEDED:
                continue
            name = job.metadata.name
            key = (
                self.serving.state.version,
                job.metadata.annotations.get(ANNOTATION_MODEL_DELETED),
            )
            if self._serving_keys.get(name) != key:
                self.driver.serving_pass(job)
                self._serving_keys[name] = key


def by_resume_order(jobs: Sequence[FineTuneJob]) -> list[FineTuneJob]:
    """Jobs that were running first (their trainers resume before new ones start), then oldest
    first.
    """
    return sorted(
        jobs,
        key=lambda j: (j.status is None or j.status.phase is not JobPhase.RUNNING, j.metadata.name),
    )
