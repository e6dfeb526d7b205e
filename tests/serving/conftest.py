"""Fixtures for the serving tests: real vLLM servers on CPU serving the tiny base model, the
adapter-sync sidecar as a real process beside each, and vLLM "pods" the operator can find.

There is no kubelet in the test cluster: a replica's Pod is created and its status written by
the test (Running, Ready, podIP 127.0.0.1), with the sidecar's port in the container port
named ``adapter-sync``, exactly where the chart puts it. The jobs train on the same head_dim-32
base model vLLM serves (the operator testbed's ``tiny_model`` is overridden here).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubetune.finetunejob import LABEL_BASE_MODEL
from tests.harness.api import ApiServer, backend_env, start_api
from tests.harness.kube import KubeCluster
from tests.harness.paths import REPO_ROOT, free_port
from tests.harness.procs import ServerProcess
from tests.harness.s3 import S3Server
from tests.harness.vllm import VllmServer, build_serving_model
from tests.operator.conftest import MODEL, ORG, Testbed, make_testbed  # noqa: F401 - fixtures

MAX_LORA_RANK = 16
SYNC_SECONDS = "2"
CHECKPOINT_SLOTS = 1  # one checkpoint model per replica: the next one asked for evicts it


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base model both the trainer and vLLM use (vLLM's shape: head_dim 32)."""
    return build_serving_model(tmp_path_factory.mktemp("serving-model"))


VLLM_API_KEY = "serving-tests-vllm-key"  # vLLM runs guarded, as the chart runs it


