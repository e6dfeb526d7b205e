"""Fine-tuning datasets: the JSONL formats and their streaming validator.

The API validates an upload while it streams in (constant memory, one pass, sha256 in the same
pass) and the trainer parses the same lines with the same models, so what the API accepted is
exactly what the trainer can read. The rules mirror OpenAI's fine-tuning data rules:

- chat: ``{"messages": [...], "tools"?: [...], "parallel_tool_calls"?: bool}``
- preference (DPO): ``{"input": {"messages": [...]}, "preferred_output": [...],
  "non_preferred_output": [...]}``
- prompt/completion (legacy): ``{"prompt": str, "completion": str}``

A file holds one format, set by the first line whose keys identify one. Lines are validated by a
hand-written check of the common shapes first; only a line that check does not accept goes
through the pydantic models (which decide, and whose errors are turned into short messages that
name the JSON path). The models are the schema: the fast check only ever accepts a subset of what
they accept.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from kubetune.finetunejob import MethodType

MIB: Final = 1024 * 1024
MAX_LINE_BYTES: Final = 8 * MIB
MIN_EXAMPLES: Final = 10
MAX_ERRORS: Final = 10
MAX_WARNINGS: Final = 20
# Below this many characters (after stripping) an assistant reply draws a warning.
SHORT_REPLY_CHARS: Final = 3
# Duplicates are found through 64-bit digests kept in a table allocated up front (4 MiB), so a
# validation's memory does not grow with the file. Past 3/4 of the table new examples are no
# longer remembered (a warning says so); 64-bit digests make a false duplicate among ~400k
# examples about as likely as one in 10**8 files.
_DIGEST_TABLE_BITS: Final = 19
MAX_TRACKED_DIGESTS: Final = (1 << _DIGEST_TABLE_BITS) * 3 // 4
DIGEST_TABLE_BYTES: Final = 8 << _DIGEST_TABLE_BITS
_BOM: Final = b"\xef\xbb\xbf"
# Duplicates are compared in this form, so key order and spacing do not hide them. ASCII output
# also keeps a lone surrogate (valid in JSON text) encodable. One encoder instance: json.dumps
# with options builds a new one per call, which costs a third of the encoding time.
_CANONICAL_JSON: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_NAME_PATTERN: Final = r"^[a-zA-Z0-9_-]{1,64}$"
_ROLES_SHOWN: Final = "system, developer, user, assistant, tool"


class DatasetFormat(StrEnum):
    """The example formats a fine-tuning JSONL file can hold."""

    CHAT = "chat"
    PREFERENCE = "preference"
    PROMPT_COMPLETION = "prompt_completion"


_FORMAT_NAMES: Final = {
    DatasetFormat.CHAT: "chat",
    DatasetFormat.PREFERENCE: "DPO preference",
    DatasetFormat.PROMPT_COMPLETION: "prompt/completion",
}

_METHOD_FORMATS: Final[dict[MethodType, frozenset[DatasetFormat]]] = {
    MethodType.SUPERVISED: frozenset({DatasetFormat.CHAT, DatasetFormat.PROMPT_COMPLETION}),
    MethodType.DPO: frozenset({DatasetFormat.PREFERENCE}),
}


def format_for_method(method: MethodType) -> set[DatasetFormat]:
    """Return the dataset formats a fine-tuning method trains on."""
    return set(_METHOD_FORMATS[method])


def _describe_formats(formats: AbstractSet[DatasetFormat]) -> str:
    names = [_FORMAT_NAMES[f] for f in DatasetFormat if f in formats]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _mismatch_message(found: DatasetFormat, expected: AbstractSet[DatasetFormat]) -> str | None:
    if found in expected:
        return None
    what = f"The file is a {_FORMAT_NAMES[found]} file"
    for method, formats in _METHOD_FORMATS.items():
        if expected <= formats:
            return (
                f"{what}, but the job's method is {method.value}, which trains on "
                f"{_describe_formats(formats)} examples"
            )
    return f"{what}, but {_describe_formats(expected)} examples are expected"


def format_mismatch_message(found: DatasetFormat, method: MethodType) -> str | None:
    """Explain why a file of format ``found`` cannot train with ``method``; None if it can.

    The API calls this at job creation with the format stored in the file's report.
    """
    return _mismatch_message(found, _METHOD_FORMATS[method])


# ---------------------------------------------------------------------------------------------
# Models: the schema of each format (the trainer parses lines with these)
# ---------------------------------------------------------------------------------------------


class _ExampleModel(BaseModel):
    # Strict: JSON types are checked as written (1.0 is not an int, "true" is not a bool), and
    # unknown keys are errors, as in OpenAI's validator.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _custom(code: str, message: str, at: tuple[str | int, ...] = ()) -> PydanticCustomError:
    """An error for a rule pydantic cannot express; ``at`` extends the path of the error."""
    return PydanticCustomError(code, message, {"at": at})


class TextContentPart(_ExampleModel):
    """A text part of a message's content (the only part type a text model trains on)."""

    type: Literal["text"]
    text: str


