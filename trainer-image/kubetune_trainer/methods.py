"""One TRL config per method, built from the TrainerConfig, and the trainers that read them.

- Supervised: TRL's SFTTrainer on kubetune's tokenized examples (``input_ids`` + ``labels``), so
  the loss mask (assistant replies, ``weight: 0``) is ours; ``padding_free`` packs each
  micro-batch into one row whose position ids restart at every example, and transformers
  builds a block-diagonal causal mask from them, so no example attends to another.
- DPO: TRL's DPOTrainer on conversational preference rows, with ``beta``; with LoRA the
  reference model is the base model (the adapter disabled), so no second copy is loaded.
- Strategies: DDP under torchrun; FSDP and DeepSpeed ZeRO-2/3 through accelerate on CUDA,
  when the processes form a process group (one process launched without torchrun has nothing
  to shard and trains without them). These arguments exist before the model is loaded, so
  ZeRO-3 partitions it as it is built and FSDP loads it on rank 0 only.
- Precision: autocast in the device's bf16/fp16 over fp32 trained weights (see
  :mod:`kubetune_trainer.device`); a micro-batch holds no more tokens than the GPU has room for
  the logits of (``tokens x vocabulary`` floats).

The global batch is split as ``batch_size = world_size * micro_batch * accumulation`` and each
micro-batch's dropout masks are drawn from a generator seeded by (seed, global micro-batch
index): the same batch gets the same masks whatever the world size, and a resumed run draws
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from trl.trainer.dpo_config import DPOConfig
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.sft_config import SFTConfig
from trl.trainer.sft_trainer import SFTTrainer

from kubetune.finetunejob import IntegrationType, Strategy
from kubetune.trainer_config import TrainerConfig
from kubetune_trainer.device import CPU, Device
from kubetune_trainer.errors import UserError

# The share of a GPU's memory a micro-batch's logits may take, and their bytes per entry.
LOGITS_MEMORY_SHARE: Final = 0.25
LOGIT_BYTES: Final = 10


def split_batch(batch_size: int, world_size: int, micro_batch_size: int) -> tuple[int, int]:
    """``(micro batch per rank, accumulation steps)`` whose product * world is the batch."""
    if batch_size % world_size:
        raise UserError(
            f"batch_size {batch_size} cannot be split over {world_size} processes; use a "
            f"multiple of {world_size}",
            code="invalid_batch_size",
            param="hyperparameters.batch_size",
        )
    per_rank = batch_size // world_size
    accumulation = math.ceil(per_rank / micro_batch_size)
    while per_rank % accumulation:
        accumulation += 1
    return per_rank // accumulation, accumulation


@dataclass(frozen=True)
class Hardware:
    """What a run's processes train on: how many, whether they form a process group, the
    device, and the model's vocabulary (whose logits bound a micro-batch on a GPU).
    """

    world_size: int = 1
    distributed: bool = False
    device: Device = CPU
    vocab_size: int | None = None


def micro_batch_cap(hardware: Hardware, max_seq_length: int) -> int | None:
    """Most examples of ``max_seq_length`` tokens a micro-batch may hold on this GPU: the
    logits (bf16, their fp32 copy and its gradient: 10 bytes per token and vocabulary entry)
    take at most a quarter of its memory. None: no cap (the CPU, or an unknown vocabulary).
    """
    device = hardware.device
    if not device.cuda or device.memory_bytes is None or not hardware.vocab_size:
        return None
    tokens = device.memory_bytes * LOGITS_MEMORY_SHARE // (hardware.vocab_size * LOGIT_BYTES)
    return max(1, int(tokens) // max_seq_length)


def shards(config: TrainerConfig, hardware: Hardware) -> bool:
    """Whether the config's FSDP / DeepSpeed strategy applies: on CUDA, in a process group."""
    return config.strategy is not Strategy.DDP and hardware.device.cuda and hardware.distributed


def _strategy_args(config: TrainerConfig, hardware: Hardware) -> dict[str, Any]:
    """FSDP / DeepSpeed settings; DDP (the Trainer's default under torchrun) needs none."""
    if not shards(config, hardware):
        return {}
    if config.strategy is Strategy.FSDP:
        return {
            "fsdp": "full_shard auto_wrap",
            "fsdp_config": {
                "version": 2,
                # Full state dicts: the final save must be one servable file, not shards.
                "state_dict_type": "FULL_STATE_DICT",
                # Rank 0 reads the weights, the others get their shards from it.
                "cpu_ram_efficient_loading": True,
                "activation_checkpointing": True,
            },
        }
    stage = 3 if config.strategy is Strategy.DEEPSPEED_ZERO3 else 2
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "deepspeed": {
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
            "zero_optimization": zero,
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": "auto",
        }
    }


def _report_to(config: TrainerConfig) -> list[str]:
    names = {IntegrationType.WANDB: "wandb", IntegrationType.MLFLOW: "mlflow"}
    return [names[i.type] for i in config.integrations]


