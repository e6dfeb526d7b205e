"""Deleting a FineTuneJob deletes its children through the operator's finalizer (what the job
lifecycle does on both runtimes is tests/lifecycle's). Real apiserver, S3, operator process;
the training-operator is played by tests.harness.training_operator.
"""

from __future__ import annotations

import sys

import pytest

from kubetune.finetunejob import JobPhase
from kubetune_operator.handlers import FINALIZER
from kubetune_operator.manifests import configmap_name_of
from tests.operator.conftest import Testbed


@pytest.mark.parametrize("runtime", ["trainjob", "pytorchjob"])
def test_deleting_a_job_deletes_its_children_through_the_finalizer(make_testbed, runtime) -> None:
    # Pods that just wait (no trainer needed to see what deletion does).
    testbed: Testbed = make_testbed(
        entrypoint=[sys.executable, "-c", "import time; time.sleep(600)"], runtime=runtime
    )
    name = testbed.submit()
    testbed.wait_phase(name, JobPhase.RUNNING)
    testbed.wait(lambda: testbed.trainers.alive(name) == 2, "both replicas running")
    assert FINALIZER in testbed.job(name)["metadata"]["finalizers"]

    testbed.kubectl("delete", "finetunejob", name, "-n", testbed.namespace, "--wait=true")

    # No garbage collector runs in the test apiserver: the finalizer deleted the children.
    assert testbed.workloads() == []
    configmaps = testbed.core.list_namespaced_config_map(testbed.namespace).items
    assert configmap_name_of(name) not in {cm.metadata.name for cm in configmaps}
    testbed.wait(lambda: testbed.trainers.alive(name) == 0, "the replicas to stop", timeout=60)
