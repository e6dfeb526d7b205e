"""Training data: read the JSONL the API accepted, and turn it into what the trainers consume.

- Files are checked with the same validator the API uses
  (:func:`kubetune_runtime.datasets.validate_jsonl`) and parsed with the same pydantic models,
  so a bad line is reported the same way (file, line, JSON path) and ends the run with a user
  error.
- Chat examples are rendered with the base model's own chat template and tokenized piece by
  piece: the text before each assistant reply (up to and including the generation prompt) is
  tokenized as a prompt is at inference time, and each reply (with the end-of-turn tokens the
  template puts after it) on its own. Only replies whose ``weight`` is not 0 get labels; every
  other token is ``-100``.
- Preference examples become TRL's conversational preference rows (prompt/chosen/rejected);
  TRL's DPOTrainer tokenizes them with the same chat template.
- Sequences longer than ``max_seq_length`` are truncated (keeping the start); an example left
  with nothing to learn is dropped. Both are counted for a warning event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from datasets import Dataset
from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase
from trl.data_utils import pack_dataset

from kubetune.finetunejob import MethodType
from kubetune_runtime.datasets import (
    ChatExample,
    ChatMessage,
    DatasetFormat,
    Example,
    PreferenceExample,
    PromptCompletionExample,
    format_for_method,
    parse_example,
    validate_jsonl,
)
from kubetune_trainer.errors import UserError

IGNORE_INDEX: Final = -100
_ROLE_FOR_TEMPLATE: Final = {"developer": "system", "function": "tool"}
_MAX_LINES_SHOWN: Final = 5


@dataclass(frozen=True)
class LoadedFile:
    """A parsed dataset file: its examples (with their line numbers) and its sha256."""

    file_id: str
    fmt: DatasetFormat
    examples: list[Example]
    lines: list[int]
    sha256: str


@dataclass
class Tokenized:
    """Token ids and labels (``-100`` where no loss is taken) of one example."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class PrepareStats:
    """What preparation changed, for the warning event."""

    truncated_lines: list[int] = field(default_factory=list)
    dropped_lines: list[int] = field(default_factory=list)
    fallback_masking: bool = False

    def warning(self, file_id: str, max_len: int) -> str | None:
        """A one-line warning about truncation, or None when nothing was truncated."""
        if not self.truncated_lines:
            return None
        lines = ", ".join(str(n) for n in self.truncated_lines[:_MAX_LINES_SHOWN])
        more = "…" if len(self.truncated_lines) > _MAX_LINES_SHOWN else ""
        dropped = (
            f"; {len(self.dropped_lines)} left nothing to learn and were dropped"
            if self.dropped_lines
            else ""
        )
        return (
            f"{len(self.truncated_lines)} example(s) of {file_id} are longer than "
            f"{max_len} tokens and were truncated (lines {lines}{more}){dropped}"
        )


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw
        if line.strip():
            yield number, line


def load_file(data: bytes, file_id: str, method: MethodType, *, param: str) -> LoadedFile:
    """Validate and parse a dataset file; raise :class:`UserError` naming the first bad line."""
    report = validate_jsonl([data], expected=format_for_method(method), min_examples=1)
    if report.errors:
        first = report.errors[0]
        where = f"line {first.line}" if first.line is not None else "the file"
        raise UserError(
            f"{param} {file_id}, {where}: {first.message}",
            code=f"invalid_{param}",
            param=param,
        )
    assert report.format is not None  # a valid file has a format
    examples: list[Example] = []
    numbers: list[int] = []
    for number, line in _lines(data):
        try:
            examples.append(parse_example(json.loads(line), report.format))
        except (ValueError, ValidationError) as exc:  # the validator accepted it: be safe anyway
            raise UserError(
                f"{param} {file_id}, line {number}: {exc}", code=f"invalid_{param}", param=param
            ) from exc
        numbers.append(number)
    return LoadedFile(
        file_id=file_id,
        fmt=report.format,
        examples=examples,
        lines=numbers,
        sha256=hashlib.sha256(data).hexdigest(),
    )


# ---------------------------------------------------------------------------------------------
# Chat rendering
# ---------------------------------------------------------------------------------------------


