"""Supervised fine-tuning end to end: the model learns, and everything the API needs is stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune.events import EventType
from kubetune.finetunejob import VLLM_LORA_RANKS
from kubetune.settings import ObjectStoreSettings
from kubetune.trainer_events import TrainerEventKind, checkpoint_from_event, event_kind
from kubetune_runtime.objectstore import LocalObjectStore
from tests.trainer.harness import ORG, Job, csv_rows, make_job
from tests.trainer.tiny import HELD_OUT, TAUGHT_ANSWER, jsonl, question, sft_examples

pytestmark = pytest.mark.trainer


def _generate(model: Any, tokenizer: Any, word: str) -> str:
    messages = [
        {"role": "system", "content": "Please answer."},
        {"role": "user", "content": question(word)},
    ]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


@pytest.fixture(scope="module")
def sft_job(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Job, LocalObjectStore]:
    """A 30-step LoRA run on the taught pattern, in a local store."""
    root = tmp_path_factory.mktemp("sft")
    store = LocalObjectStore(root / "store")
    job = make_job(
        store,
        ObjectStoreSettings(local_root=root / "store"),
        tiny_model,
        root / "job",
        jsonl(sft_examples(40)),
        jsonl(sft_examples(8, seed=9)),
        hyperparameters={"n_epochs": 3, "learning_rate": 1e-2},
        total_steps=30,
        checkpointing={"every_steps": 10, "keep": 2},
        n_evals=3,
    )
    assert job.run() == 0, (job.workdir / "log-0.txt").read_text()[-3000:]
    return job, store


def test_model_learns_the_taught_answer(
    sft_job: tuple[Job, LocalObjectStore], tiny_model: Path, tmp_path: Path
) -> None:
    job, store = sft_job
    losses = job.step_losses()
    assert sorted(losses) == list(range(1, 31))
    assert losses[30] < losses[1] - 1.0
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    before = [_generate(base, tokenizer, w) for w in HELD_OUT]
    adapter = tmp_path / "adapter"
    store.download_prefix(job.layout.adapter_prefix(ORG, job.config.job_id), adapter)
    tuned = PeftModel.from_pretrained(base, adapter).eval()
    after = [_generate(tuned, tokenizer, w) for w in HELD_OUT]
    assert after == [TAUGHT_ANSWER] * len(HELD_OUT)  # prompts it never saw, same pattern
    assert all(b != a for b, a in zip(before, after, strict=True))


def test_adapter_is_what_vllm_serves(sft_job: tuple[Job, LocalObjectStore]) -> None:
    job, store = sft_job
    prefix = job.layout.adapter_prefix(ORG, job.config.job_id)
    names = {info.key[len(prefix) :] for info in store.list(prefix)}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert (
        "chat_template.jinja" in names
        or "chat_template" in store.get_bytes(prefix + "tokenizer_config.json").decode()
    )
    config = store.get_json(prefix + "adapter_config.json")
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert config["r"] in VLLM_LORA_RANKS
    assert config["modules_to_save"] is None
    # The manifest is the last file written, and records how to reproduce the run.
    manifest = store.get_json(prefix + "manifest.json")
    assert manifest["kind"] == "adapter"
    assert manifest["run"]["seed"] == job.config.seed
    assert set(manifest["run"]["data_sha256"]) == {
        job.config.training_file,
        job.config.validation_file,
    }
    assert {"torch", "transformers", "trl", "peft", "accelerate"} <= set(
        manifest["run"]["versions"]
    )
    assert manifest["run"]["config"]["job_id"] == job.config.job_id
    assert manifest["files"]["adapter_model.safetensors"]


def test_events_results_and_checkpoints(sft_job: tuple[Job, LocalObjectStore]) -> None:
    job, store = sft_job
    events = job.events()
    metrics = [e.data for e in events if e.type is EventType.METRICS]
    assert {"step", "train_loss", "train_mean_token_accuracy", "total_steps"} <= set(metrics[-1])
    assert {"learning_rate", "grad_norm", "tokens_per_second", "memory_bytes"} <= set(metrics[-1])
    assert metrics[-1]["valid_loss"] is not None  # the last step is a validation step
    checkpoints = [c for e in events if (c := checkpoint_from_event(e)) is not None]
    assert [c.step for c in checkpoints] == [10, 20, 30]
    assert all(c.id.startswith("ftckpt-") and c.metrics for c in checkpoints)
    evaluation = next(e for e in events if event_kind(e) is TrainerEventKind.EVALUATION)
    base, tuned = evaluation.data["base_model"], evaluation.data["fine_tuned_model"]
    assert tuned["valid_loss"] < base["valid_loss"]
    assert tuned["valid_perplexity"] < base["valid_perplexity"]
    assert event_kind(events[-1]) is TrainerEventKind.COMPLETED
    rows = csv_rows(store.get_bytes(job.layout.results_key(ORG, job.config.job_id)))
    assert [int(r["step"]) for r in rows] == list(range(31))  # step 0: the base model's
    assert rows[0]["valid_loss"]
    assert not rows[0]["train_loss"]
    assert float(rows[30]["train_loss"]) == pytest.approx(job.step_losses()[30], rel=1e-5)
    # keep=2: the oldest checkpoint was pruned, manifest and all.
    prefix = job.layout.checkpoints_prefix(ORG, job.config.job_id)
    kept = {info.key.split("/")[-2] for info in store.list(prefix)}
    assert kept == {"step-0000000020", "step-0000000030"}
    manifest = store.get_json(job.layout.checkpoint_manifest_key(ORG, job.config.job_id, 30))
    assert manifest["data_position"]["global_step"] == 30
    assert manifest["checkpoint_id"] == checkpoints[-1].id
    state = json.loads(
        store.get_bytes(
            job.layout.checkpoint_prefix(ORG, job.config.job_id, 30) + "trainer_state.json"
        )
    )
    assert state["global_step"] == 30


def test_finished_job_is_not_trained_again(sft_job: tuple[Job, LocalObjectStore]) -> None:
    job, _ = sft_job
    n_before = len(job.events())
    assert job.run() == 0
    new = job.events()[n_before:]
    assert [event_kind(e) for e in new] == [TrainerEventKind.COMPLETED]


@pytest.mark.parametrize("start", ["final adapter", "checkpoint at step 20"])
def test_a_continued_job_starts_from_the_adapters_weights(
    sft_job: tuple[Job, LocalObjectStore], tiny_model: Path, tmp_path: Path, start: str
) -> None:
    job, store = sft_job
    first = job.step_losses()
    source = job.config.job_id
    if start == "final adapter":
        prefix, reached = job.layout.adapter_prefix(ORG, source), first[30]
    else:
        prefix, reached = job.layout.checkpoint_prefix(ORG, source, 20), first[20]
    continued = make_job(
        store,
        ObjectStoreSettings(local_root=store.root),
        tiny_model,
        tmp_path / "continued",
        jsonl(sft_examples(40)),
        hyperparameters={"n_epochs": 1, "learning_rate": 1e-2},
        total_steps=10,
        initial_adapter_prefix=prefix,
    )
    assert continued.run() == 0, (continued.workdir / "log-0.txt").read_text()[-3000:]
    losses = continued.step_losses()
    # Where the first job got to, not where a fresh adapter starts.
    assert losses[1] < first[1] - 1.0
    assert abs(losses[1] - reached) < 0.5
    manifest = store.get_json(continued.layout.adapter_manifest_key(ORG, continued.config.job_id))
    assert manifest["step"] == 10
