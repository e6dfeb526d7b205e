"""The subprocess runtime: a job's trainer runs as a child process of local mode.

A plugin of the job driver (:class:`kubetune_runtime.driver.Runtime`) that plays, on one
machine, what a cluster splits between Kueue, the training-operator and the kubelet:

- the workload of a job is its trainer config (written where a pod would mount its ConfigMap)
  and, once admitted, a ``python -m kubetune_trainer.launch`` process with the environment the
  training-operator gives a one-node PyTorchJob (torchrun when the job has several processes);
- at most ``max_running_jobs`` trainers run at once; the others wait ``queued`` and are admitted
  oldest first, a job interrupted by the last stop of local mode before any new one;
- an exit is read as ``restartPolicy: ExitCode`` reads it: 0 succeeds, a retryable code
  (128-255: preempted, transient) restarts the trainer until the backoff limit is spent, a
  permanent one fails the job;
- suspend sends SIGTERM (the trainer commits a checkpoint and exits 143) and the job pauses;
  resume queues it for admission again; cancel stops it, with SIGKILL after the grace period.

Stopping local mode stops the trainers the same way, but leaves their jobs ``running``: the next
start resumes them from their checkpoints.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from kubetune.finetunejob import ConditionType, FineTuneJob, JobPhase
from kubetune.settings import LocalSettings
from kubetune.trainer_config import world_size
from kubetune_local.policy import (
    Conditions,
    Relaunch,
    Waiting,
    admissible,
    after_exit,
    trainer_env,
    update_conditions,
)
from kubetune_local.process import ChildProcess, children_registry
from kubetune_runtime.driver import TrainerDefaults
from kubetune_runtime.observed import Observed
from kubetune_runtime.ports import free_loopback_port
from kubetune_trainer import launch

log = logging.getLogger(__name__)

# The trainer's entrypoint, as the trainer image's ENTRYPOINT names it.
TRAINER_MODULE: Final = launch.__name__
# A local folder takes a write a second: progress bars then move step by step.
LOCAL_EVENT_FLUSH_SECONDS: Final = 1.0
CONFIG_FILE: Final = "config.json"


@dataclass
class LocalWorkload:
    """One job's trainer on this machine: what its PyTorchJob and pods are in a cluster."""

    job_id: str
    processes: int  # trainer processes (torchrun's workers), one per GPU or one on a CPU
    suspended: bool
    resume_first: bool
    process: ChildProcess | None = None
    relaunches: int = 0  # after retryable exits, against the backoff limit
    launches: int = 0  # every start (resumes too): each gets a log of its own
    outcome: Observed | None = None  # set once the trainer ended for good (succeeded, failed)
    deleting: bool = False  # never: a stopped workload is forgotten at once
    conditions: Conditions = field(default_factory=list)  # as the training-operator keeps them

    def mark(self, type_: ConditionType, status: bool, reason: str, message: str = "") -> None:
        """Set one of the workload's conditions (see :func:`~.policy.update_conditions`)."""
        self.conditions = update_conditions(
            self.conditions, type_, status, reason, message, now=datetime.now(UTC)
        )

    def seen(self, phase: JobPhase, reason: str | None, *, restarting: bool = False) -> Observed:
        """What the driver observes: ``phase``, with the workload's conditions."""
        return Observed(phase, reason, None, restarting, tuple(self.conditions))


