"""The training-operator stand-in keeps the contract it documents (fake replicas, no trainer).

The PyTorchJobs here are built by the operator's own manifest builders, so these tests also
prove the apiserver accepts them under Kubeflow's CRD.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.finetunejob import FineTuneJob
from kubetune.settings import OperatorSettings
from kubetune_operator.manifests import config_map
from kubetune_operator.pytorchjob import pytorchjob
from tests.harness.kubelet import exit_code
from tests.harness.training_operator import (
    GROUP,
    PLURAL,
    VERSION,
    TrainingOperator,
    is_true,
    set_condition,
    wait_until,
)

# A replica that reports what it was given, then waits: SIGTERM → 143 (a checkpointing trainer),
# SIGUSR1 → 1 (a crash), SIGUSR2 → 0 (done).
REPLICA = r"""
import json, os, signal, sys, time
codes = {signal.SIGTERM: 143, signal.SIGUSR1: 1, signal.SIGUSR2: 0}
for sig, code in codes.items():
    signal.signal(sig, lambda s, f: sys.exit(codes[s]))
config = open(sys.argv[sys.argv.index("--config") + 1]).read()
print(json.dumps({"env": dict(os.environ), "argv": sys.argv, "config": config,
                  "cwd": os.getcwd()}), flush=True)
while True:
    time.sleep(0.1)
