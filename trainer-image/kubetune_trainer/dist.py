"""Where this process sits in the job: ranks from the torchrun environment, and collectives.

Under ``torchrun`` (which the PyTorchJob's pods run) the usual ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``GROUP_RANK`` (the node) are set; without it this is one process. The
process group itself is created by accelerate (``PartialState``), which transformers' Trainer
shares, so there is exactly one — and the first creation wins: its timeout is the one every
collective keeps, whatever ``ddp_timeout`` the TrainingArguments say later.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from kubetune_trainer.errors import RetryableError


@dataclass(frozen=True)
class Topology:
    """The ranks of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0
    torchrun: bool = False  # started by torchrun's agent (a process group even for one process)

    @property
    def distributed(self) -> bool:
        """Whether the processes form a process group (FSDP and DeepSpeed need one)."""
        return self.torchrun or self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: writes events, manifests, the final adapter."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """First process of its node: downloads and uploads that node's files."""
        return self.local_rank == 0

    @classmethod
    def from_env(cls) -> Topology:
        """Read torchrun's environment (all zeros and one when not under torchrun)."""
        env = os.environ
        return cls(
            rank=int(env.get("RANK", "0")),
            world_size=int(env.get("WORLD_SIZE", "1")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            node_rank=int(env.get("GROUP_RANK", env.get("PET_NODE_RANK", "0"))),
            torchrun="TORCHELASTIC_RUN_ID" in env,
        )


def init_process_group(timeout_seconds: float, *, cuda: bool) -> None:
    """Create the process group through accelerate, with the collective timeout: gloo on the
    CPU; on CUDA, NCCL for tensors on the GPU and gloo beside it for those on the CPU (FSDP
    gathers full state dicts there).
    """
    from accelerate import PartialState

    kwargs: dict[str, object] = {"timeout": timedelta(seconds=timeout_seconds)}
    if cuda:
        kwargs["backend"] = "cuda:nccl,cpu:gloo"
    try:
        PartialState(**kwargs)
    except RuntimeError as exc:
        # Gloo and NCCL report a peer that is gone or never came (a pod restarted alone while
        # the others finished or crashed) as a bare RuntimeError; restarting every node is
        # what helps, so the pod must exit retryable, not as a permanent failure.
        raise RetryableError(f"Could not join the other nodes of the job: {exc}") from exc


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one: ranks must agree to stop."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return flag
    device = "cuda" if "nccl" in str(torch_dist.get_backend()) else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [obj]
    gathered: list[object] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


@contextmanager
def local_main_first(topology: Topology) -> Iterator[None]:
    """Run the body on each node's first process, then on the others (downloads, caches)."""
    if not topology.is_local_main:
        barrier()
    try:
        yield
    finally:
        if topology.is_local_main:
            barrier()
