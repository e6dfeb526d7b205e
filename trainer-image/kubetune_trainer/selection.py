"""Early stopping and the best checkpoint: which step's weights become the fine-tuned model.

Checkpoints are judged by the validation loss the Trainer logged at their step (with early
stopping or ``use_best_checkpoint``, it evaluates at every checkpoint). The log history is
part of every checkpoint's ``trainer_state.json``, so a resumed run judges with every
evaluation of the runs before it. Patience itself is transformers' ``EarlyStoppingCallback``,
whose counter is saved with the checkpoint as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def evaluations(log_history: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Step → validation loss, from the Trainer's log history (the last one of a step)."""
    return {
        int(entry["step"]): float(entry["eval_loss"])
        for entry in log_history
        if "eval_loss" in entry and "step" in entry
    }


def best_step(losses: Mapping[int, float], candidates: Iterable[int]) -> int | None:
    """The candidate step of lowest validation loss (the earliest of equals); None if no
    candidate was evaluated.
    """
    judged = [(losses[step], step) for step in candidates if step in losses]
    return min(judged)[1] if judged else None


def early_stop_text(
    step: int, total_steps: int, patience: int, threshold: float, losses: Mapping[int, float]
) -> str:
    """Why training stopped at ``step`` of ``total_steps``."""
    best = best_step(losses, losses)
    by = f" by more than {threshold:g}" if threshold else ""
    text = (
        f"Early stopping at step {step} of {total_steps}: the validation loss has not "
        f"improved{by} in {patience} evaluation{'s' if patience > 1 else ''}"
    )
    if best is not None:
        text += f" (lowest {losses[best]:.4f}, at step {best})"
    return text


def best_checkpoint_text(chosen: int, last: int, losses: Mapping[int, float]) -> str:
    """Which checkpoint became the fine-tuned model, and why."""
    return (
        f"The fine-tuned model is the checkpoint of step {chosen}: its validation loss "
        f"{losses[chosen]:.4f} is the lowest of the checkpoints (step {last}: "
        f"{losses[last]:.4f})"
    )
