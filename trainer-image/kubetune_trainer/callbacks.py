"""The Trainer callback that reports and checkpoints: events, metrics, results, preemption.

- Every step's logs become one metrics event (validation values join the step they were
  computed at) and a results row; rank 0 also sets the Prometheus gauges.
- Every saved checkpoint is uploaded by each node, committed by rank 0 (manifest last),
  announced with a checkpoint event and pruned to the newest ``keep``; each node then deletes
  its older local copies (the Trainer's own rotation runs on rank 0 only, and DeepSpeed ranks
  on every node write shards there).
- SIGTERM sets a flag; at the end of the step every rank learns whether any rank got it, and
  then all of them save, commit and stop together.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Final

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetune.ids import new_checkpoint_id
from kubetune.trainer_events import CheckpointEventData, StepMetrics, TrainerEventKind
from kubetune_runtime.lease import LeaseLost
from kubetune_trainer.checkpoints import file_digests, write_kubetune_state
from kubetune_trainer.dist import all_gather_object, any_rank, barrier
from kubetune_trainer.errors import RetryableError
from kubetune_trainer.manifest import manifest
from kubetune_trainer.run import Run
from kubetune_trainer.selection import best_step, evaluations
from kubetune_trainer.telemetry import memory_bytes, model_flops_utilization

log = logging.getLogger(__name__)

# Fault injection for tests and chaos drills: rank 0 raises SIGTERM on itself after this step.
FAULT_SIGTERM_AT_STEP_ENV: Final = "KUBETUNE_TRAINER_FAULT_SIGTERM_AT_STEP"
# Extra keys from TRL's logs, renamed for events (DPO's rewards, entropy).
_EXTRA_KEYS: Final = {
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/margins": "rewards_margins",
    "rewards/accuracies": "rewards_accuracies",
    "entropy": "entropy",
}


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def examples_seen(step: int, batch_size: int, n_examples: int) -> int:
    """Training examples consumed after ``step`` optimizer steps (the last batch of an epoch
    may be short).
    """
    per_epoch = math.ceil(n_examples / batch_size)
    epochs, rest = divmod(step, per_epoch)
    return epochs * n_examples + min(rest * batch_size, n_examples)


def eval_summary(metrics: dict[str, Any] | None) -> dict[str, float] | None:
    """The validation numbers of an evaluation's logs, with perplexity (exp of the loss)."""
    if not metrics or _finite(metrics.get("eval_loss")) is None:
        return None
    out = {"valid_loss": float(metrics["eval_loss"])}
    for key, name in (
        ("eval_mean_token_accuracy", "valid_mean_token_accuracy"),
        ("eval_rewards/accuracies", "valid_rewards_accuracies"),
        ("eval_rewards/margins", "valid_rewards_margins"),
    ):
        if _finite(metrics.get(key)) is not None:
            out[name] = float(metrics[key])
    if "valid_rewards_margins" not in out:  # a language-model loss (not DPO's) has one
        out["valid_perplexity"] = math.exp(min(out["valid_loss"], 700.0))
    return out


def merge_digests(per_node: list[object]) -> dict[str, str | None]:
    """One ``file → sha256`` map from every node's (ranks that uploaded nothing give an empty
    one). A file two nodes uploaded with different contents — the store kept whichever came
    last — is listed without a digest: present, but not verifiable.
    """
    merged: dict[str, str | None] = {}
    for digests in per_node:
        assert isinstance(digests, dict)
        for name, digest in digests.items():
            merged[name] = digest if merged.get(name, digest) == digest else None
    return dict(sorted(merged.items()))


def stale_checkpoints(output_dir: Path, step: int) -> list[Path]:
    """The node's local checkpoint folders older than ``step`` (the object store has them)."""
    stale = []
    for folder in output_dir.glob("checkpoint-*"):
        number = folder.name.removeprefix("checkpoint-")
        if folder.is_dir() and number.isdigit() and int(number) < step:
            stale.append(folder)
    return sorted(stale)


