"""The base model: where its files are, how it is loaded, and the adapter put on it.

bf16 on CUDA, fp32 on CPU. QLoRA loads the base in 4-bit NF4 through bitsandbytes, which is
imported only on CUDA (it is not installed in CPU environments: the ``gpu`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from kubetune.finetunejob import AdapterType
from kubetune.objectstore import ObjectStore
from kubetune.trainer_config import TrainerConfig
from kubetune_trainer.dist import Topology, local_main_first
from kubetune_trainer.errors import UserError


def use_cuda(config: TrainerConfig) -> bool:
    """Train on CUDA when the job asked for GPUs and this process sees one."""
    return config.resources.gpus_per_node > 0 and torch.cuda.is_available()


def fetch_base_model(
    config: TrainerConfig, store: ObjectStore, topology: Topology, workdir: Path
) -> Path:
    """A local folder with the base model's files (downloaded once per node if in the store)."""
    source = config.base_model
    if source.path is not None:
        folder = Path(source.path)
    else:
        assert source.store_prefix is not None
        folder = workdir / "base-model"
        with local_main_first(topology):
            if topology.is_local_main and not (folder / "config.json").is_file():
                store.download_prefix(source.store_prefix, folder)
    if not (folder / "config.json").is_file():
        raise UserError(
            f"The weights of model {source.name} were not found (no config.json in "
            f"{source.path or source.store_prefix})",
            code="model_not_available",
            param="model",
        )
    return folder


def load_tokenizer(folder: Path, config: TrainerConfig) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token (EOS when the model defines none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"The tokenizer of model {config.base_model.name} cannot be loaded: {exc}",
            code="model_not_available",
            param="model",
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise UserError(
            f"Model {config.base_model.name} has no chat template, so chat examples cannot be "
            "rendered as it expects them",
            code="model_not_supported",
            param="model",
        )
    return tokenizer


def _quantization(config: TrainerConfig) -> Any:
    if config.adapter.type is not AdapterType.QLORA:
        return None
    if not use_cuda(config):
        raise UserError(
            "QLoRA needs a CUDA GPU (its 4-bit kernels are CUDA-only)",
            code="invalid_adapter",
            param="adapter.type",
        )
    from transformers import BitsAndBytesConfig  # needs bitsandbytes: the gpu extra

    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_model(folder: Path, config: TrainerConfig) -> Any:
    """The base model, in the precision this device trains in."""
    cuda = use_cuda(config)
    kwargs: dict[str, Any] = {
        "dtype": torch.bfloat16 if cuda else torch.float32,
        "attn_implementation": "sdpa",
    }
    quantization = _quantization(config)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"Model {config.base_model.name} cannot be loaded: {exc}",
            code="model_not_available",
            param="model",
        ) from exc


def lora_config(config: TrainerConfig) -> LoraConfig | None:
    """The LoRA adapter to train, or None for full fine-tuning."""
    adapter = config.adapter
    if adapter.type is AdapterType.FULL:
        return None
    targets: str | list[str] = (
        "all-linear" if adapter.target_modules == ["all-linear"] else list(adapter.target_modules)
    )
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def finalize_adapter_config(folder: Path, served_name: str) -> dict[str, Any]:
    """Make ``adapter_config.json`` what vLLM's resolver loads: LORA, the served base name,
    no ``modules_to_save``. Returns the config written.
    """
    path = folder / "adapter_config.json"
    adapter: dict[str, Any] = json.loads(path.read_text())
    adapter["base_model_name_or_path"] = served_name
    adapter["modules_to_save"] = None
    if adapter.get("peft_type") != "LORA":
        raise ValueError(f"the adapter is {adapter.get('peft_type')}, not LORA")
    path.write_text(json.dumps(adapter, indent=2, sort_keys=True))
    return adapter