class SubprocessRuntime:
    """Runs each job's trainer as a subprocess (see the module docstring)."""

    name = "subprocess"

    def __init__(
        self,
        opts: LocalSettings,
        data_dir: Path,
        *,
        python: str = sys.executable,
        host_env: Mapping[str, str] = os.environ,
    ) -> None:
        self.opts = opts
        self.data_dir = data_dir
        self.python = python
        self.host_env = host_env
        self._workloads: dict[str, LocalWorkload] = {}
        self._stopping: dict[str, list[ChildProcess]] = {}
        self._lock = threading.Lock()

    # -- the plugin ----------------------------------------------------------------------------
    @property
    def trainer_defaults(self) -> TrainerDefaults:
        """Any free metrics port, frequent event flushes, the CPU when there is no GPU."""
        return TrainerDefaults(
            image=None,
            metrics_port=0,  # several trainers may share this machine: any free port
            event_flush_seconds=LOCAL_EVENT_FLUSH_SECONDS,
            cpu_fallback=True,  # a laptop without a GPU trains the job on its CPU
            stop_grace_seconds=self.opts.trainer_grace_seconds,
        )

    def lookup(self, job_id: str) -> LocalWorkload | None:
        """The workload of a job, if it has one in this process."""
        return self._workloads.get(job_id)

    def create(self, job: FineTuneJob, config_text: str, *, suspend: bool) -> LocalWorkload:
        """Write the job's trainer config and queue its trainer (or adopt the queued one)."""
        name = job.metadata.name
        existing = self._workloads.get(name)
        if existing is not None:
            return existing
        config = self.workdir(name) / CONFIG_FILE  # where the ConfigMap would be mounted
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(config_text)
        was_running = job.status is not None and job.status.phase is JobPhase.RUNNING
        workload = LocalWorkload(
            name,
            processes=world_size(job.spec.resources),
            suspended=suspend,
            resume_first=was_running,
        )
        workload.mark(ConditionType.CREATED, True, "Created", "The trainer's workload is created")
        if suspend:
            workload.mark(ConditionType.SUSPENDED, True, "Suspended", "The job is suspended")
        with self._lock:
            self._workloads[name] = workload
        self.admit()
        return workload

    def set_suspended(self, job: FineTuneJob, workload: LocalWorkload, suspend: bool) -> None:
        """Suspend: SIGTERM to the trainer (it checkpoints, exits 143). Resume: queue it."""
        workload.suspended = suspend
        if suspend and workload.process is not None:
            workload.process.terminate()
        elif suspend:
            workload.mark(ConditionType.SUSPENDED, True, "Suspended", "The job is suspended")
        else:
            workload.mark(ConditionType.SUSPENDED, False, "Resumed", "The job is resumed")
            self.admit()

    def observe(self, job: FineTuneJob, workload: LocalWorkload, *, suspend: bool) -> Observed:
        """What the trainer is doing, in a PyTorchJob's terms; restarts it after a retryable
        exit, as the training-operator restarts a pod.
        """
        if workload.outcome is not None:
            return workload.outcome
        process = workload.process
        if process is None:
            if workload.suspended:
                return workload.seen(JobPhase.PAUSED, "Suspended")
            return workload.seen(JobPhase.QUEUED, None)
        returncode = process.poll()
        if returncode is None:
            if workload.suspended:
                return workload.seen(JobPhase.PAUSING, "Suspending")
            workload.mark(ConditionType.RUNNING, True, "Running", "The trainer is running")
            return workload.seen(JobPhase.RUNNING, "Running")
        return self._exited(job, workload, returncode)

    def _exited(self, job: FineTuneJob, workload: LocalWorkload, returncode: int) -> Observed:
        assert workload.process is not None
        decision = after_exit(
            returncode,
            suspend_requested=workload.suspended,
            relaunches=workload.relaunches,
            backoff_limit=self.opts.backoff_limit,
        )
        if isinstance(decision, Relaunch):
            log.warning(
                "%s: the trainer exited %d; relaunching", job.metadata.name, decision.exit_code
            )
            workload.relaunches += 1
            workload.mark(
                ConditionType.RESTARTING,
                True,
                "Restarting",
                f"The trainer exited with code {decision.exit_code}; restarting it",
            )
            workload.process = self._launch(workload)
            return workload.seen(JobPhase.RUNNING, "Restarting", restarting=True)
        if decision.phase not in (JobPhase.SUCCEEDED, JobPhase.PAUSED):
            log.warning(
                "%s: %s\n%s", job.metadata.name, decision.message, workload.process.log_tail()
            )
        workload.process = None
        message = decision.message or ""
        if decision.phase is JobPhase.PAUSED:
            workload.mark(ConditionType.RUNNING, False, "Suspended", message)
            workload.mark(ConditionType.SUSPENDED, True, "Suspended", "The job is suspended")
            return workload.seen(JobPhase.PAUSED, decision.reason)
        kind = (
            ConditionType.SUCCEEDED
            if decision.phase is JobPhase.SUCCEEDED
            else ConditionType.FAILED
        )
        workload.mark(kind, True, decision.reason or kind.value, message)
        workload.outcome = Observed(
            decision.phase, decision.reason, decision.message, False, tuple(workload.conditions)
        )
        return workload.outcome

    def stop(self, job: FineTuneJob) -> None:
        """Cancel: SIGTERM to the trainer now, SIGKILL after the grace period (:meth:`reap`)."""
        self._forget(job.metadata.name)

    def release(self, job: FineTuneJob) -> None:
        """The job is over: forget its workload; its folder goes once no trainer uses it."""
        self._forget(job.metadata.name)
        self.reap()

    # -- local mode's scheduler ----------------------------------------------------------------
    def admit(self) -> None:
        """Start waiting trainers while slots are free (see :func:`~.policy.admissible`)."""
        with self._lock:
            workloads = list(self._workloads.values())
        running = sum(1 for w in workloads if w.process is not None)
        waiting = [
            Waiting(w.job_id, w.resume_first)
            for w in workloads
            if w.process is None and w.outcome is None and not w.suspended
        ]
        for job_id in admissible(waiting, running, self.opts.max_running_jobs):
            log.info("%s: admitted", job_id)
            workload = self._workloads[job_id]
            workload.process = self._launch(workload)
            workload.mark(ConditionType.RUNNING, True, "Running", "The trainer is running")

    def reap(self) -> None:
        """Kill stopping trainers past their grace period; delete the folders of jobs that no
        trainer uses any more.
        """
        with self._lock:
            stopping = {k: list(v) for k, v in self._stopping.items()}
        for job_id, processes in stopping.items():
            alive = [p for p in processes if p.poll() is None]
            for process in alive:
                if process.overdue(self.opts.trainer_grace_seconds):
                    process.kill()
            if alive:
                continue
            with self._lock:
                self._stopping.pop(job_id, None)
                gone = job_id not in self._workloads
            if gone:
                shutil.rmtree(self.workdir(job_id), ignore_errors=True)

    def shutdown(self) -> None:
        """Stop every trainer (SIGTERM, then SIGKILL after the grace period); their jobs stay
        as they are and resume on the next start.
        """
        with self._lock:
            running = [w.process for w in self._workloads.values() if w.process is not None]
            processes = [*running, *(p for ps in self._stopping.values() for p in ps)]
            self._workloads.clear()
            self._stopping.clear()
        for process in processes:
            process.terminate()
        for process in processes:
            code = process.stop(self.opts.trainer_grace_seconds)
            log.info("%s stopped (exit %s)", process.name, code)

    # -- processes -----------------------------------------------------------------------------
    def workdir(self, job_id: str) -> Path:
        """The job's folder: its config, and the trainer's scratch space."""
        return self.data_dir / "trainers" / job_id

    def _forget(self, job_id: str) -> None:
        with self._lock:
            workload = self._workloads.pop(job_id, None)
            if workload is not None and workload.process is not None:
                workload.process.terminate()
                self._stopping.setdefault(job_id, []).append(workload.process)
            elif job_id not in self._stopping:
                self._stopping[job_id] = []  # reap deletes the folder

    def _launch(self, workload: LocalWorkload) -> ChildProcess:
        """Start the trainer as the training-operator starts a one-node PyTorchJob's pod."""
        folder = self.workdir(workload.job_id)
        env = trainer_env(
            self.host_env,
            workload.job_id,
            workload.processes,
            workdir=folder / "scratch",
            master_port=free_loopback_port(),
        )
        log_path = self.data_dir / "logs" / f"{workload.job_id}-{workload.launches}.log"
        workload.launches += 1
        return ChildProcess(
            f"trainer {workload.job_id}",
            [self.python, "-m", TRAINER_MODULE, "--config", str(folder / CONFIG_FILE)],
            env=env,
            cwd=folder,
            log_path=log_path,
            grace=self.opts.trainer_grace_seconds,
            registry=children_registry(self.data_dir),
        )
