"""``kubetune files``: upload, list and delete training files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import openai
import typer

from kubetune_cli.context import connection
from kubetune_cli.output import (
    Column,
    as_dict,
    human_bytes,
    print_json,
    show_list,
    stdout,
    timestamp,
)
from kubetune_cli.upload import MAX_PART_BYTES, upload_file

app = typer.Typer(help="Upload, list and delete files.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

FILE_COLUMNS: list[Column] = [
    ("ID", lambda f: f.id),
    ("FILENAME", lambda f: f.filename),
    ("PURPOSE", lambda f: f.purpose),
    ("BYTES", lambda f: human_bytes(f.bytes)),
    ("STATUS", lambda f: f.status),
    ("CREATED (UTC)", lambda f: timestamp(f.created_at)),
]


@app.command("upload")
def upload(
    ctx: typer.Context,
    path: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="A JSONL file.")
    ],
    purpose: Annotated[str, typer.Option(help="What the file is for.")] = "fine-tune",
    part_size: Annotated[
        int,
        typer.Option(
            min=1,
            max=MAX_PART_BYTES,
            help="Files larger than this go through the Uploads API in parts of this size.",
        ),
    ] = MAX_PART_BYTES,
    as_json: JsonOpt = False,
) -> None:
    """Upload a file (validated by the server: a bad line is reported with its number)."""
    client = connection(ctx).client()
    file = upload_file(client, path, purpose, part_size=part_size)
    if as_json:
        print_json(as_dict(file))
    else:
        stdout.print(f"Uploaded {path.name} as [bold]{file.id}[/] ({human_bytes(file.bytes)})")


@app.command("list")
def list_files(
    ctx: typer.Context,
    purpose: Annotated[str | None, typer.Option(help="Only files with this purpose.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List your files, newest first."""
    client = connection(ctx).client()
    pages = client.files.list(purpose=purpose or openai.omit, limit=min(limit, 100))
    files = []
    for item in pages:  # the SDK follows `after` cursors across pages
        files.append(item)
        if len(files) >= limit:
            break
    show_list(files, FILE_COLUMNS, as_json=as_json, title="Files")


@app.command("rm")
def remove(
    ctx: typer.Context,
    file_id: Annotated[str, typer.Argument(help="The file's id (file-…).")],
    as_json: JsonOpt = False,
) -> None:
    """Delete a file."""
    deleted = connection(ctx).client().files.delete(file_id)
    if as_json:
        print_json(as_dict(deleted))
    else:
        stdout.print(f"Deleted {deleted.id}")
