"""``kubetune models``: base models and your fine-tuned models."""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Final
from urllib.parse import quote

import openai
import typer

from kubetune.trainer_config import STORE_SCHEME
from kubetune_cli.context import connection
from kubetune_cli.download import download_model
from kubetune_cli.errors import ExitCode, fail, stderr
from kubetune_cli.output import (
    Column,
    as_dict,
    print_json,
    show_list,
    stdout,
    timestamp,
)

app = typer.Typer(help="List, download and delete models.", no_args_is_help=True)


class WeightsFormat(StrEnum):
    """What ``models download`` fetches."""

    ADAPTER = "adapter"
    MERGED = "merged"


# How long ``models add`` waits for the check (a large model's tokenizer takes a while to load).
CHECK_WAIT_SECONDS: Final = 600

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


@app.command("add")
def add(
    ctx: typer.Context,
    location: Annotated[
        str,
        typer.Argument(
            help="A Hugging Face model folder (config, weights, tokenizer): on this machine in "
            "local mode; on a cluster, as trainer pods see it, or store:<prefix> for one in the "
            "object store."
        ),
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="Its name in requests (default: the folder's).")
    ] = None,
    volume_claim: Annotated[
        str | None,
        typer.Option("--volume-claim", help="Cluster: the volume claim holding the folder."),
    ] = None,
    context_length: Annotated[
        int | None,
        typer.Option("--context-length", min=16, help="Longest sequence (default: the model's)."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the server's check, with a spinner.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Register a model folder as a base model of your org (admin key): the server checks it,
    then lists it, trains on it and serves its fine-tuned models where a vLLM serves it.
    """
    path = model_location(location)
    client = connection(ctx).client()
    body = {
        "id": name or PurePosixPath(path.removeprefix(STORE_SCHEME)).name,
        "path": path,
        "volume_claim": volume_claim,
        "context_length": context_length,
    }
    model = register_base_model(client, {k: v for k, v in body.items() if v is not None}, wait)
    if as_json:
        print_json(model)
    elif model["status"] == "failed":
        fail(f"{model['id']} is not usable: {model['status_details']}", ExitCode.API_ERROR)
    else:
        length = f", {model['context_length']} tokens" if model.get("context_length") else ""
        arch = f" ({model['architecture']}{length})" if model.get("architecture") else ""
        stdout.print(f"Base model {model['id']}{arch}: {model['status']}")


def model_location(location: str) -> str:
    """The path the server is sent: a store folder as given, an absolute folder as given (on a
    cluster it is the trainers', not this machine's), a relative one made absolute here.
    """
    if location.startswith(STORE_SCHEME):
        return location
    path = Path(location).expanduser()
    return str(path if path.is_absolute() else path.resolve())


def register_base_model(client: openai.OpenAI, body: dict[str, Any], wait: bool) -> Any:
    """``POST /v1/models``, then (with ``wait``) the model until its check is over."""
    model: Any = client.post("/models", body=body, cast_to=object)
    started = time.monotonic()
    path = f"/models/{quote(model['id'], safe=':')}"
    with stderr.status(f"Checking {model['id']}...") as spinner:
        while wait and model["status"] == "validating":
            if time.monotonic() - started > CHECK_WAIT_SECONDS:
                stderr.print(f"Still checking after {CHECK_WAIT_SECONDS}s; see `models get`.")
                break
            time.sleep(1.0)
            model = client.get(path, cast_to=object)
            spinner.update(f"Checking {model['id']} ({int(time.monotonic() - started)}s)...")
    return model


@app.command("rm")
def remove(
    ctx: typer.Context,
    model_id: Annotated[
        str, typer.Argument(help="A fine-tuned model (ft:…), or a base model you added.")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Delete a fine-tuned model (it is unloaded from serving everywhere), or forget a base
    model added with ``models add`` (admin key; its fine-tuned models stay).
    """
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
