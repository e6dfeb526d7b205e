"""Real vLLM servers on this machine's CPU, serving the tiny base model with LoRA enabled.

vLLM lives in its own virtualenv (``hack/install-vllm.sh``, run by ``make test-deps``); a server
takes about 25 s to become ready and about 1.3 GB of memory, so tests share them per session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from kubetune_runtime.vllm_launch import VllmLaunch, default_vllm_python, installed_accelerator
from tests.harness.paths import REPO_ROOT, free_port
from tests.harness.procs import ServerProcess

READY_TIMEOUT = 240.0


def ensure_vllm_installed() -> Path:
    """The vLLM interpreter, installing the cached virtualenv first if it is missing."""
    python = default_vllm_python()
    if not python.exists():
        subprocess.run(["bash", str(REPO_ROOT / "hack" / "install-vllm.sh")], check=True)
    return python


def build_serving_model(folder: Path) -> Path:
    """The tiny base model in vLLM's shape (head_dim 32), built with the product's own code."""
    subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.tiny_model", str(folder)],
        check=True,
        cwd=REPO_ROOT,
        capture_output=True,
    )
    return folder


class VllmServer:
    """One vLLM OpenAI server process."""

    def __init__(self, launch: VllmLaunch, log_path: Path) -> None:
        self.launch = launch
        self.process = ServerProcess("vllm", launch.argv(), log_path, env=launch.env())

    @classmethod
    def start(
        cls,
        model: Path,
        served_name: str,
        log_dir: Path,
        *,
        max_lora_rank: int = 16,
        wait: bool = True,
        api_key: str | None = None,
    ) -> VllmServer:
        """Start a server on a free port; wait until it serves /v1/models unless told not to."""
        python = ensure_vllm_installed()
        launch = VllmLaunch(
            model=model,
            served_model_name=served_name,
            port=free_port(),
            python=python,
            max_lora_rank=max_lora_rank,
            api_key=api_key,
            accelerator=installed_accelerator(python),  # the build make run installed
        )
        server = cls(launch, log_dir / f"vllm-{launch.port}.log")
        if wait:
            server.wait_ready()
        return server

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:<port> (no /v1)."""
        return self.launch.base_url

    def wait_ready(self) -> None:
        """Block until /v1/models answers."""
        self.process.wait_until(lambda: bool(self.models()), READY_TIMEOUT, "serving /v1/models")

    @property
    def headers(self) -> dict[str, str]:
        """What a client of this server sends: its API key, if it has one."""
        key = self.launch.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def models(self) -> list[dict[str, Any]]:
        """What /v1/models lists: the base model and every loaded LoRA adapter."""
        request = urllib.request.Request(f"{self.base_url}/v1/models", headers=self.headers)  # noqa: S310
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
            return list(json.load(resp)["data"])

    def adapters(self) -> set[str]:
        """Names of the LoRA adapters loaded now."""
        return {m["id"] for m in self.models() if m.get("parent")}

    def stop(self) -> None:
        """Stop the server."""
        self.process.stop(timeout=20)

    def crash_and_restart(self) -> None:
        """SIGKILL the server, then start it again on the same port, as the kubelet restarts a
        crashed container (a fresh process: no adapter loaded), and wait until it serves.
        """
        self.process.kill()
        log = self.process.log_path
        self.process = ServerProcess(
            "vllm", self.launch.argv(), log.with_suffix(".restarted.log"), env=self.launch.env()
        )
        self.wait_ready()
