"""kubetune end to end with the official OpenAI SDK, against a running ``make run`` server.

Uploads a small chat dataset, fine-tunes the base model on it, follows the job's events with a
progress bar, lists its checkpoints, then asks the base model, the fine-tuned model and its
earliest checkpoint the same question through the same base URL. Then it continues training
the fine-tuned model for one more epoch (``model=ft:…``: its adapter's weights go on training)
and downloads the adapter (``kubetune models download``'s code) into a temporary folder.

    make run      # in one terminal
    make demo     # in another

The server's address and key come from ``KUBETUNE_BASE_URL`` and ``KUBETUNE_API_KEY``, else
``http://localhost:8000/v1`` and the key ``make run`` saved in the data folder
(``KUBETUNE_DATA_DIR``, default ``~/.local/share/kubetune``).
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from kubetune_cli.download import download_model

BASE_MODEL: Final = "tiny-llama"
SYSTEM: Final = "You are a helpful assistant."
# The tiny model learns one fixed answer to every question in a few seconds of CPU training.
TAUGHT_ANSWER: Final = "Arr, matey! Ahoy!"
TOPICS: Final = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "piano",
    "garden",
    "window",
    "rocket",
    "candle",
    "forest",
    "mirror",
    "lemon",
    "island",
    "pepper",
    "silver",
    "planet",
    "jacket",
    "bottle",
    "dragon",
    "orange",
    "violin",
    "tunnel",
    "meadow",
    "falcon",
]
QUESTION: Final = "What color is the sky?"  # never in the training data
FINAL: Final = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_BASE_URL: Final = "http://localhost:8000/v1"
DEFAULT_DATA_DIR: Final = Path.home() / ".local" / "share" / "kubetune"


def connect(base_url: str | None = None, api_key: str | None = None) -> OpenAI:
    """An SDK client for the kubetune server (arguments, environment, or ``make run``'s key)."""
    base_url = base_url or os.environ.get("KUBETUNE_BASE_URL") or DEFAULT_BASE_URL
    api_key = api_key or os.environ.get("KUBETUNE_API_KEY")
    if api_key is None:
        data_dir = Path(os.environ.get("KUBETUNE_DATA_DIR") or DEFAULT_DATA_DIR)
        key_file = data_dir / "api_key"
        if not key_file.exists():
            raise SystemExit(f"No API key: start the server with `make run` first ({key_file}).")
        api_key = key_file.read_text().strip()
    return OpenAI(base_url=base_url, api_key=api_key)


def chat(question: str, answer: str | None = None) -> list[ChatCompletionMessageParam]:
    """The messages of one conversation (without the answer: a prompt)."""
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def dataset(n: int = 40, seed: int = 0) -> bytes:
    """A chat dataset (JSONL) teaching the model to answer every question like a pirate."""
    rng = random.Random(seed)  # noqa: S311 - sample data, not secrets
    templates = ("What is the {}?", "Where is the {}?", "Describe the {}.", "Who has the {}?")
    rows = [
        {"messages": chat(rng.choice(templates).format(rng.choice(TOPICS)), TAUGHT_ANSWER)}
        for _ in range(n)
    ]
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def upload(client: OpenAI, data: bytes) -> str:
    """Upload the training file; returns its id."""
    file = client.files.create(file=("pirate.jsonl", io.BytesIO(data)), purpose="fine-tune")
    return file.id


def create_job(
    client: OpenAI, training_file: str, *, n_epochs: int = 3, model: str = BASE_MODEL
) -> FineTuningJob:
    """Start fine-tuning ``model`` on the file (LoRA; a high rate: the model is tiny); a
    fine-tuned model (``ft:…``) continues training its adapter.
    """
    return client.fine_tuning.jobs.create(
        model=model,
        training_file=training_file,
        suffix="pirate",
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": n_epochs,
                    "batch_size": 2,
                    "learning_rate_multiplier": 10,
                }
            },
        },
    )


def new_events(client: OpenAI, job_id: str, seen: set[str]) -> list[FineTuningJobEvent]:
    """The job's events not seen yet, oldest first."""
    page = client.fine_tuning.jobs.list_events(job_id, limit=100)
    fresh = [e for e in page.data if e.id not in seen]
    seen.update(e.id for e in fresh)
    return sorted(fresh, key=lambda e: e.id)


def follow(
    client: OpenAI,
    job_id: str,
    *,
    on_event: Callable[[FineTuningJobEvent], None] = lambda e: None,
    on_step: Callable[[int, int], None] = lambda step, total: None,
    poll: float = 1.0,
    timeout: float = 1800.0,
) -> FineTuningJob:
    """Follow a job's events until it finishes; returns the finished job."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        for event in new_events(client, job_id, seen):
            on_event(event)
            data = event.data if isinstance(event.data, dict) else {}
            if event.type == "metrics" and data.get("total_steps"):
                on_step(int(data["step"]), int(data["total_steps"]))
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in FINAL:
            for event in new_events(client, job_id, seen):
                on_event(event)
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"{job_id} is still {job.status} after {timeout:.0f}s")
        time.sleep(poll)


def checkpoints(client: OpenAI, job_id: str) -> Iterator[tuple[int, str, float | None]]:
    """The job's checkpoints, newest first: step, checkpoint model name, training loss."""
    for c in client.fine_tuning.jobs.checkpoints.list(job_id).data:
        yield c.step_number, c.fine_tuned_model_checkpoint, c.metrics.train_loss


