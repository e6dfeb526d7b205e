"""DPO end to end: it runs to completion and the reward margin rises."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.events import EventType
from kubetune.finetunejob import MethodType
from kubetune.settings import ObjectStoreSettings
from kubetune.trainer_events import TrainerEventKind, event_kind
from kubetune_runtime.objectstore import LocalObjectStore
from tests.trainer.harness import ORG, make_job
from tests.trainer.tiny import dpo_examples, jsonl

pytestmark = pytest.mark.trainer


def test_dpo_raises_the_reward_margin(
    tiny_model: Path, local_store: tuple[LocalObjectStore, ObjectStoreSettings], tmp_path: Path
) -> None:
    store, settings = local_store
    job = make_job(
        store,
        settings,
        tiny_model,
        tmp_path / "job",
        jsonl(dpo_examples(40)),
        jsonl(dpo_examples(8, seed=5)),
        method=MethodType.DPO,
        hyperparameters={"n_epochs": 2, "learning_rate": 1e-2, "beta": 0.1},
        checkpointing={"every_steps": 10, "keep": 1},
    )
    assert job.run() == 0, (job.workdir / "log-0.txt").read_text()[-3000:]
    events = job.events()
    margins = [
        e.data["rewards_margins"]
        for e in events
        if e.type is EventType.METRICS and "rewards_margins" in e.data
    ]
    assert len(margins) == 20
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3 + 0.3
    evaluation = next(e for e in events if event_kind(e) is TrainerEventKind.EVALUATION)
    base, tuned = evaluation.data["base_model"], evaluation.data["fine_tuned_model"]
    assert tuned["valid_rewards_margins"] > base["valid_rewards_margins"]
    assert tuned["valid_loss"] < base["valid_loss"]
    assert event_kind(events[-1]) is TrainerEventKind.COMPLETED
    adapter = store.get_json(
        job.layout.adapter_prefix(ORG, job.config.job_id) + "adapter_config.json"
    )
    assert adapter["peft_type"] == "LORA"
