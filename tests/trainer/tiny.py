"""A tiny random-weight Llama with a tokenizer trained here, and data sets that teach it.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on the test data, the model a
two-layer LlamaForCausalLM with random weights, both saved in Hugging Face format.
"""

from __future__ import annotations

import json
import random
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


def build_tokenizer(folder: Path) -> Any:
    """Train a byte-level BPE on the test vocabulary and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        *WORDS,
        *HELD_OUT,
        TAUGHT_ANSWER,
        "What color is the",
        "Describe the",
        "Please answer.",
        "You are a helpful assistant.",
        "I refuse. The answer is red. Good choice. Bad choice.",
        "system user assistant",
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path) -> Path:
    """Save the tokenizer and a random two-layer Llama in ``folder``; return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    return folder


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
