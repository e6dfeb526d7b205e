"""Merging a LoRA model into its base: the merged model answers as the base with the adapter
on, is published whole (manifest last, every file's sha256) and only once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune.settings import ObjectStoreSettings
from kubetune.storage_layout import ADAPTER_FILES, MANIFEST_NAME
from kubetune_runtime.objectstore import LocalObjectStore
from kubetune_trainer import exit_codes
from kubetune_trainer.checkpoints import file_digests
from tests.trainer.harness import ORG, REPO, Job, make_job, trainer_env
from tests.trainer.tiny import jsonl, sft_examples

# One training run serves both tests: keep them on one worker.
pytestmark = [pytest.mark.trainer, pytest.mark.xdist_group("merge")]


def _merge(job: Job, step: int | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "kubetune_trainer.merge", "--config", str(job.config_path)]
    return subprocess.run(
        [*argv, *([] if step is None else ["--step", str(step)])],
        env=trainer_env(job.workdir),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids=ids).logits
    return logits


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """A 20-step LoRA job (checkpoints at 15 and 20 kept), trained once for these tests (each
    merges other models of it).
    """
    root = tmp_path_factory.mktemp("merge")
    store, settings = (
        LocalObjectStore(root / "store"),
        ObjectStoreSettings(local_root=root / "store"),
    )
    job = make_job(store, settings, tiny_model, root / "job", jsonl(sft_examples(40)))
    assert job.run() == 0, (job.workdir / "log-0.txt").read_text()[-3000:]
    return job


def test_the_merged_model_answers_as_the_base_with_the_adapter_on(
    trained: Job, tiny_model: Path, tmp_path: Path
) -> None:
    job, layout, store = trained, trained.layout, trained.store
    proc = _merge(job)
    assert proc.returncode == exit_codes.SUCCESS, proc.stderr[-3000:]

    merged = store.download_prefix(layout.merged_prefix(ORG, job.config.job_id), tmp_path / "m")
    folder = tmp_path / "m"
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    # Every file is listed with the sha256 of what was published, and nothing else is there.
    assert manifest["files"] == {
        k: v for k, v in file_digests(folder).items() if k != MANIFEST_NAME
    }
    assert {p.name for p in merged} >= {"config.json", "model.safetensors", MANIFEST_NAME}
    assert manifest["model"] == job.config.fine_tuned_model
    assert manifest["source"]["kind"] == "adapter"

    adapter = tmp_path / "adapter"
    store.download_prefix(
        layout.adapter_prefix(ORG, job.config.job_id), adapter, only=list(ADAPTER_FILES)
    )
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    base_logits = _logits(base, ids)
    with_adapter = _logits(PeftModel.from_pretrained(base, adapter).eval(), ids)
    merged_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    # A plain model now: no LoRA layers left, and the same answers as base + adapter.
    assert not any("lora" in name for name, _ in merged_model.named_parameters())
    assert torch.allclose(_logits(merged_model, ids), with_adapter, atol=1e-5)
    assert not torch.allclose(with_adapter, base_logits, atol=1e-3)  # the adapter did learn
    # The tokenizer came along with the chat template the job trained with.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_a_merge_is_done_once_and_a_checkpoint_gone_is_a_user_error(trained: Job) -> None:
    job, layout, store = trained, trained.layout, trained.store
    assert _merge(job, 15).returncode == exit_codes.SUCCESS
    key = layout.merged_manifest_key(ORG, job.config.job_id, 15)
    first = store.get_bytes(key)
    again = _merge(job, 15)
    # Already published: nothing is loaded or written again.
    assert again.returncode == exit_codes.SUCCESS
    assert "merged already" in again.stderr
    assert store.get_bytes(key) == first
    # Step 5 was a checkpoint once, but only the newest two are kept.
    gone = _merge(job, 5)
    assert gone.returncode == exit_codes.USER_ERROR
    assert "no longer stored" in gone.stderr
    assert not store.exists(layout.merged_manifest_key(ORG, job.config.job_id, 5))
    # ...and says so in the store, where the operator (which reads no pod logs) finds it.
    failure = store.get_json(layout.merge_failure_key(ORG, job.config.job_id, 5))
    assert "no longer stored" in failure["message"]
