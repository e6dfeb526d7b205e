"""The kubetune API as a real server: ``python -m kubetune_api`` under uvicorn on loopback."""

from __future__ import annotations

import json
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_api.auth import hash_key, new_api_key
from tests.harness.paths import REPO_ROOT, free_port
from tests.harness.procs import ServerProcess

ORGS = ("acme", "globex")


@dataclass
class ApiServer:
    """A running API: its base URL, one API key per org, and the settings it was given."""

    base_url: str
    keys: dict[str, str]
    env: dict[str, str]
    data_dir: Path
    backend: str
    _proc: ServerProcess = field(repr=False)

    def client(self, org: str = "acme", **kwargs: Any) -> Any:
        """The official OpenAI SDK client for ``org``."""
        import openai

        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.keys[org], max_retries=0, **kwargs
        )

    def async_client(self, org: str = "acme", **kwargs: Any) -> Any:
        """The official async OpenAI SDK client for ``org``."""
        import openai

        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.keys[org], max_retries=0, **kwargs
        )

    def log_tail(self) -> str:
        """What the server printed last."""
        return self._proc.log_tail()

    def stop(self) -> None:
        """Stop the server."""
        self._proc.stop()


def start_api(data_dir: Path, env: dict[str, str], backend: str) -> ApiServer:
    """Start the API with a keys file for two orgs (and an admin) and the given settings env."""
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = {org: new_api_key() for org in ORGS}
    keys_file = data_dir / "keys.json"
    keys_file.write_text(
        json.dumps(
            [
                {"name": f"{org}-key", "org": org, "role": "member", "sha256": hash_key(key)}
                for org, key in keys.items()
            ]
        )
    )
    port = free_port()
    full_env = {
        "KUBETUNE_DATA_DIR": str(data_dir),
        "KUBETUNE_API__HOST": "127.0.0.1",
        "KUBETUNE_API__PORT": str(port),
        "KUBETUNE_API__API_KEYS_FILE": str(keys_file),
        **env,
    }
    proc = ServerProcess(
        f"kubetune-api-{backend}",
        [sys.executable, "-m", "kubetune_api"],
        data_dir / "api.log",
        env={**full_env, "PYTHONPATH": _pythonpath()},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_until(
            lambda: urllib.request.urlopen(f"{url}/readyz", timeout=2).status == 200,  # noqa: S310
            timeout=60,
            what="ready",
        )
    except BaseException:
        proc.stop()
        raise
    return ApiServer(url, keys, full_env, data_dir, backend, proc)


def _pythonpath() -> str:
    roots = [REPO_ROOT, REPO_ROOT / "api", REPO_ROOT / "operator", REPO_ROOT / "trainer-image"]
    return ":".join(str(p) for p in roots)


def error_of(excinfo: Any) -> dict[str, Any]:
    """The ``error`` object of an OpenAI SDK exception caught by ``pytest.raises``."""
    body = excinfo.value.body
    assert isinstance(body, dict), body
    return body
