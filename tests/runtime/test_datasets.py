import copy
import hashlib
import json
import random
import tracemalloc

import pytest
from pydantic import ValidationError

from kubetune.finetunejob import MethodType
from kubetune_runtime.datasets import (
    DIGEST_TABLE_BYTES,
    EXAMPLE_MODELS,
    MIB,
    TOKEN_BATCH_TEXTS,
    ChatExample,
    ChatMessage,
    DatasetFormat,
    DatasetReport,
    JsonlValidator,
    PreferenceExample,
    PromptCompletionExample,
    detect_format,
    format_for_method,
    format_mismatch_message,
    parse_example,
    per_text,
    validate_jsonl,
)

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
USER = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT = {"role": "assistant", "content": "The capital of France is Paris."}


def chat(*messages, **extra):
    return {"messages": list(messages), **extra}


def chat_example(i=0):
    return chat(
        SYSTEM,
        {"role": "user", "content": f"Question number {i}?"},
        {"role": "assistant", "content": f"Answer number {i}."},
    )


def preference_example(i=0):
    return {
        "input": {"messages": [{"role": "user", "content": f"Say hello {i}"}]},
        "preferred_output": [{"role": "assistant", "content": f"Hello there {i}!"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
    }


def jsonl(examples, *, newline="\n"):
    return "".join(json.dumps(e) + newline for e in examples).encode()


def chat_file(n=10):
    return jsonl([chat_example(i) for i in range(n)])


def with_line(lines, index, replacement):
    """A file of valid chat lines with line ``index`` (0-based) replaced by raw bytes."""
    raw = [json.dumps(chat_example(i)).encode() for i in range(lines)]
    raw[index] = replacement
    return b"\n".join(raw) + b"\n"


def validate(data, **kwargs):
    return validate_jsonl([data], **kwargs)


def only_error(report):
    assert not report.valid
    assert report.n_errors == 1, report.errors
    return report.errors[0]


# ---------------------------------------------------------------------------------------------
# The acceptance corpus
# ---------------------------------------------------------------------------------------------


def test_a_valid_chat_file_passes_with_its_statistics():
    data = chat_file(12)
    report = validate(data)
    assert report.valid
    assert report.errors == []
    assert report.error_message() == ""
    assert report.format is DatasetFormat.CHAT
    assert report.n_examples == 12
    assert report.n_messages == 36
    assert report.n_duplicates == 0
    assert report.n_tokens is None
    assert report.n_bytes == len(data)
    assert report.sha256 == hashlib.sha256(data).hexdigest()


def test_malformed_json_names_its_line():
    data = with_line(12, 2, b'{"messages": [{"role": "user", "content": "hi"}')
    error = only_error(validate(data))
    assert error.line == 3
    assert error.code == "invalid_json"
    assert error.message.startswith("invalid JSON: ")
    assert "Line 3: invalid JSON" in validate(data).error_message()


def test_a_line_that_is_not_an_object_is_an_error():
    error = only_error(validate(with_line(12, 4, b'["messages"]')))
    assert (error.line, error.code) == (5, "not_an_object")
    assert "array" in error.message


def test_an_example_without_an_assistant_message_is_an_error():
    error = only_error(validate(with_line(12, 0, json.dumps(chat(SYSTEM, USER)).encode())))
    assert error.line == 1
    assert error.code == "no_assistant_message"
    assert error.message == "messages must contain at least one assistant message"


def test_an_unknown_role_is_named_with_its_path():
    bad = chat(USER, {"role": "robot", "content": "beep"}, ASSISTANT)
    report = validate(with_line(12, 2, json.dumps(bad).encode()))
    error = only_error(report)
    assert error.line == 3
    assert error.code == "invalid_role"
    assert error.message == (
        "messages[1].role 'robot' is not one of system, developer, user, assistant, tool"
    )
    assert report.error_message() == (
        "Invalid file format. Line 3: messages[1].role 'robot' is not one of system, developer, "
        "user, assistant, tool."
    )


@pytest.mark.parametrize("weight", [2, -1, 0.5, 1.0, True, "1", None])
def test_a_weight_other_than_0_or_1_is_an_error(weight):
    bad = chat(USER, ASSISTANT, USER, {**ASSISTANT, "weight": weight})
    if weight is None:  # null is "absent"
        assert validate(with_line(12, 1, json.dumps(bad).encode())).valid
        return
    error = only_error(validate(with_line(12, 1, json.dumps(bad).encode())))
    assert error.line == 2
    assert error.message.startswith("messages[3].weight must be 0 or 1")


def test_weight_is_only_allowed_on_assistant_messages():
    bad = chat({**USER, "weight": 1}, ASSISTANT)
    error = only_error(validate(with_line(12, 0, json.dumps(bad).encode())))
    assert error.message == "messages[0].weight is only allowed on assistant messages"


def test_weight_0_on_every_assistant_message_leaves_nothing_to_learn():
    bad = chat(USER, {**ASSISTANT, "weight": 0}, USER, {**ASSISTANT, "weight": 0})
    error = only_error(validate(with_line(12, 5, json.dumps(bad).encode())))
    assert (error.line, error.code) == (6, "nothing_to_learn")
    ok = chat(USER, {**ASSISTANT, "weight": 0}, USER, {**ASSISTANT, "weight": 1})
    assert validate(with_line(12, 5, json.dumps(ok).encode())).valid


def test_unknown_keys_are_errors():
    bad_message = chat({**USER, "mood": "happy"}, ASSISTANT)
    error = only_error(validate(with_line(12, 0, json.dumps(bad_message).encode())))
    assert error.message == "messages[0].mood is not an allowed key"
    assert error.code == "unknown_field"
    bad_example = chat(USER, ASSISTANT, id=7)
    error = only_error(validate(with_line(12, 0, json.dumps(bad_example).encode())))
    assert error.message == "id is not an allowed key"


@pytest.mark.parametrize("data", [b"", b"\n", b"\n\r\n  \n", b"\xef\xbb\xbf"])
def test_an_empty_file_is_an_error_of_the_whole_file(data):
    report = validate(data)
    error = only_error(report)
    assert error.line is None
    assert error.code == "empty_file"
    assert report.error_message() == "The file is empty."
    assert report.format is None


def test_nine_examples_are_too_few():
    report = validate(chat_file(9))
    error = only_error(report)
    assert error.line is None
    assert error.code == "too_few_examples"
    assert error.message == "The file has 9 examples; at least 10 are required"
    assert report.n_examples == 9


def test_ten_examples_are_enough():
    report = validate(chat_file(10))
    assert report.valid
    assert report.n_examples == 10


def test_min_examples_is_configurable():
    assert validate(chat_file(1), min_examples=1).valid
    assert not validate(chat_file(1)).valid


def test_non_utf8_bytes_name_their_line():
    raw = json.dumps(chat_example(99)).encode().replace(b"Question", b"Qu\xffestion")
    error = only_error(validate(with_line(12, 6, raw)))
    assert error.line == 7
    assert error.code == "invalid_utf8"
    assert "0xff" in error.message


def test_crlf_line_endings_and_a_bom_are_accepted():
    examples = [chat_example(i) for i in range(10)]
    plain = validate(jsonl(examples))
    windows = b"\xef\xbb\xbf" + jsonl(examples, newline="\r\n")
    report = validate(windows)
    assert report.valid, report.errors
    assert report.n_examples == 10
    assert report.n_duplicates == 0
    fields = {"n_bytes", "sha256"}
    assert report.model_dump(exclude=fields) == plain.model_dump(exclude=fields)


def test_a_bom_is_only_accepted_at_the_start_of_the_file():
    data = with_line(12, 3, b"\xef\xbb\xbf" + json.dumps(chat_example(3)).encode())
    error = only_error(validate(data))
    assert (error.line, error.code) == (4, "invalid_json")


def test_blank_lines_are_skipped_and_line_numbers_stay_physical():
    lines = [json.dumps(chat_example(i)) for i in range(10)]
    data = ("\n\n".join(lines) + "\n\n  \n{broken\n\n").encode()
    report = validate(data)
    error = only_error(report)
    # 10 examples on lines 1, 3, ..., 19; blank 2, ..., 20; whitespace 21; broken on 22.
    assert error.line == 22
    assert report.n_examples == 10


def test_the_last_line_needs_no_newline():
    data = chat_file(9) + json.dumps(chat(USER)).encode()
    error = only_error(validate(data))
    assert (error.line, error.code) == (10, "no_assistant_message")


def _chunks_of(data, size):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_a_line_longer_than_the_limit_is_an_error_and_is_not_held_in_memory():
    line_size = 10 * 1000 * 1000
    piece = b"x" * (64 * 1024)
    head = b'{"prompt": "'

    def chunks():
        yield jsonl([{"prompt": "a", "completion": "b"}])
        yield head
        sent = len(head)
        # The same 64 KiB object again and again: the test itself holds no 10 MB.
        while sent + len(piece) < line_size:
            yield piece
            sent += len(piece)
        yield b'", "completion": "c"}\n'
        yield jsonl([{"prompt": f"p{i}", "completion": "ok"} for i in range(10)])

    tracemalloc.start()
    try:
        report = validate_jsonl(chunks(), max_line_bytes=8 * MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    error = only_error(report)
    assert error.line == 2
    assert error.code == "line_too_long"
    assert "8,388,608" in error.message
    # The lines after it are still read, with the right numbers.
    assert report.n_examples == 11
    # At most one line's worth (the 8 MiB limit) is ever buffered, never the 10 MB line;
    # the fixed duplicate table comes on top.
    assert peak - DIGEST_TABLE_BYTES < 8 * MIB + 2 * MIB, peak
    assert peak - DIGEST_TABLE_BYTES < line_size


def test_a_long_line_within_one_chunk_is_an_error_too():
    long_line = json.dumps({"prompt": "x" * 5000, "completion": "y"}).encode()
    data = jsonl([{"prompt": "a", "completion": "b"}] * 9) + long_line + b"\n"
    error = only_error(validate(data, max_line_bytes=4096))
    assert (error.line, error.code) == (10, "line_too_long")
    assert validate(data, max_line_bytes=len(long_line)).valid


def test_a_long_last_line_without_newline_is_an_error():
    data = jsonl([{"prompt": f"p{i}", "completion": "c"} for i in range(10)]) + b"z" * 100
    for size in (1, 7, 64, 99, 100, len(data)):
        report = validate_jsonl(_chunks_of(data, size), max_line_bytes=80)
        error = only_error(report)
        assert (error.line, error.code) == (11, "line_too_long")
        assert error.message.startswith("the line is 100 bytes")
        assert report.n_examples == 10


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def test_a_dpo_file_is_rejected_when_chat_is_expected():
    data = jsonl([preference_example(i) for i in range(10)])
    for expected in (DatasetFormat.CHAT, format_for_method(MethodType.SUPERVISED)):
        report = validate(data, expected=expected)
        error = only_error(report)
        assert error.line is None
        assert error.code == "wrong_format"
        assert "DPO preference file" in error.message
        assert "method is supervised" in error.message
        assert report.format is DatasetFormat.PREFERENCE
        assert report.error_message().startswith("The file is a DPO preference file")


def test_a_chat_file_is_rejected_when_preference_is_expected():
    report = validate(chat_file(10), expected=DatasetFormat.PREFERENCE)
    error = only_error(report)
    assert error.code == "wrong_format"
    assert "chat file" in error.message
    assert "method is dpo" in error.message


def test_prompt_completion_is_accepted_for_supervised_but_not_alone_for_chat_only():
    data = jsonl([{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(10)])
    assert validate(data, expected=format_for_method(MethodType.SUPERVISED)).valid
    report = validate(data, expected=DatasetFormat.CHAT)
    assert only_error(report).code == "wrong_format"


def test_format_for_method_and_mismatch_message():
    assert format_for_method(MethodType.SUPERVISED) == {
        DatasetFormat.CHAT,
        DatasetFormat.PROMPT_COMPLETION,
    }
    assert format_for_method(MethodType.DPO) == {DatasetFormat.PREFERENCE}
    assert format_mismatch_message(DatasetFormat.CHAT, MethodType.SUPERVISED) is None
    message = format_mismatch_message(DatasetFormat.CHAT, MethodType.DPO)
    assert message is not None
    assert "method is dpo" in message


def test_a_valid_preference_file():
    report = validate(jsonl([preference_example(i) for i in range(10)]))
    assert report.valid, report.errors
    assert report.format is DatasetFormat.PREFERENCE
    assert report.n_examples == 10
    assert report.n_messages == 30


def test_preference_outputs_must_be_assistant_messages_after_a_non_assistant_input():
    bad_output = preference_example()
    bad_output["non_preferred_output"] = [USER]
    error = only_error(validate(jsonl([bad_output] + [preference_example(i) for i in range(10)])))
    assert error.line == 1
    assert error.message == "non_preferred_output[0].role must be assistant (got 'user')"

    bad_input = preference_example()
    bad_input["input"]["messages"].append(ASSISTANT)
    error = only_error(validate(jsonl([bad_input] + [preference_example(i) for i in range(10)])))
    assert error.message.startswith("input.messages must not end with an assistant message")


def test_a_valid_prompt_completion_file():
    examples = [{"prompt": f"Translate {i}:", "completion": f" Traduire {i}"} for i in range(10)]
    report = validate(jsonl(examples), count_tokens=per_text(lambda s: len(s.split())))
    assert report.valid, report.errors
    assert report.format is DatasetFormat.PROMPT_COMPLETION
    assert report.n_messages == 0
    assert report.n_tokens == 40
    assert report.n_assistant_tokens == 20


def test_a_line_of_another_format_is_an_error_naming_the_line_that_set_the_format():
    data = b"\n" + chat_file(10) + jsonl([{"prompt": "a", "completion": "b"}])
    error = only_error(validate(data))
    assert error.line == 12
    assert error.code == "mixed_formats"
    assert "line 2" in error.message


def test_an_unrecognised_line_before_the_format_is_known():
    data = jsonl([{"text": "hello"}]) + chat_file(10)
    report = validate(data)
    error = only_error(report)
    assert (error.line, error.code) == (1, "unknown_format")
    assert report.format is DatasetFormat.CHAT


def test_tools_and_tool_calls_are_valid():
    example = chat(
        SYSTEM,
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": [{"type": "text", "text": "It is 21 degrees."}]},
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
        parallel_tool_calls=False,
    )
    report = validate(jsonl([example] * 1 + [chat_example(i) for i in range(9)]))
    assert report.valid, report.errors
    assert report.warnings == []
    parsed = ChatExample.model_validate(example)
    assert parsed.messages[4].text() == "It is 21 degrees."
    assert parsed.messages[2].tool_calls is not None
    assert parsed.messages[2].tool_calls[0].function.name == "get_weather"


def test_tool_message_rules():
    no_id = chat(USER, {"role": "tool", "content": "x"}, ASSISTANT)
    error = only_error(validate(with_line(12, 0, json.dumps(no_id).encode())))
    assert error.message == "messages[1].tool_call_id is required on tool messages"
    no_content = chat(USER, {"role": "assistant"})
    error = only_error(validate(with_line(12, 0, json.dumps(no_content).encode())))
    assert error.message == "messages[1].content is required unless the message has tool_calls"
    bad_args = chat(
        USER,
        {
            "role": "assistant",
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}],
        },
    )
    error = only_error(validate(with_line(12, 0, json.dumps(bad_args).encode())))
    assert error.message == "messages[1].tool_calls[0].function.arguments is required"


def test_tool_call_arguments_that_are_not_json_draw_a_warning():
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
    example = chat(USER, {"role": "assistant", "tool_calls": [call]})
    report = validate(jsonl([example] + [chat_example(i) for i in range(9)]))
    assert report.valid
    assert report.warnings == [
        "line 1: messages[1].tool_calls[0].function.arguments is not valid JSON"
    ]


def test_legacy_function_role_and_function_call():
    example = chat(
        USER,
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "f", "content": "42"},
        ASSISTANT,
        functions=[{"name": "f", "parameters": {"type": "object"}}],
    )
    assert validate(jsonl([example] + [chat_example(i) for i in range(9)])).valid
    nameless = chat(USER, {"role": "function", "content": "42"}, ASSISTANT)
    error = only_error(validate(with_line(12, 0, json.dumps(nameless).encode())))
    assert error.message == "messages[1].name is required on function messages"


def test_content_parts_must_be_text():
    image = chat(
        USER, {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    )
    error = only_error(validate(with_line(12, 0, json.dumps(image).encode())))
    assert error.message.startswith("messages[1].content[0].type must be 'text' (got 'image_url')")
    number = chat(USER, {"role": "assistant", "content": 5})
    error = only_error(validate(with_line(12, 0, json.dumps(number).encode())))
    assert error.message == "messages[1].content must be a string or a list of text content parts"


# ---------------------------------------------------------------------------------------------
# Statistics and warnings
# ---------------------------------------------------------------------------------------------


def test_exact_duplicates_are_counted_even_with_other_key_order_and_spacing():
    examples = [chat_example(i) for i in range(10)]
    duplicate = json.dumps(examples[3])
    reordered = json.dumps(
        {"messages": [dict(reversed(list(m.items()))) for m in examples[5]["messages"]]},
        indent=1,
    ).replace("\n", " ")
    data = jsonl(examples) + f"{duplicate}\n{reordered}\n{duplicate}\n".encode()
    report = validate(data)
    assert report.valid
    assert report.n_examples == 13
    assert report.n_duplicates == 3
    assert "3 exact duplicate examples (first at line 11)" in report.warnings


def test_empty_and_short_assistant_replies_draw_warnings():
    examples = [chat_example(i) for i in range(10)]
    examples[2] = chat(USER, {"role": "assistant", "content": "  "})
    examples[4] = chat(USER, {"role": "assistant", "content": "ok"})
    # Not learnt: no warning.
    examples[6] = chat(USER, {"role": "assistant", "content": "", "weight": 0}, ASSISTANT)
    report = validate(jsonl(examples))
    assert report.valid
    assert report.warnings == [
        "line 3: assistant message is empty (messages[1])",
        "line 5: very short assistant reply (messages[1]: 'ok')",
    ]
    assert report.n_warnings == 2


def test_warnings_are_capped_but_counted():
    examples = [chat(USER, {"role": "assistant", "content": ""}) for _ in range(30)]
    examples = [
        {"messages": [*e["messages"], {**USER, "content": str(i)}]} for i, e in enumerate(examples)
    ]
    # Each example differs (the trailing user message), so no duplicate warning joins in.
    report = validate(jsonl(examples), max_warnings=5)
    assert len(report.warnings) == 5
    assert report.n_warnings == 30


def test_identical_preference_outputs_draw_a_warning():
    examples = [preference_example(i) for i in range(10)]
    examples[0]["non_preferred_output"] = examples[0]["preferred_output"]
    report = validate(jsonl(examples))
    assert report.valid
    assert report.warnings == ["line 1: preferred_output and non_preferred_output are identical"]


def test_token_counting():
    def words(s):
        return len(s.split())

    examples = [
        chat(
            {"role": "system", "content": "be brief"},  # 2
            {"role": "user", "content": "one two three"},  # 3
            {"role": "assistant", "content": "four five", "weight": 0},  # 2, not learnt
            {"role": "user", "content": [{"type": "text", "text": "six"}]},  # 1
            {"role": "assistant", "content": "seven eight nine ten"},  # 4
        )
    ] + [chat({"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"})] * 9
    report = validate(jsonl(examples), count_tokens=per_text(words))
    assert report.valid
    assert report.n_tokens == 12 + 9 * 3
    assert report.n_assistant_tokens == 4 + 9 * 1
    assert report.min_example_tokens == 3
    assert report.max_example_tokens == 12
    assert report.mean_example_tokens == pytest.approx((12 + 27) / 10)


def test_token_counting_of_preference_examples():
    examples = [preference_example(i) for i in range(10)]  # input 3, outputs 3 + 2 words
    report = validate(jsonl(examples), count_tokens=per_text(lambda s: len(s.split())))
    assert report.n_tokens == 10 * 8
    assert report.n_assistant_tokens == 10 * 5


def test_invalid_examples_do_not_count_in_statistics():
    data = with_line(12, 0, json.dumps(chat(USER)).encode())
    report = validate(data, count_tokens=per_text(lambda s: len(s.split())))
    assert report.n_examples == 11
    assert report.n_messages == 33
    assert report.n_tokens == 11 * (5 + 3 + 3)


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


def _mixed_file():
    examples = [chat_example(i) for i in range(10)]
    examples[1] = chat(USER, {"role": "assistant", "content": "é"})  # short, non-ASCII
    lines = [json.dumps(e, ensure_ascii=False).encode() for e in examples]
    lines[3] = b'{"messages": [}'
    lines[5] = b'{"messages": "\xe2\x82"}'  # a truncated multi-byte character
    lines.append(lines[0])  # a duplicate
    return b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 1000])