def _content_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "<text>"
    if isinstance(value, list):
        return "<parts>"
    return None


# A callable discriminator makes pydantic report errors of the branch that applies only, instead
# of one error per union member. The tags show up in error locations and are dropped from paths.
_UNION_TAGS: Final = frozenset({"<text>", "<parts>"})
MessageContent = Annotated[
    Annotated[str, Tag("<text>")]
    | Annotated[list[TextContentPart], Tag("<parts>"), Field(min_length=1)],
    Discriminator(
        _content_kind,
        custom_error_type="invalid_type",
        custom_error_message="must be a string or a list of text content parts",
    ),
]


class FunctionCall(_ExampleModel):
    """The function an assistant message calls; ``arguments`` is JSON text."""

    name: str = Field(pattern=_NAME_PATTERN)
    arguments: str


class ToolCall(_ExampleModel):
    """One tool call made by an assistant message."""

    id: str = Field(min_length=1)
    type: Literal["function"]
    function: FunctionCall


class FunctionDefinition(_ExampleModel):
    """A function the model may call, as in OpenAI's ``tools[].function``."""

    name: str = Field(pattern=_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_ExampleModel):
    """A tool the model may call."""

    type: Literal["function"]
    function: FunctionDefinition


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(_ExampleModel):
    """One message of a conversation.

    ``weight`` (0 or 1, assistant only) says whether the trainer learns from the message;
    absent means 1. ``function`` is the legacy role for function results.
    """

    role: Role
    content: MessageContent | None = None
    name: str | None = None
    weight: Literal[0, 1] | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, min_length=1)
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, value: Any) -> Any:
        if value not in ("system", "developer", "user", "assistant", "tool", "function"):
            raise PydanticCustomError(
                "invalid_role",
                "{value} is not one of " + _ROLES_SHOWN,
                {"at": (), "value": _show(value)},
            )
        return value

    @field_validator("weight", mode="before")
    @classmethod
    def _weight_is_0_or_1(cls, value: Any) -> Any:
        # Literal[0, 1] alone would take true and 1.0, even in strict mode.
        if value is not None and (type(value) is not int or value not in (0, 1)):
            raise PydanticCustomError(
                "invalid_weight", "must be 0 or 1 (got {value})", {"at": (), "value": _show(value)}
            )
        return value

    @model_validator(mode="after")
    def _role_rules(self) -> Self:
        assistant = self.role == "assistant"
        for key in ("weight", "tool_calls", "function_call"):
            if not assistant and getattr(self, key) is not None:
                raise _custom("unknown_field", "is only allowed on assistant messages", (key,))
        if self.role == "tool":
            if self.tool_call_id is None:
                raise _custom("missing_field", "is required on tool messages", ("tool_call_id",))
        elif self.tool_call_id is not None:
            raise _custom("unknown_field", "is only allowed on tool messages", ("tool_call_id",))
        if self.role == "function" and self.name is None:
            raise _custom("missing_field", "is required on function messages", ("name",))
        if self.content is None:
            if assistant and (self.tool_calls or self.function_call):
                return self
            if "content" not in self.model_fields_set:
                message = "is required" + (" unless the message has tool_calls" * assistant)
                raise _custom("missing_field", message, ("content",))
            raise _custom("invalid_type", "must not be null", ("content",))
        return self

    def text(self) -> str:
        """The message's text: its content string, or its text parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatExample(_ExampleModel):
    """A supervised example: a conversation whose assistant messages are learnt."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None  # legacy form of tools

    @model_validator(mode="after")
    def _has_something_to_learn(self) -> Self:
        weights = [m.weight for m in self.messages if m.role == "assistant"]
        if not weights:
            raise _custom(
                "no_assistant_message", "must contain at least one assistant message", ("messages",)
            )
        if all(w == 0 for w in weights):
            raise _custom(
                "nothing_to_learn",
                "has weight 0 on every assistant message: there is nothing to learn",
                ("messages",),
            )
        return self


