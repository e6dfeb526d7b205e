"""The adapter registry's pure parts: the desired adapters, the adapter config check and
rewrite, folder names."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.finetunejob import (
    ANNOTATION_MODEL_DELETED,
    FineTuneJob,
    JobPhase,
    checkpoint_used_annotation,
)
from kubetune_runtime.adapters import (
    AdapterRef,
    AdapterRejected,
    adapter_rank,
    desired_adapters,
    folder_name,
    job_adapters,
    prepare_adapter_config,
)


def job(
    name: str,
    *,
    phase: JobPhase = JobPhase.SUCCEEDED,
    model: str = "tiny-llama",
    register: bool = True,
    deleted: bool = False,
    adapter: str = "lora",
    kept: tuple[int, ...] = (),
    used: dict[int, str] | None = None,
) -> FineTuneJob:
    """A FineTuneJob in ``phase`` whose fine-tuned model is ``ft:<model>:acme::<name>``, which
    keeps checkpoints ``kept``, of which ``used`` (step → annotation value) were asked for.
    """
    annotations = {ANNOTATION_MODEL_DELETED: "true"} if deleted else {}
    annotations |= {checkpoint_used_annotation(s): when for s, when in (used or {}).items()}
    checkpoints = [
        {"id": f"ftckpt-{s:023d}", "step": s, "createdAt": "2026-12-07T00:00:00Z"} for s in kept
    ]
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
                "checkpoints": checkpoints,
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
    desired = desired_adapters(jobs, checkpoint_slots=4)
    assert desired == {
        "tiny-llama": [
            AdapterRef("ft:tiny-llama:acme::a000", "acme", "ftjob-a000", "tiny-llama"),
            AdapterRef("ft:tiny-llama:acme::a001", "acme", "ftjob-a001", "tiny-llama"),
            AdapterRef("ft:tiny-llama:acme::a008", "acme", "ftjob-a008", "tiny-llama"),
        ],
        "other": [AdapterRef("ft:other:acme::a002", "acme", "ftjob-a002", "other")],
    }
    assert desired_adapters([], checkpoint_slots=4) == {}


def checkpoint(job_id: str, step: int, model: str = "tiny-llama") -> AdapterRef:
    """The ref of checkpoint ``step`` of the job made by :func:`job`."""
    name = f"ft:{model}:acme::{job_id[-4:]}:ckpt-step-{step}"
    return AdapterRef(name, "acme", job_id, model, step=step)


def test_the_most_recently_used_checkpoints_fill_the_slots_of_their_base_model() -> None:
    jobs = [
        job("ftjob-b001", kept=(10, 20, 30), used={10: "100", 20: "400", 30: "200"}),
        job("ftjob-b002", kept=(5,), used={5: "300"}),
        job("ftjob-b003", model="other", kept=(7,), used={7: "50"}),
    ]
    desired = desired_adapters(jobs, checkpoint_slots=2)
    finals = [
        AdapterRef(f"ft:tiny-llama:acme::b00{i}", "acme", f"ftjob-b00{i}", "tiny-llama")
        for i in (1, 2)
    ]
    # The two newest uses (step 20 at 400, step 5 at 300); steps 30 and 10 wait for a slot.
    assert desired["tiny-llama"] == sorted(
        [*finals, checkpoint("ftjob-b001", 20), checkpoint("ftjob-b002", 5)]
    )
    # Each base model has slots of its own.
    assert checkpoint("ftjob-b003", 7, "other") in desired["other"]
    # Using step 10 again evicts the least recently used of the two (step 5).
    jobs[0] = job("ftjob-b001", kept=(10, 20, 30), used={10: "500", 20: "400", 30: "200"})
    desired = desired_adapters(jobs, checkpoint_slots=2)
    assert [r.step for r in desired["tiny-llama"] if r.step] == [10, 20]
    assert all(r.step is None for r in desired_adapters(jobs, checkpoint_slots=0)["tiny-llama"])


def test_only_kept_checkpoints_of_served_models_are_offered() -> None:
    used = {10: "100", 20: "200"}
    gone = job("ftjob-c001", kept=(20,), used=used)  # step 10 was pruned since
    assert [r.step for r in desired_adapters([gone], checkpoint_slots=4)["tiny-llama"]] == [
        None,
        20,
    ]
    for unserved in (
        job("ftjob-c002", kept=(10,), used=used, deleted=True),
        job("ftjob-c003", kept=(10,), used=used, adapter="full"),
        job("ftjob-c004", kept=(10,), used=used, register=False),
        job("ftjob-c005", kept=(10,), used=used, phase=JobPhase.RUNNING),
    ):
        assert desired_adapters([unserved], checkpoint_slots=4) == {}
    # A hand-written annotation that is no time is ignored, not fatal.
    odd = job("ftjob-c006", kept=(10, 20), used={10: "yesterday", 20: "nan"})
    assert [r.step for r in desired_adapters([odd], checkpoint_slots=4)["tiny-llama"]] == [None]
    assert job_adapters(odd).base_model == "tiny-llama"


def test_a_checkpoint_ref_travels_through_the_sidecars_json() -> None:
    ref = checkpoint("ftjob-d001", 20)
    assert ref.to_json()["step"] == 20
    assert AdapterRef.from_json(ref.to_json()) == ref
    final = AdapterRef("ft:tiny-llama:acme::d001", "acme", "ftjob-d001", "tiny-llama")
    assert "step" not in final.to_json()
    assert AdapterRef.from_json(final.to_json()) == final


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
