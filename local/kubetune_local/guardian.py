"""A child's guardian: it runs the child and stops it when local mode's server dies.

``python -m kubetune_local.guardian --grace 120 -- ARGV…`` starts ARGV in its own process group
(the guardian's), passes SIGTERM and SIGINT on to it, and exits as it exits (the same code, or
killed by the same signal), so the server sees the child's own status. Once a second it checks
its parent: when the server is gone — killed with SIGKILL, crashed — it does what the server
would have done: SIGTERM to the child (a trainer commits its checkpoint and exits 143), and
SIGKILL to the whole group once the grace period is over. No trainer or vLLM outlives the run
that started it, whichever thread of the server started it (``PR_SET_PDEATHSIG`` follows the
thread, not the process).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

PARENT_CHECK_SECONDS: Final = 1.0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """``--grace SECONDS -- ARGV…``."""
    parser = argparse.ArgumentParser(prog="kubetune_local.guardian")
    parser.add_argument("--grace", type=float, required=True)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.argv[:1] == ["--"]:
        args.argv = args.argv[1:]
    if not args.argv:
        parser.error("no command to run")
    return args


def _stop(child: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL to the group once ``grace`` is over."""
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgid(0), signal.SIGKILL)  # the group, the guardian with it


def _exit_as(code: int) -> int:
    """Leave as the child left: its exit code, or killed by its signal."""
    if code < 0:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the child's crash, not ours to dump
        with contextlib.suppress(OSError, ValueError):  # SIGKILL's handler cannot be set
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1)  # the signal is delivered before this ends
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the child under guard; returns (or dies with) its status."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    parent = os.getppid()
    child = subprocess.Popen(args.argv)

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            code = child.wait(timeout=PARENT_CHECK_SECONDS)
            break
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:  # orphaned: the server is gone
                _stop(child, args.grace)
                code = child.wait()
                break
    return _exit_as(code)


if __name__ == "__main__":
    sys.exit(main())