def common_args(config: TrainerConfig, output_dir: Path, hardware: Hardware) -> dict[str, Any]:
    """TrainingArguments shared by every method."""
    hp = config.hyperparameters
    micro = hp.micro_batch_size
    cap = micro_batch_cap(hardware, config.max_seq_length)
    if cap is not None:
        micro = min(micro, cap)
    micro, accumulation = split_batch(hp.batch_size, hardware.world_size, micro)
    device = hardware.device
    strategy = _strategy_args(config, hardware)
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": micro,
        "per_device_eval_batch_size": micro,
        "gradient_accumulation_steps": accumulation,
        "num_train_epochs": hp.n_epochs,
        "learning_rate": hp.learning_rate,
        "lr_scheduler_type": hp.lr_scheduler,
        "warmup_steps": hp.warmup_ratio,  # a float below 1 is a ratio of the total steps
        "weight_decay": hp.weight_decay,
        "max_grad_norm": hp.max_grad_norm,
        "seed": config.seed,
        "data_seed": config.seed,
        "logging_strategy": "steps",
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": config.checkpointing.every_steps,
        "save_total_limit": 1,  # local copies only: the object store keeps `keep` of them
        **_evaluation_args(config),
        "bf16": device.precision == "bf16",
        "fp16": device.precision == "fp16",
        "use_cpu": not device.cuda,
        # On GPU; FSDP checkpoints inside its own wrapping instead (no redundant all-gather).
        "activation_checkpointing": device.cuda and "fsdp" not in strategy,
        "ddp_timeout": config.collective_timeout_seconds,
        "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding",
        "ddp_find_unused_parameters": False,
        "report_to": _report_to(config) or "none",
        "run_name": _run_name(config),
        "disable_tqdm": True,
        "save_only_model": False,
        **strategy,
    }


def _evaluation_args(config: TrainerConfig) -> dict[str, Any]:
    """When to evaluate: ``n_evals`` times over the run, or, when checkpoints are judged by
    their validation loss (early stopping, the best checkpoint), at every checkpoint, with the
    Trainer tracking the best one (``state.best_metric``, ``best_global_step``).
    """
    n_evals = config.n_evals
    if config.validation_file is not None and config.hyperparameters.selects_by_validation():
        return {
            "eval_strategy": "steps",
            "eval_steps": config.checkpointing.every_steps,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
            # EarlyStoppingCallback's patience counter is in each checkpoint: a resumed run
            # counts on from it instead of from 0.
            "restore_callback_states_from_checkpoint": True,
        }
    return {
        "eval_strategy": "steps" if n_evals else "no",
        "eval_steps": max(1, config.total_steps // n_evals) if n_evals else None,
    }


def _run_name(config: TrainerConfig) -> str:
    for integration in config.integrations:
        if integration.wandb and integration.wandb.name:
            return integration.wandb.name
        if integration.mlflow and integration.mlflow.run_name:
            return integration.mlflow.run_name
    return config.job_id


def sft_config(config: TrainerConfig, output_dir: Path, hardware: Hardware) -> SFTConfig:
    """The supervised run's TRL config: our labels as given, packed (padding-free) batches."""
    return SFTConfig(
        **common_args(config, output_dir, hardware),
        max_length=None,  # examples are already truncated, with a warning event
        padding_free=True,
        packing=False,
        shuffle_dataset=False,  # the Trainer's seeded sampler shuffles, resumably
        dataset_num_proc=None,
    )


def dpo_config(config: TrainerConfig, output_dir: Path, hardware: Hardware) -> DPOConfig:
    """The DPO run's TRL config."""
    assert config.hyperparameters.beta is not None
    return DPOConfig(
        **common_args(config, output_dir, hardware),
        beta=config.hyperparameters.beta,
        max_length=config.max_seq_length,
        truncation_mode="keep_start",
        precompute_ref_log_probs=False,
    )


def micro_batch_seed(seed: int, index: int) -> int:
    """The dropout seed of global micro-batch ``index`` of a run seeded ``seed``."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


class SeededMicroBatches:
    """Trainer mixin: each micro-batch runs under its own seeded random generator.

    Rank ``r`` gets batches ``r, r + W, r + 2W, …`` of the sampler's order (accelerate's batch
    sharding), so the ``j``-th micro-batch of optimizer step ``s`` is global batch
    ``(s * accumulation + j) * W + r``: the same index, hence the same dropout masks, for the
    same examples whatever ``W``. The global generator is left untouched.
    """

    args: Any
    state: Any
    _kubetune_position: tuple[int, int] = (-1, 0)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Run the parent's training step under the micro-batch's own seed."""
        step, j = self._kubetune_position
        step, j = (step, j + 1) if step == self.state.global_step else (self.state.global_step, 0)
        self._kubetune_position = (step, j)
        index = (step * self.args.gradient_accumulation_steps + j) * self.args.world_size
        index += self.args.process_index
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(micro_batch_seed(self.args.seed, index))
            return super().training_step(*args, **kwargs)  # type: ignore[misc]


class AdapterSaves:
    """Trainer mixin: under DeepSpeed ZeRO-0/1/2 an adapter is saved from the live model.

    Every rank holds every weight whole below ZeRO-3, so the main process's PEFT model picks
    its adapter's tensors out itself; the Trainer's default would first have accelerate copy
    the whole model's state dict to CPU memory on every rank, at every checkpoint.
    """

    args: Any
    model: Any
    is_deepspeed_enabled: bool

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save an adapter without gathering the model; anything else as the Trainer does."""
        if self.is_deepspeed_enabled and _is_peft(self.model) and deepspeed_stage(self.args) < 3:
            if self.args.should_save:
                self._save(output_dir or self.args.output_dir)  # type: ignore[attr-defined]
            return
        super().save_model(output_dir, _internal_call)  # type: ignore[misc]


def deepspeed_stage(args: Any) -> int:
    """The ZeRO stage of a run's DeepSpeed config (0 without one)."""
    config = args.deepspeed if isinstance(args.deepspeed, dict) else {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


class KubetuneSFTTrainer(AdapterSaves, SeededMicroBatches, SFTTrainer):
    """TRL's SFTTrainer with per-micro-batch dropout seeds and cheap adapter saves."""


class KubetuneDPOTrainer(AdapterSaves, SeededMicroBatches, DPOTrainer):
    """TRL's DPOTrainer with per-micro-batch dropout seeds and cheap adapter saves."""
