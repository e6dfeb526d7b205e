"""``kubetune jobs``: create, inspect, control and watch fine-tuning jobs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any

import openai
import typer
from openai.types.fine_tuning import FineTuningJob

from kubetune_cli.context import connection
from kubetune_cli.output import (
    Column,
    as_dict,
    print_json,
    show_list,
    show_object,
    stdout,
    timestamp,
)
from kubetune_cli.watch import watch_and_exit_code

app = typer.Typer(help="Create, inspect, control and watch fine-tuning jobs.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
JobId = Annotated[str, typer.Argument(help="The job's id (ftjob-…).")]
IntervalOpt = Annotated[
    float, typer.Option(min=0.1, help="Seconds between two polls while watching.")
]


class Method(StrEnum):
    """Training methods the API offers."""

    SUPERVISED = "supervised"
    DPO = "dpo"


JOB_COLUMNS: list[Column] = [
    ("ID", lambda j: j.id),
    ("MODEL", lambda j: j.model),
    ("METHOD", lambda j: j.method.type if j.method else None),
    ("STATUS", lambda j: j.status),
    ("FINE-TUNED MODEL", lambda j: j.fine_tuned_model),
    ("CREATED (UTC)", lambda j: timestamp(j.created_at)),
]


def _hyperparameters(job: FineTuningJob) -> dict[str, Any]:
    method = job.method
    block = getattr(method, method.type, None) if method else None
    hp = block.hyperparameters if block is not None else job.hyperparameters
    return hp.model_dump(mode="json", exclude_none=True)


def _extra(job: FineTuningJob, key: str) -> Any:
    # kubetune's additions (adapter, resources, strategy) arrive as extra fields of the model.
    return (job.model_extra or {}).get(key)


JOB_FIELDS: list[Column] = [
    ("id", lambda j: j.id),
    ("status", lambda j: j.status),
    ("model", lambda j: j.model),
    ("fine_tuned_model", lambda j: j.fine_tuned_model),
    ("method", lambda j: j.method.type if j.method else None),
    ("hyperparameters", _hyperparameters),
    ("training_file", lambda j: j.training_file),
    ("validation_file", lambda j: j.validation_file),
    ("seed", lambda j: j.seed),
    ("trained_tokens", lambda j: j.trained_tokens),
    ("created_at", lambda j: timestamp(j.created_at)),
    ("estimated_finish", lambda j: timestamp(j.estimated_finish)),
    ("finished_at", lambda j: timestamp(j.finished_at)),
    ("error", lambda j: f"{j.error.message} ({j.error.code})" if j.error else None),
    ("adapter", lambda j: _extra(j, "adapter")),
    ("resources", lambda j: _extra(j, "resources")),
    ("strategy", lambda j: _extra(j, "strategy")),
]

EVENT_COLUMNS: list[Column] = [
    ("TIME (UTC)", lambda e: timestamp(e.created_at)),
    ("LEVEL", lambda e: e.level),
    ("TYPE", lambda e: e.type),
    ("MESSAGE", lambda e: e.message),
]

CHECKPOINT_COLUMNS: list[Column] = [
    ("ID", lambda c: c.id),
    ("STEP", lambda c: c.step_number),
    ("TRAIN LOSS", lambda c: c.metrics.train_loss),
    ("VALID LOSS", lambda c: c.metrics.valid_loss),
    ("CHECKPOINT MODEL", lambda c: c.fine_tuned_model_checkpoint),
    ("CREATED (UTC)", lambda c: timestamp(c.created_at)),
]


def method_body(
    method: Method,
    *,
    epochs: int | None,
    batch_size: int | None,
    learning_rate_multiplier: float | None,
    beta: float | None,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """OpenAI's ``method`` object; hyperparameters not given stay "auto" on the server.

    ``extra`` holds ``KEY=VALUE`` pairs for the other hyperparameters (``weight_decay=0.01``,
    ``lr_scheduler_type=cosine``); a value that parses as JSON is sent as that JSON value.
    """
    given = {
        "n_epochs": epochs,
        "batch_size": batch_size,
        "learning_rate_multiplier": learning_rate_multiplier,
        "beta": beta if method is Method.DPO else None,
    }
    hyperparameters: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    for pair in extra:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--hyperparameter")
        try:
            hyperparameters[key] = json.loads(text)
        except ValueError:
            hyperparameters[key] = text  # a bare word: a string (cosine)
    return {"type": method.value, method.value: {"hyperparameters": hyperparameters}}


def show_job(job: FineTuningJob, *, as_json: bool) -> None:
    """One job, as a table or as JSON."""
    show_object(job, JOB_FIELDS, as_json=as_json)


@app.command("create")
def create(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Base model (or an ft: model to continue).")],
    training_file: Annotated[str, typer.Option(help="Id of an uploaded training file.")],
    validation_file: Annotated[str | None, typer.Option(help="Id of a validation file.")] = None,
    method: Annotated[Method, typer.Option(help="Training method.")] = Method.SUPERVISED,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs (default: auto).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Batch size (default: auto).")
    ] = None,
    learning_rate_multiplier: Annotated[
        float | None, typer.Option(min=0.0, help="Learning-rate multiplier (default: auto).")
    ] = None,
    beta: Annotated[float | None, typer.Option(help="DPO beta (--method dpo only).")] = None,
    hyperparameter: Annotated[
        list[str] | None,
        typer.Option(
            "--hyperparameter",
            "-H",
            help="Another hyperparameter as KEY=VALUE, repeatable (weight_decay=0.01, "
            "lr_scheduler_type=cosine, save_steps=20; see docs/compatibility.md).",
        ),
    ] = None,
    suffix: Annotated[
        str | None, typer.Option(help="Added to the fine-tuned model's name.")
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Random seed.")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Watch the job until it ends.")] = False,
    interval: IntervalOpt = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """Create a fine-tuning job."""
    if beta is not None and method is not Method.DPO:
        raise typer.BadParameter("--beta applies to --method dpo only", param_hint="--beta")
    client = connection(ctx).client()
    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=training_file,
        validation_file=validation_file if validation_file is not None else openai.omit,
        method=method_body(  # type: ignore[arg-type]
            method,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate_multiplier=learning_rate_multiplier,
            beta=beta,
            extra=hyperparameter or (),
        ),
        suffix=suffix if suffix is not None else openai.omit,
        seed=seed if seed is not None else openai.omit,
    )
    if as_json:
        print_json(as_dict(job))
    else:
        stdout.print(f"Created job [bold]{job.id}[/] ({job.status})")
    if watch:
        raise typer.Exit(int(watch_and_exit_code(client, job.id, interval=interval)))


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List your jobs, newest first."""
    pages = connection(ctx).client().fine_tuning.jobs.list(limit=min(limit, 100))
    jobs = []
    for job in pages:  # the SDK follows `after` cursors across pages
        jobs.append(job)
        if len(jobs) >= limit:
            break
    show_list(jobs, JOB_COLUMNS, as_json=as_json, title="Jobs")


