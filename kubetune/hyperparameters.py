"""Resolve "auto" hyperparameters, the way OpenAI documents it, in one pure function.

The API resolves them when a job is created (so the response shows numbers), and the operator
and local executor resolve the same way for jobs created with ``kubectl apply``.

n_epochs follows OpenAI's published rule (fine-tuning data preparation guide): aim for about
3 epochs, but train on at least ~100 and at most ~25,000 examples in total, within 1 to 25 epochs.
"""

from __future__ import annotations

from typing import Final

from kubetune.finetunejob import AdapterType, Hyperparameters, LrScheduler, MethodType

TARGET_EPOCHS: Final = 3
MIN_TARGET_EXAMPLES: Final = 100
MAX_TARGET_EXAMPLES: Final = 25_000
MIN_DEFAULT_EPOCHS: Final = 1
MAX_DEFAULT_EPOCHS: Final = 25
DEFAULT_BETA: Final = 0.1
DEFAULT_WARMUP_RATIO: Final = 0.03
DEFAULT_WEIGHT_DECAY: Final = 0.0
DEFAULT_MAX_GRAD_NORM: Final = 1.0


def auto_epochs(n_examples: int) -> int:
    """OpenAI's default epoch count for a training file of ``n_examples`` examples."""
    if n_examples <= 0:
        raise ValueError("n_examples must be positive")
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


def auto_batch_size(n_examples: int) -> int:
    """About 0.2% of the examples per step, between 1 and 256 (OpenAI's observed default)."""
    return max(1, min(256, round(n_examples * 0.002)))


def auto_learning_rate_multiplier(adapter: AdapterType) -> float:
    """1.0 for adapters; full fine-tuning moves every weight, so it starts 10x gentler."""
    return 0.1 if adapter is AdapterType.FULL else 1.0


def resolve(
    requested: Hyperparameters, *, method: MethodType, adapter: AdapterType, n_examples: int
) -> Hyperparameters:
    """Fill every "auto" (absent) hyperparameter; explicit values are kept as they are."""
    return requested.model_copy(
        update={
            "n_epochs": requested.n_epochs or auto_epochs(n_examples),
            "batch_size": requested.batch_size or auto_batch_size(n_examples),
            "learning_rate_multiplier": requested.learning_rate_multiplier
            or auto_learning_rate_multiplier(adapter),
            "beta": (requested.beta or DEFAULT_BETA) if method is MethodType.DPO else None,
            "warmup_ratio": _given_or(requested.warmup_ratio, DEFAULT_WARMUP_RATIO),
            "lr_scheduler_type": requested.lr_scheduler_type or LrScheduler.LINEAR,
            "weight_decay": _given_or(requested.weight_decay, DEFAULT_WEIGHT_DECAY),
            "max_grad_norm": _given_or(requested.max_grad_norm, DEFAULT_MAX_GRAD_NORM),
            "train_on_inputs": bool(requested.train_on_inputs)
            if method is MethodType.SUPERVISED
            else None,
            "packing": bool(requested.packing) if method is MethodType.SUPERVISED else None,
            "early_stopping_threshold": _given_or(requested.early_stopping_threshold, 0.0)
            if requested.early_stopping_patience
            else None,
            "use_best_checkpoint": requested.use_best_checkpoint
            if requested.use_best_checkpoint is not None
            else bool(requested.early_stopping_patience),
        }
    )


def _given_or(value: float | None, default: float) -> float:
    """``value`` unless omitted (0 is a value: no decay, no clipping)."""
    return default if value is None else value


def total_steps(n_examples: int, n_epochs: int, batch_size: int) -> int:
    """Optimizer steps a run will take (the last partial batch of an epoch is a step)."""
    return n_epochs * -(-n_examples // batch_size)
