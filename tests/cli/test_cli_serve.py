"""``kubetune serve`` replaces itself with the API's entry point, with the right options."""

from __future__ import annotations

import os
import sys

import pytest

from tests.cli.conftest import run_cli


@pytest.fixture
def execs(monkeypatch):
    """Record what ``serve`` would exec instead of replacing the test process."""
    calls: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((argv, env)))
    return calls


def test_serve_defaults_to_local_mode(execs):
    result = run_cli(["serve"])
    assert result.exit_code == 0, result.output
    assert execs[0][0] == [sys.executable, "-m", "kubetune_local"]


def test_serve_passes_local_options(execs, tmp_path):
    args = ["serve", "--data-dir", str(tmp_path), "--host", "192.0.2.1", "--port", "9000"]
    model = tmp_path / "Qwen2.5-0.5B-Instruct"
    result = run_cli([*args, "--no-vllm", "--model", str(model), "--model-name", "qwen"])
    assert result.exit_code == 0, result.output
    assert execs[0][0] == [
        sys.executable, "-m", "kubetune_local",
        "--data-dir", str(tmp_path), "--host", "192.0.2.1", "--port", "9000", "--no-vllm",
        "--model", str(model), "--model-name", "qwen",
    ]  # fmt: skip


def test_serve_kubernetes_sets_the_mode_and_cluster_settings(execs, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    result = run_cli(
        ["serve", "--kubernetes", "--kubeconfig", str(kubeconfig), "--namespace", "ml",
         "--port", "8080"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    argv, env = execs[0]
    assert argv == [sys.executable, "-m", "kubetune_api"]
    assert env["KUBETUNE_MODE"] == "kubernetes"
    assert env["KUBETUNE_KUBERNETES__KUBECONFIG"] == str(kubeconfig)
    assert env["KUBETUNE_KUBERNETES__NAMESPACE"] == "ml"
    assert env["KUBETUNE_API__PORT"] == "8080"


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--kubernetes", "--no-vllm"],
        ["serve", "--kubernetes", "--model", "/models/qwen"],
        ["serve", "--namespace", "ml"],
    ],
)
def test_serve_refuses_options_of_the_other_mode(execs, args):
    result = run_cli(args)
    assert result.exit_code == 2
    assert execs == []
