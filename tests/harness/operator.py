"""The kubetune operator as a real process (``python -m kubetune_operator``), so tests can kill it
and start it again exactly as a Deployment would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from tests.harness.paths import REPO_ROOT, free_port
from tests.harness.procs import ServerProcess


class OperatorProcess:
    """One run of the operator; ``restart()`` starts a new process with the same settings."""

    def __init__(self, env: Mapping[str, str], workdir: Path, *, extra_args: tuple[str, ...] = ()):
        self.env = dict(env)
        self.workdir = workdir
        self.extra_args = extra_args
        self.runs = 0
        self.port = int(self.env.setdefault("KUBETUNE_OPERATOR__METRICS_PORT", str(free_port())))
        self.env.setdefault("KUBETUNE_OPERATOR__METRICS_HOST", "127.0.0.1")
        self._proc: ServerProcess | None = None

    @property
    def log_path(self) -> Path:
        """The log of the current (or last) run."""
        return self.workdir / f"operator-{self.runs}.log"

    def start(self, *, env: Mapping[str, str] | None = None, ready: bool = True) -> OperatorProcess:
        """Start a new operator process (``env`` adds to the settings for this run only)."""
        self.runs += 1
        self._proc = ServerProcess(
            "kubetune-operator",
            [sys.executable, "-m", "kubetune_operator", *self.extra_args],
            self.log_path,
            env={**self.env, **(env or {})},
            cwd=REPO_ROOT,
        )
        if ready:
            self._proc.wait_until(self.healthy, timeout=60, what="serving /healthz")
        return self

    def healthy(self) -> bool:
        """Whether /healthz answers."""
        url = f"http://127.0.0.1:{self.port}/healthz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status) == 200

    def metrics(self) -> str:
        """The /metrics page."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    @property
    def pid(self) -> int | None:
        """The process id of the current run, None before the first start."""
        return None if self._proc is None else self._proc.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status of the current run, None while it runs."""
        return None if self._proc is None else self._proc.proc.poll()

    def kill(self) -> None:
        """SIGKILL, as a node failure or an OOM kill would (no cleanup at all)."""
        if self._proc is not None and self._proc.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.proc.pid, signal.SIGKILL)
            self._proc.proc.wait()
        self.stop()

    def stop(self) -> None:
        """SIGTERM (kopf stops its daemons and exits), then SIGKILL after 10 s."""
        if self._proc is not None:
            self._proc.stop()

    def log_tail(self, lines: int = 60) -> str:
        """The end of the current run's log."""
        return self._proc.log_tail(lines) if self._proc is not None else ""

    def logs(self) -> str:
        """Every run's log, for failure messages."""
        parts = []
        for run in range(1, self.runs + 1):
            path = self.workdir / f"operator-{run}.log"
            with contextlib.suppress(OSError):
                parts.append(f"--- operator run {run}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)
