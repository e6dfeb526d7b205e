"""``kubetune serve``: run kubetune on this machine, in local mode or against a cluster.

The CLI never imports the API (components stay independent); it replaces itself with the
API's own entry point, so signals (Ctrl-C, SIGTERM from a supervisor) reach the server
directly and its exit status is the command's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LOCAL_MODULE = "kubetune_local"
API_MODULE = "kubetune_api"


def local_command(
    *,
    data_dir: Path | None,
    host: str | None,
    port: int | None,
    no_vllm: bool,
    model: Path | None = None,
    model_name: str | None = None,
) -> list[str]:
    """The command line of local mode: ``python -m kubetune_local [options]``."""
    argv = [sys.executable, "-m", LOCAL_MODULE]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    if host is not None:
        argv += ["--host", host]
    if port is not None:
        argv += ["--port", str(port)]
    if no_vllm:
        argv.append("--no-vllm")
    if model is not None:
        argv += ["--model", str(model)]
    if model_name is not None:
        argv += ["--model-name", model_name]
    return argv


def kubernetes_command(
    *, kubeconfig: Path | None, namespace: str | None, host: str | None, port: int | None
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of the API in Kubernetes mode (its settings are
    environment variables, see ``kubetune.settings``).
    """
    env = dict(os.environ, KUBETUNE_MODE="kubernetes")
    if kubeconfig is not None:
        env["KUBETUNE_KUBERNETES__KUBECONFIG"] = str(kubeconfig)
    if namespace is not None:
        env["KUBETUNE_KUBERNETES__NAMESPACE"] = namespace
    if host is not None:
        env["KUBETUNE_API__HOST"] = host
    if port is not None:
        env["KUBETUNE_API__PORT"] = str(port)
    return [sys.executable, "-m", API_MODULE], env


def exec_server(argv: list[str], env: dict[str, str] | None = None) -> None:
    """Replace this process with ``argv`` (never returns on success)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env if env is not None else dict(os.environ))  # noqa: S606
