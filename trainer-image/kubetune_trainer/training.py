"""The training run itself: data → trainer → train (resumed) → evaluate → adapter."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import (
    EarlyStoppingCallback,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from kubetune.finetunejob import Strategy
from kubetune.hyperparameters import total_steps
from kubetune.storage_layout import ADAPTER_FILES
from kubetune.trainer_config import TrainerConfig
from kubetune.trainer_events import TrainerEventKind
from kubetune_trainer import exit_codes
from kubetune_trainer.callbacks import KubetuneCallback, eval_summary
from kubetune_trainer.checkpoints import CommittedCheckpoint
from kubetune_trainer.data import (
    ChatRenderer,
    LoadedFile,
    load_file,
    pack_rows,
    preference_rows,
    tokenize_supervised,
)
from kubetune_trainer.dist import local_main_first
from kubetune_trainer.errors import UserError
from kubetune_trainer.manifest import manifest, run_manifest
from kubetune_trainer.methods import (
    Hardware,
    KubetuneDPOTrainer,
    KubetuneSFTTrainer,
    dpo_config,
    sft_config,
    shards,
)
from kubetune_trainer.model import (
    fetch_base_model,
    fetch_initial_adapter,
    finalize_adapter_config,
    load_model,
    load_tokenizer,
    lora_config,
    with_initial_adapter,
)
from kubetune_trainer.results import Results
from kubetune_trainer.run import Run
from kubetune_trainer.selection import (
    best_checkpoint_text,
    best_step,
    early_stop_text,
    evaluations,
)
from kubetune_trainer.tracking import configure_tracking

log = logging.getLogger(__name__)


def _load(run: Run, file_id: str, param: str) -> LoadedFile:
    return load_file(run.read_file(file_id, param), file_id, run.config.method, param=param)


def _dataset(run: Run, loaded: LoadedFile, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """The trainer's dataset of one file (tokenized for SFT, rows for DPO)."""
    if run.is_dpo():
        return Dataset.from_dict(preference_rows(loaded))
    renderer = ChatRenderer(tokenizer, run.config.max_seq_length)
    columns, stats = tokenize_supervised(
        loaded, renderer, train_on_inputs=run.config.hyperparameters.train_on_inputs
    )
    warning = stats.warning(loaded.file_id, run.config.max_seq_length)
    if warning:
        run.warn(warning, file_id=loaded.file_id, lines=stats.truncated_lines[:20])
    if stats.fallback_masking:
        run.warn(
            "The chat template re-renders earlier turns; replies were located by their text "
            "for the loss mask"
        )
    if not columns["input_ids"]:
        raise UserError(
            f"{loaded.file_id}: no example has anything to learn within the maximum sequence "
            "length",
            code="invalid_training_file",
            param="training_file",
        )
    return Dataset.from_dict(columns)


def _packed(run: Run, dataset: Dataset) -> Dataset:
    """The training rows of a packing run (:func:`pack_rows`).

    The run's plan then counts rows: its total steps (and the evaluation interval drawn from
    them) are replanned here, before the training arguments are built. Packing is
    deterministic, so a restarted run packs the same rows and resumes at the same one.
    """
    packed = pack_rows(dataset, run.config.max_seq_length)
    hp = run.config.hyperparameters
    steps = total_steps(len(packed), hp.n_epochs, hp.batch_size)
    run.config = run.config.model_copy(update={"total_steps": steps})
    return packed


def _warn_dpo_truncation(run: Run, trainer: Trainer, n_rows: int, file_id: str) -> None:
    """DPO rows are tokenized by TRL: count those longer than the maximum length."""
    dataset: Any = trainer.train_dataset
    limit = run.config.max_seq_length
    too_long = sum(
        1
        for row in dataset
        if len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) > limit
    )
    dropped = n_rows - len(dataset)
    if too_long or dropped:
        run.warn(
            f"{too_long} preference example(s) of {file_id} are longer than {limit} tokens and "
            f"are truncated; {dropped} whose prompt alone fills it were dropped",
            file_id=file_id,
        )


