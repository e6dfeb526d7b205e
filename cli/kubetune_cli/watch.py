"""``kubetune jobs watch``: a live progress bar and a tail of the job's events until it ends.

Progress comes from the trainer's metrics events (``data.step``/``data.total_steps``, as in
OpenAI's metrics events): the job object itself carries no step counter. Message events are
printed above the bar as they arrive.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import openai
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from kubetune_cli.errors import ExitCode
from kubetune_cli.output import stdout, timestamp

TERMINAL = {
    "succeeded": ExitCode.OK,
    "failed": ExitCode.JOB_FAILED,
    "cancelled": ExitCode.JOB_CANCELLED,
}
PAGE = 100
MAX_PAGES_PER_POLL = 20  # a burst larger than this between two polls is shown in part
LEVEL_STYLE = {"info": "", "warn": "yellow", "error": "bold red"}


@dataclass
class WatchState:
    """What the watcher has seen so far."""

    seen: set[str] = field(default_factory=set)
    step: int = 0
    total: int | None = None
    metrics: str = ""
    first_poll: bool = True


def new_events(client: openai.OpenAI, job_id: str, seen: set[str]) -> list[FineTuningJobEvent]:
    """Events not seen yet, oldest first.

    Ids are time-ordered but writers flush in chunks (the trainer buffers a few seconds), so
    an event may arrive with an id older than one already shown: keep a set, not a cursor.
    """
    fresh: list[FineTuningJobEvent] = []
    after: str | None = None
    for _ in range(MAX_PAGES_PER_POLL):
        page = client.fine_tuning.jobs.list_events(
            job_id, limit=PAGE, after=after if after is not None else openai.omit
        )
        unseen = [e for e in page.data if e.id not in seen]
        fresh.extend(unseen)
        # Page further only while the whole page was new: otherwise we reached known ground.
        if not page.has_more or len(unseen) < len(page.data) or not page.data:
            break
        after = page.data[-1].id
    fresh.sort(key=lambda e: e.id)
    return fresh


def _metrics_text(data: dict[str, Any]) -> str:
    parts = []
    for key, label in (("train_loss", "loss"), ("valid_loss", "valid loss")):
        value = data.get(key)
        if isinstance(value, int | float):
            parts.append(f"{label} {value:.4f}")
    speed = data.get("tokens_per_second")
    if isinstance(speed, int | float):
        parts.append(f"{speed:,.0f} tok/s")
    return ", ".join(parts)


def _event_line(event: FineTuningJobEvent) -> str:
    style = LEVEL_STYLE.get(event.level, "")
    text = f"{timestamp(event.created_at)}  {escape(event.message)}"
    return f"[{style}]{text}[/]" if style else text


def apply_events(
    state: WatchState, events: list[FineTuningJobEvent], console: Console, tail: int
) -> None:
    """Fold metrics into ``state`` and print message events (the last ``tail`` on the first
    poll, so a long-running job does not flood the screen).
    """
    messages = [e for e in events if e.type != "metrics"]
    if state.first_poll:
        messages = messages[-tail:] if tail > 0 else []
    shown = {e.id for e in messages}
    for event in events:
        state.seen.add(event.id)
        if event.type == "metrics":
            data = event.data if isinstance(event.data, dict) else {}
            _apply_metrics(state, data)
            # Without a live bar (output to a file or a pipe) the steps are the progress.
            if not console.is_terminal and not state.first_poll:
                console.print(_event_line(event))
        elif event.id in shown:
            console.print(_event_line(event))
    state.first_poll = False


def _apply_metrics(state: WatchState, data: dict[str, Any]) -> None:
    step = data.get("step")
    if isinstance(step, int):
        state.step = max(state.step, step)
    total = data.get("total_steps")
    if isinstance(total, int) and total > 0:
        state.total = total
    text = _metrics_text(data)
    if text:
        state.metrics = text


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(finished_text="•"),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
    )


def _update_bar(progress: Progress, task: TaskID, job: FineTuningJob, state: WatchState) -> None:
    completed = state.step
    if job.status == "succeeded" and state.total:
        completed = state.total  # the last metrics event may precede the last step
    progress.update(
        task,
        description=f"{job.id} {job.status}",
        completed=completed,
        total=state.total,
        metrics=state.metrics,
    )


def watch_job(
    client: openai.OpenAI, job_id: str, *, interval: float, tail: int = 10
) -> tuple[FineTuningJob, WatchState]:
    """Poll ``job_id`` until it reaches a terminal status; show progress and events."""
    state = WatchState()
    # One request before the bar appears: an unknown job or an unreachable server is then
    # reported on its own, without an empty bar on stdout.
    job = client.fine_tuning.jobs.retrieve(job_id)
    with _progress(stdout) as progress:
        task = progress.add_task(job_id, total=None, metrics="")
        while True:
            # The job first, then its events: whatever was written before the job ended is
            # then read in the same pass, so the tail is complete when the loop stops.
            apply_events(state, new_events(client, job_id, state.seen), progress.console, tail)
            _update_bar(progress, task, job, state)
            if job.status in TERMINAL:
                return job, state
            time.sleep(interval)
            job = client.fine_tuning.jobs.retrieve(job_id)


def summary(job: FineTuningJob) -> str:
    """One line on how the job ended."""
    if job.status == "succeeded":
        return f"[green]Job {job.id} succeeded[/]: fine-tuned model {job.fine_tuned_model}"
    if job.status == "failed":
        reason = escape(job.error.message) if job.error else "no reason given"
        code = f" ({job.error.code})" if job.error and job.error.code else ""
        return f"[red]Job {job.id} failed[/]: {reason}{code}"
    return f"[yellow]Job {job.id} was cancelled[/]"


def watch_and_exit_code(client: openai.OpenAI, job_id: str, *, interval: float) -> ExitCode:
    """Watch ``job_id`` to the end and say how it ended; the exit code follows the status."""
    try:
        job, _ = watch_job(client, job_id, interval=interval)
    except KeyboardInterrupt:
        stdout.print(f"\nStopped watching; job {job_id} keeps running.")
        return ExitCode.INTERRUPTED
    stdout.print(summary(job))
    return TERMINAL[job.status]
