"""Early stopping and the best checkpoint: a run whose validation loss turns worse stops after
``patience`` evaluations, says why, and publishes the checkpoint of lowest validation loss —
kept in the store whatever ``keep`` says — as the fine-tuned model.

The validation file answers every question differently from the training file, so the more
the tiny model learns its one answer, the worse it does on validation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from kubetune.events import EventType
from kubetune.settings import ObjectStoreSettings
from kubetune.trainer_events import TrainerEventKind, event_kind
from kubetune_runtime.objectstore import LocalObjectStore
from kubetune_trainer.selection import best_step, early_stop_text, evaluations
from tests.trainer.harness import ORG, Job, make_job, max_abs_diff
from tests.trainer.tiny import jsonl, sft_examples

pytestmark = pytest.mark.trainer

TOTAL_STEPS = 40  # 40 examples, batch 4, 4 epochs
EVERY = 5


def other_answers(n: int) -> list[dict[str, Any]]:
    """Validation examples: the training file's questions with another answer."""
    rows = sft_examples(n, seed=9)
    for row in rows:
        row["messages"][-1]["content"] = "Nobody knows that, sadly."
    return rows


def early_stopping_job(tiny_model: Path, root: Path) -> Job:
    """A job with patience 2 whose best checkpoint becomes the model (keep=1)."""
    store = LocalObjectStore(root / "store")
    return make_job(
        store,
        ObjectStoreSettings(local_root=root / "store"),
        tiny_model,
        root / "job",
        jsonl(sft_examples(40)),
        jsonl(other_answers(8)),
        hyperparameters={
            "n_epochs": 4,
            "learning_rate": 1e-2,
            "early_stopping_patience": 2,
            "use_best_checkpoint": True,
        },
        total_steps=TOTAL_STEPS,
        checkpointing={"every_steps": EVERY, "keep": 1},
    )


@pytest.fixture(scope="module")
def stopped_early(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """The uninterrupted run."""
    job = early_stopping_job(tiny_model, tmp_path_factory.mktemp("early-stopping"))
    assert job.run() == 0, (job.workdir / "log-0.txt").read_text()[-3000:]
    return job


def test_a_run_that_gets_worse_stops_early_and_publishes_its_best_checkpoint(
    stopped_early: Job,
) -> None:
    job = stopped_early
    store = job.store
    messages = {event_kind(e): e for e in job.events() if e.type is EventType.MESSAGE}
    evals = {
        e.data["step"]: e.data["valid_loss"]
        for e in job.events()
        if e.type is EventType.METRICS and "valid_loss" in e.data
    }
    # The base model at step 0, then an evaluation at every checkpoint.
    assert sorted(evals) == list(range(0, max(evals) + 1, EVERY))

    stopped = messages[TrainerEventKind.EARLY_STOPPED]
    stopped_at = stopped.data["step"]
    assert stopped_at < TOTAL_STEPS
    assert "has not improved in 2 evaluations" in stopped.message
    # Patience: the two evaluations before the stop were no better than the best before them.
    best_before = min(loss for step, loss in evals.items() if step <= stopped_at - 2 * EVERY)
    assert evals[stopped_at] >= best_before
    assert evals[stopped_at - EVERY] >= best_before

    best = min((s for s in evals if s), key=lambda step: (evals[step], step))
    assert best < stopped_at
    chosen = messages[TrainerEventKind.BEST_CHECKPOINT]
    assert chosen.data["step"] == best
    assert f"checkpoint of step {best}" in chosen.message
    done = messages[TrainerEventKind.COMPLETED]
    assert done.data["step"] == stopped_at
    assert f"(the weights of step {best})" in done.message

    # The published adapter is that checkpoint's, byte for byte, and the checkpoint is still
    # stored though keep is 1 (the newest is kept too).
    layout = job.layout
    adapter = layout.adapter_prefix(ORG, job.config.job_id) + "adapter_model.safetensors"
    checkpoint = layout.checkpoint_prefix(ORG, job.config.job_id, best)
    digest = hashlib.sha256(store.get_bytes(adapter)).hexdigest()
    assert (
        digest
        == hashlib.sha256(store.get_bytes(checkpoint + "adapter_model.safetensors")).hexdigest()
    )
    steps = sorted(
        int(info.key.split("step-")[1].split("/")[0])
        for info in store.list(layout.checkpoints_prefix(ORG, job.config.job_id))
        if info.key.endswith("manifest.json")
    )
    assert steps == [best, stopped_at]
    manifest = store.get_json(layout.adapter_manifest_key(ORG, job.config.job_id))
    assert manifest["step"] == best
    assert manifest["evaluation"]["fine_tuned_model"]["valid_loss"] == pytest.approx(evals[best])


def test_a_preempted_run_counts_its_patience_on_and_stops_where_the_uninterrupted_one_did(
    stopped_early: Job, tiny_model: Path, tmp_path: Path
) -> None:
    reference = {event_kind(e): e.data for e in stopped_early.events()}
    stopped_at = reference[TrainerEventKind.EARLY_STOPPED]["step"]
    best = reference[TrainerEventKind.BEST_CHECKPOINT]["step"]
    # Preempted between the last two evaluations: one without improvement is counted already.
    preempt_at = stopped_at - 3
    job = early_stopping_job(tiny_model, tmp_path)
    fault = {"KUBETUNE_TRAINER_FAULT_SIGTERM_AT_STEP": str(preempt_at)}
    assert job.run(env=fault) == 143
    assert job.run() == 0, (job.workdir / "log-1.txt").read_text()[-3000:]
    resumed = {event_kind(e): e.data for e in job.events()}
    assert resumed[TrainerEventKind.RESTARTED]["step"] == preempt_at
    assert resumed[TrainerEventKind.EARLY_STOPPED]["step"] == stopped_at
    assert resumed[TrainerEventKind.BEST_CHECKPOINT]["step"] == best
    assert max_abs_diff(stopped_early.adapter_tensors(), job.adapter_tensors()) <= 1e-6


def test_checkpoints_are_judged_by_their_logged_validation_loss() -> None:
    history = [
        {"step": 0, "eval_loss": 2.0},
        {"step": 5, "loss": 1.9},
        {"step": 5, "eval_loss": 1.5},
        {"step": 10, "eval_loss": 1.2},
        {"step": 15, "eval_loss": 1.2},
        {"step": 20, "eval_loss": 1.4},
    ]
    losses = evaluations(history)
    assert losses == {0: 2.0, 5: 1.5, 10: 1.2, 15: 1.2, 20: 1.4}
    assert best_step(losses, [5, 10, 15, 20]) == 10  # the earliest of equals
    assert best_step(losses, [5, 20]) == 20  # only checkpoints that are still stored
    assert best_step(losses, [25]) is None
    text = early_stop_text(20, 40, 2, 0.01, losses)
    assert text == (
        "Early stopping at step 20 of 40: the validation loss has not improved by more than "
        "0.01 in 2 evaluations (lowest 1.2000, at step 10)"
    )
