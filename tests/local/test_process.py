"""Local mode's children after a hard crash of the server: none outlives it, and the next start
stops whatever a crashed run left; the guardian is invisible otherwise (codes, signals).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kubetune_local.process import (
    ChildProcess,
    DataDirInUse,
    _start_ticks,
    children_registry,
    lock_data_dir,
    stop_orphans,
)

# A child as a trainer behaves: SIGTERM → "checkpoint" → exit 143.
TRAINER_LIKE = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
    "time.sleep(300)\n"
)


def _gone(pgid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _child(tmp_path: Path, code: str, grace: float = 5.0) -> ChildProcess:
    return ChildProcess(
        "test-child",
        [sys.executable, "-c", code],
        env=dict(os.environ),
        cwd=tmp_path,
        log_path=tmp_path / "child.log",
        grace=grace,
        registry=children_registry(tmp_path),
    )


def test_the_child_keeps_its_own_exit_code_and_stops_on_sigterm(tmp_path: Path) -> None:
    done = _child(tmp_path, "import sys; sys.exit(65)")
    deadline = time.monotonic() + 30
    while done.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done.poll() == 65
    trainer = _child(tmp_path, TRAINER_LIKE)
    time.sleep(1.0)  # its handler is installed
    assert trainer.stop(grace=10) == 143
    assert list(children_registry(tmp_path).glob("*.json")) == []  # both reaped, unrecorded


def test_no_child_outlives_a_server_killed_with_sigkill(tmp_path: Path) -> None:
    server = textwrap.dedent(
        f"""
        import os, sys, threading, time
        from pathlib import Path
        from kubetune_local.process import ChildProcess, children_registry

        def start():  # from a thread that then ends, as an API request thread may
            child = ChildProcess(
                "trainer", [sys.executable, "-c", {TRAINER_LIKE!r}], env=dict(os.environ),
                cwd=Path({str(tmp_path)!r}), log_path=Path({str(tmp_path)!r}) / "t.log",
                grace=5, registry=children_registry(Path({str(tmp_path)!r})),
            )
            print(child.pid, flush=True)

        thread = threading.Thread(target=start)
        thread.start()
        thread.join()
        time.sleep(300)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", server], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child_group = int(proc.stdout.readline())
    time.sleep(1.5)  # the child runs (and outlived the thread that started it)
    os.killpg(child_group, 0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _gone(child_group, within=10), "the child outlived the server"
    log = (tmp_path / "t.log").read_text()
    assert "Traceback" not in log


def test_the_next_start_stops_what_a_crashed_run_left(tmp_path: Path) -> None:
    registry = children_registry(tmp_path)
    registry.mkdir(parents=True)
    # A child whose guardian was killed with the server (the OOM killer took the group).
    orphan = subprocess.Popen([sys.executable, "-c", TRAINER_LIKE], start_new_session=True)
    time.sleep(1.0)
    (registry / f"{orphan.pid}.json").write_text(
        json.dumps({"pid": orphan.pid, "start": _start_ticks(orphan.pid), "name": "trainer x"})
    )
    # A record whose pid now belongs to another process (same pid, another start time).
    (registry / f"{os.getpid()}.json").write_text(
        json.dumps({"pid": os.getpid(), "start": 1, "name": "reused pid"})
    )
    assert stop_orphans(registry, grace=5) == ["trainer x"]
    assert orphan.wait(timeout=10) == 143  # SIGTERM first: it committed its checkpoint
    assert list(registry.glob("*.json")) == []


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV])
def test_a_child_killed_by_a_signal_is_seen_as_killed(tmp_path: Path, signum: int) -> None:
    child = _child(tmp_path, f"import os, signal; os.kill(os.getpid(), {int(signum)})")
    deadline = time.monotonic() + 30
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() == -signum


def test_one_server_at_a_time_holds_a_data_folder(tmp_path: Path) -> None:
    """A second server would take the first one's children for orphans and stop them."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path\n"
            "from kubetune_local.process import lock_data_dir\n"
            "lock_data_dir(Path(sys.argv[1])); print('held', flush=True); time.sleep(300)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(DataDirInUse, match=f"pid {holder.pid}"):
            lock_data_dir(tmp_path)
        second = subprocess.run(
            [sys.executable, "-m", "kubetune_local", "--data-dir", str(tmp_path), "--no-vllm"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert second.returncode == 1
        assert f"another kubetune server (pid {holder.pid}) is running on" in second.stderr
        holder.send_signal(signal.SIGKILL)  # a crashed server holds nothing
        holder.wait()
        fd = lock_data_dir(tmp_path)
        os.close(fd)
    finally:
        holder.kill()
        holder.wait()
