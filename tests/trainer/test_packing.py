"""Packing: several examples per training row, none attending to another, and a plan in rows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from torch.nn import functional
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from kubetune.events import EventType
from kubetune.finetunejob import MethodType
from kubetune.settings import ObjectStoreSettings
from kubetune.trainer_events import TrainerEventKind, event_kind
from kubetune_runtime.objectstore import LocalObjectStore
from kubetune_trainer.data import ChatRenderer, load_file, pack_rows, tokenize_supervised
from tests.trainer.harness import ORG, make_job
from tests.trainer.tiny import jsonl, sft_examples

pytestmark = pytest.mark.trainer

MAX_LEN = 128


def _examples(tokenizer: Any, n: int) -> Dataset:
    loaded = load_file(jsonl(sft_examples(n)), "file-x", MethodType.SUPERVISED, param="t")
    columns, _ = tokenize_supervised(loaded, ChatRenderer(tokenizer, MAX_LEN))
    return Dataset.from_dict(columns)


def _nll_sum(model: Any, labels: torch.Tensor, **inputs: torch.Tensor) -> float:
    """The summed next-token loss over the labelled tokens of one forward pass, without a
    KV cache as SFTTrainer.compute_loss runs it (a cache turns the packed-sequence mask off).
    """
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    return float(
        functional.cross_entropy(
            logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum"
        )
    )


def test_packed_examples_attend_only_to_themselves(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    examples = _examples(tokenizer, 12)
    rows = pack_rows(examples, MAX_LEN)

    # Fewer, fuller rows; every example whole, in exactly one row.
    assert len(rows) < len(examples)
    assert all(len(ids) <= MAX_LEN for ids in rows["input_ids"])
    lengths = sorted(n for row in rows["seq_lengths"] for n in row)
    assert lengths == sorted(len(ids) for ids in examples["input_ids"])

    # One packed row through the trainer's collator and the model, against each of its
    # examples on its own: the same loss, so no example saw another.
    row = rows[0]
    assert len(row["seq_lengths"]) > 1
    batch = DataCollatorForLanguageModeling(
        pad_token_id=tokenizer.pad_token_id or 0, padding_free=True
    )([row])
    labels = batch.pop("labels")
    packed = _nll_sum(model, labels, **batch)
    alone, start = 0.0, 0
    for n in row["seq_lengths"]:
        ids = torch.tensor([row["input_ids"][start : start + n]])
        alone += _nll_sum(model, torch.tensor([row["labels"][start : start + n]]), input_ids=ids)
        start += n
    assert packed == pytest.approx(alone, rel=1e-4)
    # The control: the same row as one sequence (later examples attending to earlier ones).
    joined = _nll_sum(model, labels, input_ids=batch["input_ids"])
    assert joined != pytest.approx(alone, rel=1e-4)


def test_a_packing_run_plans_learns_and_checkpoints_in_rows(
    tiny_model: Path, tmp_path: Path, local_store: tuple[LocalObjectStore, ObjectStoreSettings]
) -> None:
    store, settings = local_store
    unpacked_steps = 3 * math.ceil(40 / 4)
    job = make_job(
        store,
        settings,
        tiny_model,
        tmp_path / "job",
        jsonl(sft_examples(40)),
        hyperparameters={"n_epochs": 3, "learning_rate": 1e-2, "packing": True},
        total_steps=unpacked_steps,  # the operator's plan, in examples
        checkpointing={"every_steps": 2, "keep": 2},
    )
    assert job.run() == 0, (job.workdir / "log-0.txt").read_text()[-3000:]

    events = job.events()
    started = next(e for e in events if event_kind(e) is TrainerEventKind.STARTED)
    losses = job.step_losses()
    steps = max(losses)
    # Replanned in rows before the first step, and the run took exactly that many.
    assert started.data["total_steps"] == steps < unpacked_steps
    assert sorted(losses) == list(range(1, steps + 1))
    metrics = [e.data for e in events if e.type is EventType.METRICS]
    assert {m["total_steps"] for m in metrics if "total_steps" in m} == {steps}
    assert losses[steps] < losses[1]
    newest = max(
        int(info.key.split("/")[-2].removeprefix("step-"))
        for info in store.list(job.layout.checkpoints_prefix(ORG, job.config.job_id))
    )
    manifest = store.get_json(job.layout.checkpoint_manifest_key(ORG, job.config.job_id, newest))
    assert manifest["data_position"]["rows_seen"] > 0
    assert manifest["run"]["config"]["total_steps"] == steps
