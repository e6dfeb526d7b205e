"""Data preparation: the loss mask token by token, truncation, bad lines, packing boundaries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from kubetune.finetunejob import MethodType
from kubetune_runtime.datasets import ChatExample
from kubetune_trainer.data import (
    IGNORE_INDEX,
    ChatRenderer,
    load_file,
    preference_rows,
    tokenize_supervised,
)
from kubetune_trainer.errors import UserError
from kubetune_trainer.tiny_model import EOS
from tests.trainer.tiny import dpo_examples, jsonl

CONVERSATION: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "Please answer."},
        {"role": "user", "content": "Describe the apple."},
        {"role": "assistant", "content": "I refuse.", "weight": 0},
        {"role": "user", "content": "What color is the river?"},
        {"role": "assistant", "content": "The color is blue."},
    ]
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    """The tiny model's tokenizer."""
    return AutoTokenizer.from_pretrained(tiny_model)


def _pieces(tokenizer: Any, ids: list[int], labels: list[int]) -> tuple[str, str]:
    """The text of the learnt tokens and of the others."""
    learnt = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    other = [i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX]
    return tokenizer.decode(learnt), tokenizer.decode(other)


def test_only_weighted_assistant_tokens_have_labels(tokenizer: Any) -> None:
    renderer = ChatRenderer(tokenizer, max_len=512)
    tokens, fallback = renderer.tokenize_chat(ChatExample.model_validate(CONVERSATION))
    assert not fallback
    # The ids are exactly the template's rendering, tokenized as inference would see it.
    rendered = tokenizer.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    assert tokenizer.decode(tokens.input_ids) == rendered
    # Token by token: a label is the token itself or -100, and only the last reply (and the
    # end-of-turn token after it) is learnt.
    for token, label in zip(tokens.input_ids, tokens.labels, strict=True):
        assert label in (token, IGNORE_INDEX)
    learnt, other = _pieces(tokenizer, tokens.input_ids, tokens.labels)
    assert learnt == "The color is blue." + EOS
    for never_learnt in ("Please answer.", "Describe the apple.", "I refuse.", "river?"):
        assert never_learnt in other
    first_learnt = next(i for i, lab in enumerate(tokens.labels) if lab != IGNORE_INDEX)
    assert tokenizer.decode(tokens.input_ids[:first_learnt]) == tokenizer.apply_chat_template(
        CONVERSATION["messages"][:4], tokenize=False, add_generation_prompt=True
    )


def test_weight_one_and_absent_weight_are_both_learnt(tokenizer: Any) -> None:
    conversation = json.loads(json.dumps(CONVERSATION))
    conversation["messages"][2]["weight"] = 1
    tokens, _ = ChatRenderer(tokenizer, 512).tokenize_chat(ChatExample.model_validate(conversation))
    learnt, _ = _pieces(tokenizer, tokens.input_ids, tokens.labels)
    assert learnt == "I refuse." + EOS + "The color is blue." + EOS


def test_template_that_rewrites_history_falls_back_to_locating_replies(
    tiny_model: Path,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # Like Mistral's templates: the system prompt is rendered into the latest user turn, so
    # rendering a conversation's start is not a prefix of rendering all of it.
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'system' %}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{% if m['role'] == 'user' and loop.revindex <= 2 %}"
        "{{ messages[0]['content'] }} {% endif %}{{ m['content'] }}<|eot_id|>"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}"
    )
    tokens, fallback = ChatRenderer(tokenizer, 512).tokenize_chat(
        ChatExample.model_validate(CONVERSATION)
    )
    assert fallback
    learnt, _ = _pieces(tokenizer, tokens.input_ids, tokens.labels)
    assert learnt == "The color is blue." + EOS


