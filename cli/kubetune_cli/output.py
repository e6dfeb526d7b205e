"""How results are shown: rich tables for people, ``--json`` for scripts."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

stdout = Console(highlight=False, soft_wrap=True)

Column = tuple[str, Callable[[Any], object]]


def as_dict(obj: BaseModel) -> dict[str, Any]:
    """An SDK object as JSON-ready data, kubetune's extra fields (``adapter``…) included."""
    return obj.model_dump(mode="json", exclude_unset=False)


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else."""
    # print(), not rich: rich would wrap long lines and colour the text.
    print(json.dumps(data, indent=2, sort_keys=False))


def timestamp(value: int | float | None) -> str:
    """A Unix time as ``YYYY-MM-DD HH:MM:SS`` UTC, or ``-``."""
    if not value:
        return "-"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")


def human_bytes(n: int | None) -> str:
    """``1.5 MiB`` style sizes."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - loop always returns


def show_list(
    items: Sequence[BaseModel], columns: Sequence[Column], *, as_json: bool, title: str
) -> None:
    """A list as a table, or as a JSON array with ``--json``."""
    if as_json:
        print_json([as_dict(i) for i in items])
        return
    if not items:
        stdout.print(f"No {title.lower()}.")
        return
    table = Table(title=title, title_justify="left")
    for index, (name, _) in enumerate(columns):
        # The first column is the id people copy: never broken across lines; others fold.
        table.add_column(name, overflow="fold", no_wrap=index == 0)
    for item in items:
        table.add_row(*(_cell(get(item)) for _, get in columns))
    stdout.print(table)


def show_object(obj: BaseModel, fields: Iterable[Column], *, as_json: bool) -> None:
    """One object as a two-column table, or as JSON with ``--json``."""
    if as_json:
        print_json(as_dict(obj))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, get in fields:
        table.add_row(name, _cell(get(obj)))
    stdout.print(table)


def _cell(value: object) -> Text:
    # Text, not str: API data such as "[INST]" must not be read as rich markup.
    if value is None or value == "":
        return Text("-")
    if isinstance(value, dict | list):
        return Text(json.dumps(value))
    return Text(str(value))
