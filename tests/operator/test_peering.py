"""Two operator replicas with kopf peering: only the highest priority acts; the other takes over
when it leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kubetune.finetunejob import JobPhase
from kubetune.ids import new_file_id
from tests.harness.kube import KubeCluster
from tests.harness.operator import OperatorProcess
from tests.operator.conftest import (
    Testbed,
    make_peered_testbed,
    peered_operators,
    wait_resumed,
)


def acted_on(operator: OperatorProcess, name: str) -> bool:
    """Whether this replica's log shows it moving the job."""
    return f"{name}: None → validating_files" in operator.logs()


def test_only_the_highest_priority_replica_acts(
    kube: KubeCluster, make_testbed: Callable[..., Testbed], tmp_path: Path
) -> None:
    testbed = make_peered_testbed(make_testbed)
    with peered_operators(testbed, kube, tmp_path) as (leader, follower):
        # A job whose file is missing fails at once: enough to see who acts.
        first = testbed.apply(testbed.manifest(new_file_id()))
        testbed.wait_phase(first, JobPhase.FAILED, timeout=60)
        assert acted_on(leader, first)
        assert not acted_on(follower, first)

        # The leader leaves (a rolling update's SIGTERM): the follower takes over.
        leader.stop()
        wait_resumed(testbed, follower)
        second = testbed.apply(testbed.manifest(new_file_id()))
        testbed.wait_phase(second, JobPhase.FAILED, timeout=60)
        assert acted_on(follower, second)
