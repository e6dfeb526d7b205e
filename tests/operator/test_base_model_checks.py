"""Base models registered at run time, checked on the cluster: the check Job the operator builds
(pure), what its status says, and on the real apiserver the whole way — a BaseModel object made
by the API's backend, checked by a Job whose pod runs the trainer image's ``inspect_model``
(the Job controller's stand-in), ready or failed with the reason, then trained on.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest

from kubetune.base_models import BaseModelPhase, RegisteredBaseModel, resource_name
from kubetune.finetunejob import JobPhase
from kubetune.settings import ObjectStoreSettings, OperatorSettings, Settings
from kubetune.trainer_config import TrainerConfig
from kubetune_api.backends.kubernetes import KubernetesJobBackend
from kubetune_operator.base_model_checks import check_job, check_job_name, check_job_view
from tests.operator.conftest import ORG, PLANNED_STEPS, Testbed

SETTINGS = Settings(
    mode="kubernetes",
    object_store=ObjectStoreSettings(backend="s3", bucket="models", prefix="prod"),
    operator=OperatorSettings(credentials_secret="trainer-env", service_account="trainer"),
)
CLAIM = "shared-models"


def model(path: str, volume_claim: str | None = None, model_id: str = "acme-llama") -> Any:
    return RegisteredBaseModel(
        id=model_id, org=ORG, path=path, volume_claim=volume_claim, created=int(time.time())
    )


def test_the_check_job_reads_the_model_as_a_trainer_would_without_gpus() -> None:
    registered = model("/models/acme-llama", CLAIM)
    name = resource_name(ORG, registered.id)
    manifest = check_job(name, "ml", registered, SETTINGS)
    kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)

    meta = manifest["metadata"]
    assert (meta["name"], meta["namespace"]) == (check_job_name(name), "ml")
    assert len(meta["name"]) <= 63  # its pods carry it as the job-name label
    assert meta["labels"] == {
        "kubetune.io/org": ORG,
        "app.kubernetes.io/component": "base-model-check",
        "kubetune.io/base-model-object": name,
    }
    pod = manifest["spec"]["template"]["spec"]
    assert (pod["restartPolicy"], pod["serviceAccountName"]) == ("Never", "trainer")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False  # it never calls the apiserver
    (container,) = pod["containers"]
    assert container["image"] == SETTINGS.operator.trainer_image
    assert container["command"] == ["python", "-m", "kubetune_trainer.inspect_model"]
    path, flag, key, store_flag, store = container["args"]
    assert (path, flag, store_flag) == ("/models/acme-llama", "--report-key", "--object-store")
    assert key == SETTINGS.object_store.layout().base_model_check_key(ORG, name)
    assert ObjectStoreSettings.model_validate_json(store).bucket == "models"
    assert container["envFrom"] == [{"secretRef": {"name": "trainer-env"}}]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
    assert not any("gpu" in k for k in container["resources"]["requests"])
    # The claim, read-only at the model's path.
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"] == {"claimName": CLAIM, "readOnly": True}
    mount = next(m for m in container["volumeMounts"] if m["name"] == claim["name"])
    assert (mount["mountPath"], mount["readOnly"]) == ("/models/acme-llama", True)
    # A store folder is downloaded to scratch: no claim mounted at a "path" that is none.
    stored = check_job(name, "ml", model("store:models/acme", CLAIM), SETTINGS)
    assert not [
        v for v in stored["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v
    ]


@pytest.mark.parametrize(
    ("conditions", "outcome", "message"),
    [
        ([], "running", ""),
        ([{"type": "Complete", "status": "True"}], "complete", ""),
        (
            [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "m"}],
            "failed",
            "the check Job failed (DeadlineExceeded: m)",
        ),
    ],
)
def test_a_check_jobs_view_says_whose_and_how_it_ended(
    conditions: list[dict[str, str]], outcome: str, message: str
) -> None:
    body = {
        "metadata": {
            "name": "x-check",
            "labels": {"kubetune.io/base-model-object": "x"},
            "ownerReferences": [{"uid": "u1", "controller": True}],
        },
        "status": {"conditions": conditions},
    }
    view = check_job_view(body)
    assert (view.name, view.model_object, view.owner_uid) == ("x-check", "x", "u1")
    assert (view.outcome, view.message) == (outcome, message)


def wait_checked(testbed: Testbed, backend: KubernetesJobBackend, model_id: str) -> Any:
    def checked() -> Any:
        found = backend.get_base_model(ORG, model_id)
        return found if found is not None and found.phase is not BaseModelPhase.VALIDATING else None

    return testbed.wait(checked, f"the check of {model_id}", timeout=120)


def test_a_registered_model_is_checked_by_a_job_then_trained_on(
    make_testbed: Any, tiny_model: Path
) -> None:
    testbed: Testbed = make_testbed()
    pvc: dict[str, Any] = {
        "metadata": {"name": CLAIM},
        "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    testbed.core.create_namespaced_persistent_volume_claim(testbed.namespace, pvc)
    assert testbed.trainers.kubelet.claims_dir is not None
    shutil.copytree(tiny_model, testbed.trainers.kubelet.claims_dir / CLAIM)
    backend = KubernetesJobBackend(testbed.api_client, testbed.namespace, use_cache=False)
    assert backend.add_base_model(model("/models/acme-llama", CLAIM))
    assert backend.add_base_model(model("store:models/nothing-here", model_id="acme-empty"))

    ready = wait_checked(testbed, backend, "acme-llama")
    assert ready.phase is BaseModelPhase.READY, ready.message
    assert ready.report.architecture == "LlamaForCausalLM"
    failed = wait_checked(testbed, backend, "acme-empty")
    assert failed.phase is BaseModelPhase.FAILED
    assert failed.message == "nothing is stored under store:models/nothing-here"
    # Each check Job is deleted once it told, and its answer with it.
    testbed.wait(lambda: not list_check_jobs(testbed), "the check Jobs to be deleted")
    layout = testbed.layout
    for model_id in ("acme-llama", "acme-empty"):
        key = layout.base_model_check_key(ORG, resource_name(ORG, model_id))
        assert not testbed.store.exists(key)

    # Trainable like a catalogue model: the trainers mount the claim at the model's path.
    name = testbed.submit(model="acme-llama")
    status = testbed.wait_phase(name, JobPhase.SUCCEEDED)
    assert status.step == PLANNED_STEPS
    config = TrainerConfig.model_validate_json(
        testbed.store.get_bytes(layout.job_config_key(ORG, name))
    )
    assert (config.base_model.path, config.base_model.volume_claim) == ("/models/acme-llama", CLAIM)


def list_check_jobs(testbed: Testbed) -> list[Any]:
    """The check Jobs in the testbed's namespace."""
    from kubernetes import client

    batch: Any = client.BatchV1Api(testbed.api_client)
    selector = "app.kubernetes.io/component=base-model-check"
    return list(batch.list_namespaced_job(testbed.namespace, label_selector=selector).items)