def test_chunk_boundaries_do_not_change_the_report(size):
    data = _mixed_file()
    whole = validate(data, count_tokens=per_text(len), min_examples=12)
    assert [e.line for e in whole.errors] == [None, 4, 6]
    assert whole.n_duplicates == 1
    assert len(whole.warnings) == 2
    chunked = validate_jsonl(_chunks_of(data, size), count_tokens=per_text(len), min_examples=12)
    assert chunked == whole


def test_random_chunk_sizes_do_not_change_the_report():
    data = _mixed_file()
    whole = validate(data)
    rng = random.Random(7)
    for _ in range(20):
        chunks, i = [], 0
        while i < len(data):
            n = rng.choice([0, 1, 2, 3, 17, 100, 4096])
            chunks.append(data[i : i + n])
            i += n
        assert validate_jsonl(chunks) == whole


def test_the_incremental_validator_reports_bytes_and_sha256_as_it_goes():
    data = chat_file(10)
    validator = JsonlValidator()
    validator.feed(data[:100])
    assert validator.n_bytes == 100
    assert validator.sha256() == hashlib.sha256(data[:100]).hexdigest()
    validator.feed(data[100:])
    report = validator.finish()
    assert report.valid
    assert report.sha256 == hashlib.sha256(data).hexdigest()
    assert validator.finish() == report
    with pytest.raises(RuntimeError):
        validator.feed(b"{}")


