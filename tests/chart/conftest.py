"""Fixtures of the chart tests: helm without a cluster (for template and lint) and values."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chart.chart import FULL_VALUES, write_values
from tests.harness.crds import JOBSET_CRDS, KUEUE_CRDS, MONITORING_CRDS, TRAINER_V2_CRDS
from tests.harness.kube import KubeCluster
from tests.harness.paths import REPO_ROOT
from tests.harness.tools import Tool, ensure_kube_tools


@pytest.fixture(scope="session")
def helm_local(tmp_path_factory: pytest.TempPathFactory) -> Tool:
    """helm 4 with its caches in a temp folder and no cluster (``template`` and ``lint``)."""
    home = tmp_path_factory.mktemp("helm-local")
    env = {
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": str(home / "no-cluster"),
    }
    return Tool(ensure_kube_tools()["helm"], env)


@pytest.fixture(scope="session")
def full_values(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A values file that switches on everything the chart renders (see ``FULL_VALUES``)."""
    return write_values(tmp_path_factory.mktemp("values"), FULL_VALUES)


PEERING_CRD = REPO_ROOT / "crds" / "kopf-peering.yaml"


@pytest.fixture(scope="session")
def monitoring_crds(kube: KubeCluster) -> None:
    """The platform the chart expects, as upstream defines it (``../shared/reference``): the
    Prometheus Operator's CRDs (so monitoring.coreos.com/v1 is served), Kubeflow Trainer v2's
    and JobSet's (the ClusterTrainingRuntime) and Kueue's; and kopf's peering CRD, which the
    chart ships in crds/ (helm installs it on a first install only).
    """
    kube.apply_crds(MONITORING_CRDS + TRAINER_V2_CRDS + JOBSET_CRDS + KUEUE_CRDS + (PEERING_CRD,))


@pytest.fixture
def cluster_tools(
    helm: Tool, kubectl: Tool, monitoring_crds: None, tmp_path: Path
) -> tuple[Tool, Tool]:
    """(helm, kubectl) on the ``kube`` cluster with a discovery cache of their own, so they see
    the API groups served now (the monitoring CRDs may be newer than a shared cache)."""
    cache = {"KUBECACHEDIR": str(tmp_path / "kube-cache")}
    return (
        Tool(helm.binary, {**helm.env, **cache}),
        Tool(kubectl.binary, {**kubectl.env, **cache}),
    )
