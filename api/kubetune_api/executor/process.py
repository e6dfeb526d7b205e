"""Child processes of local mode (trainers, vLLM) that never outlive it.

Each child runs in its own session (process group), like a container: Ctrl-C in the terminal
reaches only the server, which then stops its children in order — SIGTERM to the child's main
process (a trainer turns it into "commit a checkpoint, exit 143"), SIGKILL to the whole group
when the grace period is over, so no grandchild (torchrun's workers) is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


class ChildProcess:
    """One child process with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.terminated_at: float | None = None
        log.info("%s started (pid %d), log %s", name, self._proc.pid, log_path)

    @property
    def pid(self) -> int:
        """The main process' id (also its process group's)."""
        return self._proc.pid

    def poll(self) -> int | None:
        """The exit status once it exited (negative: killed by that signal), else None."""
        return self._proc.poll()

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM to the main process, as the kubelet does); once."""
        if self.terminated_at is None and self.poll() is None:
            self.terminated_at = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the whole process group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    def overdue(self, grace: float) -> bool:
        """Whether it was asked to stop more than ``grace`` seconds ago and still runs."""
        started = self.terminated_at
        return started is not None and self.poll() is None and time.monotonic() - started > grace

    def stop(self, grace: float) -> int:
        """Terminate, wait up to ``grace`` seconds, then kill; returns the exit status."""
        self.terminate()
        try:
            code = self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", self.name, grace)
            self.kill()
            code = self._proc.wait()
        self.kill()  # what is left of its group (a grandchild that ignored the stop)
        return code

    def log_tail(self, size: int = 3000) -> str:
        """The end of its log."""
        try:
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""