@pytest.fixture(scope="session")
def vllm_a(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """The first vLLM replica, started once per session."""
    server = VllmServer.start(
        tiny_model,
        MODEL,
        tmp_path_factory.mktemp("vllm-a"),
        max_lora_rank=MAX_LORA_RANK,
        api_key=VLLM_API_KEY,
    )
    yield server
    server.stop()


@dataclass
class Sidecar:
    """One adapter-sync process beside one vLLM server."""

    process: ServerProcess
    port: int
    adapter_dir: Path
    vllm: VllmServer
    metrics_port: int  # where it relays vLLM's /metrics

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        """Whether /healthz answers."""
        with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:  # noqa: S310
            return int(resp.status) == 200


def sidecar_env(
    s3: S3Server, namespace: str, vllm: VllmServer, model: Path, adapter_dir: Path, port: int
) -> dict[str, str]:
    """The sidecar's environment, as the chart sets it (loopback here)."""
    return {
        **s3.env(),
        "KUBETUNE_MODE": "kubernetes",
        "KUBETUNE_OBJECT_STORE__PREFIX": namespace,
        "KUBETUNE_SERVING__BASE_MODEL": MODEL,
        "KUBETUNE_SERVING__ADAPTER_DIR": str(adapter_dir),
        "KUBETUNE_SERVING__VLLM_MODEL": str(model),
        "KUBETUNE_SERVING__VLLM_URL": vllm.base_url,
        "KUBETUNE_SERVING__ADAPTER_SYNC_HOST": "127.0.0.1",
        "KUBETUNE_SERVING__ADAPTER_SYNC_PORT": str(port),
        "KUBETUNE_SERVING__MAX_LORA_RANK": str(vllm.launch.max_lora_rank),
        "KUBETUNE_SERVING__VLLM_API_KEY": vllm.launch.api_key or "",
    }


@pytest.fixture
def start_sidecar(
    s3: S3Server, namespace: str, tiny_model: Path, tmp_path: Path
) -> Iterator[Callable[[VllmServer, str], Sidecar]]:
    """``start_sidecar(vllm, name)``: a sidecar process for ``vllm`` (stopped after the test)."""
    started: list[Sidecar] = []

    def start(vllm: VllmServer, name: str) -> Sidecar:
        port, metrics_port = free_port(), free_port()
        adapter_dir = tmp_path / f"adapters-{name}"
        adapter_dir.mkdir()
        env = sidecar_env(s3, namespace, vllm, tiny_model, adapter_dir, port)
        env["KUBETUNE_SERVING__METRICS_PORT"] = str(metrics_port)
        process = ServerProcess(
            f"adapter-sync-{name}",
            [sys.executable, "-m", "kubetune_operator.adapter_sync"],
            tmp_path / f"adapter-sync-{name}.log",
            env=env,
            cwd=REPO_ROOT,
        )
        sidecar = Sidecar(process, port, adapter_dir, vllm, metrics_port)
        started.append(sidecar)
        process.wait_until(sidecar.healthy, 60, "serving /healthz")
        return sidecar

    yield start
    for sidecar in started:
        sidecar.process.stop()


def vllm_pod(name: str, sidecar_port: int) -> dict[str, Any]:
    """A vLLM replica's Pod as the chart's Deployment makes it (the parts the operator reads)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/component": "vllm", LABEL_BASE_MODEL: MODEL},
            "annotations": {"kubetune.io/base-model-id": MODEL},
        },
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "vllm",
                    "image": "vllm",
                    "ports": [{"name": "http", "containerPort": 8000}],
                },
                {
                    "name": "adapter-sync",
                    "image": "operator",
                    "ports": [{"name": "adapter-sync", "containerPort": sidecar_port}],
                },
            ],
        },
    }


def pod_status(sidecar_ready: bool) -> dict[str, Any]:
    """A running replica's status as the kubelet writes it: vLLM's container ready, the
    sidecar's as its readiness probe says, the pod Ready when both are.
    """
    ready = "True" if sidecar_ready else "False"
    return {
        "phase": "Running",
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [
            {"type": "ContainersReady", "status": ready},
            {"type": "Ready", "status": ready},
        ],
        "containerStatuses": [
            {"name": name, "ready": is_ready, "restartCount": 0, "image": image, "imageID": ""}
            for name, is_ready, image in (
                ("vllm", True, "vllm"),
                ("adapter-sync", sidecar_ready, "operator"),
            )
        ],
    }


def sidecar_ready(sidecar: Sidecar) -> bool:
    """The sidecar's readiness probe (GET /readyz)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.port}/readyz", timeout=5):
            return True
    except OSError:
        return False


def start_replica(testbed: Testbed, name: str, sidecar: Sidecar) -> None:
    """Create the replica's Pod, write its status as the kubelet does once vLLM is up, and play
    the sidecar's readiness probe until the pod turns Ready (the operator's first push).
    """
    testbed.core.create_namespaced_pod(testbed.namespace, vllm_pod(name, sidecar.port))
    testbed.core.patch_namespaced_pod_status(
        name, testbed.namespace, {"status": pod_status(sidecar_ready=False)}
    )
    testbed.wait(lambda: sidecar_ready(sidecar), f"{name}'s sidecar to be ready", 60)
    testbed.core.patch_namespaced_pod_status(
        name, testbed.namespace, {"status": pod_status(sidecar_ready=True)}
    )


def serving_testbed(make: Callable[..., Testbed]) -> Testbed:
    """An operator testbed that syncs replicas every SYNC_SECONDS and serves CHECKPOINT_SLOTS
    checkpoint models per replica.
    """
    testbed = make(start_operator=False)
    testbed.operator.env["KUBETUNE_SERVING__SYNC_SECONDS"] = SYNC_SECONDS
    testbed.operator.env["KUBETUNE_SERVING__CHECKPOINT_SLOTS"] = str(CHECKPOINT_SLOTS)
    testbed.operator.start()
    return testbed


@pytest.fixture
def serving_api(
    kube: KubeCluster, s3: S3Server, namespace: str, vllm_a: VllmServer, tmp_path: Path
) -> Iterator[ApiServer]:
    """The API on the Kubernetes backend, in the testbed's namespace and store prefix, with
    inference forwarded to ``vllm_a`` (what the chart's vLLM Service would be) and as many
    checkpoint slots as the operator; keys for the jobs' org and another.
    """
    env = backend_env(
        "kubernetes",
        s3_env=s3.env(),
        kubeconfig=kube.kubeconfig,
        namespace=namespace,
        prefix=namespace,
    )
    env |= {
        "KUBETUNE_SERVING__VLLM_URLS": json.dumps({MODEL: vllm_a.base_url}),
        "KUBETUNE_SERVING__VLLM_API_KEY": VLLM_API_KEY,
        "KUBETUNE_SERVING__CHECKPOINT_SLOTS": str(CHECKPOINT_SLOTS),
    }
    server = start_api(tmp_path / "api", env, "kubernetes", orgs=(ORG, "globex"))
    yield server
    server.stop()


def complete(vllm: VllmServer, model: str, prompt: str) -> str:
    """A greedy chat completion from ``model`` on ``vllm``, asked as the training data asks."""
    response = httpx.post(
        f"{vllm.base_url}/v1/chat/completions",
        headers=vllm.headers,
        json={
            "model": model,
            "messages": [
                {"role": "system", "content": "Please answer."},
                {"role": "user", "content": prompt},
            ],
            "temperature": 0,
            "max_tokens": 12,
        },
        timeout=60,
    )
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"])
