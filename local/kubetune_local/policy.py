"""Pure decisions of the subprocess runtime: what a trainer's exit means, its environment, which
waiting trainers may start, and the conditions its workload carries. The training-operator (and
Kueue) make these decisions in a cluster; here they are functions so they can be tested without
running anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from kubetune.finetunejob import ConditionType, JobPhase
from kubetune_runtime.observed import Observed

SUCCESS: Final = 0
# The PyTorchJob's restartPolicy ExitCode: 1-127 are permanent, 128-255 retryable (143 after a
# SIGTERM whose checkpoint is committed, 129 for a transient failure, 137 for an OOM kill).
FIRST_RETRYABLE: Final = 128
# The part of this host's environment a trainer container would also have.
HOST_ENV: Final = ("PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "USER")


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
    job_id: str,
    nproc: int,
    *,
    workdir: Path,
    master_port: int,
) -> dict[str, str]:
    """The trainer's environment: what the training-operator gives a one-node PyTorchJob.

    All of a job's ``nproc`` processes run on this machine, so it is one "node" with one
    process per GPU (one on a CPU); ``launch`` runs torchrun when that is more than one.
    """
    env = {k: host_env[k] for k in HOST_ENV if k in host_env}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "KUBETUNE_JOB_ID": job_id,
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


@dataclass(frozen=True)
class Waiting:
    """A trainer waiting for a slot: its job, and whether it was running when local mode
    stopped (it then resumes before new work starts).
    """

    job_id: str
    resume_first: bool


def admissible(waiting: Iterable[Waiting], running: int, limit: int) -> list[str]:
    """Ids of the waiting trainers that may start now: interrupted ones first, then oldest
    first (job ids are time-ordered), as many as free slots allow. Local mode's stand-in for
    a cluster's queue (Kueue): a job waits in ``queued`` until it is admitted.
    """
    free = max(0, limit - running)
    order = sorted(waiting, key=lambda w: (not w.resume_first, w.job_id))
    return [w.job_id for w in order[:free]]


Conditions = list[dict[str, str]]


def update_conditions(
    conditions: Sequence[Mapping[str, str]],
    type_: ConditionType,
    status: bool,
    reason: str,
    message: str,
    *,
    now: datetime,
) -> Conditions:
    """``conditions`` with ``type_`` set, by the training-operator's rules for a job's
    conditions (``UpdateJobConditions``): nothing changes once the job failed; a condition's
    transition time stays while its status does; Running and Restarting replace each other;
    Succeeded and Failed turn Running False. The job driver mirrors them into the FineTuneJob,
    as it mirrors a PyTorchJob's.
    """
    current = [dict(c) for c in conditions]
    if any(c["type"] == ConditionType.FAILED and c["status"] == "True" for c in current):
        return current
    wanted = "True" if status else "False"
    old = next((c for c in current if c["type"] == type_), None)
    if old is not None and (old["status"], old.get("reason")) == (wanted, reason):
        return current
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    new = {
        "type": type_.value,
        "status": wanted,
        "reason": reason,
        "message": message,
        "lastTransitionTime": old["lastTransitionTime"]
        if old is not None and old["status"] == wanted
        else stamp,
    }
    replaced = {type_} | _REPLACES.get(type_, set())
    kept = [c for c in current if c["type"] not in replaced]
    if type_ in (ConditionType.SUCCEEDED, ConditionType.FAILED):
        kept = [{**c, "status": "False"} if c["type"] == ConditionType.RUNNING else c for c in kept]
    return [*kept, new]


_REPLACES: Final[dict[ConditionType, set[ConditionType]]] = {
    ConditionType.RUNNING: {ConditionType.RESTARTING},
    ConditionType.RESTARTING: {ConditionType.RUNNING},
}
