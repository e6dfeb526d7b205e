"""``make gpu-smoke`` on the CPU: the cases a CPU can run pass, the CUDA ones are named as such.

On a GPU the same script runs every case (LoRA, QLoRA, DPO, FSDP, ZeRO-3, SIGTERM + resume, one
process with a sharding strategy); here it must still train, resume from the SIGTERM step and
end at the planned step, and say which cases it could not run rather than pass them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.harness import REPO, trainer_env

pytestmark = pytest.mark.trainer


def test_the_smoke_script_runs_its_cpu_cases_and_names_the_cuda_ones(tmp_path: Path) -> None:
    out = tmp_path / "gpu-smoke.json"
    proc = subprocess.run(
        [sys.executable, "hack/gpu_smoke.py", "--cpu", "--out", str(out)],
        cwd=REPO,
        env=trainer_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    outcomes = {o["case"]: o for o in json.loads(out.read_text())["outcomes"]}
    status = {name: o["status"] for name, o in outcomes.items()}
    assert status == {
        "lora": "passed",
        "qlora": "skipped",
        "dpo": "passed",
        "fsdp": "skipped",
        "zero3": "skipped",
        "sigterm-resume": "passed",
        "one-process-strategy": "passed",
    }
    assert {outcomes[c]["detail"] for c in ("qlora", "fsdp", "zero3")} == {"needs CUDA"}
    assert outcomes["sigterm-resume"]["exit_codes"] == [143, 0]
    assert outcomes["sigterm-resume"]["steps"] == 8
    # The resumed run ends where the uninterrupted one does (CPU, fp32: to the bit).
    assert outcomes["sigterm-resume"]["last_loss"] == outcomes["lora"]["last_loss"]
    assert outcomes["dpo"]["last_loss"] < outcomes["dpo"]["first_loss"]
    assert "needs CUDA" in proc.stdout
