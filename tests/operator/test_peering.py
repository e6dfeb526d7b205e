"""Two operator replicas with kopf peering: only the highest priority acts; the other takes over
when it leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune.finetunejob import JobPhase
from kubetune.ids import new_file_id
from tests.harness.kube import KubeCluster
from tests.harness.operator import OperatorProcess
from tests.harness.paths import REPO_ROOT, free_port
from tests.operator.conftest import Testbed

PEERING_CRD = REPO_ROOT / "crds" / "kopf-peering.yaml"
PEERING = "kubetune-operator"


def acted_on(operator: OperatorProcess, name: str) -> bool:
    """Whether this replica's log shows it moving the job."""
    return f"{name}: None → validating_files" in operator.logs()


def test_only_the_highest_priority_replica_acts(
    kube: KubeCluster,
    kube_api: Any,
    namespace: str,
    make_testbed: Callable[..., Testbed],
    tmp_path: Path,
) -> None:
    from kubernetes import client

    kube.apply_crds((PEERING_CRD,))
    custom: Any = client.CustomObjectsApi(kube_api)
    custom.create_namespaced_custom_object(
        "kopf.dev",
        "v1",
        namespace,
        "kopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}},
    )
    testbed = make_testbed(start_operator=False, peering=PEERING, peering_priority="200")
    leader = testbed.operator
    (tmp_path / "follower").mkdir()
    follower = OperatorProcess(
        {
            **leader.env,
            "KUBETUNE_OPERATOR__PEERING_PRIORITY": "100",
            "KUBETUNE_OPERATOR__METRICS_PORT": str(free_port()),
        },
        tmp_path / "follower",
    )
    leader.start()
    follower.start()
    try:

        def peers() -> int:
            obj = custom.get_namespaced_custom_object(
                "kopf.dev", "v1", namespace, "kopfpeerings", PEERING
            )
            return len(obj.get("status") or {})

        # Both replicas keep their keep-alives in the peering object; the follower starts
        # paused (kopf pauses until it has seen its peers) and stays so.
        testbed.wait(lambda: peers() == 2, "both replicas to join the peering", timeout=60)

        # A job whose file is missing fails at once: enough to see who acts.
        first = testbed.apply(testbed.manifest(new_file_id()))
        testbed.wait_phase(first, JobPhase.FAILED, timeout=60)
        assert acted_on(leader, first)
        assert not acted_on(follower, first)

        # The leader leaves (a rolling update's SIGTERM): the follower takes over.
        leader.stop()
        testbed.wait(
            lambda: "Resuming operations" in follower.logs(), "the follower to resume", timeout=60
        )
        second = testbed.apply(testbed.manifest(new_file_id()))
        testbed.wait_phase(second, JobPhase.FAILED, timeout=60)
        assert acted_on(follower, second)
    finally:
        follower.stop()
