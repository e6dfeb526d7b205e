"""What a job's workload looks like from outside, reduced to what the job's status needs.

:class:`Observed` is the common currency of every runtime: the PyTorchJob and TrainJob runtimes
derive it from their workload's conditions, the local runtime from its trainer subprocess. The
pure lifecycle functions in :mod:`kubetune_runtime.reconcile` take it from there, so a job reads
the same wherever it ran.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.finetunejob import JobPhase


@dataclass(frozen=True)
class Waiting:
    """Why a queued job's trainer is not running, as its scheduler says (Kueue: waiting for
    quota in a queue, preempted). Shown as the job's Queued condition and, when the reason
    changes, as an event of the job.
    """

    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class Observed:
    """The phase a workload implies, why, and the conditions its controller wrote.

    ``conditions`` are the workload's own (in the training controller's shape: ``type``,
    ``status``, ``reason``, ``message``, ``lastTransitionTime``); the job mirrors those of the
    types :data:`kubetune_runtime.reconcile.MIRRORED_CONDITIONS`, so ``kubectl describe ftj``
    shows what happened to the pods. A runtime without such conditions leaves it empty.
    """

    phase: JobPhase
    reason: str | None
    message: str | None
    restarting: bool
    conditions: tuple[Mapping[str, Any], ...] = ()
    waiting: Waiting | None = None
