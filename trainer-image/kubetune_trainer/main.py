"""The trainer's entrypoint: ``python -m kubetune_trainer --config config.json`` (or torchrun).

One run: fetch the base model and the data, resume from the newest committed checkpoint if
there is one, train, evaluate, and write the adapter, the results file and the run manifest
to the object store. The exit code tells the PyTorchJob what to do next (see exit_codes).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from kubetune.events import EventLevel
from kubetune.finetunejob import MethodType
from kubetune.objectstore import ObjectNotFound, ObjectStore, ObjectStoreError, open_object_store
from kubetune.trainer_config import TrainerConfig, is_adapter
from kubetune.trainer_events import TrainerEventKind
from kubetune_trainer import exit_codes
from kubetune_trainer.callbacks import PreemptionFlag
from kubetune_trainer.checkpoints import CheckpointStore, CommittedCheckpoint, read_kubetune_state
from kubetune_trainer.dist import Topology, barrier, broadcast_object, init_process_group
from kubetune_trainer.errors import RetryableError, UserError
from kubetune_trainer.event_log import EventLog
from kubetune_trainer.results import Results
from kubetune_trainer.telemetry import Exporter

log = logging.getLogger("kubetune_trainer")

WORKDIR_ENV: Final = "KUBETUNE_TRAINER_WORKDIR"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(prog="kubetune_trainer", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="Resolved trainer config.")
    return parser.parse_args(argv)


def default_workdir(config: TrainerConfig, topology: Topology) -> Path:
    """Scratch space of this node (checkpoints, downloads); one per node, shared by its ranks."""
    root = os.environ.get(WORKDIR_ENV)
    base = Path(root) if root else Path(tempfile.gettempdir()) / "kubetune-trainer"
    return base / config.job_id / f"node-{topology.node_rank}"


# Failures of the infrastructure rather than of the code or the input: the object store (boto
# and its HTTP stack), the network, and collectives whose peer is gone.
_TRANSIENT_MODULES: Final = ("botocore.", "urllib3.", "torch.distributed")


def is_transient(exc: BaseException) -> bool:
    """Whether a restart may well succeed where this attempt failed."""
    if isinstance(exc, RetryableError | ObjectStoreError | ConnectionError | TimeoutError):
        return True
    module = type(exc).__module__ + "."
    return module.startswith(_TRANSIENT_MODULES)


class Run:
    """One attempt at a job; :meth:`execute` returns the exit code."""

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

    # -- the whole attempt -----------------------------------------------------------------
    def execute(self) -> int:
        """Train, mapping failures to exit codes and error events."""
        try:
            if self.topology.is_main:
                self.events = EventLog(
                    self.store,
                    self.layout,
                    self.config.org,
                    self.config.job_id,
                    flush_seconds=self.config.event_flush_seconds,
                )
            return self._execute()
        except UserError as exc:
            self._error(exc.message, code=exc.code, param=exc.param)
            return exit_codes.USER_ERROR
        except Exception as exc:
            if is_transient(exc):
                log.exception("transient failure")
                self._error(f"Transient failure, the job will be retried: {exc}", code="retryable")
                return exit_codes.RETRYABLE_ERROR
            log.exception("training failed")
            self._error(f"Internal error: {type(exc).__name__}: {exc}", code="internal_error")
            return exit_codes.INTERNAL_ERROR
        finally:
            if self.events is not None:
                self.events.close()
            if self.exporter is not None:
                self.exporter.close()

    def _error(self, message: str, *, code: str, param: str | None = None) -> None:
        log.error("%s", message)
        if self.events is not None:
            self.events.message(
                TrainerEventKind.ERROR,
                message,
                level=EventLevel.ERROR,
                flush=True,
                code=code,
                param=param,
                user_error=code not in ("retryable", "internal_error"),
            )

    def _execute(self) -> int:
        self.flag.install()
        if self.topology.world_size > 1:
            init_process_group()
        if self.store.exists(self.layout.adapter_manifest_key(self.config.org, self.config.job_id)):
            self.message(TrainerEventKind.COMPLETED, "The adapter is already stored; nothing to do")
            return exit_codes.SUCCESS
        self._prepare_workdir()
        if self.topology.is_main and self.config.metrics_port is not None:
            self.exporter = Exporter(self.config.job_id)
            self.outcome["metrics_port"] = self.exporter.serve(self.config.metrics_port)
        from kubetune_trainer.training import train  # torch-heavy: imported once needed

        return train(self)

    def _prepare_workdir(self) -> None:
        if self.topology.is_local_main:
            shutil.rmtree(self.workdir / "checkpoints", ignore_errors=True)
            self.workdir.mkdir(parents=True, exist_ok=True)
        barrier()

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

    def checkpoint_store(self) -> CheckpointStore:
        """The checkpoints of this job."""
        return CheckpointStore(self.store, self.layout, self.config.org, self.config.job_id)

    def newest_checkpoint(self) -> CommittedCheckpoint | None:
        """The checkpoint to resume from, the same on every rank."""
        found = self.checkpoint_store().newest() if self.topology.is_main else None
        result = broadcast_object(found)
        assert result is None or isinstance(result, CommittedCheckpoint)
        return result

    def fetch_checkpoint(self, checkpoint: CommittedCheckpoint) -> tuple[Path, dict[str, Any]]:
        """Download the checkpoint on each node; return its folder and kubetune's state."""
        folder = self.workdir / "checkpoints"
        if self.topology.is_local_main:
            path = self.checkpoint_store().download(checkpoint, folder)
        barrier()
        path = folder / f"checkpoint-{checkpoint.step}"
        return path, read_kubetune_state(path)

    def restore(self, state: dict[str, Any]) -> tuple[Results, dict[str, float] | None]:
        """Results rows and the base model's evaluation kept in a checkpoint."""
        return Results.from_state(state.get("results", [])), state.get("base_eval")

    def is_dpo(self) -> bool:
        """Whether this run is DPO."""
        return self.config.method is MethodType.DPO

    def is_adapter(self) -> bool:
        """Whether this run trains a LoRA adapter."""
        return is_adapter(self.config)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the trainer; returns the process exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    try:
        config = TrainerConfig.model_validate_json(args.config.read_text())
    except (OSError, ValidationError) as exc:
        # The config is written by the operator, not the user: a bad one is our bug.
        log.error("cannot read the trainer config %s: %s", args.config, exc)
        return exit_codes.INTERNAL_ERROR
    topology = Topology.from_env()
    return Run(config, topology, default_workdir(config, topology)).execute()