def training_args(run: Run, folder: Path) -> TrainingArguments:
    """The method's TRL config for this run's hardware. Built before the model is loaded: its
    DeepSpeed ZeRO-3 config makes ``from_pretrained`` partition the weights as it builds them,
    and FSDP's loads them on rank 0 only (the other ranks get their shards from it).
    """
    hardware = Hardware(
        world_size=run.topology.world_size,
        distributed=run.topology.distributed,
        device=run.device,
        vocab_size=vocab_size(folder),
    )
    output_dir = run.workdir / "checkpoints"
    builder = dpo_config if run.is_dpo() else sft_config
    args = builder(run.config, output_dir, hardware)
    if run.config.strategy is not Strategy.DDP and not shards(run.config, hardware):
        run.warn(
            f"Strategy {run.config.strategy.value} shards a model over several CUDA processes; "
            "this run is one process (or on the CPU) and trains without it"
        )
    if args.fsdp:
        from accelerate.utils import enable_fsdp_ram_efficient_loading

        enable_fsdp_ram_efficient_loading()  # what `accelerate launch` would have set
    return args


def vocab_size(folder: Path) -> int | None:
    """The vocabulary of the model in ``folder`` (None if its config does not say)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return int(size) if size else None


def _build_trainer(
    run: Run,
    args: TrainingArguments,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    datasets: tuple[Dataset, Dataset | None],
    callback: KubetuneCallback,
) -> Trainer:
    common: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": datasets[0],
        "eval_dataset": datasets[1],
        "processing_class": tokenizer,
        "callbacks": [callback, *_early_stopping(run.config)],
        # A continued job's model carries its adapter already: none is added on top.
        "peft_config": None if run.config.initial_adapter_prefix else lora_config(run.config),
    }
    if run.is_dpo():
        return KubetuneDPOTrainer(**common)
    return KubetuneSFTTrainer(**common)


def _early_stopping(config: TrainerConfig) -> list[TrainerCallback]:
    """Transformers' patience on the validation loss, when the job asks for it."""
    hp = config.hyperparameters
    if not hp.early_stopping_patience or config.validation_file is None:
        return []
    return [EarlyStoppingCallback(hp.early_stopping_patience, hp.early_stopping_threshold)]


def _initial_adapter(run: Run, prefix: str) -> Path:
    """The continued adapter's files on this node, downloaded by its first process."""
    dest = run.workdir / "initial-adapter"
    with local_main_first(run.topology):
        if run.topology.is_local_main:
            fetch_initial_adapter(run.store, prefix, dest)
    return dest


