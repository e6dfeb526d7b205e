"""The operator's view of vLLM replicas: ready vLLM pods of the chart (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_operator.serving import replica_of


def pod(**overrides: Any) -> dict[str, Any]:
    """A ready vLLM pod of the chart."""
    body: dict[str, Any] = {
        "metadata": {
            "name": "vllm-0",
            "uid": "u1",
            "labels": {"app.kubernetes.io/component": "vllm", "kubetune.io/base-model": "m"},
            "annotations": {"kubetune.io/base-model-id": "org/model-1"},
        },
        "spec": {
            "containers": [
                {"name": "vllm", "ports": [{"name": "http", "containerPort": 8000}]},
                {"name": "sync", "ports": [{"name": "adapter-sync", "containerPort": 8081}]},
            ]
        },
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.7",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    for key, value in overrides.items():
        body[key] = {**body[key], **value}
    return body


def test_a_ready_vllm_pod_is_a_replica() -> None:
    replica = replica_of(pod())
    assert replica is not None
    assert replica.base_model == "org/model-1"  # the annotation: label values cannot hold "/"
    assert replica.url == "http://10.0.0.7:8081"
    without = pod(metadata={"annotations": {}})
    assert replica_of(without) is not None
    assert replica_of(without).base_model == "m"  # type: ignore[union-attr]
    ipv6 = replica_of(pod(status={"podIP": "fd00::7"}))
    assert ipv6 is not None
    assert ipv6.url == "http://[fd00::7]:8081"


@pytest.mark.parametrize(
    "overrides",
    [
        {"status": {"conditions": [{"type": "Ready", "status": "False"}]}},
        {"status": {"phase": "Pending"}},
        {"status": {"podIP": None}},
        {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}},
        {"spec": {"containers": [{"name": "vllm"}]}},
    ],
)
def test_a_pod_that_is_not_ready_is_no_replica(overrides: dict[str, Any]) -> None:
    assert replica_of(pod(**overrides)) is None
