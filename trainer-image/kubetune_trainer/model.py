"""The base model: where its files are, how it is loaded, and the adapter put on it.

The dtypes and the attention kernel come from the run's :class:`~kubetune_trainer.device.Device`.
QLoRA loads the base in 4-bit NF4 through bitsandbytes, which is imported only on CUDA (it is
not installed in CPU environments: the ``gpu`` extra); its 4-bit weights are stored in the
compute dtype, so FSDP and ZeRO-3 can shard them like every other weight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from kubetune.finetunejob import AdapterType
from kubetune.storage_layout import ADAPTER_FILES
from kubetune.trainer_config import TrainerConfig
from kubetune_runtime.objectstore import ObjectNotFound, ObjectStore
from kubetune_trainer.device import Device, weights_dtype
from kubetune_trainer.dist import Topology, local_main_first
from kubetune_trainer.errors import UserError

log = logging.getLogger(__name__)


def fetch_base_model(
    config: TrainerConfig, store: ObjectStore, topology: Topology, workdir: Path
) -> Path:
    """A local folder with the base model's files: its own folder, or downloaded from the store
    once per node — into the shared cache volume when there is one, where restarts and later
    jobs find it.
    """
    source = config.base_model
    if source.path is not None:
        folder = Path(source.path)
    else:
        assert source.store_prefix is not None
        folder = _download_folder(source.store_prefix, source.cache_dir, workdir)
        with local_main_first(topology):
            if topology.is_local_main:
                _download_once(store, source.store_prefix, folder, source.name)
    if not (folder / "config.json").is_file():
        raise UserError(
            f"The weights of model {source.name} were not found (no config.json in "
            f"{source.path or source.store_prefix})",
            code="model_not_available",
            param="model",
        )
    return folder


def _download_folder(prefix: str, cache_dir: str | None, workdir: Path) -> Path:
    if cache_dir is None:
        return workdir / "base-model"
    # One folder per store location: two catalogue entries never share a cached copy.
    digest = hashlib.sha256(prefix.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{Path(prefix.rstrip('/')).name}-{digest}"


def _download_once(store: ObjectStore, prefix: str, folder: Path, name: str) -> None:
    """Download the weights into ``folder`` unless they are there. Into a folder of its own
    first, renamed into place when complete: a download cut short (preemption) leaves no
    half-written model, and of two nodes downloading into a shared volume at once, one wins.
    """
    if (folder / "config.json").is_file():
        log.info("base model %s: found in %s, not downloaded again", name, folder)
        return
    log.info("base model %s: downloading from the object store into %s", name, folder)
    partial = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.partial")
    try:
        store.download_prefix(prefix, partial)
        try:
            partial.rename(folder)
        except OSError:  # another node finished first: keep its copy
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


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


def quantization(config: TrainerConfig, device: Device) -> Any:
    """The 4-bit quantization of a QLoRA base (None for other adapters)."""
    if config.adapter.type is not AdapterType.QLORA:
        return None
    if not device.cuda:
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
        bnb_4bit_compute_dtype=device.compute_dtype,
        # Packed 4-bit weights in the compute dtype: FSDP and ZeRO-3 shard tensors of one dtype.
        bnb_4bit_quant_storage=device.compute_dtype,
    )


def load_model(folder: Path, config: TrainerConfig, device: Device) -> Any:
    """The base model, in the dtype its weights train or stay frozen in (see
    :func:`~kubetune_trainer.device.weights_dtype`), with the device's attention kernel.
    """
    kwargs: dict[str, Any] = {
        "dtype": weights_dtype(config, device),
        "attn_implementation": device.attention,
    }
    quantization_config = quantization(config, device)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"Model {config.base_model.name} cannot be loaded: {exc}",
            code="model_not_available",
            param="model",
        ) from exc


def fetch_initial_adapter(store: ObjectStore, prefix: str, dest: Path) -> Path:
    """Download the adapter a continued job starts from (its weights and configuration only,
    not a checkpoint's optimizer state) into ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        try:
            (dest / name).write_bytes(store.get_bytes(prefix + name))
        except ObjectNotFound as exc:
            raise UserError(
                f"The adapter to continue from is no longer stored ({prefix}{name} is "
                "missing): its job or checkpoint was deleted",
                code="model_not_available",
                param="model",
            ) from exc
    return dest


def with_initial_adapter(model: Any, folder: Path) -> Any:
    """The base ``model`` with the adapter in ``folder`` on it, trainable: training goes on
    from its weights (and its rank, alpha and target modules) instead of a fresh LoRA.
    """
    from peft import PeftModel

    # What TRL does for the adapter it adds itself (it adds none here): with activation
    # checkpointing, the frozen embeddings' output must carry gradients to reach the adapter.
    model.enable_input_require_grads()
    return PeftModel.from_pretrained(model, folder, is_trainable=True)


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
