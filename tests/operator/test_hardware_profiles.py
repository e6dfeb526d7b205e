"""A hardware profile reaches the trainer pods on both runtimes: the operator's TrainJob (whose
runtime patch the upstream CRD validates, merged into the JobSet by the Trainer v2 stand-in as
Trainer v2 does, on the chart's per-profile ClusterTrainingRuntime for the runtime class) and
its PyTorchJob's replica templates.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.finetunejob import JobPhase
from tests.operator.conftest import Testbed

PROFILE: dict[str, Any] = {
    "name": "rdma",
    "resources": {"rdma/rdma_shared_device_a": "1"},
    "env": {"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "eth0"},
    "labels": {"fabric": "infiniband"},
    "annotations": {"k8s.v1.cni.cncf.io/networks": "rdma-net"},
    "nodeSelector": {"fabric": "infiniband"},
    "tolerations": [{"key": "fabric", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"fabric": "infiniband"}},
                    },
                }
            ]
        }
    },
    "runtimeClassName": "rdma",
    "capabilities": ["IPC_LOCK"],
    "volumes": [{"name": "ib-scratch", "emptyDir": {}}],
    "volumeMounts": [{"name": "ib-scratch", "mountPath": "/ib"}],
}
SETTINGS_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.mark.parametrize("runtime", ["trainjob", "pytorchjob"])
def test_a_hardware_profile_reaches_the_trainer_pods(make_testbed, runtime: str) -> None:
    testbed: Testbed = make_testbed(
        runtime=runtime,
        env={
            "KUBETUNE_OPERATOR__HARDWARE_PROFILES": json.dumps([PROFILE]),
            "KUBETUNE_OPERATOR__TOLERATIONS": json.dumps([SETTINGS_TOLERATION]),
        },
    )
    name = testbed.submit(resources={"nodes": 2, "gpusPerNode": 0, "profile": "rdma"})
    testbed.wait(lambda: testbed.workloads(), "the workload")
    templates = testbed.pod_templates(name)
    assert templates
    for template in templates:
        meta, spec = template["metadata"], template["spec"]
        assert meta["labels"]["fabric"] == "infiniband"
        assert meta["annotations"]["k8s.v1.cni.cncf.io/networks"] == "rdma-net"
        assert spec["runtimeClassName"] == "rdma"
        assert spec["nodeSelector"]["fabric"] == "infiniband"
        assert spec["affinity"] == PROFILE["affinity"]
        assert SETTINGS_TOLERATION in spec["tolerations"]
        assert PROFILE["tolerations"][0] in spec["tolerations"]
        volumes = {v["name"] for v in spec["volumes"]}
        assert {"ib-scratch", "config", "scratch"} <= volumes  # added, the rest kept
        (trainer,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in trainer["env"]}
        assert env["NCCL_IB_HCA"] == "mlx5"
        assert "PYTHONUNBUFFERED" in env  # the runtime's own environment is kept
        mounts = {m["mountPath"] for m in trainer["volumeMounts"]}
        assert {"/ib", "/etc/kubetune", "/tmp"} <= mounts
        assert trainer["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
        resources = trainer["resources"]
        assert resources["requests"]["rdma/rdma_shared_device_a"] == "1"
        assert resources["limits"]["rdma/rdma_shared_device_a"] == "1"
    testbed.patch_spec(name, cancel=True)
    testbed.wait_phase(name, JobPhase.CANCELLED)
