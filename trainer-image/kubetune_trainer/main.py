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
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from kubetune.events import EventLevel
from kubetune.trainer_config import TrainerConfig
from kubetune.trainer_events import TrainerEventKind
from kubetune_runtime.lease import LeaseLost
from kubetune_runtime.objectstore import ObjectStoreError
from kubetune_trainer import exit_codes
from kubetune_trainer.dist import Topology, barrier, init_process_group
from kubetune_trainer.errors import InfrastructureError, RetryableError, UserError
from kubetune_trainer.event_log import EventLog
from kubetune_trainer.run import Run
from kubetune_trainer.telemetry import Exporter

log = logging.getLogger("kubetune_trainer")

WORKDIR_ENV: Final = "KUBETUNE_TRAINER_WORKDIR"
# How often a rank waiting for its peers looks whether the job's result was published.
RESULT_POLL_SECONDS: Final = 5.0


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


# Gloo reports a peer that died mid-collective as a bare RuntimeError; these are the words of
# its TCP transport (pair.cc) for a lost peer.
_PEER_LOST: Final = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
)


def is_transient(exc: BaseException) -> bool:
    """Whether a restart may well succeed where this attempt failed."""
    if isinstance(exc, RetryableError | ObjectStoreError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, RuntimeError) and any(words in str(exc) for words in _PEER_LOST):
        return True
    module = type(exc).__module__ + "."
    return module.startswith(_TRANSIENT_MODULES)


def execute(run: Run) -> int:
    """Train, mapping failures to exit codes and error events."""
    try:
        if run.topology.is_main:
            run.events = EventLog(
                run.store,
                run.layout,
                run.config.org,
                run.config.job_id,
                flush_seconds=run.config.event_flush_seconds,
            )
        return _execute(run)
    except UserError as exc:
        _error(run, exc.message, code=exc.code, param=exc.param)
        return exit_codes.USER_ERROR
    except InfrastructureError as exc:
        _error(run, exc.message, code=exc.code, user_error=False)
        return exit_codes.INTERNAL_ERROR
    except LeaseLost as exc:
        # A trainer that took this job over writes it now; this one stops without writing.
        # Retryable: a restart in another replica's place waits for the lease.
        _error(run, f"Stopped without writing: {exc}", code="lease_lost", user_error=False)
        return exit_codes.RETRYABLE_ERROR
    except Exception as exc:
        if is_transient(exc):
            log.exception("transient failure")
            _error(run, f"Transient failure, the job will be retried: {exc}", code="retryable")
            return exit_codes.RETRYABLE_ERROR
        log.exception("training failed")
        _error(run, f"Internal error: {type(exc).__name__}: {exc}", code="internal_error")
        return exit_codes.INTERNAL_ERROR
    finally:
        run.release_lease()
        if run.events is not None:
            run.events.close()
        if run.exporter is not None:
            run.exporter.close()


def _error(
    run: Run,
    message: str,
    *,
    code: str,
    param: str | None = None,
    user_error: bool | None = None,
) -> None:
    log.error("%s", message)
    if user_error is None:
        user_error = code not in ("retryable", "internal_error")
    if run.events is not None:
        run.events.message(
            TrainerEventKind.ERROR,
            message,
            level=EventLevel.ERROR,
            flush=True,
            code=code,
            param=param,
            user_error=user_error,
        )


def _execute(run: Run) -> int:
    run.flag.install()
    from kubetune_trainer.device import cuda_diagnosis, plan_device  # torch: imported late

    run.device = plan_device(run.config)  # before any download: a node without CUDA stops now
    if run.config.resources.gpus_per_node and not run.device.cuda:
        run.warn(f"No usable CUDA device: training on the CPU ({cuda_diagnosis()})")
    # Before joining the other nodes: a pod restarted after the job's result was published
    # must end at once, not wait for peers that have finished (or never come); and the result
    # is looked for once the lease is taken, as a trainer it waited for may have published it.
    if run.topology.is_main:
        run.take_lease()
    if run.store.exists(run.layout.adapter_manifest_key(run.config.org, run.config.job_id)):
        run.message(TrainerEventKind.COMPLETED, "The adapter is already stored; nothing to do")
        return exit_codes.SUCCESS
    with _ends_once_published(run):
        if run.topology.distributed:
            log.info("rank %d: joining the job's other ranks", run.topology.rank)
            init_process_group(run.config.collective_timeout_seconds, cuda=run.device.cuda)
        _prepare_workdir(run)
    if run.topology.is_main and run.config.metrics_port is not None:
        run.exporter = Exporter(run.config.job_id)
        run.outcome["metrics_port"] = run.exporter.serve(run.config.metrics_port)
    from kubetune_trainer.training import train  # torch-heavy: imported once needed

    return train(run)


@contextmanager
def _ends_once_published(run: Run, poll_seconds: float = RESULT_POLL_SECONDS) -> Iterator[None]:
    """While the body joins the other ranks: end this process with success as soon as the job's
    result is published.

    A pod restarted just before rank 0 publishes finds no result, then waits to join a rank 0
    that has finished and will never come back, holding its node (and GPUs) until the
    collective timeout (found by tests/lifecycle/test_faults.py). Joining blocks inside the
    process group's C++ rendezvous, which nothing in Python can interrupt, so the watcher ends
    the process itself. Rank 0 holds the lease and publishes the result, so it never waits for
    one: the watcher runs on the other ranks only.
    """
    if run.topology.is_main or not run.topology.distributed:
        yield
        return
    key = run.layout.adapter_manifest_key(run.config.org, run.config.job_id)
    joined = threading.Event()

    def watch() -> None:
        while not joined.wait(poll_seconds):
            try:
                published = run.store.exists(key)
            except ObjectStoreError:
                continue  # the store is down: the join goes on, look again later
            if published and not joined.is_set():
                log.info("the job's result was published while this rank waited for its peers")
                logging.shutdown()
                os._exit(exit_codes.SUCCESS)

    watcher = threading.Thread(target=watch, name="result-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        joined.set()
        watcher.join()


def _prepare_workdir(run: Run) -> None:
    if run.topology.is_local_main:
        shutil.rmtree(run.workdir / "checkpoints", ignore_errors=True)
        run.workdir.mkdir(parents=True, exist_ok=True)
    barrier()


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
    return execute(Run(config, topology, default_workdir(config, topology)))