class RecordingKube:
    """What the reconciles asked of the apiserver (its answers do not matter to them)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def ensure_batch_job(self, manifest: dict[str, Any], owner: dict[str, Any]) -> None:
        self.calls.append(("ensure", manifest["metadata"]["name"]))

    def delete_batch_job(self, namespace: str, name: str) -> None:
        self.calls.append(("delete", name))

    def patch_base_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.calls.append(("status", status))


def base_model_object(status: dict[str, Any] | None = None, uid: str = "u1") -> dict[str, Any]:
    from kubetune.base_models import to_manifest

    obj = to_manifest(model("/models/acme-llama", CLAIM), "ml")
    obj["metadata"]["uid"] = uid
    if status is not None:
        obj["status"] = status
    return obj


def view(outcome: str = "complete", uid: str = "u1", message: str = "") -> Any:
    from kubetune_operator.base_model_checks import CheckJobView

    name = resource_name(ORG, "acme-llama")
    return CheckJobView(check_job_name(name), name, uid, outcome, message)  # type: ignore[arg-type]


def checks(tmp_path: Path) -> tuple[Any, RecordingKube, Any]:
    from kubetune_operator.base_model_checks import ClusterBaseModelChecks
    from kubetune_runtime.objectstore import LocalObjectStore

    kube = RecordingKube()
    store = LocalObjectStore(tmp_path)
    settings = SETTINGS.model_copy(update={"object_store": ObjectStoreSettings()})
    return ClusterBaseModelChecks(kube, store, settings), kube, store  # type: ignore[arg-type]


def test_a_validating_model_gets_one_job_and_stale_or_told_jobs_go(tmp_path: Path) -> None:
    reconcile, kube, _ = checks(tmp_path)
    reconcile.reconcile(base_model_object(), None)
    reconcile.reconcile(base_model_object(), view("running"))  # it is there: nothing to do
    reconcile.reconcile(base_model_object(), view("running", uid="u0"))  # an older object's
    reconcile.reconcile(base_model_object({"phase": "failed", "message": "x"}), view("failed"))
    name = check_job_name(resource_name(ORG, "acme-llama"))
    assert kube.calls == [("ensure", name), ("delete", name), ("delete", name)]


def test_an_ended_check_tells_its_answer_or_the_jobs_failure(tmp_path: Path) -> None:
    reconcile, kube, store = checks(tmp_path)
    key = SETTINGS.object_store.model_copy(update={"prefix": ""}).layout()
    answer_key = key.base_model_check_key(ORG, resource_name(ORG, "acme-llama"))
    store.put_json(answer_key, {"architecture": "LlamaForCausalLM", "context_length": 4096})
    reconcile.job_ended(base_model_object(), view())
    (_, status), (_, deleted) = kube.calls
    assert (status["phase"], status["report"]["architecture"]) == ("ready", "LlamaForCausalLM")
    assert "checkedAt" in status
    assert deleted.endswith("-check")
    assert not store.exists(answer_key)  # told once: the answer goes with the Job

    kube.calls.clear()  # a pod that never answered (its node lost, twice): the Job's reason
    reconcile.job_ended(base_model_object(), view("failed", message="the check Job failed (X)"))
    (_, status), _ = kube.calls
    assert (status["phase"], status["message"]) == ("failed", "the check Job failed (X)")
