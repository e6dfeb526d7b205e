"""Token counting with a base model's own tokenizer (Hugging Face ``tokenizers``; no torch)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from kubetune.settings import BaseModelEntry
from kubetune_runtime.datasets import TokenCounter


@functools.lru_cache(maxsize=16)
def _load(path: Path) -> TokenCounter:
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    tokenizer = Tokenizer.from_file(str(file))

    def count(texts: list[str]) -> Sequence[int]:
        # One call per batch: the Rust side encodes the texts in parallel, and the fast variant
        # skips the character offsets, which counting never reads.
        return [len(e.ids) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    return count


def token_counter(model: BaseModelEntry | None) -> TokenCounter | None:
    """A function counting the tokens of each text of a batch as ``model`` does, or None when
    it has no tokenizer.
    """
    if model is None or model.tokenizer is None:
        return None
    return _load(model.tokenizer)