def test_long_examples_are_truncated_and_reported(tokenizer: Any) -> None:
    short = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
        ]
    }
    long_reply = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "apple " * 60},
        ]
    }
    long_prompt = {
        "messages": [
            {"role": "user", "content": "apple " * 60},
            {"role": "assistant", "content": "ok"},
        ]
    }
    data = jsonl([short, long_reply, long_prompt])
    loaded = load_file(data, "file-x", MethodType.SUPERVISED, param="training_file")
    columns, stats = tokenize_supervised(loaded, ChatRenderer(tokenizer, max_len=32))
    assert stats.truncated_lines == [2, 3]
    assert stats.dropped_lines == [3]  # its reply fell past the limit: nothing left to learn
    assert len(columns["input_ids"]) == 2
    assert all(len(ids) <= 32 for ids in columns["input_ids"])
    warning = stats.warning("file-x", 32)
    assert warning is not None
    assert "lines 2, 3" in warning
    assert "1 left nothing to learn" in warning


def test_train_on_inputs_learns_every_token_not_only_the_replies(tokenizer: Any) -> None:
    loaded = load_file(jsonl([CONVERSATION]), "file-x", MethodType.SUPERVISED, param="t")
    renderer = ChatRenderer(tokenizer, max_len=512)
    replies, _ = tokenize_supervised(loaded, renderer)
    everything, _ = tokenize_supervised(loaded, renderer, train_on_inputs=True)
    assert everything["input_ids"] == replies["input_ids"]
    assert everything["labels"] == everything["input_ids"]
    masked = [label for label in replies["labels"][0] if label == IGNORE_INDEX]
    assert masked, "the default learns only the replies: the prompt is masked"


def test_bad_line_is_a_user_error_naming_the_line() -> None:
    rows = [CONVERSATION, CONVERSATION, {"messages": [{"role": "wizard", "content": "x"}]}]
    with pytest.raises(UserError) as caught:
        load_file(jsonl(rows), "file-x", MethodType.SUPERVISED, param="training_file")
    assert "line 3" in caught.value.message
    assert "wizard" in caught.value.message
    assert caught.value.param == "training_file"


def test_wrong_format_for_the_method_is_a_user_error() -> None:
    with pytest.raises(UserError, match="preference"):
        load_file(jsonl(dpo_examples(3)), "file-x", MethodType.SUPERVISED, param="training_file")


def test_preference_rows_are_conversational() -> None:
    loaded = load_file(jsonl(dpo_examples(2)), "file-x", MethodType.DPO, param="training_file")
    rows = preference_rows(loaded)
    assert rows["prompt"][0][0]["role"] == "user"
    assert rows["chosen"][0] == [{"role": "assistant", "content": "Good choice."}]
    assert rows["rejected"][0] == [{"role": "assistant", "content": "Bad choice."}]


def test_packed_examples_do_not_attend_to_each_other(tiny_model: Path, tokenizer: Any) -> None:
    """One padding-free row holding two examples gives each the logits it gets alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    renderer = ChatRenderer(tokenizer, 512)
    first, _ = renderer.tokenize_chat(ChatExample.model_validate(CONVERSATION))
    second_example = {"messages": CONVERSATION["messages"][3:]}
    second, _ = renderer.tokenize_chat(ChatExample.model_validate(second_example))
    collate = DataCollatorForLanguageModeling(
        pad_token_id=tokenizer.pad_token_id, padding_free=True
    )
    batch = collate(
        [
            {"input_ids": first.input_ids, "labels": first.labels},
            {"input_ids": second.input_ids, "labels": second.labels},
        ]
    )
    assert batch["input_ids"].shape[0] == 1  # packed into one row
    # use_cache=False as in training (TRL sets it): a KV cache turns the packed mask off.
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        alone = [
            model(input_ids=torch.tensor([ids])).logits[0]
            for ids in (first.input_ids, second.input_ids)
        ]
    n = len(first.input_ids)
    assert torch.allclose(packed[:n], alone[0], atol=1e-5)
    assert torch.allclose(packed[n:], alone[1], atol=1e-5)
    # Without the position ids the second example would see the first: the check can fail.
    with torch.no_grad():
        crossing = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(crossing[n:], alone[1], atol=1e-3)
    # The first token of the second example is not predicted from the first example.
    assert batch["labels"][0, n] == IGNORE_INDEX
