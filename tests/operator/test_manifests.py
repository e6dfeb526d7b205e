"""The PyTorchJob and ConfigMap built for a FineTuneJob (pure functions, no cluster)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from kubetune.finetunejob import FineTuneJob
from kubetune.settings import OperatorSettings, Toleration
from kubetune_operator.manifests import KUEUE_QUEUE_LABEL, config_map, configmap_name
from kubetune_operator.pytorchjob import pytorchjob
from tests.harness.paths import REFERENCE_DIR

JOB_ID = "ftjob-0mhx5k2ab00000000000001"


def job(**spec: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "metadata": {"name": JOB_ID, "namespace": "ml", "uid": "1234-uid"},
            "spec": {
                "org": "acme",
                "model": "llama",
                "trainingFile": "file-0mhx5k2ab00000000000001",
                **spec,
            },
        }
    )


def pytorchjob_schema() -> Any:
    crd = yaml.safe_load((REFERENCE_DIR / "kubeflow.org_pytorchjobs.yaml").read_text())
    return _to_json_schema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def _to_json_schema(node: Any) -> Any:
    """OpenAPI v3.0 → JSON Schema draft 7: int-or-string and nullable need spelling out."""
    if isinstance(node, list):
        return [_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    return out


def test_pytorchjob_is_valid_against_kubeflows_crd():
    manifest = pytorchjob(job(resources={"nodes": 3, "gpusPerNode": 8}), OperatorSettings())
    Draft7Validator(pytorchjob_schema()).validate(manifest)


def test_master_and_workers_follow_nodes_and_gpus():
    manifest = pytorchjob(job(resources={"nodes": 3, "gpusPerNode": 8}), OperatorSettings())
    specs = manifest["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    assert specs["Worker"]["replicas"] == 2
    assert manifest["spec"]["nprocPerNode"] == "8"
    for replica in specs.values():
        assert replica["restartPolicy"] == "ExitCode"
        container = replica["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"
        assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    single = pytorchjob(job(), OperatorSettings())["spec"]["pytorchReplicaSpecs"]
    assert set(single) == {"Master"}


def test_children_are_deterministic_and_owned():
    first = pytorchjob(job(), OperatorSettings())
    assert first == pytorchjob(job(), OperatorSettings())
    assert first["metadata"]["name"] == JOB_ID
    owner = first["metadata"]["ownerReferences"][0]
    assert owner == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "name": JOB_ID,
        "uid": "1234-uid",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    cm = config_map(job(), '{"a": 1}')
    assert cm["metadata"]["name"] == configmap_name(job()) == f"{JOB_ID}-config"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "1234-uid"
    volumes = first["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": f"{JOB_ID}-config"}} in volumes


def test_a_job_without_uid_cannot_own_children():
    unsaved = job()
    unsaved.metadata.uid = None
    with pytest.raises(ValueError, match="uid"):
        pytorchjob(unsaved, OperatorSettings())


def test_pods_meet_the_restricted_pod_security_standard():
    spec = pytorchjob(job(), OperatorSettings())["spec"]["pytorchReplicaSpecs"]["Master"][
        "template"
    ]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = spec["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert spec["terminationGracePeriodSeconds"] >= 30


def test_scheduling_settings_queue_and_suspend():
    settings = OperatorSettings(
        node_selector={"pool": "spot"},
        priority_class="batch-low",
        tolerations=[Toleration(key="spot", value="true", effect="NoSchedule")],
        credentials_secret="trainer-creds",
    )
    manifest = pytorchjob(
        job(queue="team-a", suspend=True, resources={"gpuType": "NVIDIA-H100-80GB-HBM3"}),
        settings,
    )
    assert manifest["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    assert manifest["spec"]["runPolicy"]["suspend"] is True
    assert manifest["spec"]["runPolicy"]["schedulingPolicy"] == {"priorityClass": "batch-low"}
    pod = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["nodeSelector"] == {
        "pool": "spot",
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    }
    assert pod["tolerations"] == [
        {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    ]
    assert pod["priorityClassName"] == "batch-low"
    # Credentials come from the Secret by reference only.
    container = pod["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "trainer-creds"}}]
    assert "AWS" not in str(manifest)


def test_cpu_jobs_request_no_gpus():
    manifest = pytorchjob(job(resources={"gpusPerNode": 0}), OperatorSettings())
    container = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][
        0
    ]
    assert "limits" not in container["resources"]
    assert manifest["spec"]["nprocPerNode"] == "1"


def test_the_validator_would_catch_a_broken_manifest():
    manifest = copy.deepcopy(pytorchjob(job(), OperatorSettings()))
    manifest["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "one"
    with pytest.raises(Exception, match="not of type"):
        Draft7Validator(pytorchjob_schema()).validate(manifest)


@pytest.mark.parametrize("workload", ["pytorchjob", "trainjob"])
def test_the_trainer_config_carries_the_pods_grace_period_and_collective_timeout(
    workload: str,
) -> None:
    from kubetune_operator.pytorchjob import PYTORCHJOB_WORKLOAD
    from kubetune_operator.trainjob import TRAINJOB_WORKLOAD
    from kubetune_operator.workloads import ClusterRuntime
    from kubetune_runtime.faults import Faults

    opts = OperatorSettings(
        termination_grace_seconds=900, collective_timeout_seconds=7200, writer_lease_seconds=45
    )
    types = {"pytorchjob": PYTORCHJOB_WORKLOAD, "trainjob": TRAINJOB_WORKLOAD}
    runtime = ClusterRuntime(
        types[workload],
        kube=None,  # type: ignore[arg-type]  # pure calls only: nothing reaches the apiserver
        opts=opts,
        namespace="ml",
        faults=Faults(),
    )
    defaults = runtime.trainer_defaults
    # The launcher gives torchrun's workers most of this; the pod must allow as much.
    assert (defaults.stop_grace_seconds, defaults.collective_timeout_seconds) == (900, 7200)
    assert defaults.writer_lease_seconds == 45
    assert defaults.cpu_fallback is False  # a cluster's GPU job never trains on a CPU
    if workload == "pytorchjob":
        specs = pytorchjob(job(), opts)["spec"]["pytorchReplicaSpecs"]
        assert specs["Master"]["template"]["spec"]["terminationGracePeriodSeconds"] == 900
