"""Loopback ports for the servers a component starts beside itself (vLLM, torchrun's rendezvous)."""

from __future__ import annotations

import socket


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now.

    The kernel picks it; another process may take it before the caller binds, so callers that
    start a server on it check that the server came up.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
