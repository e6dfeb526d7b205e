"""The CLI's errors: the API's own message and a non-zero exit code, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune_cli.errors import ExitCode
from tests.api.conftest import chat_line, jsonl
from tests.cli.conftest import global_args, run_cli
from tests.harness.paths import free_port


def bad_file(tmp_path: Path) -> Path:
    """Line 2 is not JSON; line 3 has no assistant message."""
    path = tmp_path / "bad.jsonl"
    good = jsonl([chat_line(1)])
    no_answer = json.dumps({"messages": [{"role": "user", "content": "hello"}]}).encode()
    path.write_bytes(good + b"{not json\n" + no_answer + b"\n")
    return path


def assert_no_traceback(result) -> None:
    assert "Traceback" not in result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_bad_file_shows_the_line_number(cli_api, tmp_path):
    result = run_cli([*global_args(cli_api), "files", "upload", str(bad_file(tmp_path))])
    assert result.exit_code == ExitCode.API_ERROR
    assert "HTTP 400" in result.stderr
    assert "line 2" in result.stderr.lower()
    assert_no_traceback(result)


def test_bad_file_through_parts_shows_the_line_number(cli_api, tmp_path):
    path = bad_file(tmp_path)
    result = run_cli([*global_args(cli_api), "files", "upload", str(path), "--part-size", "64"])
    assert result.exit_code == ExitCode.API_ERROR
    assert "line 2" in result.stderr.lower()
    assert_no_traceback(result)


def test_unknown_job_shows_the_404_message(cli_api):
    unknown = "ftjob-0000000000000000000000000"
    for command in (["get"], ["watch"], ["events"], ["cancel"]):
        result = run_cli([*global_args(cli_api), "jobs", *command, unknown])
        assert result.exit_code == ExitCode.API_ERROR, command
        assert f"No fine-tuning job found with id {unknown}" in result.stderr
        assert "HTTP 404" in result.stderr
        assert_no_traceback(result)


def test_invalid_request_names_the_param(cli_api):
    result = run_cli(
        [*global_args(cli_api), "jobs", "create", "--model", "no-such-model",
         "--training-file", "file-" + "0" * 23]
    )  # fmt: skip
    assert result.exit_code == ExitCode.API_ERROR
    assert "Model no-such-model is not available for fine-tuning" in result.stderr
    assert "param: model" in result.stderr


def test_wrong_key_is_a_401_message(cli_api):
    args = ["--base-url", f"{cli_api.base_url}/v1", "--api-key", "kt-wrong-key-123456"]
    result = run_cli([*args, "--max-retries", "0", "jobs", "list"])
    assert result.exit_code == ExitCode.API_ERROR
    assert "Incorrect API key provided" in result.stderr
    assert "HTTP 401" in result.stderr


def test_server_down_is_a_clear_message(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    for command in (["jobs", "list"], ["models", "list", "--json"], ["jobs", "watch", "ftjob-x"]):
        result = run_cli(["--base-url", url, "--max-retries", "0", *command])
        assert result.exit_code == ExitCode.UNREACHABLE, command
        assert f"cannot reach kubetune at {url}" in result.stderr
        assert "Connection refused" in result.stderr
        assert result.stdout == ""
        assert_no_traceback(result)


def test_local_mode_key_is_found_in_the_data_dir(cli_api, tmp_path):
    (tmp_path / "api_key").write_text(cli_api.keys["acme"] + "\n")
    result = run_cli(
        ["--base-url", f"{cli_api.base_url}/v1", "--max-retries", "0", "models", "list"],
        env={"KUBETUNE_DATA_DIR": str(tmp_path)},
    )
    assert result.exit_code == 0, result.stderr
    assert "tiny-llama" in result.stdout


def test_openai_api_key_is_the_fallback(cli_api):
    result = run_cli(
        ["--base-url", f"{cli_api.base_url}/v1", "--max-retries", "0", "models", "list"],
        env={"OPENAI_API_KEY": cli_api.keys["globex"]},
    )
    assert result.exit_code == 0, result.stderr