def test_errors_are_capped_but_counted_and_the_message_names_the_first_lines():
    data = b"{bad\n" * 25
    report = validate(data, max_errors=4)
    assert report.n_errors == 25
    assert [e.line for e in report.errors] == [1, 2, 3, 4]
    message = report.error_message()
    assert message.startswith("Invalid file format. Line 1: invalid JSON")
    assert "Line 3:" in message
    assert "Line 4:" not in message
    assert message.endswith("(22 more line errors.)")


def test_file_errors_come_before_line_errors_in_the_message():
    data = jsonl([preference_example(i) for i in range(3)]) + b"nope\n"
    report = validate(data, expected=DatasetFormat.CHAT)
    assert report.n_errors == 3
    assert [e.code for e in report.errors] == ["wrong_format", "too_few_examples", "invalid_json"]
    message = report.error_message()
    assert message.index("DPO preference") < message.index("4 examples") < message.index("Line 4")


def test_the_report_round_trips_through_json():
    report = validate(_mixed_file(), count_tokens=per_text(len))
    stored = json.loads(json.dumps(report.model_dump(mode="json")))
    assert stored["format"] == "chat"
    assert stored["errors"][0] == {
        "line": 4,
        "message": stored["errors"][0]["message"],
        "code": "invalid_json",
    }
    assert DatasetReport.model_validate(stored) == report


