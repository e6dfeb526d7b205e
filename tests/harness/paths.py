"""Where the harness finds the repository, ../shared and its cache of heavy binaries."""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DIR = Path(os.environ.get("KUBETUNE_SHARED_DIR", REPO_ROOT.parent / "shared"))
REFERENCE_DIR = SHARED_DIR / "reference"
CACHE_DIR = Path(os.environ.get("KUBETUNE_CACHE_DIR", Path.home() / ".cache" / "kubetune"))
CACHE_BIN = CACHE_DIR / "bin"


def free_port() -> int:
    """Return a loopback TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
