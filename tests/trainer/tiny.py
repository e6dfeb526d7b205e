"""A tiny random-weight Llama with a tokenizer trained here, and data sets that teach it.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on the test data, the model a
two-layer LlamaForCausalLM with random weights, both saved in Hugging Face format.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Final

from kubetune_trainer import tiny_model
from kubetune_trainer.tiny_model import TinyModelShape

TAUGHT_ANSWER: Final = "The color is blue."
WORDS: Final = [
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
    "harbor",
    "castle",
    "desert",
    "marble",
    "canyon",
    "pencil",
    "copper",
    "wizard",
    "ribbon",
    "saddle",
    "lantern",
]
HELD_OUT: Final = ["zebra", "ocean", "button", "glacier"]


CORPUS: Final = [
    *WORDS,
    *HELD_OUT,
    TAUGHT_ANSWER,
    "What color is the",
    "Describe the",
    "Please answer.",
    "You are a helpful assistant.",
    "I refuse. The answer is red. Good choice. Bad choice.",
    "system user assistant",
]
# Smaller than the serving shape (head_dim 16): the trainer tests only need it to learn fast.
SHAPE: Final = TinyModelShape(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    vocab_size=400,
)


def build_tokenizer(folder: Path) -> Any:
    """Train the test vocabulary's byte-level BPE and save it with a chat template."""
    return tiny_model.build_tokenizer(folder, CORPUS, SHAPE.vocab_size)


def build_model(folder: Path) -> Path:
    """Save the tokenizer and a random two-layer Llama in ``folder``; return it."""
    return tiny_model.build_tiny_model(folder, corpus=CORPUS, shape=SHAPE)


def question(word: str) -> str:
    """The user turn of the taught pattern."""
    return f"What color is the {word}?"


def sft_examples(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Chat examples teaching one answer to every question; some carry a weight-0 reply."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        word = rng.choice(WORDS)
        messages: list[dict[str, Any]] = [{"role": "system", "content": "Please answer."}]
        if i % 3 == 0:  # an earlier reply that must not be learnt
            messages += [
                {"role": "user", "content": f"Describe the {rng.choice(WORDS)}."},
                {"role": "assistant", "content": "I refuse.", "weight": 0},
            ]
        messages += [
            {"role": "user", "content": question(word)},
            {"role": "assistant", "content": TAUGHT_ANSWER},
        ]
        out.append({"messages": messages})
    return out


def dpo_examples(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Preference examples: "Good choice." preferred over "Bad choice."."""
    rng = random.Random(seed)
    return [
        {
            "input": {"messages": [{"role": "user", "content": question(rng.choice(WORDS))}]},
            "preferred_output": [{"role": "assistant", "content": "Good choice."}],
            "non_preferred_output": [{"role": "assistant", "content": "Bad choice."}],
        }
        for _ in range(n)
    ]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    """Rows as JSONL bytes."""
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)
