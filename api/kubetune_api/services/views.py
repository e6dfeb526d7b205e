"""How a FineTuneJob looks through OpenAI's eyes (pure functions)."""

from __future__ import annotations

from typing import Any

from kubetune.finetunejob import (
    FineTuneJob,
    FineTuneJobSpec,
    Hyperparameters,
    JobPhase,
    MethodType,
)
from kubetune.ids import default_seed, id_timestamp, results_file_id
from kubetune.lifecycle import TERMINAL_PHASES
from kubetune_api.protocol import (
    DpoJobHyperparameters,
    DpoMethodOut,
    FineTuningJob,
    JobError,
    JobHyperparameters,
    MethodOut,
    SupervisedMethodOut,
)

_WAITING = (None, JobPhase.VALIDATING_FILES, JobPhase.QUEUED, JobPhase.PAUSED)


def api_status(job: FineTuneJob) -> str:
    """The status a client sees: the observed phase, updated at once by what was requested.

    The job driver (operator or local mode) acts on ``spec.cancel``/``spec.suspend``
    asynchronously; showing the requested outcome right away is what OpenAI's cancel and pause
    do too.
    """
    phase = job.status.phase if job.status else None
    if phase in TERMINAL_PHASES:
        assert phase is not None
        return phase.value
    if job.spec.cancel:
        return JobPhase.CANCELLED.value
    if job.spec.suspend:
        return (JobPhase.PAUSED if phase in _WAITING else JobPhase.PAUSING).value
    if phase in (JobPhase.PAUSED, JobPhase.PAUSING):
        return JobPhase.QUEUED.value  # resume requested, not yet picked up
    return phase.value if phase else JobPhase.VALIDATING_FILES.value


def created_at(job: FineTuneJob) -> int:
    """When the job was created (Unix seconds): its object's time, else its id's."""
    if job.metadata.creation_timestamp is not None:
        return int(job.metadata.creation_timestamp.timestamp())
    return int(id_timestamp(job.metadata.name))


def _knobs(spec: FineTuneJobSpec, hp: Hyperparameters) -> dict[str, Any]:
    """The hyperparameters beyond OpenAI's, as resolved (or as asked, before that)."""
    return {
        "lr_scheduler_type": hp.lr_scheduler_type.value if hp.lr_scheduler_type else None,
        "warmup_ratio": hp.warmup_ratio,
        "weight_decay": hp.weight_decay,
        "max_grad_norm": hp.max_grad_norm,
        "max_seq_length": hp.max_seq_length,
        "save_steps": spec.checkpointing.every_steps,
        "save_total_limit": spec.checkpointing.keep,
        "early_stopping_patience": hp.early_stopping_patience,
        "early_stopping_threshold": hp.early_stopping_threshold,
        "use_best_checkpoint": hp.use_best_checkpoint,
    }


def job_to_openai(job: FineTuneJob) -> FineTuningJob:
    """The ``fine_tuning.job`` object of a FineTuneJob."""
    spec, status = job.spec, job.status
    hp = (
        status.hyperparameters if status and status.hyperparameters else spec.method.hyperparameters
    )
    common: dict[str, Any] = {
        "batch_size": hp.batch_size or "auto",
        "learning_rate_multiplier": hp.learning_rate_multiplier or "auto",
        "n_epochs": hp.n_epochs or "auto",
    }
    knobs = _knobs(spec, hp)
    if spec.method.type is MethodType.DPO:
        dpo_hp = DpoJobHyperparameters(**common, **knobs, beta=hp.beta or "auto")
        method = MethodOut(type="dpo", dpo=DpoMethodOut(hyperparameters=dpo_hp))
    else:
        method = MethodOut(
            type="supervised",
            supervised=SupervisedMethodOut(
                hyperparameters=JobHyperparameters(
                    **common, **knobs, train_on_inputs=hp.train_on_inputs, packing=hp.packing
                )
            ),
        )
    phase = status.phase if status else None
    error = (
        JobError(code=status.error.code, message=status.error.message, param=status.error.param)
        if status and status.error and phase is JobPhase.FAILED
        else None
    )
    finished = status.finished_at if status and phase in TERMINAL_PHASES else None
    return FineTuningJob(
        id=job.metadata.name,
        created_at=created_at(job),
        error=error,
        fine_tuned_model=status.fine_tuned_model
        if status and phase is JobPhase.SUCCEEDED
        else None,
        finished_at=int(finished.timestamp()) if finished else None,
        hyperparameters=JobHyperparameters(**common),
        model=spec.model,
        organization_id=spec.org,
        result_files=[results_file_id(job.metadata.name)] if phase is JobPhase.SUCCEEDED else [],
        status=api_status(job),
        trained_tokens=(status.trained_tokens if status and phase is JobPhase.SUCCEEDED else None),
        training_file=spec.training_file,
        validation_file=spec.validation_file,
        integrations=[i.model_dump(mode="json", exclude_none=True) for i in spec.integrations],
        seed=spec.seed if spec.seed is not None else default_seed(job.metadata.name),
        estimated_finish=(
            int(status.estimated_finish.timestamp())
            if status and status.estimated_finish and phase is JobPhase.RUNNING
            else None
        ),
        method=method,
        metadata=spec.metadata or None,
        adapter=spec.adapter.model_dump(mode="json"),
        resources=spec.resources.model_dump(mode="json"),
        strategy=spec.strategy.value,
    )
