"""Fixtures every test can use: a real Kubernetes API, kubectl/helm, and an S3 endpoint.

- ``kube``: a kube-apiserver + etcd on loopback (session-scoped, one per xdist worker) with the
  FineTuneJob and PyTorchJob CRDs installed. Tests that use it are marked ``cluster``
  automatically, so ``pytest -m "not cluster"`` runs the fast part.
- ``namespace``: a fresh namespace per test in that cluster.
- ``kube_api``: a ``kubernetes.client.ApiClient`` for the admin user.
- ``kubectl`` / ``helm``: the real binaries, bound to the cluster's kubeconfig.
- ``s3``: an S3-protocol server (moto server mode) with a bucket; ``s3.client()`` is boto3.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness.kube import KubeCluster, start_cluster
from tests.harness.s3 import S3Server, start_s3
from tests.harness.tools import Tool, ensure_kube_tools

pytest_plugins = ["tests.harness.skip_gate"]

CLUSTER_FIXTURES = frozenset({"kube", "kube_api", "namespace", "kubectl", "helm"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the apiserver as ``cluster``."""
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def kube() -> Iterator[KubeCluster]:
    """A real kube-apiserver + etcd with kubetune's and Kubeflow's CRDs installed."""
    cluster = start_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def kube_api(kube: KubeCluster) -> Any:
    """An admin ``kubernetes.client.ApiClient`` for the ``kube`` cluster."""
    return kube.api_client()


@pytest.fixture
def namespace(kube_api: Any) -> Iterator[str]:
    """A namespace of its own for one test."""
    from kubernetes import client

    core: Any = client.CoreV1Api(kube_api)
    name = f"t-{secrets.token_hex(4)}"
    core.create_namespace({"metadata": {"name": name, "labels": {"kubetune.io/test": "true"}}})
    yield name
    # No namespace controller runs, so the namespace stays Terminating; its objects are
    # unreachable to other tests anyway because every test gets a new name.
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def kube_tools() -> dict[str, Any]:
    """Paths of the kubectl and helm binaries."""
    return ensure_kube_tools()


@pytest.fixture(scope="session")
def kubectl(kube: KubeCluster, kube_tools: dict[str, Any]) -> Tool:
    """kubectl 1.33 pointed at the ``kube`` cluster."""
    return Tool(kube_tools["kubectl"], kube.env())


@pytest.fixture(scope="session")
def helm(
    kube: KubeCluster, kube_tools: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Tool:
    """helm pointed at the ``kube`` cluster, with its caches inside the test's temp folder."""
    home = tmp_path_factory.mktemp("helm")
    env = {
        **kube.env(),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return Tool(kube_tools["helm"], env)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """An S3 endpoint on loopback with a bucket."""
    server = start_s3()
    yield server
    server.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The tally of tests/lifecycle/test_faults.py, when it ran (under xdist too: the
    recorded properties travel with the reports). Here, not in tests/lifecycle: under xdist the
    controller loads only this conftest unless that folder is named on the command line.
    """
    from collections import Counter

    faults: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            properties = dict(getattr(report, "user_properties", []))
            if "fault" in properties:
                faults[properties["fault"]] += 1
                outcomes[properties.get("fault_outcome", "lost")] += 1
    if faults:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(faults.items()))
        terminalreporter.write_line(
            f"fault injection: {sum(faults.values())} faults injected ({kinds}); "
            f"{outcomes['recovered']} jobs recovered, {outcomes['lost']} lost, "
            f"{outcomes['orphans']} with orphan processes, {outcomes['duplicates']} with "
            "duplicate workloads"
        )
