"""Child processes of local mode (trainers, vLLM) that never outlive it.

Each child runs in its own session (process group), like a container: Ctrl-C in the terminal
reaches only the server, which then stops its children in order — SIGTERM to the child's main
process (a trainer turns it into "commit a checkpoint, exit 143"), SIGKILL to the whole group
when the grace period is over, so no grandchild (torchrun's workers) is left behind.

A server killed outright cannot do that, so each child runs under a guardian
(:mod:`kubetune_local.guardian`) that stops it the same way when the server dies, and is
recorded in the data folder until it is reaped: the next start stops whatever a crashed run
left (:func:`stop_orphans`), so a job never has two trainers and vLLM never runs twice. One
server at a time uses a data folder (:func:`lock_data_dir`): a second one would take the first
one's children for orphans.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

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
        grace: float,
        registry: Path,
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        guarded = [sys.executable, "-m", GUARDIAN, "--grace", f"{grace:g}", "--", *argv]
        with log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                guarded,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._record = _register(registry, self._proc.pid, name)
        self.terminated_at: float | None = None
        log.info("%s started (pid %d), log %s", name, self._proc.pid, log_path)

    @property
    def pid(self) -> int:
        """The main process' id (also its process group's)."""
        return self._proc.pid

    def poll(self) -> int | None:
        """The exit status once it exited (negative: killed by that signal), else None."""
        code = self._proc.poll()
        if code is not None:
            self._record.unlink(missing_ok=True)
        return code

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
        self._record.unlink(missing_ok=True)
        return code

    def log_tail(self, size: int = 3000) -> str:
        """The end of its log."""
        try:
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""


GUARDIAN: Final = "kubetune_local.guardian"


class DataDirInUse(Exception):
    """Another server runs on the data folder."""

    def __init__(self, data_dir: Path, pid: str) -> None:
        super().__init__(
            f"another kubetune server (pid {pid or 'unknown'}) is running on {data_dir}: stop it "
            "first, or start this one with another --data-dir"
        )


def lock_data_dir(data_dir: Path) -> int:
    """Hold ``data_dir`` for this process's life (an exclusive ``flock`` on ``run/server.lock``,
    released by the kernel however the process ends); raises :class:`DataDirInUse` when
    another process holds it. Returns the descriptor that holds the lock (not inherited by
    children: they are stopped on their own, see :func:`stop_orphans`).
    """
    path = data_dir / "run" / "server.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise DataDirInUse(data_dir, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def children_registry(data_dir: Path) -> Path:
    """Where the running children of the server using ``data_dir`` are recorded."""
    return data_dir / "run" / "children"


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (None: no such process). With the pid
    it names one process: a pid reused later has another start time.
    """
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat_line.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 of proc(5), counted after the command's ")"


def _register(registry: Path, pid: int, name: str) -> Path:
    registry.mkdir(parents=True, exist_ok=True)
    record = registry / f"{pid}.json"
    record.write_text(json.dumps({"pid": pid, "start": _start_ticks(pid), "name": name}))
    return record


def stop_orphans(registry: Path, grace: float = 10.0) -> list[str]:
    """Stop the children a previous run of the server left (killed before it could stop them):
    SIGTERM to each group still running, SIGKILL after ``grace``. Returns their names.
    """
    stopped: list[tuple[int, str]] = []
    for record in sorted(registry.glob("*.json")) if registry.is_dir() else []:
        try:
            entry = json.loads(record.read_text())
            pid, name = int(entry["pid"]), str(entry["name"])
        except (OSError, ValueError, KeyError):
            record.unlink(missing_ok=True)
            continue
        if entry.get("start") is not None and _start_ticks(pid) == entry["start"]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
                stopped.append((pid, name))
        record.unlink(missing_ok=True)
    deadline = time.monotonic() + grace
    while stopped and time.monotonic() < deadline and any(_alive(p) for p, _ in stopped):
        time.sleep(0.1)
    for pid, _ in stopped:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    return [name for _, name in stopped]


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
