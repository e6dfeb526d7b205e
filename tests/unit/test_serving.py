"""Serving's pure parts: the desired adapters, the adapter config check and rewrite, the
replicas read from Pods, and the job's serving status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune.finetunejob import (
    ANNOTATION_MODEL_DELETED,
    ConditionStatus,
    FineTuneJob,
    FineTuneJobStatus,
    JobPhase,
)
from kubetune.serving import (
    AdapterRef,
    AdapterRejected,
    SyncResult,
    SyncState,
    adapter_rank,
    desired_adapters,
    folder_name,
    prepare_adapter_config,
)
from kubetune_operator.serving import (
    AdapterServing,
    ReplicaTracker,
    ServingState,
    SidecarReport,
    replica_of,
    serving_status,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def job(
    name: str,
    *,
    phase: JobPhase = JobPhase.SUCCEEDED,
    model: str = "tiny-llama",
    register: bool = True,
    deleted: bool = False,
    adapter: str = "lora",
) -> FineTuneJob:
    """A FineTuneJob in ``phase`` whose fine-tuned model is ``ft:<model>:acme::<name>``."""
    annotations = {ANNOTATION_MODEL_DELETED: "true"} if deleted else {}
    return FineTuneJob.from_manifest(
        {
            "metadata": {"name": name, "annotations": annotations},
            "spec": {
                "org": "acme",
                "model": model,
                "trainingFile": "file-" + "0" * 23,
                "serving": {"register": register},
                "adapter": {"type": adapter},
            },
            "status": {
                "phase": phase.value,
                "fineTunedModel": f"ft:{model}:acme::{name[-4:]}"
                if phase is JobPhase.SUCCEEDED
                else None,
            },
        }
    )


def test_desired_adapters_are_succeeded_registered_undeleted_jobs_by_base_model() -> None:
    jobs = [
        job("ftjob-a001"),
        job("ftjob-a002", model="other"),
        job("ftjob-a003", phase=JobPhase.RUNNING),
        job("ftjob-a004", phase=JobPhase.FAILED),
        job("ftjob-a005", register=False),
        job("ftjob-a006", deleted=True),
        job("ftjob-a007", adapter="full"),  # a whole model: not LoRA-loadable
        job("ftjob-a008", adapter="qlora"),
        job("ftjob-a000"),
    ]
    desired = desired_adapters(jobs)
    assert desired == {
        "tiny-llama": [
            AdapterRef("ft:tiny-llama:acme::a000", "acme", "ftjob-a000", "tiny-llama"),
            AdapterRef("ft:tiny-llama:acme::a001", "acme", "ftjob-a001", "tiny-llama"),
            AdapterRef("ft:tiny-llama:acme::a008", "acme", "ftjob-a008", "tiny-llama"),
        ],
        "other": [AdapterRef("ft:other:acme::a002", "acme", "ftjob-a002", "other")],
    }
    assert desired_adapters([]) == {}


def lora_config(**fields: Any) -> dict[str, Any]:
    """A PEFT LoRA adapter_config.json as the trainer writes it."""
    return {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "bias": "none",
        "base_model_name_or_path": "tiny-llama",
        "target_modules": ["q_proj", "v_proj"],
        **fields,
    }


def test_the_config_is_rewritten_for_vllms_filesystem_resolver() -> None:
    config = lora_config()
    result = prepare_adapter_config(config, vllm_model="/models/tiny", max_lora_rank=16)
    assert result["base_model_name_or_path"] == "/models/tiny"
    assert {k: v for k, v in result.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in config.items() if k != "base_model_name_or_path"
    }
    assert config["base_model_name_or_path"] == "tiny-llama"  # the input is not modified
    kept = prepare_adapter_config(config, vllm_model=None, max_lora_rank=16)
    assert kept["base_model_name_or_path"] == "tiny-llama"


@pytest.mark.parametrize("rank", [1, 8, 16])
def test_ranks_up_to_the_limit_are_accepted(rank: int) -> None:
    prepare_adapter_config(lora_config(r=rank), vllm_model=None, max_lora_rank=16)


def test_a_rank_above_the_limit_is_rejected_with_the_rank_and_the_limit() -> None:
    with pytest.raises(AdapterRejected) as caught:
        prepare_adapter_config(lora_config(r=32), vllm_model=None, max_lora_rank=16)
    assert caught.value.code == "adapter_rank_too_large"
    assert "rank 32" in caught.value.message
    assert "--max-lora-rank 16" in caught.value.message
    assert "[32, 64" in caught.value.message  # the maxLoraRank values that would serve it


def test_the_rank_is_the_largest_of_r_and_the_rank_pattern() -> None:
    config = lora_config(r=8, rank_pattern={"q_proj": 64})
    assert adapter_rank(config) == 64
    with pytest.raises(AdapterRejected, match="rank 64"):
        prepare_adapter_config(config, vllm_model=None, max_lora_rank=32)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"peft_type": "IA3"}, "adapter_not_lora"),
        ({"peft_type": None}, "adapter_not_lora"),
        ({"bias": "all"}, "adapter_bias_unsupported"),
    ],
)
def test_what_vllm_cannot_serve_is_rejected(fields: dict[str, Any], code: str) -> None:
    with pytest.raises(AdapterRejected) as caught:
        prepare_adapter_config(lora_config(**fields), vllm_model=None, max_lora_rank=16)
    assert caught.value.code == code


def test_folder_names_are_the_model_name_when_safe() -> None:
    assert folder_name("ft:tiny-llama:acme:x.y:abc123") == "ft:tiny-llama:acme:x.y:abc123"
    odd = folder_name("ft:meta-llama/Llama-3:acme::abc")
    assert "/" not in odd
    assert odd.startswith("ft:meta-llama_Llama-3:acme::abc-")
    assert odd != folder_name("ft:meta-llama_Llama-3:acme::abc")
    assert "/" not in folder_name("ft:../../etc")


def pod(**overrides: Any) -> dict[str, Any]:
    """A ready vLLM pod of the chart."""
    body: dict[str, Any] = {
        "metadata": {
            "name": "vllm-0",
            "uid": "u1",
            "labels": {"app.kubernetes.io/component": "vllm", "kubetune.io/base-model": "m"},
            "annotations": {"kubetune.io/base-model-id": "org/model-1"},
        },
        "spec": {
            "containers": [
                {"name": "vllm", "ports": [{"name": "http", "containerPort": 8000}]},
                {"name": "sync", "ports": [{"name": "adapter-sync", "containerPort": 8081}]},
            ]
        },
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.7",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    for key, value in overrides.items():
        body[key] = {**body[key], **value}
    return body


def test_a_ready_vllm_pod_is_a_replica() -> None:
    replica = replica_of(pod())
    assert replica is not None
    assert replica.base_model == "org/model-1"  # the annotation: label values cannot hold "/"
    assert replica.url == "http://10.0.0.7:8081"
    without = pod(metadata={"annotations": {}})
    assert replica_of(without) is not None
    assert replica_of(without).base_model == "m"  # type: ignore[union-attr]
    ipv6 = replica_of(pod(status={"podIP": "fd00::7"}))
    assert ipv6 is not None
    assert ipv6.url == "http://[fd00::7]:8081"


@pytest.mark.parametrize(
    "overrides",
    [
        {"status": {"conditions": [{"type": "Ready", "status": "False"}]}},
        {"status": {"phase": "Pending"}},
        {"status": {"podIP": None}},
        {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}},
        {"spec": {"containers": [{"name": "vllm"}]}},
    ],
)
def test_a_pod_that_is_not_ready_is_no_replica(overrides: dict[str, Any]) -> None:
    assert replica_of(pod(**overrides)) is None


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
    replica = replica_of(pod())
    assert replica is not None
    state = ServingState()
    state.seen(replica)
    version = state.version
    state.record(replica, SidecarReport({}, frozenset({REF.name})))
    assert state.version > version
    assert state.of(REF.name, "org/model-1").served_on == ("vllm-0",)
    assert state.of(REF.name, "other").served_on == ()
    assert list(state.loaded_counts()) == [("vllm-0", "org/model-1", 1)]
    state.forget("vllm-0")
    assert state.of(REF.name, "org/model-1") == AdapterServing((), 0, None, ())


def test_a_tracker_pushes_on_change_periodically_and_backs_off() -> None:
    replica = replica_of(pod())
    assert replica is not None
    tracker = ReplicaTracker(replica, sync_seconds=30)
    desired = (REF,)
    assert tracker.wants_push(desired, now=0)
    report = SidecarReport({REF.name: SyncResult(SyncState.LOADED, changed=True)}, frozenset())
    tracker.pushed_ok(desired, report, now=0)
    assert not tracker.wants_push(desired, now=10)
    assert tracker.wants_push((), now=10)  # the set changed
    assert tracker.wants_push(desired, now=30)  # periodic
    tracker.push_failed(now=40)
    assert not tracker.wants_push((), now=40.5)
    assert tracker.wants_push((), now=42)


def test_failures_are_counted_once() -> None:
    replica = replica_of(pod())
    assert replica is not None
    tracker = ReplicaTracker(replica, sync_seconds=30)
    rejected = SyncResult(SyncState.REJECTED, code="c", message="rank 32")
    report = SidecarReport({REF.name: rejected}, frozenset())
    assert tracker.new_outcomes(report) == [(REF.name, rejected)]
    assert tracker.new_outcomes(report) == []
    loaded = SyncResult(SyncState.LOADED, changed=True, seconds=0.1)
    assert tracker.new_outcomes(SidecarReport({REF.name: loaded}, frozenset())) == [
        (REF.name, loaded)
    ]
    same = SyncResult(SyncState.LOADED, changed=False)
    assert tracker.new_outcomes(SidecarReport({REF.name: same}, frozenset())) == []
