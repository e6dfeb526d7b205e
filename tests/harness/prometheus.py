"""A real Prometheus (and promtool) from Debian's ``prometheus`` package, on loopback.

``ensure_prometheus()`` installs the package when its binaries are missing (CI runs as root
with apt, as for etcd); ``start_prometheus()`` runs a server with a given scrape and rule
configuration and a throwaway TSDB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from tests.harness.paths import CACHE_DIR, free_port
from tests.harness.procs import ServerProcess

APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


class PrometheusUnavailable(RuntimeError):
    """Debian's prometheus package is not installed and cannot be installed here."""


@dataclass(frozen=True)
class PrometheusTools:
    """Paths of the ``prometheus`` server and ``promtool``."""

    prometheus: Path
    promtool: Path


def _found() -> PrometheusTools | None:
    server, tool = shutil.which("prometheus"), shutil.which("promtool")
    if server and tool:
        return PrometheusTools(Path(server), Path(tool))
    return None


def ensure_prometheus() -> PrometheusTools:
    """Return Debian's prometheus and promtool, installing the package when missing.

    Raises :class:`PrometheusUnavailable` (with apt's output) when that is not possible, e.g.
    not root or no package index.
    """
    found = _found()
    if found:
        return found
    if os.geteuid() != 0:
        raise PrometheusUnavailable("prometheus is not installed and installing it needs root")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]
    with FileLock(str(CACHE_DIR / "apt.lock")):
        found = _found()
        if found:
            return found
        proc = subprocess.run(install, env=APT_ENV, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=APT_ENV, check=False)
            proc = subprocess.run(install, env=APT_ENV, capture_output=True, text=True, check=False)
    found = _found()
    if not found:
        raise PrometheusUnavailable(
            f"apt-get install prometheus failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return found


@dataclass
class PrometheusServer:
    """A running Prometheus: its URL and the HTTP API calls the tests need."""

    url: str
    workdir: Path
    _proc: ServerProcess = field(repr=False)

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data`` (raises on an error status)."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{path} {params}: {exc.code} {exc.read().decode()}") from exc
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (vector or scalar data, as the API returns it)."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = (
            data["result"] if data["resultType"] in ("vector", "matrix") else [data]
        )
        return result

    def wait_for(self, expr: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns a non-empty vector."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr} stayed empty for {timeout}s:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self) -> str:
        """What the server printed last."""
        return self._proc.log_tail()

    def stop(self) -> None:
        """Stop the server and remove its TSDB."""
        self._proc.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_prometheus(
    tools: PrometheusTools,
    scrape_configs: list[dict[str, Any]],
    rule_files: Sequence[Path] = (),
    evaluation_interval: str = "1s",
    timeout: float = 30,
) -> PrometheusServer:
    """Start Prometheus on a free loopback port with these scrape configs and rule files."""
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-prometheus-"))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": evaluation_interval},
        "scrape_configs": scrape_configs,
        "rule_files": [str(p) for p in rule_files],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = ServerProcess(
        "prometheus",
        [
            str(tools.prometheus),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        workdir / "prometheus.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_until(
            lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200,  # noqa: S310
            timeout=timeout,
            what="ready",
        )
    except BaseException:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return PrometheusServer(url, workdir, proc)