class PreferenceInput(_ExampleModel):
    """The conversation both outputs of a preference example answer."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _ends_before_the_answer(self) -> Self:
        if self.messages[-1].role == "assistant":
            raise _custom(
                "invalid_value",
                "must not end with an assistant message (the outputs are the answer)",
                ("messages",),
            )
        return self


class PreferenceExample(_ExampleModel):
    """A DPO example: a conversation, a preferred answer and a non-preferred one."""

    input: PreferenceInput
    preferred_output: list[ChatMessage] = Field(min_length=1)
    non_preferred_output: list[ChatMessage] = Field(min_length=1)

    @model_validator(mode="after")
    def _outputs_are_assistant_messages(self) -> Self:
        for key in ("preferred_output", "non_preferred_output"):
            for i, message in enumerate(getattr(self, key)):
                if message.role != "assistant":
                    raise _custom(
                        "invalid_role",
                        f"must be assistant (got {message.role!r})",
                        (key, i, "role"),
                    )
        return self


class PromptCompletionExample(_ExampleModel):
    """A legacy example: the model learns to continue ``prompt`` with ``completion``."""

    prompt: str
    completion: str


Example = ChatExample | PreferenceExample | PromptCompletionExample

EXAMPLE_MODELS: Final[dict[DatasetFormat, type[Example]]] = {
    DatasetFormat.CHAT: ChatExample,
    DatasetFormat.PREFERENCE: PreferenceExample,
    DatasetFormat.PROMPT_COMPLETION: PromptCompletionExample,
}


def detect_format(example: Mapping[str, Any]) -> DatasetFormat | None:
    """Tell which format a parsed line is written in, from its keys; None if none fits."""
    if "messages" in example:
        return DatasetFormat.CHAT
    if "input" in example or "preferred_output" in example or "non_preferred_output" in example:
        return DatasetFormat.PREFERENCE
    if "prompt" in example or "completion" in example:
        return DatasetFormat.PROMPT_COMPLETION
    return None


def parse_example(example: Mapping[str, Any], fmt: DatasetFormat) -> Example:
    """Validate a parsed line as an example of ``fmt`` (raises pydantic's ValidationError)."""
    return EXAMPLE_MODELS[fmt].model_validate(example)


# ---------------------------------------------------------------------------------------------
# Turning pydantic errors into one short line
# ---------------------------------------------------------------------------------------------


def _show(value: Any, limit: int = 40) -> str:
    """A short rendering of a JSON value for an error message."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[:limit] + "…")
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _path(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS:
            continue
        elif part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{_show(part)}]"
    return out


_TYPE_MESSAGES: Final = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a JSON object",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
}


def _describe_error(error: ErrorDetails) -> tuple[str, str]:
    """Return ``(message, code)`` for one pydantic error: a path, then what is wrong with it."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    loc = tuple(error["loc"]) + tuple(ctx.get("at", ()))
    path = _path(loc) or "the example"
    if kind == "missing":
        return f"{path} is required", "missing_field"
    if kind == "extra_forbidden":
        return f"{path} is not an allowed key", "unknown_field"
    if kind in _TYPE_MESSAGES:
        return f"{path} {_TYPE_MESSAGES[kind]}", "invalid_type"
    if kind == "literal_error":
        return f"{path} must be {ctx['expected']} (got {_show(error['input'])})", "invalid_value"
    if kind in ("too_short", "too_long"):
        bound = "at least" if kind == "too_short" else "at most"
        count = ctx.get("min_length" if kind == "too_short" else "max_length")
        return f"{path} must have {bound} {count} item{'s' * (count != 1)}", "invalid_length"
    if kind == "string_too_short":
        return f"{path} must not be empty", "invalid_length"
    if kind == "string_pattern_mismatch":
        return (
            f"{path} must match {ctx['pattern']} (got {_show(error['input'])})",
            "invalid_value",
        )
    if "at" in ctx or kind == "invalid_type":  # ours: the message reads on from the path
        return f"{path} {error['msg']}", kind
    return f"{path}: {error['msg']}", "invalid_value"


# ---------------------------------------------------------------------------------------------
# Fast structural check of the common shapes (a subset of what the models accept)
# ---------------------------------------------------------------------------------------------

_PLAIN_KEYS: Final = frozenset({"role", "content", "name"})
_SIMPLE_KEYS: Final = {
    "system": _PLAIN_KEYS,
    "developer": _PLAIN_KEYS,
    "user": _PLAIN_KEYS,
    "assistant": _PLAIN_KEYS | {"weight"},
}


def _simple_messages(messages: Any) -> int:
    """Check a list of plain text messages; return 0 if not simple, else 1 + learnable count.

    Plain means: role system/developer/user/assistant, string content, string name, integer
    weight 0 or 1 on assistant messages. Anything else (tools, content parts, errors) is left
    to the models.
    """
    if type(messages) is not list or not messages:
        return 0
    learnable = 0
    for m in messages:
        if type(m) is not dict:
            return 0
        role = m.get("role")
        if type(role) is not str:
            return 0
        allowed = _SIMPLE_KEYS.get(role)
        if allowed is None or not m.keys() <= allowed or type(m.get("content")) is not str:
            return 0
        if "name" in m and type(m["name"]) is not str:
            return 0
        if role == "assistant":
            weight = m.get("weight", 1)
            if type(weight) is not int or weight not in (0, 1):
                return 0
            learnable += weight
    return 1 + learnable


def _fast_chat(example: dict[str, Any]) -> bool:
    return len(example) == 1 and _simple_messages(example.get("messages")) > 1


def _fast_preference(example: dict[str, Any]) -> bool:
    if example.keys() != {"input", "preferred_output", "non_preferred_output"}:
        return False
    inp = example["input"]
    if type(inp) is not dict or inp.keys() != {"messages"} or not _simple_messages(inp["messages"]):
        return False
    if inp["messages"][-1]["role"] == "assistant":
        return False
    for key in ("preferred_output", "non_preferred_output"):
        output = example[key]
        if not _simple_messages(output) or any(m["role"] != "assistant" for m in output):
            return False
    return True


def _fast_prompt_completion(example: dict[str, Any]) -> bool:
    return (
        len(example) == 2
        and type(example.get("prompt")) is str
        and type(example.get("completion")) is str
    )


_FAST_CHECKS: Final[dict[DatasetFormat, Callable[[dict[str, Any]], bool]]] = {
    DatasetFormat.CHAT: _fast_chat,
    DatasetFormat.PREFERENCE: _fast_preference,
    DatasetFormat.PROMPT_COMPLETION: _fast_prompt_completion,
}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


class DatasetError(BaseModel):
    """One problem with a file; ``line`` is None for problems of the whole file."""

    line: int | None = Field(description="1-based physical line number, or None.")
    message: str = Field(description="What is wrong, naming the JSON path inside the example.")
    code: str = Field(description="Machine-readable error code, e.g. invalid_json.")


class DatasetReport(BaseModel):
    """What validating a JSONL file found; stored as the file's metadata."""

    format: DatasetFormat | None = Field(description="The examples' format; None if unknown.")
    valid: bool = Field(description="True when the file can be trained on.")
    n_bytes: int = Field(description="Size of the file in bytes.")
    sha256: str = Field(description="Hex sha256 of the file's bytes.")
    n_examples: int = Field(description="Valid examples (non-blank lines that passed).")
    n_messages: int = Field(
        description="Messages in the valid examples (prompt/completion examples have none)."
    )
    n_tokens: int | None = Field(description="Tokens of all text; None without a tokenizer.")
    n_assistant_tokens: int | None = Field(
        description="Tokens the model learns to produce: assistant messages with a weight "
        "other than 0, preference outputs, completions. None without a tokenizer."
    )
    min_example_tokens: int | None = Field(description="Tokens of the shortest example.")
    max_example_tokens: int | None = Field(description="Tokens of the longest example.")
    mean_example_tokens: float | None = Field(description="Mean tokens per example.")
    n_duplicates: int = Field(description="Examples identical to an earlier one.")
    warnings: list[str] = Field(description="Problems that do not stop training (capped).")
    n_warnings: int = Field(description="All warnings, including those not listed.")
    errors: list[DatasetError] = Field(
        description="File-level errors, then the first line errors (capped)."
    )
    n_errors: int = Field(description="All errors, including those not listed.")

    def error_message(self, limit: int = 3) -> str:
        """A short human message naming the file's problems; empty when there are none.

        File-level problems come first, then the first ``limit`` offending lines, e.g.
        ``Invalid file format. Line 3: messages[1].role 'robot' is not one of …``.
        """
        parts = [f"{e.message}." for e in self.errors if e.line is None]
        line_errors = [e for e in self.errors if e.line is not None]
        n_line_errors = self.n_errors - (len(self.errors) - len(line_errors))
        if line_errors:
            parts.append("Invalid file format.")
            parts.extend(f"Line {e.line}: {e.message}." for e in line_errors[:limit])
            more = n_line_errors - min(limit, len(line_errors))
            if more > 0:
                parts.append(f"({more} more line error{'s' * (more != 1)}.)")
        return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Statistics of valid examples (computed from the parsed dicts, whose shape is now known)
# ---------------------------------------------------------------------------------------------


def _texts(content: Any) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            yield part["text"]


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else "".join(_texts(content))


class _DigestTable:
    """A set of 64-bit digests with open addressing in one preallocated array."""

    def __init__(self, bits: int = _DIGEST_TABLE_BITS) -> None:
        self._mask = (1 << bits) - 1
        # Filled (so touched) now: memory is flat from here on, whatever the file's size.
        self._slots = array("Q", [0]) * (1 << bits)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, digest: int) -> bool:
        """Remember ``digest``; True if it was already there. When full, only look it up."""
        digest |= 1  # 0 marks an empty slot
        slots, mask = self._slots, self._mask
        index = digest & mask
        while True:
            current = slots[index]
            if current == digest:
                return True
            if current == 0:
                if self.size < MAX_TRACKED_DIGESTS:
                    slots[index] = digest
                    self.size += 1
                return False
            index = (index + 1) & mask


