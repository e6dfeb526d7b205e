"""Pure decisions of the local executor: what a trainer's exit means, its environment, which
queued jobs may start. The training-operator makes these decisions in a cluster; here they are
functions so they can be tested without running anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from kubetune.finetunejob import FineTuneJob, JobPhase
from kubetune.observed import Observed
from kubetune.trainer_config import world_size

SUCCESS: Final = 0
# The PyTorchJob's restartPolicy ExitCode: 1-127 are permanent, 128-255 retryable (143 after a
# SIGTERM whose checkpoint is committed, 129 for a transient failure, 137 for an OOM kill).
FIRST_RETRYABLE: Final = 128
# The part of this host's environment a trainer container would also have.
HOST_ENV: Final = ("PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "USER")
# Waiting, in the order jobs are picked (oldest first within a phase).
STARTABLE: Final = (JobPhase.QUEUED, JobPhase.RUNNING, JobPhase.PAUSED)


@dataclass(frozen=True)
class Relaunch:
    """The trainer stopped for a retryable reason: start it again (it resumes)."""

    exit_code: int


def exit_code(returncode: int) -> int:
    """A process' exit status as a container's: killed by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def after_exit(
    returncode: int, *, suspend_requested: bool, relaunches: int, backoff_limit: int
) -> Observed | Relaunch:
    """What a trainer's exit means for its job, as the training-operator would decide it.

    0 succeeds; a retryable code pauses a job whose pause was asked for, else relaunches the
    trainer until the backoff limit is spent; a permanent code (65: the user's input) fails.
    """
    code = exit_code(returncode)
    if code == SUCCESS:
        return Observed(JobPhase.SUCCEEDED, "Completed", "The trainer finished", restarting=False)
    if code >= FIRST_RETRYABLE:
        if suspend_requested:
            return Observed(JobPhase.PAUSED, "Suspended", f"exit code {code}", restarting=False)
        if relaunches < backoff_limit:
            return Relaunch(code)
        return Observed(
            JobPhase.FAILED,
            "BackoffLimitExceeded",
            f"The trainer kept failing (last exit code {code}) and has reached the specified "
            f"backoff limit of {backoff_limit} restarts",
            restarting=False,
        )
    return Observed(
        JobPhase.FAILED, "Failed", f"The trainer exited with code {code}", restarting=False
    )


def trainer_env(
    host_env: Mapping[str, str],
    job: FineTuneJob,
    *,
    workdir: Path,
    master_port: int,
) -> dict[str, str]:
    """The trainer's environment: what the training-operator gives a one-node PyTorchJob.

    All of a job's processes run on this machine, so it is one "node" with one process per
    GPU (one on a CPU); ``launch`` runs torchrun when that is more than one.
    """
    env = {k: host_env[k] for k in HOST_ENV if k in host_env}
    nproc = world_size(job.spec.resources)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "KUBETUNE_JOB_ID": job.metadata.name,
            "KUBETUNE_TRAINER_WORKDIR": str(workdir),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(master_port),
            "WORLD_SIZE": str(nproc),
            "RANK": "0",
            "PET_NNODES": "1",
            "PET_NODE_RANK": "0",
            "PET_NPROC_PER_NODE": str(nproc),
            # Everything the trainer reads is local: never reach out for models or telemetry.
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": host_env.get("WANDB_MODE", "offline"),
        }
    )
    for name, value in host_env.items():  # credentials and tracker settings, as envFrom would
        if name.startswith(("AWS_", "WANDB_", "MLFLOW_", "KUBETUNE_TRAINER_")):
            env.setdefault(name, value)
    return env


def startable(jobs: Sequence[FineTuneJob], running: int, limit: int) -> list[str]:
    """Ids of the jobs that may start a trainer now: waiting, not paused, oldest first,
    as many as free slots allow. A job that was running when the server stopped counts as
    waiting (its trainer is gone) and goes first, so it resumes before new work starts.
    """
    free = max(0, limit - running)
    waiting = [
        j
        for j in jobs
        if j.status is not None
        and j.status.phase in STARTABLE
        and not j.spec.suspend
        and not j.spec.cancel
    ]
    waiting.sort(
        key=lambda j: (j.status is None or j.status.phase is not JobPhase.RUNNING, j.metadata.name)
    )
    return [j.metadata.name for j in waiting[:free]]