@app.command("get")
def get(ctx: typer.Context, job_id: JobId, as_json: JsonOpt = False) -> None:
    """Show one job."""
    show_job(connection(ctx).client().fine_tuning.jobs.retrieve(job_id), as_json=as_json)


@app.command("cancel")
def cancel(ctx: typer.Context, job_id: JobId, as_json: JsonOpt = False) -> None:
    """Cancel a job that has not finished."""
    _transition(connection(ctx).client().fine_tuning.jobs.cancel(job_id), "cancel", as_json)


@app.command("pause")
def pause(ctx: typer.Context, job_id: JobId, as_json: JsonOpt = False) -> None:
    """Pause a job: it checkpoints, stops, and keeps its place."""
    _transition(connection(ctx).client().fine_tuning.jobs.pause(job_id), "pause", as_json)


@app.command("resume")
def resume(ctx: typer.Context, job_id: JobId, as_json: JsonOpt = False) -> None:
    """Resume a paused job from its last checkpoint."""
    _transition(connection(ctx).client().fine_tuning.jobs.resume(job_id), "resume", as_json)


def _transition(job: FineTuningJob, verb: str, as_json: bool) -> None:
    if as_json:
        print_json(as_dict(job))
    else:
        stdout.print(f"Requested {verb} of {job.id}: status is now {job.status}")


@app.command("watch")
def watch(ctx: typer.Context, job_id: JobId, interval: IntervalOpt = 2.0) -> None:
    """Follow a job until it ends (exit 0: succeeded, 4: failed, 5: cancelled).

    Shows a progress bar from the trainer's step metrics and the job's events as they come.
    """
    code = watch_and_exit_code(connection(ctx).client(), job_id, interval=interval)
    raise typer.Exit(int(code))


@app.command("events")
def events(
    ctx: typer.Context,
    job_id: JobId,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="The newest this many.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Show a job's newest events, oldest of them first."""
    page = connection(ctx).client().fine_tuning.jobs.list_events(job_id, limit=limit)
    show_list(list(reversed(page.data)), EVENT_COLUMNS, as_json=as_json, title="Events")


@app.command("checkpoints")
def checkpoints(
    ctx: typer.Context,
    job_id: JobId,
    limit: Annotated[int, typer.Option(min=1, max=100, help="The newest this many.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """List a job's checkpoints, newest first."""
    page = connection(ctx).client().fine_tuning.jobs.checkpoints.list(job_id, limit=limit)
    show_list(page.data, CHECKPOINT_COLUMNS, as_json=as_json, title="Checkpoints")
