"""The kubetune API as a real server: ``python -m kubetune_api`` under uvicorn on loopback."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_api.auth import hash_key, new_api_key
from tests.harness.openapi import check_response
from tests.harness.paths import REPO_ROOT, free_port
from tests.harness.procs import ServerProcess

ORGS = ("acme", "globex", "initech")  # initech: tests that need an org of their own


@dataclass
class ApiServer:
    """A running API: its base URL, one API key per org, and the settings it was given."""

    base_url: str
    keys: dict[str, str]
    env: dict[str, str]
    data_dir: Path
    backend: str
    _proc: ServerProcess = field(repr=False)

    schema_violations: list[str] = field(default_factory=list)
    responses_checked: int = 0

    def _record(self, method: str, path: str, status: int, ctype: str, body: bytes) -> None:
        self.responses_checked += 1
        try:
            check_response(method, path, status, ctype, body)
        except AssertionError as exc:
            self.schema_violations.append(str(exc))

    def client(self, org: str = "acme", **kwargs: Any) -> Any:
        """The official OpenAI SDK client for ``org``; every response it receives is checked
        against OpenAI's schemas (see ``schema_violations``)."""
        import openai

        def hook(response: Any) -> None:
            response.read()
            request = response.request
            self._record(
                request.method,
                request.url.path,
                response.status_code,
                response.headers.get("content-type", ""),
                response.content,
            )

        http_client = openai.DefaultHttpxClient(event_hooks={"response": [hook]})
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=self.keys[org],
            max_retries=0,
            http_client=http_client,
            **kwargs,
        )

    def async_client(self, org: str = "acme", **kwargs: Any) -> Any:
        """The official async OpenAI SDK client for ``org``, checked like :meth:`client`."""
        import openai

        async def hook(response: Any) -> None:
            await response.aread()
            request = response.request
            self._record(
                request.method,
                request.url.path,
                response.status_code,
                response.headers.get("content-type", ""),
                response.content,
            )

        http_client = openai.DefaultAsyncHttpxClient(event_hooks={"response": [hook]})
        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=self.keys[org],
            max_retries=0,
            http_client=http_client,
            **kwargs,
        )

    def log_tail(self) -> str:
        """What the server printed last."""
        return self._proc.log_tail()

    @property
    def pid(self) -> int:
        """The server process's id (for reading its memory from ``/proc``)."""
        return self._proc.proc.pid

    def stop(self) -> None:
        """Stop the server."""
        self._proc.stop()

    def kill(self) -> None:
        """SIGKILL the server (a crash)."""
        self._proc.kill()


def catalogue_env(tokenizer: Path | None = None) -> str:
    """``KUBETUNE_MODELS``: ``tiny-llama`` (counting tokens with ``tokenizer`` if given) and
    ``tiny-llama-2``.
    """
    first: dict[str, Any] = {"id": "tiny-llama", "owned_by": "kubetune", "created": 1_700_000_000}
    if tokenizer is not None:
        first["tokenizer"] = str(tokenizer)
    first["context_length"] = 512
    second = {"id": "tiny-llama-2", "owned_by": "kubetune", "created": 1_700_000_001}
    return json.dumps([first, second])


def backend_env(
    backend: str,
    *,
    tokenizer: Path | None = None,
    s3_env: dict[str, str] | None = None,
    kubeconfig: Path | None = None,
    namespace: str = "kubetune-api",
    prefix: str = "api-tests",
) -> dict[str, str]:
    """The settings env of the API on ``backend`` ("local": SQLite + a local folder;
    "kubernetes": the apiserver at ``kubeconfig`` + the S3 server of ``s3_env``), with the
    per-org limits raised: callers that make many requests test those limits on their own.
    """
    env = {
        "KUBETUNE_MODELS": catalogue_env(tokenizer),
        "KUBETUNE_LIMITS__MAX_ACTIVE_JOBS_PER_ORG": "1000",
        "KUBETUNE_API__REQUESTS_PER_MINUTE": "100000",
    }
    if backend == "local":
        env.update({"KUBETUNE_MODE": "local", "KUBETUNE_OBJECT_STORE__BACKEND": "local"})
    elif backend == "kubernetes":
        if s3_env is None or kubeconfig is None:
            raise ValueError("the kubernetes backend needs s3_env and kubeconfig")
        env.update(
            {
                **s3_env,
                "KUBETUNE_MODE": "kubernetes",
                "KUBETUNE_OBJECT_STORE__PREFIX": prefix,
                "KUBETUNE_KUBERNETES__KUBECONFIG": str(kubeconfig),
                "KUBETUNE_KUBERNETES__NAMESPACE": namespace,
            }
        )
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return env


ADMIN = ":admin"  # the suffix of an org's admin key in ApiServer.keys


def start_api(
    data_dir: Path,
    env: dict[str, str],
    backend: str,
    *,
    ready: bool = True,
    orgs: Sequence[str] = ORGS,
) -> ApiServer:
    """Start the API with a keys file for ``orgs`` and the given settings env; wait until it
    is ready (``/readyz``), or only alive (``/healthz``: its store is down).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    # A member key per org (``client(org)``) and an admin key (``client(f"{org}{ADMIN}")``).
    keys = {who: new_api_key() for org in orgs for who in (org, f"{org}{ADMIN}")}
    keys_file = data_dir / "keys.json"
    keys_file.write_text(
        json.dumps(
            [
                {
                    "name": f"{who.replace(ADMIN, '-admin')}-key",
                    "org": who.removesuffix(ADMIN),
                    "role": "admin" if who.endswith(ADMIN) else "member",
                    "sha256": hash_key(key),
                }
                for who, key in keys.items()
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
    probe = "/readyz" if ready else "/healthz"
    try:
        proc.wait_until(
            lambda: urllib.request.urlopen(f"{url}{probe}", timeout=2).status == 200,  # noqa: S310
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