def _evaluate(trainer: Trainer, callback: KubetuneCallback) -> dict[str, float]:
    metrics = trainer.evaluate()
    callback.flush()
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def train(run: Run) -> int:
    """Train the job (see the module docstring); returns the exit code."""
    config, topology = run.config, run.topology
    folder = fetch_base_model(config, run.store, topology, run.workdir)
    tokenizer = load_tokenizer(folder, config)
    train_file = _load(run, config.training_file, "training_file")
    valid_file = (
        _load(run, config.validation_file, "validation_file") if config.validation_file else None
    )
    data_sha = {train_file.file_id: train_file.sha256}
    if valid_file is not None:
        data_sha[valid_file.file_id] = valid_file.sha256
    datasets = (
        _dataset(run, train_file, tokenizer),
        _dataset(run, valid_file, tokenizer) if valid_file is not None else None,
    )
    if config.hyperparameters.packing:
        datasets = (_packed(run, datasets[0]), datasets[1])
        config = run.config
    run.n_train_rows = len(datasets[0])
    point = run.resume_point()
    checkpoint = point[0] if point else None
    resume_from, results, base_eval = _resume_state(run, point)
    args = training_args(run, folder)
    model = load_model(folder, config, run.device)
    if config.initial_adapter_prefix is not None:
        model = with_initial_adapter(model, _initial_adapter(run, config.initial_adapter_prefix))
    run.run_manifest = run_manifest(config, data_sha, world_size=topology.world_size)
    run.n_params = sum(p.numel() for p in model.parameters())
    run.results, run.base_eval = results, base_eval
    callback = KubetuneCallback(run)
    configure_tracking(config, run.workdir)
    trainer = _build_trainer(run, args, model, tokenizer, datasets, callback)
    if run.is_dpo():
        _warn_dpo_truncation(run, trainer, len(datasets[0]), train_file.file_id)
    _announce(run, checkpoint, trainer)
    # The base model's validation runs inside train() (eval_on_start), after the model is
    # wrapped for DDP: evaluating before train() would leave it unwrapped (never synced).
    trainer.args.eval_on_start = checkpoint is None and datasets[1] is not None
    with out_of_memory_as_user_error(run, trainer):
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    callback.flush()
    if callback.preempted:
        step = trainer.state.global_step
        run.message(TrainerEventKind.PREEMPTED, f"Stopped at step {step} after SIGTERM", step=step)
        return exit_codes.PREEMPTED
    _finish(run, trainer, callback, datasets[1] is not None)
    return exit_codes.SUCCESS


