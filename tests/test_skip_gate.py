"""The CI skip gate (tests/harness/skip_gate.py): a skipped test fails a CI run, not a local one,
unless it is allow-listed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import skip_gate
from tests.harness.paths import REPO_ROOT

SUITE = """
import pytest

def test_runs():
    assert True

def test_needs_something_missing():
    pytest.skip("something is not installed")
"""


def _pytest(folder: Path, *, ci: bool) -> subprocess.CompletedProcess[str]:
    (folder / "test_sample.py").write_text(SUITE)
    (folder / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_XDIST_WORKER")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.harness.skip_gate",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(folder),
            "-c",
            str(folder / "pytest.ini"),
            str(folder),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
        check=False,
    )


def test_a_skip_fails_a_ci_run_and_says_which(tmp_path: Path) -> None:
    result = _pytest(tmp_path, ci=True)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "test_sample.py::test_needs_something_missing: Skipped: something is not installed" in (
        result.stdout
    )


def test_a_skip_passes_a_local_run(tmp_path: Path) -> None:
    result = _pytest(tmp_path, ci=False)
    assert result.returncode == pytest.ExitCode.OK, result.stdout
    assert "1 passed, 1 skipped" in result.stdout


def test_the_allow_list_names_tests_or_whole_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(skip_gate, "ALLOWED_SKIPS", {"tests/a.py": "why", "tests/b.py::t": "why"})
    assert skip_gate.allowed("tests/a.py::test_x")
    assert skip_gate.allowed("tests/b.py::t")
    assert not skip_gate.allowed("tests/b.py::t2")
    assert not skip_gate.allowed("tests/c.py::t")