"""
CONFIG = '{"hello": "trainer"}'


def condition_types(conditions: list[dict[str, Any]]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in conditions}


def test_conditions_follow_the_training_operators_rules() -> None:
    conds = set_condition([], "Created", "True", "PyTorchJobCreated", "created")
    conds = set_condition(conds, "Running", "True", "PyTorchJobRunning", "running")
    created_at = conds[0]["lastTransitionTime"]
    conds = set_condition(conds, "Restarting", "True", "PyTorchJobRestarting", "restarting")
    assert condition_types(conds) == {"Created": "True", "Restarting": "True"}
    conds = set_condition(conds, "Running", "True", "PyTorchJobRunning", "running")
    assert condition_types(conds) == {"Created": "True", "Running": "True"}
    conds = set_condition(conds, "Succeeded", "True", "PyTorchJobSucceeded", "done")
    assert condition_types(conds) == {"Created": "True", "Running": "False", "Succeeded": "True"}
    assert conds[0]["lastTransitionTime"] == created_at
    failed = set_condition(conds, "Failed", "True", "PyTorchJobFailed", "failed")
    assert set_condition(failed, "Running", "True", "PyTorchJobRunning", "again") == failed
    assert exit_code(-15) == 143
    assert exit_code(65) == 65


@pytest.fixture
def fake_job(kube_api: Any, namespace: str) -> tuple[str, Any]:
    """A FineTuneJob-shaped owner, its ConfigMap and a 2-node PyTorchJob built for it."""
    from kubernetes import client

    job = FineTuneJob.model_validate(
        {
            "metadata": {
                "name": "ftjob-0mhx5k2ab00000000000001",
                "namespace": namespace,
                "uid": "u-1",
            },
            "spec": {
                "model": "m",
                "trainingFile": "file-0mhx5k2ab00000000000001",
                "resources": {"nodes": 2, "gpusPerNode": 0},
            },
        }
    )
    settings = OperatorSettings(credentials_secret="creds", termination_grace_seconds=30)
    core: Any = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "creds"}, "stringData": {"AWS_ACCESS_KEY_ID": "k"}}
    )
    cm = config_map(job, CONFIG)
    del cm["metadata"]["ownerReferences"]  # no such owner object in this test
    core.create_namespaced_config_map(namespace, cm)
    manifest = pytorchjob(job, settings)
    del manifest["metadata"]["ownerReferences"]
    custom: Any = client.CustomObjectsApi(kube_api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    return job.metadata.name, custom


def replica_report(fixture: TrainingOperator, name: str, rtype: str) -> dict[str, Any]:
    def read() -> dict[str, Any] | None:
        replica = next((r for r in fixture.replicas(name) if r.rtype == rtype), None)
        text = replica.logs[-1].read_text() if replica and replica.logs else ""
        line = next((x for x in text.splitlines() if x.startswith("{")), None)
        return json.loads(line) if line else None

    report: dict[str, Any] = wait_until(read, 30, f"{rtype} to report")
    return report


def conditions_of(custom: Any, namespace: str, name: str) -> dict[str, str]:
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return condition_types((obj.get("status") or {}).get("conditions") or [])


def test_replicas_get_the_training_operators_environment_and_the_config_mount(
    kube: Any, namespace: str, fake_job: tuple[str, Any], tmp_path: Path
) -> None:
    name, custom = fake_job
    fixture = TrainingOperator(
        kube.api_client(), namespace, tmp_path, entrypoint=[sys.executable, "-c", REPLICA]
    ).start()
    try:
        master = replica_report(fixture, name, "Master")
        worker = replica_report(fixture, name, "Worker")
        for rank, report in enumerate((master, worker)):
            env = report["env"]
            assert env["RANK"] == env["PET_NODE_RANK"] == str(rank)
            assert (env["WORLD_SIZE"], env["PET_NNODES"], env["PET_NPROC_PER_NODE"]) == (
                "2",
                "2",
                "1",
            )
            assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "127.0.0.1"
            assert env["MASTER_PORT"] == master["env"]["MASTER_PORT"] == env["PET_MASTER_PORT"]
            assert env["PYTHONUNBUFFERED"]  # non-empty: unbuffered
            assert env["KUBETUNE_JOB_ID"] == name  # the container's own env
            assert env["AWS_ACCESS_KEY_ID"] == "k"  # envFrom the Secret
            assert Path(env["HOME"]).is_dir()  # the "home" emptyDir, not /home/trainer
            assert Path(env["TMPDIR"]).is_dir()
            assert report["config"] == CONFIG  # the ConfigMap, mounted at /etc/kubetune
            # The container's args, with the mount path rewritten to the mounted folder.
            assert report["argv"][1] == "--config"
            assert report["argv"][2].endswith("/volumes/config/config.json")
        wait_until(
            lambda: conditions_of(custom, namespace, name).get("Running") == "True", 30, "Running"
        )
        fixture.signal(name, "Master", 0, signal.SIGUSR2)  # the master completes
        wait_until(
            lambda: conditions_of(custom, namespace, name).get("Succeeded") == "True",
            30,
            "Succeeded",
        )
        assert conditions_of(custom, namespace, name)["Running"] == "False"
    finally:
        fixture.stop()


def test_exit_codes_suspend_and_resume(
    kube: Any, namespace: str, fake_job: tuple[str, Any], tmp_path: Path
) -> None:
    name, custom = fake_job
    fixture = TrainingOperator(
        kube.api_client(),
        namespace,
        tmp_path,
        entrypoint=[sys.executable, "-c", REPLICA],
        restart_delay=0.2,
    ).start()

    def conds() -> dict[str, str]:
        return conditions_of(custom, namespace, name)

    try:
        wait_until(lambda: fixture.alive(name) == 2 and conds().get("Running") == "True", 30, "run")

        # A retryable exit (143) restarts that replica only.
        fixture.signal(name, "Worker", 0, signal.SIGTERM)
        wait_until(lambda: fixture.starts(name) == 3 and fixture.alive(name) == 2, 30, "restart")
        wait_until(lambda: conds().get("Running") == "True", 30, "running again")
        assert fixture.failures(name) == 1

        # Suspend: every pod gets SIGTERM, then Suspended; resume starts new pods.
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": {"runPolicy": {"suspend": True}}}
        )
        wait_until(lambda: conds().get("Suspended") == "True", 30, "Suspended")
        assert fixture.alive(name) == 0
        assert conds()["Running"] == "False"
        assert fixture.failures(name) == 1  # suspension is not a failure
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": {"runPolicy": {"suspend": False}}}
        )
        wait_until(lambda: conds().get("Suspended") == "False", 30, "resumed")
        wait_until(lambda: fixture.alive(name) == 2 and fixture.starts(name) == 5, 30, "new pods")

        # A permanent exit code (1-127) fails the job at once (the other replica is left to
        # exit on its own, as cleanPodPolicy None keeps pods).
        wait_until(lambda: conds().get("Running") == "True", 30, "running after resume")
        replica_report(fixture, name, "Master")  # its signal handlers are installed
        fixture.signal(name, "Master", 0, signal.SIGUSR1)
        wait_until(lambda: conds().get("Failed") == "True", 30, "Failed")
        assert fixture.alive(name) == 1
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        failed = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "PyTorchJobFailed"
        assert "1 Master replica(s) failed" in failed["message"]
        assert is_true(obj["status"]["conditions"], "Created")
        assert obj["status"]["replicaStatuses"]["Master"]["active"] == 0
    finally:
        fixture.stop()