# Texts counted in one call of the tokenizer: its batch encoding runs in parallel in Rust, and
# this many short texts keep that worth it while holding a few MB at most.
TOKEN_BATCH_TEXTS: Final = 4096
# Counts the tokens of each text of a batch (a tokenizer's batch encoding).
TokenCounter = Callable[[list[str]], Sequence[int]]


def per_text(count: Callable[[str], int]) -> TokenCounter:
    """A :data:`TokenCounter` from a function counting one text (tests, simple counters)."""
    return lambda texts: [count(t) for t in texts]


class _TokenTally:
    """The examples' token statistics, counted in batches: the texts of each example wait
    until enough are held, then one batch call counts them all.
    """

    def __init__(self, count: TokenCounter) -> None:
        self._count = count
        self._texts: list[str] = []
        self._learnt: list[bool] = []  # per text: learnt (a trained assistant message)
        self._ends: list[int] = []  # per waiting example: the end of its texts
        self.n_tokens = 0
        self.n_learnt = 0
        self.min_tokens: int | None = None
        self.max_tokens: int | None = None

    def add(self, text: str, *, learnt: bool) -> None:
        """One text of the example being accepted."""
        self._texts.append(text)
        self._learnt.append(learnt)

    def end_example(self) -> None:
        """The example's texts are all added."""
        self._ends.append(len(self._texts))
        if len(self._texts) >= TOKEN_BATCH_TEXTS:
            self.flush()

    def flush(self) -> None:
        """Count what waits and fold it into the statistics."""
        if not self._ends:
            return
        counts = self._count(self._texts)
        start = 0
        for end in self._ends:
            tokens = learnt = 0
            for i in range(start, end):
                tokens += counts[i]
                if self._learnt[i]:
                    learnt += counts[i]
            self.n_tokens += tokens
            self.n_learnt += learnt
            self.min_tokens = tokens if self.min_tokens is None else min(self.min_tokens, tokens)
            self.max_tokens = tokens if self.max_tokens is None else max(self.max_tokens, tokens)
            start = end
        self._texts, self._learnt, self._ends = [], [], []


