"""Create-or-adopt and optimistic status writes, against the real apiserver."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from kubetune.finetunejob import GROUP, LABEL_ORG, PLURAL, VERSION, FineTuneJob
from kubetune.settings import OperatorSettings
from kubetune_operator import manifests
from kubetune_operator.kube import PYTORCHJOB, Conflict, KubeClient, KubeJobStore
from kubetune_operator.pytorchjob import pytorchjob


@pytest.fixture
def owner(kube_api: Any, namespace: str) -> dict[str, Any]:
    """A FineTuneJob in the apiserver (no operator runs here)."""
    from kubernetes import client

    custom: Any = client.CustomObjectsApi(kube_api)
    obj: dict[str, Any] = custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": "ftjob-0mhx5k2ab00000000000009", "labels": {LABEL_ORG: "acme"}},
            "spec": {"org": "acme", "model": "m", "trainingFile": "file-0mhx5k2ab00000000000001"},
        },
    )
    return obj


def test_children_are_created_once_then_found(kube_api: Any, owner: dict[str, Any]) -> None:
    kube = KubeClient(kube_api)
    job = FineTuneJob.from_manifest(owner)
    first = kube.ensure_workload(PYTORCHJOB, pytorchjob(job, OperatorSettings()), owner)
    again = kube.ensure_workload(PYTORCHJOB, pytorchjob(job, OperatorSettings()), owner)
    assert again["metadata"]["uid"] == first["metadata"]["uid"]
    (ref,) = first["metadata"]["ownerReferences"]
    assert (ref["uid"], ref["controller"]) == (owner["metadata"]["uid"], True)
    assert first["metadata"]["labels"][LABEL_ORG] == "acme"

    cm = kube.ensure_configmap(manifests.config_map(job, '{"a": 1}'), owner)
    # A second pass with another config keeps the first: a job's config never changes.
    kept = kube.ensure_configmap(manifests.config_map(job, '{"a": 2}'), owner)
    assert kept["metadata"]["uid"] == cm["metadata"]["uid"]
    assert kept["data"] == {"config.json": '{"a": 1}'}


def test_an_orphan_is_adopted_and_anothers_child_is_waited_for(
    kube_api: Any, namespace: str, owner: dict[str, Any]
) -> None:
    from kubernetes import client

    core: Any = client.CoreV1Api(kube_api)
    kube = KubeClient(kube_api)
    job = FineTuneJob.from_manifest(owner)
    manifest = manifests.config_map(job, "{}")
    orphan = {**manifest, "metadata": {"name": manifest["metadata"]["name"]}}
    core.create_namespaced_config_map(namespace, orphan)

    adopted = kube.ensure_configmap(manifest, owner)
    (ref,) = adopted["metadata"]["ownerReferences"]
    assert ref["uid"] == owner["metadata"]["uid"]

    # Owned by another (e.g. a deleted job of the same name, not yet garbage-collected).
    other = dict(owner, metadata={**owner["metadata"], "uid": "another-uid"})
    with pytest.raises(kopf.TemporaryError, match="belongs to another"):
        kube.ensure_configmap(manifests.config_map(FineTuneJob.from_manifest(other), "{}"), other)


def test_a_status_computed_from_a_stale_read_is_refused(
    kube_api: Any, namespace: str, owner: dict[str, Any]
) -> None:
    from kubernetes import client

    kube = KubeClient(kube_api)
    name = owner["metadata"]["name"]
    stale = owner["metadata"]["resourceVersion"]
    written = kube.patch_job_status(namespace, name, stale, {"phase": "validating_files"})
    assert written["status"]["phase"] == "validating_files"
    with pytest.raises(Conflict):
        kube.patch_job_status(namespace, name, stale, {"phase": "failed"})
    custom: Any = client.CustomObjectsApi(kube_api)
    current = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    assert current["status"]["phase"] == "validating_files"


def test_a_metadata_only_change_does_not_waste_a_status_write(
    kube_api: Any, namespace: str, owner: dict[str, Any]
) -> None:
    from kubernetes import client

    custom: Any = client.CustomObjectsApi(kube_api)
    kube = KubeClient(kube_api)
    name = owner["metadata"]["name"]
    stale = owner["metadata"]["resourceVersion"]
    # What kopf does to every new job while its first pass computes: finalizer, annotations.
    custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        {"metadata": {"finalizers": ["kubetune.io/operator"], "annotations": {"a": "b"}}},
    )
    with pytest.raises(Conflict):  # the bare precondition refuses it
        kube.patch_job_status(namespace, name, stale, {"phase": "validating_files"})
    # The driver's store sees that only metadata moved since the job was read, and writes.
    jobs = KubeJobStore(kube, namespace)
    read = FineTuneJob.from_manifest(owner)
    written = jobs.write_status(read, {"phase": "validating_files"})
    assert written.status is not None
    assert written.status.phase == "validating_files"

    # The status moved since ``read``: the precondition holds, the write is refused.
    with pytest.raises(Conflict):
        jobs.write_status(read, {"phase": "queued"})
    assert (
        kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)["status"][
            "phase"
        ]
        == "validating_files"
    )
