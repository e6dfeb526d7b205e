"""The serving policy shared by every runtime (pure): the job's serving status, what the
replicas reported, when a replica is pushed."""

from __future__ import annotations

from datetime import UTC, datetime

from kubetune.finetunejob import ConditionStatus, FineTuneJob, FineTuneJobStatus
from kubetune_runtime.adapters import AdapterRef, SyncResult, SyncState
from kubetune_runtime.serving import (
    AdapterServing,
    ReplicaTracker,
    ServingState,
    plan_serving,
    serving_status,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


REF = AdapterRef("ft:m:acme::a1", "acme", "ftjob-a1", "m")


def test_the_status_says_where_the_model_is_served() -> None:
    serving = AdapterServing(("vllm-0", "vllm-1"), 2, None, ())
    status = serving_status(FineTuneJobStatus(), REF, serving, deleted=False, now=NOW)
    assert status.served_on == ["vllm-0", "vllm-1"]
    assert status.serving_error is None
    (served,) = status.conditions
    assert (served.type, served.status, served.reason) == ("Served", ConditionStatus.TRUE, "Loaded")
    assert "2 of 2" in (served.message or "")


def test_a_rejection_is_a_user_error_on_the_job() -> None:
    rejection = SyncResult(SyncState.REJECTED, code="adapter_rank_too_large", message="rank 32")
    serving = AdapterServing((), 1, rejection, ())
    status = serving_status(FineTuneJobStatus(), REF, serving, deleted=False, now=NOW)
    assert status.serving_error is not None
    assert status.serving_error.code == "adapter_rank_too_large"
    assert status.serving_error.param == "adapter.r"
    assert "rank 32" in status.serving_error.message
    assert status.conditions[0].reason == "AdapterRejected"


def test_no_replica_and_a_deleted_model_are_said_so() -> None:
    none = serving_status(
        FineTuneJobStatus(), REF, AdapterServing((), 0, None, ()), deleted=False, now=NOW
    )
    assert none.conditions[0].reason == "NoReplicas"
    deleted = serving_status(
        FineTuneJobStatus(), None, AdapterServing((), 1, None, ()), deleted=True, now=NOW
    )
    assert deleted.served_on == []
    assert deleted.conditions[0].reason == "ModelDeleted"
    quiet = serving_status(
        FineTuneJobStatus(), None, AdapterServing((), 1, None, ()), deleted=False, now=NOW
    )
    assert quiet.conditions == []  # never meant to be served: nothing to say


def test_served_on_is_bounded_like_the_crd() -> None:
    pods = tuple(f"vllm-{i:03d}" for i in range(100))
    status = serving_status(
        FineTuneJobStatus(), REF, AdapterServing(pods, 100, None, ()), deleted=False, now=NOW
    )
    FineTuneJobStatus.model_validate(status.to_wire())  # within the CRD's bounds
    assert len(status.served_on) == 64


def test_the_state_reports_per_adapter_and_forgets_gone_replicas() -> None:
    state = ServingState()
    state.seen("vllm-0", "org/model-1")
    version = state.version
    state.record("vllm-0", "org/model-1", {}, [REF.name])
    assert state.version > version
    assert state.of(REF.name, "org/model-1").served_on == ("vllm-0",)
    assert state.of(REF.name, "other").served_on == ()
    assert list(state.loaded_counts()) == [("vllm-0", "org/model-1", 1)]
    same = state.version
    state.record("vllm-0", "org/model-1", {}, [REF.name])
    assert state.version == same  # an unchanged report is no change
    state.forget("vllm-0")
    assert state.of(REF.name, "org/model-1") == AdapterServing((), 0, None, ())


def test_a_single_load_is_noted_beside_the_last_report() -> None:
    state = ServingState()
    state.seen("local", "m")
    rejected = SyncResult(SyncState.REJECTED, code="adapter_rank_too_large", message="rank 32")
    state.note("local", "m", REF.name, rejected)
    assert state.of(REF.name, "m").rejection == rejected
    state.note("local", "m", REF.name, SyncResult(SyncState.LOADED, changed=True))
    where = state.of(REF.name, "m")
    assert (where.served_on, where.rejection) == (("local",), None)
    unavailable = SyncResult(SyncState.UNAVAILABLE, message="vLLM did not answer")
    state.note("local", "m", "ft:m:acme::b2", unavailable)
    assert state.of("ft:m:acme::b2", "m").problems == ("local: vLLM did not answer",)


def test_a_tracker_pushes_on_change_periodically_and_backs_off() -> None:
    tracker = ReplicaTracker(sync_seconds=30)
    desired = (REF,)
    assert tracker.wants_push(desired, now=0)
    tracker.pushed_ok(desired, {REF.name: SyncResult(SyncState.LOADED, changed=True)}, now=0)
    assert not tracker.wants_push(desired, now=10)
    assert tracker.wants_push((), now=10)  # the set changed
    assert tracker.wants_push(desired, now=30)  # periodic
    tracker.pushed_ok(desired, {REF.name: SyncResult(SyncState.UNAVAILABLE)}, now=30)
    assert tracker.wants_push(desired, now=35)  # an unavailable adapter is retried soon
    tracker.push_failed(now=40)
    assert not tracker.wants_push((), now=40.5)
    assert tracker.wants_push((), now=42)


def test_failures_are_counted_once() -> None:
    tracker = ReplicaTracker(sync_seconds=30)
    rejected = SyncResult(SyncState.REJECTED, code="c", message="rank 32")
    assert tracker.new_outcomes({REF.name: rejected}) == [(REF.name, rejected)]
    assert tracker.new_outcomes({REF.name: rejected}) == []
    loaded = SyncResult(SyncState.LOADED, changed=True, seconds=0.1)
    assert tracker.new_outcomes({REF.name: loaded}) == [(REF.name, loaded)]
    same = SyncResult(SyncState.LOADED, changed=False)
    assert tracker.new_outcomes({REF.name: same}) == []


def succeeded_job(**metadata: object) -> FineTuneJob:
    return FineTuneJob.from_manifest(
        {
            "metadata": {"name": "ftjob-a1", **metadata},
            "spec": {"org": "acme", "model": "m", "trainingFile": "file-" + "0" * 23},
            "status": {"phase": "succeeded", "fineTunedModel": REF.name},
        }
    )


def test_plan_announces_a_rejection_once_and_the_model_served() -> None:
    rejection = SyncResult(SyncState.REJECTED, code="adapter_rank_too_large", message="rank 32")
    job = succeeded_job()
    status, notices = plan_serving(job, AdapterServing((), 1, rejection, ()), now=NOW)
    assert [(n.reason, n.warning) for n in notices] == [("AdapterRejected", True)]
    again = job.model_copy(update={"status": status})
    _, repeated = plan_serving(again, AdapterServing((), 1, rejection, ()), now=NOW)
    assert repeated == ()
    served, notices = plan_serving(job, AdapterServing(("vllm-0",), 1, None, ()), now=NOW)
    assert [n.reason for n in notices] == ["Served"]
    assert served.served_on == ["vllm-0"]
    deleted = succeeded_job(annotations={"kubetune.io/model-deleted": "true"})
    gone, _ = plan_serving(deleted, AdapterServing(), now=NOW)
    assert gone.conditions[0].reason == "ModelDeleted"
