"""Local mode as a real process: ``python -m kubetune_local`` on a free port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kubetune_api.auth import hash_key, new_api_key
from tests.harness.paths import REPO_ROOT, free_port
from tests.harness.procs import ServerProcess

READY_TIMEOUT = 360.0  # a first start builds the tiny model and waits for vLLM
STOP_TIMEOUT = 150.0
OTHER_ORG = "globex"


@dataclass
class LocalServer:
    """One run of local mode on ``data_dir``; ``restart`` starts another on the same folder."""

    data_dir: Path
    vllm: bool = True
    extra_args: list[str] = field(default_factory=list)
    runs: int = 0
    process: ServerProcess | None = field(default=None, repr=False)
    port: int = 0

    @property
    def base_url(self) -> str:
        """The OpenAI base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def key(self) -> str:
        """The key local mode made on its first start."""
        return (self.data_dir / "api_key").read_text().strip()

    def seed_other_org(self) -> str:
        """A key of a second org, added before the first start (local mode keeps entries)."""
        key = new_api_key()
        entry = {"name": "other", "org": OTHER_ORG, "role": "admin", "sha256": hash_key(key)}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "api_keys.json").write_text(json.dumps([entry]))
        return key

    def start(self) -> None:
        """Start local mode and wait until it answers."""
        self.port = free_port()
        self.runs += 1
        argv = [sys.executable, "-m", "kubetune_local", "--data-dir", str(self.data_dir)]
        argv += ["--port", str(self.port)] + ([] if self.vllm else ["--no-vllm"])
        argv += self.extra_args
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
        env["KUBETUNE_LOCAL__POLL_SECONDS"] = "0.5"
        env["KUBETUNE_LOCAL__PROGRESS_SECONDS"] = "1"
        log = self.data_dir.parent / f"local-mode-{self.runs}.log"
        self.process = ServerProcess("local-mode", argv, log, env=env, cwd=REPO_ROOT)
        self.process.wait_until(self._ready, READY_TIMEOUT, "local mode answering /healthz")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                return True
        except OSError:
            return False

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the server; returns its exit status once it stopped."""
        assert self.process is not None
        self.process.proc.send_signal(signal.SIGINT)
        return self.process.proc.wait(timeout=STOP_TIMEOUT)

    def log(self) -> str:
        """Everything this run printed."""
        assert self.process is not None
        return self.process.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop it however it is (teardown)."""
        if self.process is not None and self.process.proc.poll() is None:
            self.interrupt()
        if self.process is not None:
            self.process.stop()


def processes_using(folder: Path) -> list[str]:
    """Command lines of live (not zombie) processes that mention ``folder``: a trainer's
    config or vLLM's model lives there, so none may outlive local mode.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(folder) in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def tiny_model_folder(folder: Path) -> Path:
    """A Hugging Face model folder at ``folder``: the tiny Llama, made as local mode makes it."""
    subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.tiny_model", str(folder)], check=True, timeout=300
    )
    return folder
