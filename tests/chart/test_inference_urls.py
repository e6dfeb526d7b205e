"""The chart points the API's inference proxy at each served model's vLLM Service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.chart.chart import NAMESPACE, by_kind, container, env_of, render, write_values
from tests.harness.tools import Tool, ensure_kube_tools


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Tool:
    """helm with its caches in a temp folder and no cluster."""
    home = tmp_path_factory.mktemp("helm")
    env = {f"HELM_{k}_HOME": str(home / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}
    return Tool(ensure_kube_tools()["helm"], {**env, "KUBECONFIG": str(home / "none")})


def _api_env(docs: list[dict[str, object]]) -> dict[str, str]:
    api = next(d for name, d in by_kind(docs, "Deployment").items() if name.endswith("-api"))
    spec = api["spec"]
    assert isinstance(spec, dict)
    return env_of(container(spec["template"], "api"))


def test_api_forwards_inference_to_each_served_model(helm: Tool, tmp_path: Path) -> None:
    served = {"id": "llama-3.1-8b", "name": "llama8b", "path": "/models/l", "serving": {}}
    unserved = {"id": "other", "name": "other", "path": "/models/o", "serving": {"enabled": False}}
    docs = render(helm, write_values(tmp_path, {"models": [served, unserved]}))
    urls = json.loads(_api_env(docs)["KUBETUNE_SERVING__VLLM_URLS"])
    services = by_kind(docs, "Service")
    vllm = next(name for name in services if name.endswith("-vllm-llama8b"))
    port = services[vllm]["spec"]["ports"][0]["port"]
    assert urls == {"llama-3.1-8b": f"http://{vllm}.{NAMESPACE}.svc:{port}"}


def test_no_urls_without_vllm(helm: Tool, tmp_path: Path) -> None:
    docs = render(helm, write_values(tmp_path, {"vllm": {"enabled": False}}))
    assert "KUBETUNE_SERVING__VLLM_URLS" not in _api_env(docs)