class KubetuneCallback(TrainerCallback):
    """Reports and checkpoints a run (see the module docstring)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.preempted = False
        self.last_metrics: StepMetrics | None = None
        self._pending: dict[str, Any] | None = None
        self._clock: tuple[float, int] | None = None
        fault = os.environ.get(FAULT_SIGTERM_AT_STEP_ENV)
        self._fault_step = int(fault) if fault else None

    # -- steps -----------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        """Start the tokens/s clock."""
        self._clock = (time.monotonic(), state.num_input_tokens_seen)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        """Agree on preemption; a requested stop saves this step and ends training."""
        if self._fault_step == state.global_step and self.run.topology.is_main:
            signal.raise_signal(signal.SIGTERM)
        if any_rank(self.run.flag.requested):
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True

    # -- logs ------------------------------------------------------------------------------
    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        """Turn the Trainer's logs into metrics events and results rows (rank 0)."""
        if not self.run.topology.is_main or not logs:
            return
        if "eval_loss" in logs:
            self._on_eval(state, logs)
        elif "loss" in logs:
            self._emit_pending()
            self._pending = self._train_metrics(args, state, logs)

    def _train_metrics(
        self, args: TrainingArguments, state: TrainerState, logs: dict[str, float]
    ) -> dict[str, Any]:
        now, tokens = time.monotonic(), state.num_input_tokens_seen
        start, start_tokens = self._clock or (now, tokens)
        self._clock = (now, tokens)
        rate = (tokens - start_tokens) / (now - start) if now > start else None
        data: dict[str, Any] = {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "train_loss": _finite(logs.get("loss")),
            "train_mean_token_accuracy": _finite(logs.get("mean_token_accuracy")),
            "learning_rate": _finite(logs.get("learning_rate")),
            "grad_norm": _finite(logs.get("grad_norm")),
            "tokens_per_second": rate,
            "trained_tokens": int(tokens),
            "epoch": _finite(state.epoch),
            "memory_bytes": memory_bytes(),
        }
        if rate is not None:
            data["mfu"] = model_flops_utilization(self.run.n_params, rate, args.world_size)
        for key, name in _EXTRA_KEYS.items():
            if key in logs:
                data[name] = _finite(logs[key])
        return data

    def _on_eval(self, state: TrainerState, logs: dict[str, float]) -> None:
        if state.global_step == 0 and self.run.base_eval is None:  # eval_on_start: the base model
            self.run.base_eval = eval_summary(logs)
        valid = {
            "valid_loss": _finite(logs.get("eval_loss")),
            "valid_mean_token_accuracy": _finite(logs.get("eval_mean_token_accuracy")),
        }
        for key, name in _EXTRA_KEYS.items():
            if f"eval_{key}" in logs:
                valid[f"valid_{name}"] = _finite(logs[f"eval_{key}"])
        if self._pending is not None and self._pending["step"] == state.global_step:
            self._pending.update(valid)
        else:
            self._emit_pending()
            self._pending = {"step": state.global_step, "total_steps": state.max_steps, **valid}

    def _emit_pending(self) -> None:
        data, self._pending = self._pending, None
        if data is None or self.run.events is None:
            return
        metrics = StepMetrics.model_validate({k: v for k, v in data.items() if v is not None})
        self.last_metrics = metrics
        self.run.results.update(
            metrics.step,
            train_loss=metrics.train_loss,
            train_accuracy=metrics.train_mean_token_accuracy,
            valid_loss=metrics.valid_loss,
            valid_mean_token_accuracy=metrics.valid_mean_token_accuracy,
        )
        shown = metrics.model_dump(exclude_none=True)
        self.run.events.metrics(f"Step {metrics.step}/{metrics.total_steps}", shown)
        if self.run.exporter is not None:
            self.run.exporter.observe(shown)

    def flush(self) -> None:
        """Emit the metrics still waiting for a possible validation at their step."""
        self._emit_pending()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        """Emit what is pending."""
        self._emit_pending()

    # -- checkpoints -----------------------------------------------------------------------
    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        """Upload this node's files, commit (rank 0), prune, and stop if SIGTERM came."""
        step = state.global_step
        local = Path(str(args.output_dir)) / f"checkpoint-{step}"
        self._emit_pending()
        failed = False
        digests: dict[str, str] = {}
        try:
            if self.run.topology.is_main:
                write_kubetune_state(
                    local,
                    {
                        "results": self.run.results.upto(step).to_state(),
                        "base_eval": self.run.base_eval,
                    },
                )
            barrier()  # every rank has written its files
            if self.run.topology.is_local_main:
                digests = file_digests(local)
                self.run.checkpoints.upload_files(local, step)
        except Exception:
            log.exception("uploading checkpoint %s failed", step)
            failed = True
        if any_rank(failed):
            raise RetryableError(f"the checkpoint of step {step} could not be stored")
        files = merge_digests(all_gather_object(digests))  # every node's, for the manifest
        self._ensure_writer(step)
        if self.run.topology.is_main:
            self._commit(step, files, state)
        if self.run.topology.is_local_main:
            for folder in stale_checkpoints(local.parent, step):
                shutil.rmtree(folder, ignore_errors=True)
        # The Trainer's best checkpoint (metric_for_best_model, for early stopping) may be one
        # of those local copies: the store holds checkpoints and selection.py judges them, so
        # the Trainer must not look for it at the end of training.
        state.best_model_checkpoint = None
        barrier()  # nobody stops before the manifest is written
        if any_rank(self.run.flag.requested):
            self.preempted = True
            control.should_training_stop = True

    def _ensure_writer(self, step: int) -> None:
        """Rank 0 renews the writer lease; every rank stops together when another trainer took
        the job over (the checkpoint is then never committed by this one).
        """
        lost: LeaseLost | None = None
        if self.run.topology.is_main:
            try:
                self.run.ensure_writer()
            except LeaseLost as exc:
                lost = exc
        if any_rank(lost is not None):
            log.error("not committing the checkpoint of step %s: the lease is lost", step)
            raise lost or LeaseLost("writer lease", None)

    def _commit(self, step: int, files: dict[str, str | None], state: TrainerState) -> None:
        checkpoint_id = new_checkpoint_id()
        metrics = self.last_metrics
        body = manifest(
            "checkpoint",
            self.run.run_manifest,
            checkpoint_id=checkpoint_id,
            step=step,
            metrics=metrics.model_dump(exclude_none=True) if metrics else None,
            data_position=self._data_position(step),
            files=files,
        )
        self.run.checkpoints.commit(step, body)
        data = CheckpointEventData(
            checkpoint_id=checkpoint_id,
            step=step,
            created_at=body["created_at"],
            prefix=self.run.checkpoints.prefix(step),
            metrics=metrics,
        )
        if self.run.events is not None:
            self.run.events.message(
                TrainerEventKind.CHECKPOINT,
                f"Checkpoint saved at step {step}",
                flush=True,
                **data.model_dump(mode="json", exclude_none=True, exclude={"kind"}),
            )
        if self.run.exporter is not None:
            self.run.exporter.checkpoints.labels(self.run.checkpoints.job_id).inc()
        keep = self.run.run_manifest["config"]["checkpointing"]["keep"]
        best = None
        if self.run.config.hyperparameters.use_best_checkpoint:
            # The best so far stays whatever `keep` says: it may become the model.
            committed = self.run.checkpoints.committed_steps()
            best = best_step(evaluations(state.log_history), committed)
        self.run.checkpoints.prune(keep, protect=best)

    def _data_position(self, step: int) -> dict[str, Any]:
        """Where in the data the run is: the Trainer resumes by skipping this many batches of
        the sampler's order for the epoch (seeded by seed + epoch).
        """
        config = self.run.run_manifest["config"]
        # A packing run's batches are of rows, several examples each.
        seen = "rows_seen" if config["hyperparameters"]["packing"] else "examples_seen"
        return {
            "global_step": step,
            seen: examples_seen(
                step, config["hyperparameters"]["batch_size"], self.run.n_train_rows
            ),
            "sampler_seed": config["seed"],
            "world_size": self.run.topology.world_size,
        }
