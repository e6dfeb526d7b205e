"""Rate limits, size limits, health and metrics of a live local-mode API."""

from __future__ import annotations

import contextlib
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.api.conftest import chat_file
from tests.harness.api import ApiServer, error_of, start_api
from tests.harness.paths import free_port


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


def _raw_request(server: ApiServer, head: str, chunks: list[bytes], *, end: bool) -> bytes:
    """Send a chunked request on a plain socket (``end``: with its final chunk) and return
    what the server answers within 5 s; a server still waiting for the body answers nothing.
    """
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(server.base_url)
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + (b"0\r\n\r\n" if end else b"")
    with socket.create_connection((where.hostname, where.port), timeout=5) as sock:
        sock.sendall(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(OSError):  # the server answered and closed without reading
            sock.sendall(body)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                part = sock.recv(65536)
                if not part:
                    break
                answer += part
        except TimeoutError:
            pass
    return answer


def test_an_upload_without_a_key_is_refused_before_its_body_is_read(strict_api):
    head = (
        "POST /v1/files HTTP/1.1\r\nHost: api\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    )
    # The body never ends: a server that reads it before checking the key waits forever.
    answer = _raw_request(strict_api, head, [b"--b\r\n" + b"x" * 1000], end=False)
    assert answer.startswith(b"HTTP/1.1 401")


def test_a_chunked_body_over_the_limit_is_refused_whatever_the_headers(strict_api):
    key = strict_api.keys["acme"]
    head = (
        f"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\n"
    )
    chunks = [b'{"model": "tiny-llama", "suffix": "' + b"x" * 1024] * 8 + [b'"}']
    answer = _raw_request(strict_api, head, chunks, end=True)  # 8 KiB, no Content-Length
    assert answer.startswith(b"HTTP/1.1 413")


@pytest.fixture(scope="module")
def store_down_api(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Path
) -> Iterator[ApiServer]:
    """An API whose S3 endpoint refuses every connection (an object-store outage)."""
    dead = free_port()
    env = {
        "KUBETUNE_MODE": "local",
        "KUBETUNE_MODELS": json.dumps([{"id": "tiny-llama", "tokenizer": str(tiny_tokenizer)}]),
        "KUBETUNE_OBJECT_STORE__BACKEND": "s3",
        "KUBETUNE_OBJECT_STORE__ENDPOINT_URL": f"http://127.0.0.1:{dead}",
        "KUBETUNE_OBJECT_STORE__REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }
    server = start_api(tmp_path_factory.mktemp("store-down"), env, "local", ready=False)
    yield server
    server.stop()


def test_an_object_store_outage_is_a_quick_503_with_retry_after(store_down_api):
    import time

    client = store_down_api.client()
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as excinfo:
        client.files.create(file=("t.jsonl", io.BytesIO(chat_file(10))), purpose="fine-tune")
    assert time.monotonic() - started < 15  # not the SDK's minutes of retries
    assert excinfo.value.status_code == 503
    assert excinfo.value.response.headers["retry-after"] == "5"
    error = error_of(excinfo)
    assert (error["type"], error["code"]) == ("server_error", "service_unavailable")
    assert error["message"] == "The object store is unavailable; retry in a few seconds."
    # Readiness says the same, so a load balancer stops sending traffic.
    status, _, _ = get(f"{store_down_api.base_url}/readyz")
    assert status == 503