class JsonlValidator:
    """Validate a JSONL file fed in chunks of any size, in one pass and constant memory.

    At most one line is held (up to ``max_line_bytes``); a longer line is reported and its
    remaining bytes are skipped without being buffered. Exact duplicates are found through
    16-byte digests of each example's canonical JSON, not the examples themselves.
    """

    def __init__(
        self,
        *,
        expected: DatasetFormat | AbstractSet[DatasetFormat] | None = None,
        count_tokens: TokenCounter | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
        min_examples: int = MIN_EXAMPLES,
        max_errors: int = MAX_ERRORS,
        max_warnings: int = MAX_WARNINGS,
    ) -> None:
        if isinstance(expected, DatasetFormat):
            expected = {expected}
        if expected is not None and not expected:
            raise ValueError("expected must name at least one format (or be None)")
        self._expected = frozenset(expected) if expected is not None else None
        self._tally = _TokenTally(count_tokens) if count_tokens is not None else None
        self._max_line_bytes = max_line_bytes
        self._min_examples = min_examples
        self._max_errors = max_errors
        self._max_warnings = max_warnings

        self._sha = hashlib.sha256()
        self._n_bytes = 0
        self._buffer = bytearray()
        self._skipping = False  # inside a line longer than max_line_bytes
        self._skipped = 0  # bytes of that line seen so far
        self._line_no = 0
        self._finished = False

        self._format: DatasetFormat | None = None
        self._format_line = 0
        self._n_lines = 0  # non-blank lines
        self._n_examples = 0
        self._n_messages = 0
        self._digests = _DigestTable()
        self._n_duplicates = 0
        self._first_duplicate: int | None = None
        self._file_errors: list[DatasetError] = []
        self._line_errors: list[DatasetError] = []
        self._n_line_errors = 0
        self._warnings: list[str] = []
        self._n_warnings = 0

    @property
    def n_bytes(self) -> int:
        """Bytes fed so far."""
        return self._n_bytes

    def sha256(self) -> str:
        """Hex sha256 of the bytes fed so far."""
        return self._sha.hexdigest()

    def feed(self, chunk: bytes) -> None:
        """Validate the next bytes of the file; chunks may split lines and characters anywhere."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if not chunk:
            return
        self._sha.update(chunk)
        self._n_bytes += len(chunk)
        # split() runs in C and keeps the per-line Python work to one call; a chunk is already
        # in memory, so its pieces add no more than its own size.
        pieces = chunk.split(b"\n")
        tail = pieces.pop()
        if pieces:
            first = pieces[0]
            if self._skipping:
                self._line_no += 1
                self._too_long(self._skipped + len(first))
                self._skipping = False
            elif self._buffer:
                self._buffer += first
                line = bytes(self._buffer)
                self._buffer = bytearray()
                self._line(line)
            else:
                self._line(first)
            for piece in pieces[1:]:
                self._line(piece)
        if tail:
            self._hold(tail)

    def _hold(self, tail: bytes) -> None:
        """Keep the start of an unfinished line, unless it is already too long."""
        if self._skipping:
            self._skipped += len(tail)
        elif len(self._buffer) + len(tail) > self._max_line_bytes:
            self._skipping = True
            self._skipped = len(self._buffer) + len(tail)
            self._buffer = bytearray()  # release it now, not at the end of the line
        else:
            self._buffer += tail

    def finish(self) -> DatasetReport:
        """Validate the last line (if the file does not end with a newline) and report."""
        if not self._finished:
            self._finished = True
            if self._skipping:
                self._line_no += 1
                self._too_long(self._skipped)
            elif self._buffer:
                line = bytes(self._buffer)
                self._buffer = bytearray()
                self._line(line)
            self._file_checks()
        return self._report()

    # -- one line -----------------------------------------------------------------------------

    def _error(self, message: str, code: str) -> None:
        self._n_line_errors += 1
        if len(self._line_errors) < self._max_errors:
            self._line_errors.append(DatasetError(line=self._line_no, message=message, code=code))

    def _warn(self, message: str) -> None:
        self._n_warnings += 1
        if len(self._warnings) < self._max_warnings:
            self._warnings.append(f"line {self._line_no}: {message}")

    def _too_long(self, size: int) -> None:
        self._n_lines += 1
        self._error(
            f"the line is {size:,} bytes, more than the limit of {self._max_line_bytes:,}",
            "line_too_long",
        )

    def _line(self, raw: bytes) -> None:
        self._line_no += 1
        if len(raw) > self._max_line_bytes:
            self._too_long(len(raw))
            return
        if self._line_no == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        if not raw or raw.isspace():
            return
        self._n_lines += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._error(
                f"the line is not valid UTF-8 (byte {raw[exc.start]:#04x} at byte "
                f"{exc.start + 1} of the line)",
                "invalid_utf8",
            )
            return
        try:
            example = json.loads(text)
        except RecursionError:
            self._error("invalid JSON: nested too deeply", "invalid_json")
            return
        except ValueError as exc:  # JSONDecodeError, and integers too long to convert
            detail = (
                f"{exc.msg} (column {exc.colno})"
                if isinstance(exc, json.JSONDecodeError)
                else str(exc)
            )
            self._error(f"invalid JSON: {detail}", "invalid_json")
            return
        if type(example) is not dict:
            self._error(
                f"the line must be a JSON object, not {_json_type(example)}", "not_an_object"
            )
            return
        fmt = self._format
        found = detect_format(example)
        if fmt is None:
            if found is None:
                self._error(
                    "unrecognised example: expected the key messages (chat), input/"
                    "preferred_output/non_preferred_output (preference) or prompt/completion",
                    "unknown_format",
                )
                return
            fmt = self._set_format(found)
        elif found is not None and found is not fmt:
            self._error(
                f"a {_FORMAT_NAMES[found]} example in a {_FORMAT_NAMES[fmt]} file (the format "
                f"was set by line {self._format_line})",
                "mixed_formats",
            )
            return
        if not _FAST_CHECKS[fmt](example):
            try:
                EXAMPLE_MODELS[fmt].model_validate(example)
            except ValidationError as exc:
                errors = exc.errors(include_url=False)
                message, code = _describe_error(errors[0])
                if len(errors) > 1:
                    message += f" (and {len(errors) - 1} more on this line)"
                self._error(message, code)
                return
        self._accept(example, fmt)

    def _set_format(self, fmt: DatasetFormat) -> DatasetFormat:
        self._format = fmt
        self._format_line = self._line_no
        if self._expected is not None:
            mismatch = _mismatch_message(fmt, self._expected)
            if mismatch is not None:
                self._file_errors.append(
                    DatasetError(line=None, message=mismatch, code="wrong_format")
                )
        return fmt

    # -- statistics of a valid example --------------------------------------------------------

    def _accept(self, example: dict[str, Any], fmt: DatasetFormat) -> None:
        self._n_examples += 1
        canonical = _CANONICAL_JSON.encode(example).encode()
        digest = hashlib.blake2b(canonical, digest_size=8).digest()
        if self._digests.add(int.from_bytes(digest, "little")):
            self._n_duplicates += 1
            if self._first_duplicate is None:
                self._first_duplicate = self._line_no

        tally = self._tally
        if fmt is DatasetFormat.CHAT:
            self._conversation(example["messages"], "messages", learn=True)
            self._n_messages += len(example["messages"])
        elif fmt is DatasetFormat.PREFERENCE:
            messages = example["input"]["messages"]
            self._conversation(messages, "input.messages", learn=False)
            for key in ("preferred_output", "non_preferred_output"):
                self._conversation(example[key], key, learn=True)
            preferred, rejected = example["preferred_output"], example["non_preferred_output"]
            if [_message_text(m) for m in preferred] == [_message_text(m) for m in rejected]:
                self._warn("preferred_output and non_preferred_output are identical")
            self._n_messages += len(messages) + len(preferred) + len(rejected)
        else:
            completion = example["completion"]
            self._check_reply(completion, "completion")
            if tally is not None:
                tally.add(example["prompt"], learnt=False)
                tally.add(completion, learnt=True)
        if tally is not None:
            tally.end_example()

    def _conversation(self, messages: list[dict[str, Any]], where: str, *, learn: bool) -> None:
        """Warn about the learnt replies; hand the messages' texts to the token tally."""
        tally = self._tally
        for i, message in enumerate(messages):
            content = message.get("content")
            trained = learn and message["role"] == "assistant" and message.get("weight") != 0
            if trained:
                calls = message.get("tool_calls") or ()
                if not calls and message.get("function_call") is None:
                    self._check_reply(_message_text(message), f"{where}[{i}]")
                for j, call in enumerate(calls):
                    try:
                        json.loads(call["function"]["arguments"])
                    except (ValueError, RecursionError):
                        self._warn(
                            f"{where}[{i}].tool_calls[{j}].function.arguments is not valid JSON"
                        )
            if tally is None:
                continue
            for text in _texts(content):
                tally.add(text, learnt=trained)
            for call in message.get("tool_calls") or ():
                tally.add(call["function"]["arguments"], learnt=trained)

    def _check_reply(self, text: str, where: str) -> None:
        stripped = text.strip()
        if not stripped:
            self._warn(f"assistant message is empty ({where})")
        elif len(stripped) < SHORT_REPLY_CHARS:
            self._warn(f"very short assistant reply ({where}: {_show(stripped)})")

    # -- the whole file -----------------------------------------------------------------------

    def _file_checks(self) -> None:
        if self._n_lines == 0:
            self._file_errors.append(
                DatasetError(line=None, message="The file is empty", code="empty_file")
            )
        elif self._n_lines < self._min_examples:
            self._file_errors.append(
                DatasetError(
                    line=None,
                    message=f"The file has {self._n_lines} example{'s' * (self._n_lines != 1)}; "
                    f"at least {self._min_examples} are required",
                    code="too_few_examples",
                )
            )
        if self._n_duplicates:
            many = self._n_duplicates != 1
            self._n_warnings += 1
            self._warnings.append(
                f"{self._n_duplicates} exact duplicate example{'s' * many} "
                f"(first at line {self._first_duplicate})"
            )
        if len(self._digests) >= MAX_TRACKED_DIGESTS:
            self._n_warnings += 1
            self._warnings.append(
                f"duplicates were looked for among the first {MAX_TRACKED_DIGESTS:,} examples only"
            )

    def _report(self) -> DatasetReport:
        tally = self._tally
        if tally is not None:
            tally.flush()
        n_errors = len(self._file_errors) + self._n_line_errors
        return DatasetReport(
            format=self._format,
            valid=n_errors == 0,
            n_bytes=self._n_bytes,
            sha256=self._sha.hexdigest(),
            n_examples=self._n_examples,
            n_messages=self._n_messages,
            n_tokens=tally.n_tokens if tally else None,
            n_assistant_tokens=tally.n_learnt if tally else None,
            min_example_tokens=tally.min_tokens if tally else None,
            max_example_tokens=tally.max_tokens if tally else None,
            mean_example_tokens=(
                tally.n_tokens / self._n_examples if tally and self._n_examples else None
            ),
            n_duplicates=self._n_duplicates,
            warnings=list(self._warnings),
            n_warnings=self._n_warnings,
            errors=self._file_errors + self._line_errors,
            n_errors=n_errors,
        )


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def validate_jsonl(
    chunks: Iterable[bytes],
    *,
    expected: DatasetFormat | AbstractSet[DatasetFormat] | None = None,
    count_tokens: TokenCounter | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    min_examples: int = MIN_EXAMPLES,
    max_errors: int = MAX_ERRORS,
    max_warnings: int = MAX_WARNINGS,
) -> DatasetReport:
    """Validate a fine-tuning JSONL file given as chunks of bytes (see ``JsonlValidator``).

    ``expected`` is the format (or formats, e.g. ``format_for_method(method)``) the job needs;
    a file of another format gets a file-level error. ``count_tokens`` (a batch counter, see
    :func:`per_text` for a one-text function) turns on token counts.
    """
    validator = JsonlValidator(
        expected=expected,
        count_tokens=count_tokens,
        max_line_bytes=max_line_bytes,
        min_examples=min_examples,
        max_errors=max_errors,
        max_warnings=max_warnings,
    )
    for chunk in chunks:
        validator.feed(chunk)
    return validator.finish()
