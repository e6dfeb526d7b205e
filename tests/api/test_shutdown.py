"""The Kubernetes backend's job cache when the apiserver is away, and when the app stops.

Its watch thread retries with growing waits and one log line per retry (no traceback a second),
and it ends with the app that started it instead of outliving it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kubetune_api.backends.jobcache import JobCache
from kubetune_api.backends.kubernetes import KubernetesJobBackend
from tests.harness.paths import free_port


def _unreachable_client() -> object:
    """A Kubernetes client for an apiserver address where nothing listens."""
    from kubernetes import client

    port = free_port()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.retries = False
    return client.ApiClient(configuration)


def test_the_watch_retries_with_backoff_and_one_line_per_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="kubetune_api.backends.jobcache")
    backend = KubernetesJobBackend(_unreachable_client(), "ns")
    try:
        time.sleep(4.5)  # tries at 0, 1, 3 s; the next waits until 7 s
    finally:
        backend.close()
    retries = [r for r in caplog.records if r.name == "kubetune_api.backends.jobcache"]
    assert 2 <= len(retries) <= 3
    assert all(r.exc_info is None for r in retries)  # a line each, no traceback
    messages = [r.getMessage() for r in retries]
    assert "retrying in 1 s" in messages[0]
    assert "retrying in 2 s" in messages[1]
    assert "cannot be listed or watched (" in messages[0]


def test_closing_the_backend_ends_the_watch_thread() -> None:
    cache = JobCache(_custom_objects(), "ns")
    assert cache.running
    started = time.monotonic()
    cache.stop()
    assert not cache.running
    assert time.monotonic() - started < 5


def _custom_objects() -> object:
    from kubernetes import client

    return client.CustomObjectsApi(_unreachable_client())


def test_the_app_closes_its_backend_when_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune_api.app import create_app

    monkeypatch.setenv("KUBETUNE_DATA_DIR", str(tmp_path))
    app = create_app()
    closed: list[bool] = []
    monkeypatch.setattr(app.state.services.backend, "close", lambda: closed.append(True))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert closed == []
    assert closed == [True]
