"""One attempt at a job, as every part of the trainer sees it (:class:`Run`).

The entrypoint (:mod:`kubetune_trainer.main`) builds it, the training module
(:mod:`kubetune_trainer.training`) sets it up and trains, and the callback
(:mod:`kubetune_trainer.callbacks`) reports and checkpoints through it. It imports none of
them, so none of them imports another in a circle.
"""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path
from typing import Any

from kubetune.events import EventLevel
from kubetune.finetunejob import MethodType
from kubetune.trainer_config import TrainerConfig, is_adapter
from kubetune.trainer_events import TrainerEventKind
from kubetune_runtime.lease import LeaseRecord, WriterLease
from kubetune_runtime.objectstore import ObjectNotFound, ObjectStore, open_object_store
from kubetune_trainer.checkpoints import (
    CheckpointStore,
    CommittedCheckpoint,
    damaged_files,
    read_kubetune_state,
)
from kubetune_trainer.device import CPU, Device
from kubetune_trainer.dist import Topology, any_rank, barrier, broadcast_object
from kubetune_trainer.errors import UserError
from kubetune_trainer.event_log import EventLog
from kubetune_trainer.results import Results
from kubetune_trainer.telemetry import Exporter

log = logging.getLogger(__name__)


class PreemptionFlag:
    """Set by SIGTERM; read at step boundaries."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        """Handle SIGTERM from now on (the default handler would kill us mid-write)."""
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: checkpointing at the end of this step")
        self.requested = True


class Run:
    """One attempt at a job: what every part of the run reads and fills in.

    Built by :mod:`kubetune_trainer.main`; :mod:`kubetune_trainer.training` sets the training
    fields up (``run_manifest``, ``n_params``, restored ``results`` and ``base_eval``) and the
    callback reads and updates them, so a checkpoint and the final manifest carry them.
    """

    def __init__(self, config: TrainerConfig, topology: Topology, workdir: Path) -> None:
        self.config = config
        self.topology = topology
        self.workdir = workdir
        self.store: ObjectStore = open_object_store(config.object_store)
        self.layout = config.object_store.layout()
        self.events: EventLog | None = None
        self.exporter: Exporter | None = None
        self.flag = PreemptionFlag()
        self.outcome: dict[str, Any] = {}
        self.checkpoints = CheckpointStore(self.store, self.layout, config.org, config.job_id)
        # Set up by training.train before the first step.
        self.run_manifest: dict[str, Any] = {}
        self.n_params = 0
        self.n_train_rows = config.n_train_examples  # several examples each when packing
        self.results = Results()
        self.base_eval: dict[str, float] | None = None
        # Set by the entrypoint before anything else (see kubetune_trainer.device).
        self.device: Device = CPU
        self.lease: WriterLease | None = None  # rank 0's, once taken

    # -- the writer lease (see kubetune_runtime.lease) -------------------------------------
    def take_lease(self) -> None:
        """Become the job's one writer (rank 0), waiting while another trainer is."""
        self.lease = WriterLease(
            self.store,
            self.layout.writer_lease_key(self.config.org, self.config.job_id),
            ttl_seconds=self.config.writer_lease_seconds,
        )
        self.lease.acquire(on_wait=self._waiting_for)

    def _waiting_for(self, holder: LeaseRecord) -> None:
        log.warning("the writer lease is held by %s: waiting", holder.holder)
        if self.events is not None:  # at once: the wait may be long
            self.events.message(
                TrainerEventKind.WARNING,
                f"Another trainer ({holder.holder}) is writing this job; waiting until it "
                f"stops or its lease expires ({holder.ttl_seconds:.0f} s after its last "
                "renewal)",
                level=EventLevel.WARN,
                flush=True,
                holder=holder.holder,
            )

    def ensure_writer(self) -> None:
        """Renew the lease before a write that publishes; ``LeaseLost`` when another trainer
        took the job over (ranks other than 0 hold none and never publish).
        """
        if self.lease is not None:
            self.lease.ensure_held()

    def release_lease(self) -> None:
        """Give the lease back (every ending but a hard crash)."""
        if self.lease is not None:
            self.lease.release()

    # -- helpers the training module uses --------------------------------------------------
    def message(self, kind: TrainerEventKind, message: str, **data: Any) -> None:
        """A message event of ``kind`` (rank 0)."""
        if self.events is not None:
            self.events.message(kind, message, **data)

    def warn(self, message: str, **data: Any) -> None:
        """A warning event (rank 0)."""
        if self.events is not None:
            self.events.message(TrainerEventKind.WARNING, message, level=EventLevel.WARN, **data)

    def read_file(self, file_id: str, param: str) -> bytes:
        """The bytes of an uploaded file; a missing one is the user's error."""
        try:
            return self.store.get_bytes(self.layout.file_key(self.config.org, file_id))
        except ObjectNotFound:
            raise UserError(
                f"{param} {file_id} does not exist", code="invalid_file", param=param
            ) from None

    def resume_point(self) -> tuple[CommittedCheckpoint, Path] | None:
        """The newest committed checkpoint that is intact on every node, downloaded into each
        node's scratch space (the same on every rank); None to start afresh.

        A checkpoint whose files do not match its manifest is uncommitted, with a warning
        event, and the one before it is tried: a torn or damaged checkpoint costs the steps
        since the previous one, never the run.
        """
        steps = broadcast_object(
            self.checkpoints.committed_steps() if self.topology.is_main else None
        )
        assert isinstance(steps, list)
        folder = self.workdir / "checkpoints"
        for step in steps:
            checkpoint = broadcast_object(
                self.checkpoints.load(step) if self.topology.is_main else None
            )
            assert isinstance(checkpoint, CommittedCheckpoint)
            damaged: list[str] = []
            if self.topology.is_local_main:
                path = self.checkpoints.download(checkpoint, folder)
                damaged = damaged_files(path, checkpoint.manifest)
            barrier()
            path = folder / f"checkpoint-{step}"
            if not any_rank(bool(damaged)):
                return checkpoint, path
            self._discard(step, path, damaged)
        return None

    def _discard(self, step: int, path: Path, damaged: list[str]) -> None:
        where = ", ".join(damaged[:3]) if damaged else "on another node"
        log.warning("checkpoint of step %s is damaged (%s): not resuming from it", step, where)
        self.warn(
            f"The checkpoint of step {step} does not match its manifest ({where}); resuming from "
            "the one before it",
            step=step,
            files=damaged[:20],
        )
        if self.topology.is_main:
            self.checkpoints.uncommit(step)
        if self.topology.is_local_main:
            shutil.rmtree(path, ignore_errors=True)
        barrier()

    def restore(self, path: Path) -> tuple[Results, dict[str, float] | None]:
        """Results rows and the base model's evaluation kept in the downloaded checkpoint."""
        state = read_kubetune_state(path)
        return Results.from_state(state.get("results", [])), state.get("base_eval")

    def is_dpo(self) -> bool:
        """Whether this run is DPO."""
        return self.config.method is MethodType.DPO

    def is_adapter(self) -> bool:
        """Whether this run trains a LoRA adapter."""
        return is_adapter(self.config)
