"""Connection settings shared by every command, and the OpenAI SDK client built from them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import openai
import typer

from kubetune.settings import DEFAULT_DATA_DIR

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
# The SDK refuses to build a client without a key; a server that needs one answers 401 with
# its own message, which is more useful than the SDK's.
NO_KEY = "none"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Connection:
    """Where the API is and how to authenticate; built once by the top-level callback."""

    base_url: str
    api_key: str | None
    timeout: float
    max_retries: int

    def client(self) -> openai.OpenAI:
        """The official OpenAI SDK client for this connection."""
        return openai.OpenAI(
            base_url=self.base_url,
            api_key=self.api_key or NO_KEY,
            timeout=self.timeout,
            max_retries=self.max_retries,
        )


def local_mode_key(base_url: str) -> str | None:
    """The admin key local mode generates on first start (``<data dir>/api_key``), when the base
    URL is on this machine: ``kubetune serve`` then works with no key configured.
    """
    if urlparse(base_url).hostname not in LOOPBACK_HOSTS:
        return None
    data_dir = Path(os.environ.get("KUBETUNE_DATA_DIR") or DEFAULT_DATA_DIR)
    try:
        return (data_dir / "api_key").read_text().strip() or None
    except OSError:
        return None


def connection(ctx: typer.Context) -> Connection:
    """The :class:`Connection` the top-level callback stored on the context."""
    root = ctx.find_root()
    conn = root.obj
    if not isinstance(conn, Connection):  # pragma: no cover - the callback always sets it
        raise RuntimeError("no connection settings on the context")
    return conn
