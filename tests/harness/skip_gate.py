"""In CI (``CI=true``), a skipped test fails the run unless it is on :data:`ALLOWED_SKIPS`.

A skip on a developer's machine says "this needs something you have not installed"; in CI,
where ``make test`` installs everything, it would hide a test that never ran. Loaded by
``tests/conftest.py``; in an xdist run the controller, which sees every worker's reports,
decides.
"""

from __future__ import annotations

import os
from typing import Final

import pytest

# Node ids (or their prefixes) that may be skipped in CI, each with why. Keep it short.
ALLOWED_SKIPS: Final[dict[str, str]] = {}


def in_ci() -> bool:
    """Whether this is a CI run (CI=true, as CI services and .ci/run set it)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def allowed(nodeid: str) -> bool:
    """Whether ``nodeid`` may be skipped in CI."""
    return any(nodeid == a or nodeid.startswith(f"{a}::") for a in ALLOWED_SKIPS)


class SkipGate:
    """Collects the skips of a run and fails a CI run over one not allowed."""

    def __init__(self) -> None:
        self.skipped: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Remember every skip with its reason."""
        if report.skipped and not hasattr(report, "wasxfail"):
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            self.skipped[report.nodeid] = reason

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Fail a CI run that skipped a test the allow-list does not name."""
        if not in_ci() or hasattr(session.config, "workerinput"):
            return
        refused = {n: r for n, r in self.skipped.items() if not allowed(n)}
        if not refused:
            return
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                "skipped in CI and not on tests/harness/skip_gate.py's ALLOWED_SKIPS:",
                red=True,
                bold=True,
            )
            for nodeid, reason in sorted(refused.items()):
                reporter.write_line(f"  {nodeid}: {reason}", red=True)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    """Register the gate."""
    config.pluginmanager.register(SkipGate(), "kubetune-skip-gate")