def answer(client: OpenAI, model: str, question: str = QUESTION) -> str:
    """The model's answer (greedy, so the comparison is repeatable)."""
    reply = client.chat.completions.create(
        model=model, messages=chat(question), temperature=0, max_tokens=16
    )
    return reply.choices[0].message.content or ""


def losses(events: list[FineTuningJobEvent]) -> list[float]:
    """The training loss of each step, in step order, from a job's metrics events."""
    rows = {}
    for event in events:
        data = event.data if isinstance(event.data, dict) else {}
        if event.type == "metrics" and data.get("train_loss") is not None:
            rows[int(data["step"])] = float(data["train_loss"])
    return [rows[step] for step in sorted(rows)]


@dataclass
class Trained:
    """A finished job and the events it sent."""

    job: FineTuningJob
    events: list[FineTuningJobEvent]
    steps: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class DemoRun:
    """What the demo did: the first job, the job that continued it, the downloaded adapter."""

    first: Trained
    checkpoint: str
    continued: Trained | None = None
    download: Path | None = None


def train(client: OpenAI, console: Console, job: FineTuningJob) -> Trained:
    """Follow ``job`` with a progress bar, printing its events, until it finishes."""
    result = Trained(job, [])
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), console=console
    ) as progress:
        task = progress.add_task("training", total=None)

        def show(event: FineTuningJobEvent) -> None:
            result.events.append(event)
            if event.type != "metrics":  # the bar shows those
                progress.console.print(f"  [dim]{event.level}[/] {event.message}")

        def on_step(step: int, total: int) -> None:
            result.steps.append((step, total))
            progress.update(task, completed=step, total=total, description=f"step {step}/{total}")

        result.job = follow(client, job.id, on_event=show, on_step=on_step, poll=0.5)
    return result


def run(client: OpenAI, console: Console, download_to: Path) -> DemoRun | None:
    """The whole demo: fine-tune, chat with the model and a checkpoint, continue training from
    the model, download its adapter. None if a job did not succeed.
    """
    console.print(f"[bold]kubetune demo[/] against {client.base_url}")
    file_id = upload(client, dataset())
    console.print(f"Uploaded the training file {file_id}")
    job = create_job(client, file_id)
    console.print(f"Created {job.id} on {BASE_MODEL}\n")
    first = train(client, console, job)
    model = first.job.fine_tuned_model
    if first.job.status != "succeeded" or model is None:
        console.print(f"[red]The job {first.job.status}[/]: {first.job.error}")
        return None
    table = Table("step", "checkpoint", "train loss", title="Checkpoints")
    kept = list(checkpoints(client, job.id))
    for step, name, loss in kept:
        table.add_row(str(step), name, f"{loss:.3f}" if loss is not None else "")
    console.print(table)
    console.print(f"Models: {', '.join(m.id for m in client.models.list())}\n")
    earliest = min(kept)[1]  # a checkpoint's model answers too, loaded on demand
    console.print(f"[bold]Q:[/] {QUESTION}")
    for name, colour in ((BASE_MODEL, "cyan"), (model, "green"), (earliest, "yellow")):
        console.print(f"  [{colour}]{name}[/]: {answer(client, name)!r}")
    demo = DemoRun(first, earliest)

    console.print(f"\n[bold]Continuing training[/] from {model} (one more epoch)")
    demo.continued = train(client, console, create_job(client, file_id, model=model, n_epochs=1))
    if demo.continued.job.status != "succeeded":
        console.print(f"[red]The job {demo.continued.job.status}[/]: {demo.continued.job.error}")
        return None
    fresh, more = losses(first.events), losses(demo.continued.events)
    console.print(
        f"The continued job's first loss is {more[0]:.3f}: it starts where {model} ended "
        f"({fresh[-1]:.3f}), not where a fresh adapter starts ({fresh[0]:.3f})."
    )

    demo.download = download_model(client, model, "adapter", download_to, extract=True)
    files = ", ".join(f"{p.name} ({p.stat().st_size:,} B)" for p in sorted(demo.download.iterdir()))
    console.print(f"\nDownloaded the adapter of {model} to {demo.download}: {files}")
    return demo


def main() -> int:
    """Run the demo, printing as it goes."""
    target = Path(tempfile.mkdtemp(prefix="kubetune-demo-")) / "adapter"
    return 0 if run(connect(), Console(), target) is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
