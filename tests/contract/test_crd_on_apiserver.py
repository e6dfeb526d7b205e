"""The FineTuneJob CRD served by a real kube-apiserver: kubectl, validation, Python round trip."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from kubetune.finetunejob import GROUP, PLURAL, VERSION, FineTuneJob, FineTuneJobSpec, ObjectMeta
from kubetune.ids import new_file_id, new_job_id
from tests.harness.paths import REPO_ROOT

EXAMPLE = REPO_ROOT / "docs" / "examples" / "finetunejob.yaml"


def custom_objects(kube_api):
    from kubernetes import client

    return client.CustomObjectsApi(kube_api)


def test_kubectl_apply_get_and_explain(kubectl, kube_api, namespace):
    out = kubectl("apply", "-n", namespace, "-f", str(EXAMPLE))
    assert "finetunejob.kubetune.io/ftjob-0mhx5k2ab00000000000001 created" in out

    # Only the operator writes status; here the test plays it through the status subresource.
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    custom_objects(kube_api).patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        {
            "status": {
                "phase": "running",
                "step": 120,
                "totalSteps": 400,
                "progress": "120/400",
                "fineTunedModel": "ft:llama-3.1-8b-instruct:acme:support-bot:00000001",
            }
        },
    )

    table = kubectl("get", "ftj", "-n", namespace)
    header, row = table.strip().splitlines()
    assert re.split(r"\s{2,}", header) == [
        "NAME",
        "PHASE",
        "MODEL",
        "PROGRESS",
        "FINE-TUNED MODEL",
        "AGE",
    ]
    cells = re.split(r"\s{2,}", row)
    assert cells[:5] == [
        name,
        "running",
        "llama-3.1-8b-instruct",
        "120/400",
        "ft:llama-3.1-8b-instruct:acme:support-bot:00000001",
    ]

    # The apiserver applied the schema's defaults to what the YAML left out.
    stored = json.loads(kubectl("get", "ftj", name, "-n", namespace, "-o", "json"))
    assert stored["spec"]["adapter"]["dropout"] == 0.05
    assert stored["spec"]["serving"] == {"register": True}

    explain = kubectl("explain", "finetunejob.spec.method")
    assert "Method and hyperparameters." in explain
    assert "supervised: learn to produce the assistant turns" in explain
    assert "hyperparameters" in explain
    epochs = kubectl("explain", "ftj.spec.method.hyperparameters.nEpochs")
    assert "Full passes over the training file" in epochs


@pytest.mark.parametrize(
    ("patch", "field", "message"),
    [
        ({"method": {"type": "rlhf"}}, "spec.method.type", "supported values"),
        (
            {"method": {"hyperparameters": {"nEpochs": -2}}},
            "spec.method.hyperparameters.nEpochs",
            "greater than or equal to 1",
        ),
        ({"adapter": {"r": 12}}, "spec.adapter.r", "supported values"),
        ({"trainingFile": "not-a-file"}, "spec.trainingFile", "should match"),
        ({"resources": {"nodes": 0}}, "spec.resources.nodes", "greater than or equal to 1"),
    ],
)
def test_apiserver_rejects_invalid_jobs_naming_the_field(kubectl, namespace, patch, field, message):
    doc = yaml.safe_load(EXAMPLE.read_text())
    for key, value in patch.items():
        doc["spec"][key] = (
            {**doc["spec"].get(key, {}), **value} if isinstance(value, dict) else value
        )
    # --validate=false: kubectl must not catch it first; the apiserver is what is under test.
    result = kubectl.run(
        "apply",
        "--validate=false",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump(doc),
        check=False,
    )
    assert result.returncode != 0
    assert "is invalid" in result.stderr
    assert field in result.stderr
    assert message in result.stderr


def test_apiserver_requires_model_and_training_file(kubectl, namespace):
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": new_job_id()},
        "spec": {"suffix": "x"},
    }
    result = kubectl.run(
        "apply", "--validate=false", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False
    )
    assert result.returncode != 0
    assert "spec.model: Required value" in result.stderr
    assert "spec.trainingFile: Required value" in result.stderr


def test_python_client_round_trip(kube_api, namespace):
    job = FineTuneJob(
        metadata=ObjectMeta(
            name=new_job_id(), namespace=namespace, labels={"kubetune.io/org": "acme"}
        ),
        spec=FineTuneJobSpec.model_validate(
            {
                "org": "acme",
                "model": "tiny-llama",
                "trainingFile": new_file_id(),
                "validationFile": new_file_id(),
                "method": {
                    "type": "dpo",
                    "hyperparameters": {"beta": 0.25, "nEpochs": 2, "learningRateMultiplier": 1.5},
                },
                "adapter": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
                "metadata": {"team": "search"},
                "integrations": [{"type": "mlflow", "mlflow": {"experiment": "exp"}}],
                "resources": {"nodes": 2, "gpusPerNode": 0},
                "strategy": "deepspeed-zero3",
                "seed": 7,
                "suffix": "pref",
            }
        ),
    )
    api = custom_objects(kube_api)
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job.to_manifest())
    stored = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job.metadata.name)
    parsed = FineTuneJob.from_manifest(stored)
    assert parsed.spec == job.spec
    assert parsed.metadata.labels == job.metadata.labels
    assert parsed.metadata.uid
    assert parsed.status is None


def test_pytorchjob_crd_is_installed(kube_api, namespace):
    api = custom_objects(kube_api)
    pytorchjob = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "probe"},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "restartPolicy": "ExitCode",
                    "template": {"spec": {"containers": [{"name": "pytorch", "image": "x"}]}},
                }
            }
        },
    }
    api.create_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", pytorchjob)
    got = api.get_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", "probe")
    assert got["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] == "ExitCode"


def test_kubectl_and_helm_reach_the_server(kubectl, helm):
    version = json.loads(kubectl("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"].startswith("v1.20")
    assert helm("list", "--all-namespaces").startswith("NAME")
