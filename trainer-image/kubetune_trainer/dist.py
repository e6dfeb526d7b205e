"""Where this process sits in the job: ranks from the torchrun environment, and collectives.

Under ``torchrun`` (which the PyTorchJob's pods run) the usual ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``GROUP_RANK`` (the node) are set; without it this is one process. The
process group itself is created by accelerate (``PartialState``), which transformers' Trainer
shares, so there is exactly one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Topology:
    """The ranks of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0

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
        )


def init_process_group() -> None:
    """Create the process group through accelerate (gloo on CPU, NCCL on GPU)."""
    from accelerate import PartialState

    PartialState()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one: ranks must agree to stop."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return flag
    device = "cuda" if torch_dist.get_backend() == "nccl" else "cpu"
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
