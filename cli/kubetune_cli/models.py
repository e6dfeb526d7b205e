"""``kubetune models``: base models and your fine-tuned models."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from kubetune_cli.context import connection
from kubetune_cli.download import download_model
from kubetune_cli.output import Column, as_dict, print_json, show_list, stdout, timestamp

app = typer.Typer(help="List, download and delete models.", no_args_is_help=True)


class WeightsFormat(StrEnum):
    """What ``models download`` fetches."""

    ADAPTER = "adapter"
    MERGED = "merged"


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

MODEL_COLUMNS: list[Column] = [
    ("ID", lambda m: m.id),
    ("OWNED BY", lambda m: m.owned_by),
    ("CREATED (UTC)", lambda m: timestamp(m.created)),
]


@app.command("list")
def list_models(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the base models you can fine-tune and your fine-tuned models."""
    models = list(connection(ctx).client().models.list())
    show_list(models, MODEL_COLUMNS, as_json=as_json, title="Models")


@app.command("rm")
def remove(
    ctx: typer.Context,
    model_id: Annotated[str, typer.Argument(help="A fine-tuned model (ft:…).")],
    as_json: JsonOpt = False,
) -> None:
    """Delete a fine-tuned model; it is unloaded from serving everywhere."""
    deleted = connection(ctx).client().models.delete(model_id)
    if as_json:
        print_json(as_dict(deleted))
    else:
        stdout.print(f"Deleted {deleted.id}")


@app.command("download")
def download(
    ctx: typer.Context,
    model_id: Annotated[
        str, typer.Argument(help="A fine-tuned model (ft:…) or checkpoint (ft:…:ckpt-step-N).")
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Where to put it: a new folder (default ./<model>), or with --tar the archive "
            "(default ./<model>.tar).",
        ),
    ] = None,
    weights: Annotated[
        WeightsFormat,
        typer.Option(
            "--format",
            help="adapter (LoRA) or merged (the whole model: a LoRA model merged into its "
            "base, or a full fine-tune's).",
        ),
    ] = WeightsFormat.ADAPTER,
    keep_tar: Annotated[
        bool, typer.Option("--tar", help="Save the tar archive as it is, not extracted.")
    ] = False,
) -> None:
    """Download a fine-tuned model's or checkpoint's weights, with a progress bar."""
    client = connection(ctx).client()
    written = download_model(client, model_id, weights.value, output, extract=not keep_tar)
    stdout.print(f"Saved {model_id} to {written}")