# ---------------------------------------------------------------------------------------------
# The models are the schema: the fast path never disagrees with them
# ---------------------------------------------------------------------------------------------

_ODD_VALUES: list[object] = [
    None,
    0,
    1,
    2,
    True,
    1.0,
    "",
    "x",
    "assistant",
    "user",
    "tool",
    [],
    {},
    [{}],
]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


def _mutate(example, rng):
    example = copy.deepcopy(example)
    path = rng.choice([p for p in _paths(example) if p])
    parent = example
    for part in path[:-1]:
        parent = parent[part]
    action = rng.random()
    if action < 0.3 and isinstance(parent, dict):
        del parent[path[-1]]
    elif action < 0.4 and isinstance(parent, dict):
        parent["unexpected"] = 1
    else:
        parent[path[-1]] = rng.choice(_ODD_VALUES)
    return example


def test_the_validator_agrees_with_the_models_on_mutated_examples():
    seeds = [
        chat(SYSTEM, USER, ASSISTANT, {**USER, "name": "bob"}, {**ASSISTANT, "weight": 0}),
        chat(USER, {**ASSISTANT, "weight": 1}),
        preference_example(),
        {"prompt": "p", "completion": "c"},
    ]
    rng = random.Random(1234)
    checked = accepted = 0
    for _ in range(3000):
        example = _mutate(rng.choice(seeds), rng)
        fmt = detect_format(example)
        if fmt is None:
            continue
        try:
            parse_example(example, fmt)
            model_ok = True
        except ValidationError:
            model_ok = False
        report = validate(jsonl([example]), min_examples=1)
        assert report.valid == model_ok, (example, report.errors)
        checked += 1
        accepted += model_ok
    # Both outcomes were exercised many times.
    assert checked > 2000
    assert 100 < accepted < checked - 100


