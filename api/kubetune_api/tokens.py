"""Token counting with a base model's own tokenizer (Hugging Face ``tokenizers``; no torch)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from kubetune.settings import BaseModelEntry


@functools.lru_cache(maxsize=16)
def _load(path: Path) -> Callable[[str], int]:
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    tokenizer = Tokenizer.from_file(str(file))

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return count


def token_counter(model: BaseModelEntry | None) -> Callable[[str], int] | None:
    """A function counting tokens as ``model`` does, or None when it has no tokenizer."""
    if model is None or model.tokenizer is None:
        return None
    return _load(model.tokenizer)
