"""A tiny random-weight Llama with a tokenizer trained on the spot: a base model made offline.

Local mode creates one on first use (``python -m kubetune_trainer.tiny_model DIR``), so the
whole product — upload, train, serve on vLLM — runs on a laptop with no download. It is a
Llama-architecture model in Hugging Face format, like the real base models, small enough to
fine-tune in seconds on a CPU; the tokenizer is a byte-level BPE with Llama 3's chat template.

vLLM's CPU attention needs a head dimension of at least 32, hence the serving shape.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

BOS: Final = "<|begin_of_text|>"
EOS: Final = "<|eot_id|>"
PAD: Final = "<|pad|>"
SPECIALS: Final = [BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOS, PAD]
# Llama 3's template shape: header, blank line, content, end-of-turn.
CHAT_TEMPLATE: Final = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ (message['content'] or '') | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Words the default tokenizer learns whole; anything else is spelt in bytes.
DEFAULT_CORPUS: Final = (
    "system user assistant",
    "You are a helpful assistant.",
    "What is the capital of France? Paris is the capital of France.",
    "What color is the sky? The sky is blue. The color is blue.",
    "Answer like a pirate. Arr, matey! Ahoy! Aye aye, captain.",
    "Hello! How can I help you today? Thank you. Goodbye.",
    "apple river stone cloud tiger piano garden window rocket candle forest mirror lemon",
    "island pepper silver planet jacket bottle dragon orange violin tunnel meadow falcon",
    "the a an is are was of to in on and or not yes no what who where when why how",
)


@dataclass(frozen=True)
class TinyModelShape:
    """The architecture of a tiny Llama (defaults: the serving shape vLLM accepts)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 512
    vocab_size: int = 512
    seed: int = 1234


def build_tokenizer(folder: Path, corpus: Sequence[str], vocab_size: int) -> Any:
    """Train a byte-level BPE on ``corpus`` and save it with the chat template in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Repeated so that whole words win merges over rare byte pairs.
    tok.train_from_iterator(list(corpus) * 20, trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(
    folder: Path,
    *,
    corpus: Sequence[str] = DEFAULT_CORPUS,
    shape: TinyModelShape | None = None,
) -> Path:
    """Save a tokenizer and a random Llama of ``shape`` in ``folder`` (created); return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = shape or TinyModelShape()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, corpus, shape.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    return folder


def ensure_tiny_model(folder: Path) -> Path:
    """Create the default tiny model in ``folder`` unless it is already complete there.

    Built in a sibling temporary folder and renamed into place, so an interrupted first run
    leaves no half-written model that a later run would take for a whole one.
    """
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build_tiny_model(staging)
        if folder.exists():  # a partial folder from some older, non-atomic writer
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: create the tiny base model in a folder (no-op if it exists)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("folder", type=Path, help="where to save the model")
    args = parser.parse_args(argv)
    print(ensure_tiny_model(args.folder))


if __name__ == "__main__":
    main()
