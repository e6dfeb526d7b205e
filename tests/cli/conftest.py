"""A live API in local mode for the CLI tests, and helpers to drive the CLI and play the
trainer/executor (the API runs here without its local executor, so the test moves jobs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from kubetune.events import JobEvent, encode_chunk
from kubetune.finetunejob import FineTuneJobStatus
from kubetune_cli import output
from kubetune_cli.main import app
from kubetune_runtime.progress import fold_events
from tests.api.conftest import backend_of, settings_of, store_of, tiny_tokenizer
from tests.harness.api import ApiServer, backend_env, start_api
from tests.harness.paths import REPO_ROOT

__all__ = ["tiny_tokenizer"]

# Keys from the developer's shell must not leak into what the tests run.
CLEAN_ENV: dict[str, str | None] = {
    "KUBETUNE_API_KEY": None,
    "OPENAI_API_KEY": None,
    "KUBETUNE_BASE_URL": None,
    "KUBETUNE_DATA_DIR": None,
    "COLUMNS": "200",
}


@pytest.fixture(scope="session")
def cli_api(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Path) -> Iterator[ApiServer]:
    """The API in local mode (SQLite + local folder) with a tiny tokenizer."""
    server = start_api(
        tmp_path_factory.mktemp("cli-api"), backend_env("local", tokenizer=tiny_tokenizer), "local"
    )
    yield server
    server.stop()


def global_args(server: ApiServer, org: str = "acme") -> list[str]:
    """``--base-url``/``--api-key`` for ``server``; no retries, so failures show at once."""
    return [
        "--base-url",
        f"{server.base_url}/v1",
        "--api-key",
        server.keys[org],
        "--max-retries",
        "0",
    ]


def run_cli(args: Sequence[str], env: dict[str, str | None] | None = None) -> Result:
    """Run the CLI in this process (typer's CliRunner), stdout and stderr kept apart."""
    # A wide terminal, so table cells are not folded. rich fixed the width when the CLI's
    # console was built at import, from COLUMNS — 80 in pytest-xdist workers.
    output.stdout.width = 250
    return CliRunner().invoke(app, list(args), env={**CLEAN_ENV, **(env or {})})


def run_json(args: Sequence[str]) -> Any:
    """Run a command with ``--json`` and parse what it printed."""
    result = run_cli([*args, "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


class CliProcess:
    """The CLI as a real subprocess (for ``jobs watch``, which polls while the test moves the
    job); stdout is collected line by line as it comes."""

    def __init__(self, args: Sequence[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
        pythonpath = ":".join(str(REPO_ROOT / p) for p in (".", "api", "cli"))
        env.update({"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune_cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def stdout(self) -> str:
        """Everything printed so far."""
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        """Wait until the process has printed ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.stdout:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"never printed {text!r}; got:\n{self.stdout}")
            time.sleep(0.05)

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """Exit code, stdout and stderr once the process has ended."""
        # Not communicate(): the reader thread owns stdout, and two readers would split it.
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(timeout=5)
        assert self.proc.stderr is not None
        return self.proc.returncode, self.stdout, self.proc.stderr.read()


class Executor:
    """Plays the local executor and the trainer for one job: writes trainer event chunks to
    the server's object store and the folded status to its SQLite job store."""

    def __init__(self, server: ApiServer, job_id: str, org: str = "acme") -> None:
        self.backend = backend_of(server)
        self.store = store_of(server)
        self.layout = settings_of(server).object_store.layout()
        self.org, self.job_id = org, job_id
        self.status = FineTuneJobStatus(phase=None)
        self._seq = 0

    def emit(self, events: Sequence[JobEvent]) -> None:
        """Append one trainer chunk and fold it into the status, as the executor does."""
        key = self.layout.event_chunk_key(self.org, self.job_id, self._seq)
        self.store.put_bytes(key, encode_chunk(events))
        self._seq += 1
        self.status = fold_events(self.status, events)
        self.set(**{})

    def set(self, **fields: Any) -> None:
        """Write the status with ``fields`` changed."""
        self.status = self.status.model_copy(update=fields)
        self.backend.update_status(self.org, self.job_id, self.status)

    def now(self) -> datetime:
        """Timestamps for the status."""
        return datetime.now(UTC)
