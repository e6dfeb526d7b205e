"""What the operator reads of Kueue's Workloads (pure): why a queued job waits, whose
Workload it is, and how a Kueue-managed workload is suspended (never through ``suspend``).
"""

from __future__ import annotations

from typing import Any

from kubetune.finetunejob import FineTuneJob, JobPhase
from kubetune.ids import new_file_id
from kubetune.settings import OperatorSettings
from kubetune_operator.kube import PYTORCHJOB, TRAINJOB
from kubetune_operator.kueue import Admission, admission, owner_name, waiting
from kubetune_operator.trainjob import TRAINJOB_WORKLOAD
from kubetune_operator.workloads import ClusterRuntime
from kubetune_runtime.faults import Faults


def workload(conditions: list[dict[str, Any]], *, active: bool = True) -> Admission:
    return admission(
        {
            "metadata": {
                "name": "trainjob-ftjob-abc-1a2b3",
                "resourceVersion": "7",
                "ownerReferences": [
                    {
                        "apiVersion": "trainer.kubeflow.org/v1alpha1",
                        "kind": "TrainJob",
                        "name": "ftjob-abc",
                        "uid": "u",
                        "controller": True,
                    }
                ],
            },
            "spec": {"active": active, "queueName": "q"},
            "status": {"conditions": conditions},
        }
    )


def cond(type_: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def test_waiting_for_quota_quotes_kueue() -> None:
    pending = workload([cond("QuotaReserved", "False", "Pending", "insufficient unused quota")])
    result = waiting(pending, "team")
    assert (result.reason, result.warning) == ("Pending", False)
    assert result.message == "waiting for quota in queue team: insufficient unused quota"


def test_not_yet_evaluated_and_not_yet_made_are_told_apart() -> None:
    assert waiting(workload([]), "team").reason == "PendingEvaluation"
    assert waiting(workload([]), "team").message == "waiting for quota in queue team"
    assert waiting(None, "team").reason == "Queueing"


def test_a_preemption_is_a_warning_that_promises_the_checkpoint() -> None:
    preempted = workload(
        [
            cond("Evicted", "True", "Preempted", "Preempted to accommodate a workload"),
            cond("Preempted", "True", "InClusterQueue", "Preempted to accommodate a workload"),
            cond("QuotaReserved", "False", "Pending", "Preempted"),
        ]
    )
    result = waiting(preempted, "team")
    assert result.reason == "Preempted"
    assert result.warning
    assert result.message.startswith("preempted by Kueue (InClusterQueue")
    assert "resume from the latest checkpoint" in result.message


def test_admitted_and_reserved_say_what_is_left() -> None:
    admitted = workload(
        [cond("QuotaReserved", "True", "QuotaReserved"), cond("Admitted", "True", "Admitted")]
    )
    assert waiting(admitted, "team").reason == "Admitted"
    reserved = workload([cond("QuotaReserved", "True", "QuotaReserved")])
    assert waiting(reserved, "team").reason == "AdmissionChecks"


def test_the_owner_is_found_by_kind_and_group() -> None:
    body = {
        "metadata": {
            "ownerReferences": [
                {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": "a"},
                {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "name": "b"},
            ]
        }
    }
    assert owner_name(body, TRAINJOB) == "b"
    assert owner_name(body, PYTORCHJOB) == "a"
    assert owner_name({"metadata": {}}, TRAINJOB) is None


def runtime(kueue: bool) -> ClusterRuntime:
    return ClusterRuntime(
        TRAINJOB_WORKLOAD,
        kube=None,  # type: ignore[arg-type]  # pure calls only: nothing reaches the apiserver
        opts=OperatorSettings(),
        namespace="ns",
        faults=Faults(),
        kueue=kueue,
    )


def trainjob(queue: str | None, suspend: bool) -> dict[str, Any]:
    labels = {"kueue.x-k8s.io/queue-name": queue} if queue else {}
    return {"metadata": {"name": "ftjob-abc", "labels": labels}, "spec": {"suspend": suspend}}


def test_a_kueue_managed_workload_is_suspended_when_its_kueue_workload_is_inactive() -> None:
    view = TRAINJOB_WORKLOAD.view(trainjob("team", suspend=True))
    managed = runtime(kueue=True)
    # Suspended by Kueue (not admitted) is not "asked to be suspended" by the operator.
    assert managed.with_admission(view, workload([])).suspended is False
    assert managed.with_admission(view, None).suspended is False
    assert managed.with_admission(view, workload([], active=False)).suspended is True
    # Without Kueue, or without a queue, the workload's own suspend is what counts.
    assert runtime(kueue=False).with_admission(view, workload([])).suspended is True
    unqueued = TRAINJOB_WORKLOAD.view(trainjob(None, suspend=True))
    assert managed.with_admission(unqueued, workload([])).suspended is True


def test_a_queued_observation_carries_kueues_reason() -> None:
    job = FineTuneJob.from_manifest(
        {
            "metadata": {"name": "ftjob-abc"},
            "spec": {"model": "m", "trainingFile": new_file_id(), "queue": "team"},
        }
    )
    view = runtime(True).with_admission(
        TRAINJOB_WORKLOAD.view(trainjob("team", suspend=True)),
        workload([cond("QuotaReserved", "False", "Pending", "no room")]),
    )
    observed = runtime(True).observe(job, view, suspend=False)
    assert observed.phase is JobPhase.QUEUED
    assert observed.waiting is not None
    assert observed.waiting.reason == "Pending"
    assert runtime(False).observe(job, view, suspend=False).waiting is None
