"""The vLLM metrics our dashboards and alerts use, checked against a live vLLM's /metrics.

``tests/chart/test_observability.py`` checks every ``vllm:*`` name and label the dashboards use
against its ``VLLM_METRICS`` table; this test proves that table against the real server the
chart deploys (vLLM 0.32 here on CPU, the tiny base model, LoRA enabled) after real traffic.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.chart.test_observability import VLLM_METRICS
from tests.harness.vllm import VllmServer, build_serving_model

pytestmark = [pytest.mark.xdist_group("vllm"), pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def vllm_exposition(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    workdir = tmp_path_factory.mktemp("vllm-metrics")
    model = build_serving_model(workdir / "model")
    server = VllmServer.start(model, "kubetune-tiny", workdir)
    try:
        body = json.dumps(
            {"model": "kubetune-tiny", "prompt": "What color is the sky?", "max_tokens": 4}
        ).encode()
        request = urllib.request.Request(  # noqa: S310 - a loopback URL we built
            f"{server.base_url}/v1/completions",
            data=body,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310
            assert resp.status == 200
        with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=10) as resp:  # noqa: S310
            text = resp.read().decode()
    finally:
        server.stop()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def test_every_vllm_metric_we_use_is_exported_with_its_labels(
    vllm_exposition: dict[str, set[str]],
) -> None:
    missing = sorted(set(VLLM_METRICS) - set(vllm_exposition))
    assert missing == [], f"not on a live vLLM: {missing}"
    wrong_labels = {
        name: sorted(set(labels) - vllm_exposition[name])
        for name, labels in VLLM_METRICS.items()
        if set(labels) - vllm_exposition[name]
    }
    assert wrong_labels == {}


def test_the_table_is_not_vacuous(vllm_exposition: dict[str, set[str]]) -> None:
    # The request above must show up in the request counters the dashboards chart.
    assert "vllm:request_success_total" in vllm_exposition
    assert len(VLLM_METRICS) > 20
    assert Path(__file__).exists()
