"""The OpenAI-style results file: one CSV row per step (``results.csv``)."""

from __future__ import annotations

import csv
import io
from typing import Any, Final

COLUMNS: Final = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")


class Results:
    """Rows by step; a step's validation values join its training row."""

    def __init__(self, rows: dict[int, dict[str, Any]] | None = None) -> None:
        self.rows: dict[int, dict[str, Any]] = dict(rows or {})

    def update(self, step: int, **values: Any) -> None:
        """Set ``values`` (those not None) on the row of ``step``."""
        row = self.rows.setdefault(step, {"step": step})
        row.update({k: v for k, v in values.items() if v is not None})

    def upto(self, step: int) -> Results:
        """The rows of steps ≤ ``step`` (what a checkpoint at ``step`` keeps)."""
        return Results({s: dict(r) for s, r in self.rows.items() if s <= step})

    def to_state(self) -> list[dict[str, Any]]:
        """Rows for ``kubetune_state.json``."""
        return [self.rows[s] for s in sorted(self.rows)]

    @classmethod
    def from_state(cls, rows: list[dict[str, Any]]) -> Results:
        """Rows read back from ``kubetune_state.json``."""
        return cls({int(r["step"]): dict(r) for r in rows})

    def to_csv(self) -> bytes:
        """The CSV OpenAI's ``result_files`` hold."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for step in sorted(self.rows):
            writer.writerow({c: _fmt(self.rows[step].get(c)) for c in COLUMNS})
        return out.getvalue().encode()


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