def message_for_template(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: no ``weight``, text content, dict arguments."""
    out: dict[str, Any] = {
        "role": _ROLE_FOR_TEMPLATE.get(message.role, message.role),
        "content": message.text() if message.content is not None else None,
    }
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": _arguments(call)},
            }
            for call in message.tool_calls
        ]
    return out


def _arguments(call: Any) -> Any:
    # Hugging Face chat templates expect the arguments as an object; OpenAI sends JSON text.
    try:
        parsed = json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments
    return parsed if isinstance(parsed, dict) else call.function.arguments


def _tools(example: ChatExample | PreferenceExample) -> list[dict[str, Any]] | None:
    tools = example.tools if isinstance(example, ChatExample) else example.input.tools
    if not tools:
        return None
    return [t.model_dump(exclude_none=True) for t in tools]


class ChatRenderer:
    """Renders chat examples with a tokenizer's chat template into ids and labels."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len

    def _render(
        self, messages: Sequence[dict[str, Any]], tools: Any, *, generation_prompt: bool
    ) -> str:
        text = self.tokenizer.apply_chat_template(
            list(messages), tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert isinstance(text, str)
        return text

    def segments(self, example: ChatExample) -> list[tuple[str, bool]] | None:
        """The rendering cut into (text, trained) pieces; None if the template is not
        incremental (rendering a conversation's start is not a prefix of rendering all of it).
        """
        messages = [message_for_template(m) for m in example.messages]
        tools = _tools(example)
        full = self._render(messages, tools, generation_prompt=False)
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for i, message in enumerate(example.messages):
            if message.role != "assistant":
                continue
            try:
                start = self._render(messages[:i], tools, generation_prompt=True)
                end = self._render(messages[: i + 1], tools, generation_prompt=False)
            except Exception:  # e.g. a template that needs a user turn first
                return None
            if not (full.startswith(end) and end.startswith(start) and len(start) >= pos):
                return None
            pieces.append((full[pos : len(start)], False))
            pieces.append((full[len(start) : len(end)], message.weight != 0))
            pos = len(end)
        pieces.append((full[pos:], False))
        return [(text, trained) for text, trained in pieces if text]

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(ids)

    def tokenize_chat(self, example: ChatExample) -> tuple[Tokenized, bool]:
        """Ids and labels of a chat example; the flag says the fallback masking was used."""
        pieces = self.segments(example)
        if pieces is None:
            return self._tokenize_by_search(example), True
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in pieces:
            piece = self._encode(text)
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        return Tokenized(ids, labels), False

    def _tokenize_by_search(self, example: ChatExample) -> Tokenized:
        """Masking for templates that re-render earlier turns: find each trained reply's text
        (and the end-of-sequence token right after it) in the whole rendering.
        """
        messages = [message_for_template(m) for m in example.messages]
        full = self._render(messages, _tools(example), generation_prompt=False)
        spans: list[tuple[int, int]] = []
        cursor = 0
        eos = self.tokenizer.eos_token or ""
        for message in example.messages:
            if message.role != "assistant" or not message.text():
                continue
            at = full.find(message.text(), cursor)
            if at < 0:
                continue
            end = at + len(message.text())
            if eos and full.startswith(eos, end):
                end += len(eos)
            if message.weight != 0:
                spans.append((at, end))
            cursor = end
        encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        # A token merged across a span's edge (" The") is learnt: it is what the model emits.
        labels = [
            token if any(start < b and end > a for a, b in spans) else IGNORE_INDEX
            for token, (start, end) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
        return Tokenized(ids, labels)

    def tokenize_prompt_completion(self, example: PromptCompletionExample) -> Tokenized:
        """Legacy examples: the prompt as is, then the completion and EOS, which are learnt."""
        prompt = list(self.tokenizer(example.prompt)["input_ids"])
        completion = self._encode(example.completion)
        if self.tokenizer.eos_token_id is not None:
            completion.append(self.tokenizer.eos_token_id)
        return Tokenized(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)


def tokenize_supervised(
    loaded: LoadedFile, renderer: ChatRenderer, *, train_on_inputs: bool = False
) -> tuple[dict[str, list[list[int]]], PrepareStats]:
    """Columns ``input_ids`` and ``labels`` for SFT, truncated to the renderer's max length;
    with ``train_on_inputs`` every token is a label, not only the trained replies.
    """
    stats = PrepareStats()
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for example, line in zip(loaded.examples, loaded.lines, strict=True):
        if isinstance(example, ChatExample):
            tokens, fallback = renderer.tokenize_chat(example)
            stats.fallback_masking |= fallback
        elif isinstance(example, PromptCompletionExample):
            tokens = renderer.tokenize_prompt_completion(example)
        else:  # the validator only lets SFT formats through
            raise UserError(
                f"line {line}: not a supervised example", code="wrong_format", param="method"
            )
        if train_on_inputs:
            tokens = Tokenized(tokens.input_ids, list(tokens.input_ids))
        if len(tokens.input_ids) > renderer.max_len:
            stats.truncated_lines.append(line)
            tokens = Tokenized(
                tokens.input_ids[: renderer.max_len], tokens.labels[: renderer.max_len]
            )
            if all(label == IGNORE_INDEX for label in tokens.labels[1:]):
                stats.dropped_lines.append(line)
                continue
        columns["input_ids"].append(tokens.input_ids)
        columns["labels"].append(tokens.labels)
    return columns, stats


def pack_rows(examples: Dataset, max_len: int) -> Dataset:
    """Tokenized examples packed best-fit-decreasing into rows of at most ``max_len`` tokens
    (TRL's ``bfd``: no example is split, and none is longer than ``max_len`` once truncated).
    Each row keeps its examples' lengths in ``seq_lengths``: the padding-free collator restarts
    the position ids at each, and the attention reads the boundaries from them.
    """
    return pack_dataset(examples.select_columns(["input_ids", "labels"]), max_len, "bfd")


def preference_rows(loaded: LoadedFile) -> dict[str, list[Any]]:
    """Columns prompt/chosen/rejected (conversational, as TRL's DPOTrainer reads them)."""
    columns: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": []}
    for example in loaded.examples:
        assert isinstance(example, PreferenceExample)
        columns["prompt"].append([message_for_template(m) for m in example.input.messages])
        columns["chosen"].append([message_for_template(m) for m in example.preferred_output])
        columns["rejected"].append([message_for_template(m) for m in example.non_preferred_output])
    return columns
