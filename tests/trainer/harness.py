"""Helpers to set up a trainer job in an object store, run the trainer and read what it wrote."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.events import EventType, JobEvent, read_events
from kubetune.finetunejob import Resources
from kubetune.ids import new_file_id, new_job_id
from kubetune.settings import ObjectStoreSettings
from kubetune.trainer_config import BaseModelSource, ResolvedHyperparameters, TrainerConfig
from kubetune.trainer_events import TrainerEventKind, event_kind
from kubetune_runtime.objectstore import ObjectStore

REPO = Path(__file__).resolve().parents[2]
ORG = "default"


@dataclass
class Job:
    """A trainer job whose files are in ``store``."""

    config: TrainerConfig
    config_path: Path
    store: ObjectStore
    workdir: Path

    @property
    def layout(self) -> Any:
        """The store's key builder."""
        return self.config.object_store.layout()

    def events(self) -> list[JobEvent]:
        """Every event written so far, oldest first."""
        return read_events(self.store, self.layout.events_prefix(ORG, self.config.job_id))

    def kinds(self) -> list[TrainerEventKind | None]:
        """The trainer kinds of the message events, in order."""
        return [event_kind(e) for e in self.events() if e.type is EventType.MESSAGE]

    def step_losses(self) -> dict[int, float]:
        """Train loss by step, from the metrics events (a repeated step keeps the last)."""
        return {
            e.data["step"]: e.data["train_loss"]
            for e in self.events()
            if e.type is EventType.METRICS and "train_loss" in e.data
        }

    def adapter_tensors(self) -> dict[str, Any]:
        """The final adapter's tensors."""
        from safetensors.torch import load

        key = self.layout.adapter_prefix(ORG, self.config.job_id) + "adapter_model.safetensors"
        return dict(load(self.store.get_bytes(key)))

    def run(self, *, env: dict[str, str] | None = None, timeout: float = 180) -> int:
        """Run ``python -m kubetune_trainer`` to its end; returns the exit code."""
        proc = subprocess.run(
            [sys.executable, "-m", "kubetune_trainer", "--config", str(self.config_path)],
            env=trainer_env(self.workdir, env),
            cwd=REPO,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        (self.workdir / f"log-{len(list(self.workdir.glob('log-*')))}.txt").write_bytes(
            proc.stdout + proc.stderr
        )
        return proc.returncode


def trainer_env(workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a trainer subprocess: the repo importable, scratch in ``workdir``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KUBETUNE_", "PET_", "WANDB_", "MLFLOW_"))
    }
    env.update(
        {
            "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'trainer-image'}",
            "KUBETUNE_TRAINER_WORKDIR": str(workdir / "scratch"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update(extra or {})
    return env


def make_job(
    store: ObjectStore,
    settings: ObjectStoreSettings,
    model_path: Path,
    workdir: Path,
    train: bytes,
    valid: bytes | None = None,
    **overrides: Any,
) -> Job:
    """Upload the data, write a config for it and return the job."""
    layout = settings.layout()
    train_id = new_file_id()
    store.put_bytes(layout.file_key(ORG, train_id), train)
    valid_id = None
    if valid is not None:
        valid_id = new_file_id()
        store.put_bytes(layout.file_key(ORG, valid_id), valid)
    hp = {
        "n_epochs": 2,
        "batch_size": 4,
        "learning_rate_multiplier": 1.0,
        "learning_rate": 5e-3,
        "warmup_ratio": 0.0,
        "micro_batch_size": 2,
        **overrides.pop("hyperparameters", {}),
    }
    fields: dict[str, Any] = {
        "job_id": new_job_id(),
        "org": ORG,
        "fine_tuned_model": "ft:tiny-llama:default::test",
        "base_model": BaseModelSource(name="tiny-llama", path=str(model_path), context_length=256),
        "training_file": train_id,
        "validation_file": valid_id,
        "object_store": settings,
        "hyperparameters": ResolvedHyperparameters(**hp),
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.1},
        "checkpointing": {"every_steps": 5, "keep": 2},
        "resources": Resources(gpus_per_node=0),  # the CPU: a GPU job would need CUDA
        "seed": 1234,
        "max_seq_length": 128,
        "n_evals": 2 if valid is not None else 0,
        "n_train_examples": 40,
        "total_steps": 20,
        "metrics_port": None,
        **overrides,
    }
    config = TrainerConfig(**fields)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.json"
    path.write_text(config.model_dump_json(indent=2))
    return Job(config, path, store, workdir)


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest elementwise difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def sigterm(pid: int) -> None:
    """Send SIGTERM, as the kubelet does to a preempted pod."""
    os.kill(pid, signal.SIGTERM)


def csv_rows(data: bytes) -> list[dict[str, str]]:
    """Rows of a CSV file."""
    import csv

    return list(csv.DictReader(io.StringIO(data.decode())))
