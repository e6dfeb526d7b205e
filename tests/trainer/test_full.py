"""Full fine-tuning: every weight trains, and the result is a complete model folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load
from transformers import AutoModelForCausalLM

from kubetune.settings import ObjectStoreSettings
from kubetune_runtime.objectstore import LocalObjectStore
from tests.trainer.harness import ORG, make_job
from tests.trainer.tiny import jsonl, sft_examples

pytestmark = pytest.mark.trainer


def test_full_fine_tuning_stores_a_whole_model(
    tiny_model: Path,
    local_store: tuple[LocalObjectStore, ObjectStoreSettings],
    tmp_path: Path,
) -> None:
    store, settings = local_store
    job = make_job(
        store,
        settings,
        tiny_model,
        tmp_path / "job",
        jsonl(sft_examples(40)),
        adapter={"type": "full"},
        hyperparameters={"n_epochs": 1, "learning_rate": 1e-3},
        total_steps=10,
        checkpointing={"every_steps": 5, "keep": 1},
    )
    assert job.run() == 0, (job.workdir / "log-0.txt").read_text()[-3000:]
    losses = job.step_losses()
    assert losses[10] < losses[1]
    prefix = job.layout.adapter_prefix(ORG, job.config.job_id)
    manifest = store.get_json(prefix + "manifest.json")
    assert manifest["kind"] == "model"
    assert not store.exists(prefix + "adapter_config.json")
    folder = tmp_path / "model"
    store.download_prefix(prefix, folder)
    tuned = AutoModelForCausalLM.from_pretrained(folder)
    base = load((tiny_model / "model.safetensors").read_bytes())
    changed = [
        name
        for name, weight in tuned.state_dict().items()
        if name in base and not torch.equal(weight, base[name])
    ]
    assert len(changed) >= len(base) - 2  # every trained matrix moved (norm weights may not)
