"""Where the harness finds the repository, ../shared and its cache of heavy binaries."""

from __future__ import annotations

import os
from pathlib import Path

from kubetune_runtime.ports import free_loopback_port

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DIR = Path(os.environ.get("KUBETUNE_SHARED_DIR", REPO_ROOT.parent / "shared"))
REFERENCE_DIR = SHARED_DIR / "reference"
CACHE_DIR = Path(os.environ.get("KUBETUNE_CACHE_DIR", Path.home() / ".cache" / "kubetune"))
CACHE_BIN = CACHE_DIR / "bin"


def free_port() -> int:
    """Return a loopback TCP port that is free right now."""
    return free_loopback_port()
