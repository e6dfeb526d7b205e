"""Rate limits, size limits, health and metrics of a live local-mode API."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.harness.api import ApiServer, error_of, start_api
from tests.integration.api.conftest import chat_file


@pytest.fixture(scope="module")
def strict_api(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Path
) -> Iterator[ApiServer]:
    """An API with small limits: 5 requests a minute, 64 KiB files, 3 active jobs."""
    env = {
        "KUBETUNE_MODE": "local",
        "KUBETUNE_MODELS": json.dumps([{"id": "tiny-llama", "tokenizer": str(tiny_tokenizer)}]),
        "KUBETUNE_API__REQUESTS_PER_MINUTE": "5",
        "KUBETUNE_LIMITS__MAX_FILE_BYTES": str(64 * 1024),
        "KUBETUNE_API__MAX_JSON_BODY_BYTES": "4096",
    }
    server = start_api(tmp_path_factory.mktemp("strict"), env, "local")
    yield server
    server.stop()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request) as response:  # noqa: S310
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_rate_limit_answers_429_with_openai_headers(strict_api):
    client = strict_api.client("globex")
    seen = []
    for _ in range(5):
        raw = client.files.with_raw_response.list()
        seen.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert raw.headers["x-ratelimit-limit-requests"] == "5"
    assert seen == [4, 3, 2, 1, 0]
    with pytest.raises(openai.RateLimitError) as excinfo:
        client.files.list()
    headers = excinfo.value.response.headers
    assert int(headers["retry-after"]) >= 1
    assert error_of(excinfo)["type"] == "rate_limit_error"
    # Another org has its own budget.
    assert strict_api.client("acme").files.list().data is not None


def test_oversized_bodies_are_refused_with_413(strict_api):
    client = strict_api.client("acme")
    big = chat_file(10) * 40  # > 64 KiB
    with pytest.raises(openai.APIStatusError) as excinfo:
        client.files.create(file=("big.jsonl", io.BytesIO(big)), purpose="fine-tune")
    assert excinfo.value.status_code == 413
    assert error_of(excinfo)["code"] == "payload_too_large"
    with pytest.raises(openai.APIStatusError) as excinfo:
        client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file="file-x",
            metadata={f"k{i}": "v" * 400 for i in range(16)},
        )
    assert excinfo.value.status_code == 413


def test_health_readiness_and_metrics(strict_api):
    # Its own request to count: under xdist this module's tests may share no server.
    strict_api.client("acme").files.list()
    status, headers, _ = get(f"{strict_api.base_url}/healthz")
    assert status == 200
    assert headers["x-request-id"].startswith("req_")
    assert get(f"{strict_api.base_url}/readyz")[0] == 200
    status, _, body = get(f"{strict_api.base_url}/metrics")
    text = body.decode()
    assert status == 200
    assert 'kubetune_api_requests_total{method="GET",route="/v1/files",status="200"}' in text
    assert "kubetune_api_request_duration_seconds_bucket" in text
    assert "kubetune_api_files_created_total" in text