def test_parse_example_returns_the_models():
    assert isinstance(parse_example(chat_example(), DatasetFormat.CHAT), ChatExample)
    assert isinstance(
        parse_example(preference_example(), DatasetFormat.PREFERENCE), PreferenceExample
    )
    pc = parse_example({"prompt": "a", "completion": "b"}, DatasetFormat.PROMPT_COMPLETION)
    assert isinstance(pc, PromptCompletionExample)
    assert set(EXAMPLE_MODELS) == set(DatasetFormat)
    message = ChatMessage.model_validate(ASSISTANT)
    assert message.weight is None
    assert message.text() == ASSISTANT["content"]


def test_memory_for_duplicates_does_not_grow_with_the_file():
    import tracemalloc

    def lines(n: int):
        for i in range(n):
            yield json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}).encode() + b"\n"

    peaks = []
    for n in (2_000, 40_000):
        tracemalloc.start()
        report = validate_jsonl(lines(n))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert report.n_examples == n
        assert report.n_duplicates == 0
    assert peaks[1] < peaks[0] * 1.2, peaks


def test_duplicates_are_still_found_with_the_fixed_table():
    rows = [{"prompt": f"q{i % 7}", "completion": "a"} for i in range(70)]
    report = validate_jsonl([b"".join(json.dumps(r).encode() + b"\n" for r in rows)])
    assert report.n_duplicates == 63


