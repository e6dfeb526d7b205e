"""Trainer metrics are scraped: the chart's PodMonitor selects the trainer pods the operator's
workload makes, on a port they name, and the trainer serves its metrics there — on both
runtimes. The PodMonitor is the chart's own, rendered with monitoring on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import pytest

from kubetune.finetunejob import JobPhase
from tests.chart.chart import CHART, MONITORING_API, parse_manifests
from tests.harness.paths import free_port
from tests.harness.tools import Tool, ensure_kube_tools
from tests.operator.conftest import Testbed


def chart_pod_monitor(namespace: str) -> dict[str, Any]:
    """The chart's trainer PodMonitor for a release in ``namespace``."""
    helm = Tool(ensure_kube_tools()["helm"], {"KUBECONFIG": "/dev/null"})
    out = helm(
        "template", "kt", str(CHART), "--namespace", namespace,
        "--api-versions", MONITORING_API,
        "--set", "monitoring.podMonitor.enabled=true",
        "--show-only", "templates/monitoring.yaml",
    )  # fmt: skip
    (monitor,) = [d for d in parse_manifests(out) if d["kind"] == "PodMonitor"]
    return monitor


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector's verdict on ``labels``."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
        }[op]
        if not ok:
            return False
    return True


def ports_named(templates: Sequence[Mapping[str, Any]], name: str) -> list[int]:
    """The container ports called ``name`` across the templates."""
    return [
        port["containerPort"]
        for t in templates
        for c in t["spec"]["containers"]
        for port in c.get("ports") or []
        if port.get("name") == name
    ]


@pytest.mark.parametrize("runtime", ["trainjob", "pytorchjob"])
def test_the_pod_monitor_scrapes_the_trainer_pods(make_testbed, runtime: str) -> None:
    port = free_port()  # the trainer's metrics port (one host runs every pod here)
    testbed: Testbed = make_testbed(runtime=runtime, trainer_metrics_port=str(port))
    monitor = chart_pod_monitor(testbed.namespace)
    name = testbed.submit(checkpointing={"everySteps": 1, "keep": 2})

    templates = testbed.pod_templates(name)
    assert testbed.namespace in monitor["spec"]["namespaceSelector"]["matchNames"]
    selected = [
        t for t in templates if selects(monitor["spec"]["selector"], t["metadata"]["labels"])
    ]
    assert selected == templates, "every trainer pod is selected"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    # Rank 0 serves the metrics, on the port the PodMonitor names.
    assert ports_named(selected, endpoint["port"]) == [port]

    testbed.wait_phase(name, JobPhase.RUNNING)

    def scraped() -> str | None:
        try:
            response = httpx.get(f"http://127.0.0.1:{port}{endpoint['path']}", timeout=5)
        except httpx.HTTPError:
            return None
        return response.text if "kubetune_trainer_step{" in response.text else None

    exposition = testbed.wait(scraped, "the trainer's metrics", timeout=120)
    assert f'job_id="{name}"' in exposition
    testbed.patch_spec(name, cancel=True)
    testbed.wait_phase(name, JobPhase.CANCELLED)
