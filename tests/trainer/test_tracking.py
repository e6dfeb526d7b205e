"""W&B (offline mode) and MLflow (a file store) get the run's metrics, when the job asks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kubetune.settings import ObjectStoreSettings
from kubetune_runtime.objectstore import LocalObjectStore
from tests.trainer.harness import make_job
from tests.trainer.tiny import jsonl, sft_examples

pytestmark = [
    pytest.mark.trainer,
    pytest.mark.skipif(
        importlib.util.find_spec("wandb") is None or importlib.util.find_spec("mlflow") is None,
        reason="wandb and mlflow are in the `tracking` extra: pip install -e '.[tracking]'",
    ),
]


def test_wandb_offline_and_mlflow_file_store(
    tiny_model: Path, local_store: tuple[LocalObjectStore, ObjectStoreSettings], tmp_path: Path
) -> None:
    store, settings = local_store
    mlruns = tmp_path / "mlruns"
    job = make_job(
        store,
        settings,
        tiny_model,
        tmp_path / "job",
        jsonl(sft_examples(8)),
        hyperparameters={"n_epochs": 1},
        n_train_examples=8,
        total_steps=2,
        integrations=[
            {"type": "wandb", "wandb": {"project": "kubetune-test", "tags": ["ci"]}},
            {
                "type": "mlflow",
                "mlflow": {"experiment": "kubetune-test", "trackingUri": mlruns.as_uri()},
            },
        ],
    )
    # MLflow 3 refuses a file store unless told it is wanted (it prefers a database).
    env = {"WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}
    assert job.run(env=env) == 0, (job.workdir / "log-0.txt").read_text()[-3000:]
    # W&B ran offline (no API key): its run folder holds the run's data, to sync later.
    runs = list((job.workdir / "scratch").rglob(f"offline-run-*-{job.config.job_id}"))
    assert runs, "no offline W&B run"
    assert any(p.suffix == ".wandb" for p in runs[0].iterdir())
    # MLflow logged the training loss of both steps into the file store.
    losses = list(mlruns.rglob("metrics/loss"))
    assert losses, "no MLflow loss metric"
    steps = [line.split()[2] for line in losses[0].read_text().splitlines()]
    assert steps == ["1", "2"]