def test_tokens_are_counted_in_batches_with_every_example_told_apart():
    # Examples of 1 + i % 7 words in the user turn and 2 + i % 5 in the reply, across more
    # texts than one batch holds: the tally must split each batch back into its examples.
    examples = [
        {
            "messages": [
                {"role": "user", "content": " ".join(["w"] * (1 + i % 7))},
                {"role": "assistant", "content": " ".join(["r"] * (2 + i % 5))},
            ]
        }
        for i in range(TOKEN_BATCH_TEXTS + 1000)
    ]
    batches: list[int] = []

    def count(texts: list[str]) -> list[int]:
        batches.append(len(texts))
        return [len(t.split()) for t in texts]

    report = validate(jsonl(examples), count_tokens=count)
    per_example = [(1 + i % 7) + (2 + i % 5) for i in range(len(examples))]
    assert report.n_tokens == sum(per_example)
    assert report.n_assistant_tokens == sum(2 + i % 5 for i in range(len(examples)))
    assert (report.min_example_tokens, report.max_example_tokens) == (3, 13)
    assert report.mean_example_tokens == pytest.approx(sum(per_example) / len(examples))
    # Full batches as the examples come, then the rest when the report is made.
    rest = 2 * len(examples) - 2 * TOKEN_BATCH_TEXTS
    assert batches == [TOKEN_BATCH_TEXTS, TOKEN_BATCH_TEXTS, rest]
