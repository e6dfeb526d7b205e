"""The image's entrypoint: the PyTorchJob environment in, torchrun in-process, our exit code out.

The training-operator starts each pod with ``MASTER_ADDR``, ``MASTER_PORT``, ``PET_NNODES``,
``PET_NODE_RANK`` and ``PET_NPROC_PER_NODE`` (and pod-level ``WORLD_SIZE``/``RANK``). This turns
them into torchrun's arguments and runs torchrun's agent in this process, because torchrun
itself exits 1 for any worker failure and for SIGTERM alike, and the PyTorchJob's
``restartPolicy: ExitCode`` needs the worker's own code (65: do not retry, 143: retry).

A one-process job skips torchrun and runs the trainer directly.

``python -m kubetune_trainer.launch --config /etc/kubetune/config.json``
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Final

from kubetune_trainer import exit_codes

log = logging.getLogger("kubetune_trainer.launch")

DEFAULT_MASTER_PORT: Final = "23456"
# How long torchrun lets workers finish their checkpoint after SIGTERM before SIGKILL; keep the
# pod's terminationGracePeriodSeconds above it.
DEFAULT_SHUTDOWN_TIMEOUT: Final = "120"


def torchrun_args(env: Mapping[str, str], trainer_args: Sequence[str]) -> list[str]:
    """Torchrun's command line for this pod, from the PyTorchJob environment."""
    return [
        "--nnodes",
        env.get("PET_NNODES", "1"),
        "--node_rank",
        env.get("PET_NODE_RANK", "0"),
        "--nproc_per_node",
        env.get("PET_NPROC_PER_NODE", "1"),
        "--master_addr",
        env.get("MASTER_ADDR", "127.0.0.1"),
        "--master_port",
        env.get("MASTER_PORT", DEFAULT_MASTER_PORT),
        "--max_restarts",
        "0",  # the PyTorchJob restarts pods; a restart resumes from the store
        "--shutdown-timeout",
        env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT),
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

    try:
        run(parse_args(torchrun_args(os.environ, trainer_args)))  # type: ignore[no-untyped-call]
    except ChildFailedError as exc:
        return exit_code_for([failure.exitcode for failure in exc.failures.values()])
    except SignalException as exc:
        # The workers got the signal too and had the shutdown timeout to commit a checkpoint.
        log.warning("stopped by signal %s", exc.sigval)
        return 128 + int(exc.sigval)
    return exit_codes.SUCCESS


if __name__ == "__main__":
    sys.exit(main())
