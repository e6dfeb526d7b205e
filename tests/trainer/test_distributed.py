"""Two "nodes" (two torchrun agents, gloo) as the training-operator starts them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.settings import ObjectStoreSettings
from kubetune.trainer_events import TrainerEventKind, event_kind
from kubetune_runtime.objectstore import S3ObjectStore
from tests.harness.paths import free_port
from tests.harness.s3 import S3Server
from tests.trainer.conftest import TRAIN, VALID
from tests.trainer.harness import ORG, REPO, Job, make_job, max_abs_diff, trainer_env

pytestmark = pytest.mark.trainer


def _pod_env(job: Job, s3: S3Server, port: int, node: int, extra: dict[str, str]) -> dict[str, str]:
    """What the training-operator sets on replica ``node`` of a 2-node PyTorchJob."""
    return trainer_env(
        job.workdir,
        {
            **s3.env(),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "RANK": str(node),
            "PET_NNODES": "2",
            "PET_NODE_RANK": str(node),
            "PET_NPROC_PER_NODE": "1",
            **extra,
        },
    )


def _two_nodes(
    job: Job, s3: S3Server, *, launcher: bool, extra: dict[str, str] | None = None
) -> list[int]:
    port = free_port()
    procs = []
    for node in range(2):
        if launcher:  # the image's entrypoint: PyTorchJob env → torchrun, exit code mapped
            argv = [sys.executable, "-m", "kubetune_trainer.launch"]
        else:  # plain torchrun, as a pod command would run it
            argv = [
                sys.executable, "-m", "torch.distributed.run",
                "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(port),
                "-m", "kubetune_trainer",
            ]  # fmt: skip
        log = (job.workdir / f"node-{node}-{len(list(job.workdir.glob('node-*')))}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [*argv, "--config", str(job.config_path)],
                env=_pod_env(job, s3, port, node, extra or {}),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        return [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()


def test_two_nodes_equal_one_process_with_the_same_global_batch(
    reference_run: Job,
    s3: S3Server,
    s3_store: tuple[S3ObjectStore, ObjectStoreSettings],
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    store, settings = s3_store
    job = make_job(store, settings, tiny_model, tmp_path / "job", TRAIN, VALID)
    assert _two_nodes(job, s3, launcher=False) == [0, 0]
    started = next(e for e in job.events() if event_kind(e) is TrainerEventKind.STARTED)
    assert started.data["world_size"] == 2
    assert started.data["gradient_accumulation_steps"] == 1  # reference: 1 process, 2 steps
    assert max_abs_diff(reference_run.adapter_tensors(), job.adapter_tensors()) <= 1e-5
    reference, losses = reference_run.step_losses(), job.step_losses()
    assert sorted(losses) == list(range(1, 21))
    assert all(abs(losses[s] - reference[s]) <= 1e-5 for s in reference)


def test_two_nodes_preempted_at_step_7_resume_exactly(
    reference_run: Job,
    s3: S3Server,
    s3_store: tuple[S3ObjectStore, ObjectStoreSettings],
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    store, settings = s3_store
    job = make_job(store, settings, tiny_model, tmp_path / "job", TRAIN, VALID)
    fault = {"KUBETUNE_TRAINER_FAULT_SIGTERM_AT_STEP": "7"}
    # Only rank 0 gets the signal; rank 1 learns it at the step boundary and stops too.
    assert _two_nodes(job, s3, launcher=True, extra=fault) == [143, 143]
    assert job.kinds()[-1] is TrainerEventKind.PREEMPTED
    # The manifest lists every node's files with their digests (node 1 wrote its RNG state).
    manifest = store.get_json(job.layout.checkpoint_manifest_key(ORG, job.config.job_id, 7))
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= set(
        manifest["files"]
    )
    assert _two_nodes(job, s3, launcher=True) == [0, 0]
    restarted = next(e for e in job.events() if event_kind(e) is TrainerEventKind.RESTARTED)
    assert restarted.data["step"] == 7
    assert max_abs_diff(reference_run.adapter_tensors(), job.adapter_tensors()) <= 1e-5
    reference, losses = reference_run.step_losses(), job.step_losses()
    assert all(abs(losses[s] - reference[s]) <= 1e-5 for s in range(8, 21))
