"""The image's entrypoint: the training controller's environment in, torchrun in-process, our exit
code out.

Kubeflow Trainer v2 starts each node's pod with ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK`` (the Job's completion index), ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``; the
training-operator 1.x with ``MASTER_ADDR``/``MASTER_PORT`` and the same ``PET_*`` counts (and
pod-level ``WORLD_SIZE``/``RANK``). This turns either into torchrun's arguments and runs
torchrun's agent in this process, because torchrun itself exits 1 for any worker failure and
for SIGTERM alike, and the controller's failure policy (a PyTorchJob's ``restartPolicy:
ExitCode``, a TrainJob's pod failure policy) needs the worker's own code (65: do not retry,
143: retry).

A one-process job skips torchrun and runs the trainer directly.

``python -m kubetune_trainer.launch --config /etc/kubetune/config.json``
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from kubetune.trainer_config import DEFAULT_STOP_GRACE_SECONDS
from kubetune_trainer import exit_codes

log = logging.getLogger("kubetune_trainer.launch")

DEFAULT_MASTER_PORT: Final = "23456"
# What torchrun's agent keeps of the pod's grace period for itself after its workers' share:
# forwarding SIGTERM, reaping the workers, and exiting with their code before the kubelet's
# SIGKILL.
AGENT_GRACE_SECONDS: Final = 15.0
# How long torchrun's agent waits at exit for the other nodes' agents (its "exit barrier",
# 300 s by default; see shorten_exit_barrier).
EXIT_BARRIER_SECONDS: Final = 30.0


def shorten_exit_barrier(seconds: float = EXIT_BARRIER_SECONDS) -> None:
    """Make torchrun's agent wait at most ``seconds`` for the other nodes' agents once its own
    workers finished.

    The exit barrier guards scripts whose nodes must end together; ours need none (rank 0
    publishes the result and nothing waits for peers after it). But a node restarted just
    before the result was published never reaches the barrier (its trainer waits for a rank 0
    that is gone), and the master's pod then stays up for the default five minutes before the
    job can succeed (found by tests/lifecycle/test_faults.py). torchrun has no option for it,
    so the launcher, a process that runs only torchrun's agent, sets the agent's default.
    """
    import functools

    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    init: Any = vars(LocalElasticAgent)["__init__"]
    if isinstance(init, functools.partialmethod):  # set already: keep the original underneath
        init = init.func
    LocalElasticAgent.__init__ = functools.partialmethod(  # type: ignore[method-assign,assignment]
        init, exit_barrier_timeout=seconds
    )


def shutdown_timeout(stop_grace_seconds: float) -> int:
    """How long torchrun lets workers commit their checkpoint after SIGTERM before SIGKILL, in
    whole seconds (torchrun's unit): the pod's grace period but the agent's share (half of it
    when the period is short).
    """
    return max(1, int(max(stop_grace_seconds - AGENT_GRACE_SECONDS, stop_grace_seconds / 2)))


def stop_grace_seconds(trainer_args: Sequence[str]) -> float:
    """The pod's grace period, from the trainer config named by ``--config`` (its default when
    the config cannot be read: the trainer itself then reports why).
    """
    from kubetune.trainer_config import DEFAULT_STOP_GRACE_SECONDS, TrainerConfig

    args = list(trainer_args)
    try:
        path = Path(args[args.index("--config") + 1])
        return TrainerConfig.model_validate_json(path.read_text()).stop_grace_seconds
    except (ValueError, IndexError, OSError):
        return DEFAULT_STOP_GRACE_SECONDS


def torchrun_args(
    env: Mapping[str, str],
    trainer_args: Sequence[str],
    grace_seconds: float = DEFAULT_STOP_GRACE_SECONDS,
) -> list[str]:
    """Torchrun's command line for this pod, from the PyTorchJob or TrainJob environment and
    the pod's grace period after SIGTERM.
    """
    return [
        "--nnodes",
        env.get("PET_NNODES", "1"),
        "--node_rank",
        env.get("PET_NODE_RANK", "0"),
        "--nproc_per_node",
        env.get("PET_NPROC_PER_NODE", "1"),
        "--master_addr",
        env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR", "127.0.0.1"),
        "--master_port",
        env.get("PET_MASTER_PORT") or env.get("MASTER_PORT", DEFAULT_MASTER_PORT),
        "--max_restarts",
        "0",  # the PyTorchJob restarts pods; a restart resumes from the store
        "--shutdown-timeout",
        str(shutdown_timeout(grace_seconds)),
        "-m",
        "kubetune_trainer",
        *trainer_args,
    ]


def exit_code_for(codes: Sequence[int]) -> int:
    """One exit code for the pod from its workers' codes (negative: killed by that signal)."""
    normalized = [128 - code if code < 0 else code for code in codes]
    for wanted in (exit_codes.USER_ERROR, exit_codes.INTERNAL_ERROR):
        if wanted in normalized:
            return wanted
    failed = [code for code in normalized if code != exit_codes.SUCCESS]
    return failed[0] if failed else exit_codes.SUCCESS


def is_single_process(env: Mapping[str, str]) -> bool:
    """Whether the job is one process on one node (no torchrun needed)."""
    return env.get("PET_NNODES", "1") == "1" and env.get("PET_NPROC_PER_NODE", "1") == "1"


def main(argv: Sequence[str] | None = None) -> int:
    """Launch the trainer for this pod; returns the pod's exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    trainer_args = list(sys.argv[1:] if argv is None else argv)
    if is_single_process(os.environ):
        from kubetune_trainer.main import main as trainer_main

        return trainer_main(trainer_args)
    # The operator's WORLD_SIZE/RANK count pods; torchrun sets the per-process ones itself.
    for name in ("WORLD_SIZE", "RANK"):
        os.environ.pop(name, None)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    shorten_exit_barrier()
    try:
        grace = stop_grace_seconds(trainer_args)
        run(parse_args(torchrun_args(os.environ, trainer_args, grace)))  # type: ignore[no-untyped-call]
    except ChildFailedError as exc:
        return exit_code_for([failure.exitcode for failure in exc.failures.values()])
    except SignalException as exc:
        # The workers got the signal too and had the shutdown timeout to commit a checkpoint.
        log.warning("stopped by signal %s", exc.sigval)
        return 128 + int(exc.sigval)
    return exit_codes.SUCCESS


if __name__ == "__main__":
    sys.exit(main())
