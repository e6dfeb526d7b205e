"""The merge Job built for a model of a FineTuneJob, and what its status says (pure functions,
no cluster; the Job running on the test apiserver is tests/lifecycle's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest

from kubetune.finetunejob import (
    MERGE_FAILED,
    MERGE_REQUESTED,
    FineTuneJobStatus,
    JobPhase,
    merge_annotation,
)
from kubetune.settings import ObjectStoreSettings, OperatorSettings
from kubetune.trainer_config import BaseModelSource
from kubetune_operator.merges import (
    ClusterMerges,
    MergeJobView,
    merge_job,
    merge_job_name,
    merge_job_view,
)
from kubetune_runtime.objectstore import LocalObjectStore
from tests.operator.test_manifests import JOB_ID, job
from tests.trainer.harness import make_job

MODEL = BaseModelSource(name="llama", path="/models/llama", context_length=2048)


@pytest.mark.parametrize("step", [None, 40])
def test_a_merge_job_runs_the_merge_in_the_trainer_image_without_gpus(step: int | None) -> None:
    settings = OperatorSettings(credentials_secret="trainer-env")
    manifest = merge_job(job(resources={"nodes": 2, "gpusPerNode": 8}), settings, MODEL, step)
    kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)

    meta = manifest["metadata"]
    assert meta["name"] == merge_job_name(JOB_ID, step) == f"{JOB_ID}-merge-{step or 'final'}"
    assert (meta["namespace"], meta["labels"]["kubetune.io/job"]) == ("ml", JOB_ID)
    assert meta["labels"]["app.kubernetes.io/component"] == "merge"
    spec = manifest["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (1, 3600)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"] == settings.trainer_image
    assert container["command"] == ["python", "-m", "kubetune_trainer.merge"]
    expected_args = ["--config", "/etc/kubetune/config.json"]
    assert container["args"] == expected_args + ([] if step is None else ["--step", "40"])
    assert container["envFrom"] == [{"secretRef": {"name": "trainer-env"}}]
    # The job's config, and no GPU: a merge is arithmetic on the CPU.
    assert {"name": "config", "configMap": {"name": f"{JOB_ID}-config"}} in pod["volumes"]
    assert container["resources"] == {"requests": container["resources"]["requests"]}
    assert not any("gpu" in key for key in container["resources"]["requests"])


def _job(conditions: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "metadata": {"name": f"{JOB_ID}-merge-final", "labels": {"kubetune.io/job": JOB_ID}},
        "status": {"conditions": conditions},
    }


def test_a_merge_jobs_outcome_is_its_complete_or_failed_condition() -> None:
    running = merge_job_view(_job([]))
    assert (running.owner, running.outcome) == (JOB_ID, "running")
    complete = [{"type": "SuccessCriteriaMet", "status": "True"}]
    complete.append({"type": "Complete", "status": "True"})
    assert merge_job_view(_job(complete)).outcome == "complete"
    failed = merge_job_view(
        _job(
            [
                {"type": "FailureTarget", "status": "True"},
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                },
            ]
        )
    )
    assert failed.outcome == "failed"
    assert "BackoffLimitExceeded: Job has reached the specified backoff limit" in failed.message
    assert merge_job_view(_job([{"type": "Complete", "status": "False"}])).outcome == "running"


class RecordingKube:
    """The three calls the reconcile makes, recorded (the real ones run in tests/lifecycle)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def ensure_batch_job(self, manifest: dict[str, Any], owner: dict[str, Any]) -> None:
        self.calls.append(("create", manifest["metadata"]["name"], owner["metadata"]["uid"]))

    def delete_batch_job(self, namespace: str, name: str) -> None:
        self.calls.append(("delete", name))

    def annotate_job(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self.calls.append(("annotate", name, *annotations.items()))  # type: ignore[arg-type]


def test_the_reconcile_creates_missing_jobs_deletes_ended_ones_and_tells_failures(
    tmp_path: Path,
) -> None:
    store, layout = LocalObjectStore(tmp_path), ObjectStoreSettings(local_root=tmp_path).layout()
    asked = {merge_annotation(None): MERGE_REQUESTED, merge_annotation(40): MERGE_REQUESTED}
    finished = job().model_copy(update={"status": FineTuneJobStatus(phase=JobPhase.SUCCEEDED)})
    finished.metadata.annotations = asked
    settings = ObjectStoreSettings(local_root=tmp_path)
    trainer = make_job(store, settings, Path(MODEL.path or ""), tmp_path / "t", b"{}\n")
    config = trainer.config.model_copy(update={"job_id": JOB_ID, "org": "acme"})
    store.put_bytes(layout.job_config_key("acme", JOB_ID), config.model_dump_json().encode())
    kube = RecordingKube()
    merges = ClusterMerges(kube, store, layout, OperatorSettings())  # type: ignore[arg-type]

    merges.reconcile(finished, {})  # nothing runs yet: a Job per model asked for
    final, step_40 = merge_job_name(JOB_ID, None), merge_job_name(JOB_ID, 40)
    assert kube.calls == [("create", final, "1234-uid"), ("create", step_40, "1234-uid")]

    # The final model's merge failed (the reason it recorded); checkpoint 40's is published.
    kube.calls.clear()
    store.put_json(layout.merge_failure_key("acme", JOB_ID), {"message": "out of memory"})
    store.put_bytes(layout.merged_manifest_key("acme", JOB_ID, 40), b"{}")
    ended = {
        final: MergeJobView(final, JOB_ID, "failed", "the merge Job failed"),
        step_40: MergeJobView(step_40, JOB_ID, "complete"),
    }
    merges.reconcile(finished, ended)
    failed = (merge_annotation(None), MERGE_FAILED + "out of memory")
    assert kube.calls == [("delete", final), ("annotate", JOB_ID, failed), ("delete", step_40)]

    # A job that has not succeeded merges nothing.
    kube.calls.clear()
    merges.reconcile(job().model_copy(update={"metadata": finished.metadata}), {})
    assert kube.calls == []
