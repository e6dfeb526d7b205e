"""End to end: terminal job events reach real loopback receivers exactly once, through an outage.

The sender runs as it does in the operator (``run_forever`` in a thread) over the local store
and over S3 (the moto server). Each receiver verifies every request with ``standardwebhooks``.
The receivers are first down (connection refused), then answer 503, then recover; meanwhile
the terminal transitions are replayed, as a restarted operator would.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from kubetune.ids import new_job_id
from kubetune.settings import (
    ObjectStoreBackend,
    ObjectStoreSettings,
    Settings,
    StaticWebhookEndpoint,
    WebhookSettings,
)
from kubetune_runtime.objectstore import ObjectStore, open_object_store
from kubetune_runtime.webhooks import (
    OutboxEntry,
    WebhookEventType,
    WebhookSender,
    create_endpoint,
    enqueue_job_event,
    new_secret,
    static_endpoints,
)
from tests.webhooks.receiver import Receiver

ORG = "acme"
TYPES = (
    WebhookEventType.JOB_SUCCEEDED,
    WebhookEventType.JOB_FAILED,
    WebhookEventType.JOB_CANCELLED,
)


@pytest.fixture(params=["local", "s3"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStoreSettings:
    if request.param == "local":
        return ObjectStoreSettings(local_root=tmp_path / "store", prefix="wh")
    s3: Any = request.getfixturevalue("s3")
    for name, value in s3.env().items():
        request.getfixturevalue("monkeypatch").setenv(name, value)
    return Settings().object_store.model_copy(
        update={"backend": ObjectStoreBackend.S3, "prefix": f"wh-{time.monotonic_ns()}"}
    )


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, Receiver]]:
    # Bind to learn a free port, then go down: the first attempts meet a refused connection.
    pair = (Receiver(new_secret()).start(), Receiver(new_secret()).start())
    for r in pair:
        r.stop()
    yield pair
    for r in pair:
        r.stop()


def pending(store: ObjectStore, settings: Settings) -> list[OutboxEntry]:
    prefix = settings.object_store.layout().webhook_outbox_prefix()
    return [OutboxEntry.model_validate(store.get_json(i.key)) for i in store.list(prefix)]


def wait(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_each_terminal_job_is_delivered_once_per_endpoint_through_an_outage(
    store_settings: ObjectStoreSettings, receivers: tuple[Receiver, Receiver]
) -> None:
    registered, configured = receivers
    static = StaticWebhookEndpoint(org=ORG, url=configured.url, secret=SecretStr(configured.secret))
    opts = WebhookSettings(
        allow_insecure_targets=True,
        allow_private_targets=True,
        backoff_base_seconds=0.1,
        backoff_cap_seconds=0.4,
        poll_seconds=0.05,
        timeout_seconds=2.0,
        max_attempts=100,
        endpoints=[static],
    )
    settings = Settings(object_store=store_settings, webhooks=opts)
    layout = store_settings.layout()
    store = open_object_store(store_settings)
    create_endpoint(store, layout, ORG, registered.url, opts, secret=registered.secret)
    jobs = {new_job_id(): t for t in TYPES}

    def transitions() -> list[str]:
        return [
            m
            for job, event_type in jobs.items()
            for m in enqueue_job_event(
                store, layout, ORG, job, event_type, static=static_endpoints(opts)
            )
        ]

    assert len(transitions()) == 2 * len(jobs)
    stop = threading.Event()
    sender = WebhookSender(store, settings)
    thread = threading.Thread(target=sender.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        # Down: connections refused, retried with backoff.
        wait(lambda: min(e.attempts for e in pending(store, settings)) >= 2, "retries")
        assert transitions() == []  # a replay during the outage queues nothing new
        # Up, but failing.
        for r in receivers:
            r.fail_with = 503
            r.start()
        wait(lambda: all(r.failed >= len(jobs) for r in receivers), "503 answers")
        # Recovered.
        for r in receivers:
            r.fail_with = None
        wait(lambda: all(len(r.deliveries) == len(jobs) for r in receivers), "deliveries")
        assert transitions() == []  # a replay after delivery queues nothing either
        time.sleep(1.0)  # several more polls: nothing is sent again
    finally:
        stop.set()
        thread.join(timeout=10)
        sender.close()
    assert pending(store, settings) == []
    for r in receivers:
        assert r.rejected == []  # every request carried a valid signature
        ids = Counter(d.webhook_id for d in r.deliveries)
        assert all(n == 1 for n in ids.values()), ids
        got = {e["data"]["id"]: e["type"] for e in r.events()}
        assert got == {job: t.value for job, t in jobs.items()}
        assert all(e["object"] == "event" and e["id"].startswith("evt_") for e in r.events())
    # Both endpoints got the same event ids (one event, two deliveries).
    assert {e["id"] for e in registered.events()} == {e["id"] for e in configured.events()}
