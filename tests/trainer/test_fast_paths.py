"""CPU numerics of the trainer's fast paths, and how they degrade without CUDA.

- Packed (padding-free) vs padded: the trainer's own collator (the one ``KubetuneSFTTrainer``
  builds from ``methods.sft_config``) packs a micro-batch into one row whose position ids
  restart at every example; each example's loss must equal its loss in a padded batch (fp32,
  1e-5), as must the micro-batch's per-token mean loss. A negative control (the same packed row
  without its position ids, so examples attend to each other) must differ.
- Without CUDA the trainer's config turns every CUDA-only path off (bf16, gradient
  checkpointing, Liger, torch.compile) and keeps padding-free packing, and the benchmark's
  kubetune row runs on CPU and reports which paths were active.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from kubetune.settings import ObjectStoreSettings
from kubetune_runtime.objectstore import LocalObjectStore
from kubetune_trainer.data import ChatRenderer, load_file, tokenize_supervised
from kubetune_trainer.device import CPU
from kubetune_trainer.methods import Hardware, KubetuneSFTTrainer, sft_config
from kubetune_trainer.model import load_model, load_tokenizer, lora_config
from tests.trainer.harness import make_job
from tests.trainer.tiny import jsonl, sft_examples

pytestmark = pytest.mark.trainer

ATOL = 1e-5


@pytest.fixture
def sft_trainer(
    tiny_model: Path, local_store: tuple[LocalObjectStore, ObjectStoreSettings], tmp_path: Path
) -> tuple[Any, list[dict[str, list[int]]]]:
    """The kubetune SFT trainer on CPU as ``training._build_trainer`` makes it, and the
    examples tokenized by the trainer's own data path.
    """
    store, settings = local_store
    data = jsonl(sft_examples(8, seed=3))
    job = make_job(store, settings, tiny_model, tmp_path / "job", data)
    config = job.config
    tokenizer = load_tokenizer(tiny_model, config)
    loaded = load_file(data, "file-x", config.method, param="training_file")
    columns, _ = tokenize_supervised(loaded, ChatRenderer(tokenizer, config.max_seq_length))
    model = load_model(tiny_model, config, CPU)
    torch.manual_seed(0)
    trainer = KubetuneSFTTrainer(
        model=model,
        args=sft_config(config, tmp_path / "out", Hardware()),
        train_dataset=Dataset.from_dict(columns),
        processing_class=tokenizer,
        peft_config=lora_config(config),
    )
    # A trained-looking adapter: LoRA B starts at zero, which would hide the adapter's path.
    peft_model: Any = trainer.model
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    peft_model.eval()
    rows = [
        {"input_ids": ids, "labels": labels}
        for ids, labels in zip(columns["input_ids"], columns["labels"], strict=True)
    ]
    return trainer, rows


def _per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next-token prediction (0 where the label is -100)."""
    return torch.nn.functional.cross_entropy(
        logits[:-1].float(), labels[1:], ignore_index=-100, reduction="none"
    )


def _mean(losses: torch.Tensor, labels: torch.Tensor) -> float:
    return float(losses.sum() / (labels[1:] != -100).sum())


def _packed_per_example(model: Any, batch: dict[str, Any]) -> list[float]:
    labels = batch["labels"][0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[0]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    ends = [*starts[1:], labels.numel()]
    return [
        _mean(_per_token_losses(logits[s:e], labels[s:e]), labels[s:e])
        for s, e in zip(starts, ends, strict=True)
    ]


def _padded_per_example(model: Any, batch: dict[str, Any]) -> list[float]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = []
    for i, n in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
        labels = batch["labels"][i, :n]
        out.append(_mean(_per_token_losses(logits[i, :n], labels), labels))
    return out


def test_packed_equals_padded_per_example(
    sft_trainer: tuple[Any, list[dict[str, list[int]]]],
) -> None:
    trainer, rows = sft_trainer
    collator = trainer.data_collator
    assert isinstance(collator, DataCollatorForLanguageModeling)
    assert collator.padding_free  # the trainer's normal path packs its micro-batches
    pad_id = trainer.processing_class.pad_token_id
    padded_collator = DataCollatorForLanguageModeling(pad_token_id=pad_id)
    model = trainer.model
    with torch.no_grad():
        for chunk in (rows[:4], rows[4:]):
            packed = collator(chunk)
            padded = padded_collator(chunk)
            assert packed["input_ids"].shape[0] == 1
            assert packed["input_ids"].shape[1] == sum(len(r["input_ids"]) for r in chunk)
            got = _packed_per_example(model, packed)
            want = _padded_per_example(model, padded)
            assert got == pytest.approx(want, abs=ATOL)
            # The model's own loss (what the trainer optimizes): the per-token mean.
            assert float(model(**packed).loss) == pytest.approx(
                float(model(**padded).loss), abs=ATOL
            )
            # Negative control: without the restarting position ids (and the sequence
            # boundaries derived from them) examples attend to each other.
            leaky = {k: v for k, v in packed.items() if k == "input_ids" or k == "labels"}
            assert float(model(**leaky).loss) != pytest.approx(
                float(model(**padded).loss), abs=1e-3
            )


def test_cpu_config_turns_cuda_paths_off(
    sft_trainer: tuple[Any, list[dict[str, list[int]]]],
) -> None:
    trainer, _ = sft_trainer
    args = trainer.args
    assert args.padding_free
    assert not args.packing
    assert not args.bf16
    assert args.use_cpu
    assert not args.activation_checkpointing
    assert not args.use_liger_kernel
    assert not args.torch_compile
    assert next(trainer.model.parameters()).dtype == torch.float32


def test_benchmark_kubetune_row_runs_on_cpu() -> None:
    from benchmarks.trainer_throughput import SHAPES, loss_guard, run_row, step_flops

    row = run_row("kubetune-lora", "tiny", steps=6, warmup=2, cuda=False)
    assert row.name == "kubetune-tiny-lora"
    assert row.steps == 6
    assert row.tokens_per_s
    assert row.tokens_per_s > 0
    assert row.mfu is None
    assert row.peak_kind == "cpu_process_peak_rss"
    assert row.fast_paths["padding_free"]
    assert not row.fast_paths["liger"]
    assert len(row.losses) == 6
    assert loss_guard(row, row)["passed"]
    shape = SHAPES["8b"]
    # 4*N per token with N ~ 7.5e9 non-embedding parameters (lm_head counted).
    assert 4 * 7.4e9 < step_flops(shape, [1]) < 4 * 7.6e9