@contextmanager
def out_of_memory_as_user_error(run: Run, trainer: Trainer) -> Iterator[None]:
    """An out-of-memory error in training becomes the user's, naming what to lower."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        args = trainer.args
        raise UserError(
            f"Out of GPU memory at step {trainer.state.global_step + 1} with micro-batches of "
            f"{args.per_device_train_batch_size} example(s) of up to "
            f"{run.config.max_seq_length} tokens: lower hyperparameters.max_seq_length, use "
            "qlora or a sharding strategy (fsdp, deepspeed_zero3), or give the job more GPUs. "
            f"({str(exc).splitlines()[0] if str(exc) else 'CUDA out of memory'})",
            code="out_of_memory",
            param="hyperparameters.max_seq_length",
        ) from exc


def _resume_state(
    run: Run, point: tuple[CommittedCheckpoint, Path] | None
) -> tuple[Path | None, Results, dict[str, float] | None]:
    if point is None:
        return None, Results(), None
    path = point[1]
    results, base_eval = run.restore(path)
    return path, results, base_eval


def _announce(run: Run, checkpoint: CommittedCheckpoint | None, trainer: Trainer) -> None:
    config = run.config
    if checkpoint is not None:
        run.message(
            TrainerEventKind.RESTARTED,
            f"Restarted from step {checkpoint.step}",
            step=checkpoint.step,
            checkpoint_id=checkpoint.manifest.get("checkpoint_id"),
        )
        return
    args = trainer.args
    run.message(
        TrainerEventKind.STARTED,
        f"Fine-tuning {config.base_model.name} ({config.method.value}, "
        f"{config.adapter.type.value}) on {run.topology.world_size} process(es)",
        world_size=run.topology.world_size,
        micro_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        total_steps=config.total_steps,
    )


def _finish(run: Run, trainer: Trainer, callback: KubetuneCallback, has_valid: bool) -> None:
    step = trainer.state.global_step
    final = None
    chosen = step
    if has_valid:
        # Every rank decides alike (evaluation is collective): from the shared log history.
        losses = evaluations(trainer.state.log_history)
        if step not in losses:
            _evaluate(trainer, callback)
            losses = evaluations(trainer.state.log_history)
        chosen = _judge(run, step, losses)
        final = next(
            eval_summary(e)
            for e in reversed(trainer.state.log_history)
            if "eval_loss" in e and e.get("step") == chosen
        )
        run.message(
            TrainerEventKind.EVALUATION,
            _comparison_text(run.base_eval, final),
            base_model=run.base_eval,
            fine_tuned_model=final,
            step=chosen,
        )
    out = run.workdir / "final"
    if chosen == step:
        trainer.save_model(str(out))  # every rank: FSDP/ZeRO-3 gather the weights here
    elif run.topology.is_main:  # the chosen checkpoint's adapter, as committed
        run.store.download_prefix(run.checkpoints.prefix(chosen), out, only=ADAPTER_FILES)
    # No barrier after this: the result is whole once rank 0 has published it, and a rank 0
    # waiting for its peers would wait out the collective timeout (an hour) for one that
    # crashed after its last step (found by tests/lifecycle/test_faults.py).
    if run.topology.is_main:
        _publish(run, trainer, out, chosen, final, trained_to=step)


def _judge(run: Run, step: int, losses: dict[int, float]) -> int:
    """Announce an early stop, and choose the step whose weights become the model: the last,
    or with ``use_best_checkpoint`` the committed checkpoint (or last step) of lowest
    validation loss.
    """
    hp = run.config.hyperparameters
    if hp.early_stopping_patience and step < run.config.total_steps:
        text = early_stop_text(
            step,
            run.config.total_steps,
            hp.early_stopping_patience,
            hp.early_stopping_threshold,
            losses,
        )
        run.message(TrainerEventKind.EARLY_STOPPED, text, step=step)
    if not hp.use_best_checkpoint:
        return step
    chosen = best_step(losses, {*run.checkpoints.committed_steps(), step})
    if chosen is None or chosen == step:
        return step
    run.message(
        TrainerEventKind.BEST_CHECKPOINT,
        best_checkpoint_text(chosen, step, losses),
        step=chosen,
        valid_loss=losses[chosen],
    )
    return chosen


def _comparison_text(base: dict[str, float] | None, final: dict[str, float] | None) -> str:
    def show(metrics: dict[str, float] | None) -> str:
        if not metrics:
            return "n/a"
        text = f"loss {metrics['valid_loss']:.4f}"
        if "valid_perplexity" in metrics:
            text += f" (perplexity {metrics['valid_perplexity']:.2f})"
        return text

    return f"Validation: base model {show(base)}, fine-tuned model {show(final)}"


def _publish(
    run: Run,
    trainer: Trainer,
    out: Path,
    step: int,
    final: dict[str, float] | None,
    *,
    trained_to: int,
) -> None:
    """Publish the weights in ``out`` (those of ``step``) as the fine-tuned model, after
    training ended at step ``trained_to``.
    """
    config = run.config
    tokenizer: Any = trainer.processing_class
    tokenizer.save_pretrained(out)
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle vLLM does not need
    if run.is_adapter():
        finalize_adapter_config(out, config.base_model.name)
    files = {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    body = manifest(
        "adapter" if run.is_adapter() else "model",
        run.run_manifest,
        step=step,
        fine_tuned_model=config.fine_tuned_model,
        base_model=config.base_model.name,
        metrics=run.results.rows.get(step),
        evaluation={"base_model": run.base_eval, "fine_tuned_model": final},
        files=files,
    )
    (out / "manifest.json").write_text(json.dumps(body, indent=2, allow_nan=False))
    prefix = run.layout.adapter_prefix(config.org, config.job_id)
    run.ensure_writer()
    run.store.put_bytes(
        run.layout.results_key(config.org, config.job_id),
        run.results.to_csv(),
        content_type="text/csv",
    )
    run.store.upload_dir(out, prefix, last="manifest.json")
    which = f" (the weights of step {step})" if step != trained_to else ""
    run.message(
        TrainerEventKind.COMPLETED,
        f"Fine-tuning finished at step {trained_to}: {config.fine_tuned_model}{which}",
        step=trained_to,
        fine_tuned_model=config.fine_tuned_model,
        adapter_prefix=prefix,
        trained_tokens=int(trainer.state.num_input_tokens_seen),
    )
