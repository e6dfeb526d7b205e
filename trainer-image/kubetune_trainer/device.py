"""The device a run trains on: CUDA or the CPU, its precision, its attention kernel, and why a
GPU job stops before it starts when CUDA is not usable.

A job that asks for GPUs trains on CUDA or not at all: a CUDA build of torch on a node whose
driver is older than the build needs reports no device, and training an 8B model in fp32 on
the CPU (then failing QLoRA as if the user had erred) is worse than stopping at once with the
driver and the build named. Only local mode, whose jobs ask for a GPU by default on laptops
that have none, may fall back to the CPU (``TrainerConfig.cpu_fallback``).

Precision: bf16 where the GPU computes it natively (Ampere and later), fp16 with loss scaling
before that, fp32 on the CPU (the exactness tests' ground). Attention: padding-free packing
puts several examples in one row; flash attention (when the image has it) and flex attention
read the example boundaries from the position ids, where sdpa would build a dense
``tokens x tokens`` mask per layer. The CPU keeps sdpa, whose output the tests compare.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import torch

from kubetune.finetunejob import AdapterType
from kubetune.trainer_config import TrainerConfig
from kubetune_trainer.errors import InfrastructureError

log = logging.getLogger(__name__)

Precision = Literal["bf16", "fp16", "fp32"]
DRIVER_VERSION_FILE: Final = Path("/proc/driver/nvidia/version")
_DTYPES: Final = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Device:
    """Where and how a process computes."""

    cuda: bool = False
    precision: Precision = "fp32"
    attention: str = "sdpa"
    memory_bytes: int | None = None  # of one GPU

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matrix products run in (autocast on CUDA)."""
        return _DTYPES[self.precision]


CPU: Final = Device()


def plan_device(config: TrainerConfig) -> Device:
    """The device of this run; raises :class:`InfrastructureError` when the job asks for GPUs
    and CUDA is not usable (unless the config allows the CPU instead).
    """
    if config.resources.gpus_per_node == 0:
        return CPU
    if not torch.cuda.is_available():
        if config.cpu_fallback:
            log.warning("no usable CUDA device: training on the CPU (%s)", cuda_diagnosis())
            return CPU
        raise InfrastructureError(
            f"The job asks for {config.resources.gpus_per_node} GPU(s) per node but CUDA is not "
            f"usable here: {cuda_diagnosis()}. Run the trainer image built for a CUDA version "
            "that the nodes' NVIDIA driver supports, or upgrade the driver.",
            code="gpu_unavailable",
        )
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return Device(
        cuda=True,
        precision="bf16" if bf16 else "fp16",
        attention=attention_implementation(cuda=True),
        memory_bytes=torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory,
    )


def attention_implementation(*, cuda: bool) -> str:
    """The attention kernel: flash attention when installed, else flex attention, on CUDA
    (both honour packed sequences without a dense mask); sdpa on the CPU.
    """
    if not cuda:
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "flex_attention"


def nvidia_driver_version(path: Path = DRIVER_VERSION_FILE) -> str | None:
    """The NVIDIA kernel driver's version (None when this container sees no driver)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    return found.group(1) if found else None


def cuda_diagnosis(driver_file: Path = DRIVER_VERSION_FILE) -> str:
    """Why CUDA may be unusable, in facts: torch's CUDA build, the driver, the visible devices."""
    build = torch.version.cuda
    driver = nvidia_driver_version(driver_file)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("NVIDIA_VISIBLE_DEVICES"))
    parts = [
        f"torch {torch.__version__} is built for CUDA {build}"
        if build
        else f"torch {torch.__version__} is a CPU-only build",
        f"the NVIDIA driver is {driver}" if driver else "no NVIDIA driver is visible",
    ]
    if visible is not None:
        parts.append(f"visible devices: {visible!r}")
    return ", ".join(parts)


def weights_dtype(config: TrainerConfig, device: Device) -> torch.dtype:
    """The dtype the base model is loaded in.

    Trained weights stay fp32 (full fine-tuning: the optimizer's updates of 1e-5 relative size
    would round away in bf16's 8-bit mantissa), computed in ``device.precision`` by autocast;
    a frozen base under LoRA is loaded in the compute dtype (PEFT keeps the adapter fp32).
    """
    if config.adapter.type is AdapterType.FULL:
        return torch.float32
    return device.compute_dtype
