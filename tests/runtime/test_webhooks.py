"""kubetune_runtime.webhooks: payload, signature, backoff, target checks and outbox idempotency.

The store is the real local backend and the receiver a real HTTP server on loopback that
verifies signatures with the ``standardwebhooks`` package.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from standardwebhooks import Webhook, WebhookVerificationError

from kubetune.ids import new_job_id
from kubetune.settings import ObjectStoreSettings, Settings, StaticWebhookEndpoint, WebhookSettings
from kubetune.storage_layout import StorageLayout
from kubetune_runtime.objectstore import LocalObjectStore
from kubetune_runtime.webhooks import (
    InvalidWebhookTarget,
    OutboxEntry,
    WebhookEventType,
    WebhookSender,
    backoff_delay,
    check_target,
    create_endpoint,
    delete_endpoint,
    enqueue_job_event,
    job_event,
    list_endpoints,
    new_secret,
    sign,
    static_endpoints,
)
from tests.webhooks.receiver import Receiver, running

ORG = "acme"
SUCCEEDED = WebhookEventType.JOB_SUCCEEDED
LOOPBACK = WebhookSettings(allow_insecure_targets=True, allow_private_targets=True)


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "store", fsync=False)


def make_settings(tmp_path: Path, **webhooks: Any) -> Settings:
    opts = LOOPBACK.model_copy(update={"backoff_base_seconds": 1.0, **webhooks})
    return Settings(
        object_store=ObjectStoreSettings(local_root=tmp_path / "store", prefix="p"),
        webhooks=opts,
    )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running(new_secret()) as r:
        yield r


def outbox(store: LocalObjectStore, layout: StorageLayout) -> list[OutboxEntry]:
    return [
        OutboxEntry.model_validate(store.get_json(i.key))
        for i in store.list(layout.webhook_outbox_prefix())
    ]


# Payload and signature -------------------------------------------------------------------
def test_the_event_has_openais_shape_and_a_derived_id() -> None:
    job = new_job_id()
    event = job_event(ORG, job, SUCCEEDED, 1_750_000_000)
    assert json.loads(event.body()) == {
        "object": "event",
        "id": event.id,
        "type": "fine_tuning.job.succeeded",
        "created_at": 1_750_000_000,
        "data": {"id": job},
    }
    assert event.id.startswith("evt_")
    assert job_event(ORG, job, SUCCEEDED, 1).id == event.id  # replay: same id
    assert job_event(ORG, job, WebhookEventType.JOB_FAILED, 1).id != event.id
    assert job_event("globex", job, SUCCEEDED, 1).id != event.id
    assert job_event(ORG, new_job_id(), SUCCEEDED, 1).id != event.id


def test_the_signature_verifies_with_the_reference_package() -> None:
    secret = new_secret()
    body = job_event(ORG, new_job_id(), SUCCEEDED, 1).body()
    headers = sign(secret, "wh_" + "0" * 32, datetime.now(UTC), body)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert Webhook(secret).verify(body, headers)["type"] == SUCCEEDED.value
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"succeeded", b"failed"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


# Backoff and targets ---------------------------------------------------------------------
def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    opts = WebhookSettings(backoff_base_seconds=2.0, backoff_cap_seconds=60.0)
    assert [backoff_delay(n, opts, lambda: 1.0) for n in (1, 2, 3, 4)] == [2, 4, 8, 16]
    assert [backoff_delay(n, opts, lambda: 0.0) for n in (1, 2, 3)] == [1, 2, 4]
    assert backoff_delay(30, opts, lambda: 1.0) == 60.0


@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.216.34/hook",  # plain http
        "https://127.0.0.1/hook",
        "https://localhost/hook",
        "https://10.1.2.3/hook",
        "https://169.254.169.254/latest/meta-data",  # cloud metadata
        "https://[::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://user:pw@93.184.216.34/hook",
        "ftp://93.184.216.34/hook",
        "https:///hook",
    ],
)
def test_unsafe_targets_are_refused(url: str) -> None:
    with pytest.raises(InvalidWebhookTarget):
        check_target(url, WebhookSettings())


def test_targets_allowed_by_settings() -> None:
    assert check_target("https://93.184.216.34/hook", WebhookSettings())
    assert check_target("http://127.0.0.1:9/hook", LOOPBACK)


# Registry --------------------------------------------------------------------------------
def test_endpoints_are_per_org_limited_and_keep_their_secret_out_of_reprs(
    store: LocalObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    layout = StorageLayout("p")
    opts = LOOPBACK.model_copy(update={"max_endpoints_per_org": 2})
    first = create_endpoint(store, layout, ORG, "http://127.0.0.1:1/a", opts)
    secret = first.secret.get_secret_value()
    assert secret.startswith("whsec_")
    assert secret not in repr(first)
    create_endpoint(store, layout, ORG, "http://127.0.0.1:1/b", opts)
    with pytest.raises(OverflowError):
        create_endpoint(store, layout, ORG, "http://127.0.0.1:1/c", opts)
    assert first.id in {e.id for e in list_endpoints(store, layout, ORG)}
    assert list_endpoints(store, layout, "globex") == []
    assert not delete_endpoint(store, layout, "globex", first.id)
    assert delete_endpoint(store, layout, ORG, first.id)
    assert len(list_endpoints(store, layout, ORG)) == 1
    assert secret not in caplog.text


# Outbox ----------------------------------------------------------------------------------
def test_enqueue_is_idempotent_per_job_and_type(store: LocalObjectStore, tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    layout = settings.object_store.layout()
    endpoint = create_endpoint(store, layout, ORG, "http://127.0.0.1:1/a", settings.webhooks)
    create_endpoint(
        store,
        layout,
        ORG,
        "http://127.0.0.1:1/only-failures",
        settings.webhooks,
        event_types=[WebhookEventType.JOB_FAILED],
    )
    job = new_job_id()
    finished = int(time.time()) + 5  # after the endpoints were registered
    first = enqueue_job_event(store, layout, ORG, job, SUCCEEDED, created_at=finished)
    assert len(first) == 1
    assert enqueue_job_event(store, layout, ORG, job, SUCCEEDED, created_at=finished) == []
    [entry] = outbox(store, layout)
    assert entry.endpoint_id == endpoint.id
    assert entry.event.data.id == job
    assert endpoint.secret.get_secret_value() not in json.dumps(
        store.get_json(layout.webhook_outbox_key(entry.message_id))
    )
    # Delivered and removed from the outbox: a replayed transition queues nothing.
    store.put_json(layout.webhook_delivered_key(entry.message_id), {})
    store.delete(layout.webhook_outbox_key(entry.message_id))
    assert enqueue_job_event(store, layout, ORG, job, SUCCEEDED, created_at=finished) == []
    assert outbox(store, layout) == []


def test_static_endpoints_get_their_orgs_events(store: LocalObjectStore, tmp_path: Path) -> None:
    static = StaticWebhookEndpoint(
        org=ORG, url="http://127.0.0.1:1/s", secret=SecretStr(new_secret())
    )
    settings = make_settings(tmp_path, endpoints=[static])
    layout = settings.object_store.layout()
    endpoints = static_endpoints(settings.webhooks)
    assert endpoints[0].id == static_endpoints(settings.webhooks)[0].id  # stable id
    job = new_job_id()
    assert enqueue_job_event(store, layout, "globex", job, SUCCEEDED, static=endpoints) == []
    assert len(enqueue_job_event(store, layout, ORG, job, SUCCEEDED, static=endpoints)) == 1


def test_sender_delivers_once_and_never_after_the_marker(
    store: LocalObjectStore, tmp_path: Path, receiver: Receiver
) -> None:
    settings = make_settings(tmp_path)
    layout = settings.object_store.layout()
    create_endpoint(store, layout, ORG, receiver.url, settings.webhooks, secret=receiver.secret)
    [message] = enqueue_job_event(store, layout, ORG, new_job_id(), SUCCEEDED)
    sender = WebhookSender(store, settings)
    assert sender.run_once() == 1
    assert sender.run_once() == 0
    assert [d.webhook_id for d in receiver.deliveries] == [message]
    assert store.exists(layout.webhook_delivered_key(message))
    assert outbox(store, layout) == []
    # An entry written again (a replay racing the delivery) is dropped without a POST.
    store.put_json(layout.webhook_outbox_key(message), {"bad": "entry"})
    entry = {
        "message_id": message,
        "org": ORG,
        "endpoint_id": list_endpoints(store, layout, ORG)[0].id,
        "event": json.loads(job_event(ORG, new_job_id(), SUCCEEDED, 1).body()),
    }
    store.put_json(layout.webhook_outbox_key(message), entry)
    assert WebhookSender(store, settings).run_once() == 0
    assert len(receiver.deliveries) == 1
    assert outbox(store, layout) == []


def test_one_sender_never_posts_a_message_twice_at_once(
    store: LocalObjectStore, tmp_path: Path, receiver: Receiver
) -> None:
    settings = make_settings(tmp_path)
    layout = settings.object_store.layout()
    create_endpoint(store, layout, ORG, receiver.url, settings.webhooks, secret=receiver.secret)
    for _ in range(3):
        enqueue_job_event(store, layout, ORG, new_job_id(), SUCCEEDED)
    receiver.delay = 0.3
    sender = WebhookSender(store, settings)
    threads = [threading.Thread(target=sender.run_once) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [d.webhook_id for d in receiver.deliveries]
    assert len(ids) == 3
    assert len(set(ids)) == 3


def test_failures_back_off_persistently_then_give_up(
    store: LocalObjectStore,
    tmp_path: Path,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(tmp_path, max_attempts=3)
    layout = settings.object_store.layout()
    endpoint = create_endpoint(
        store, layout, ORG, receiver.url, settings.webhooks, secret=receiver.secret
    )
    [message] = enqueue_job_event(store, layout, ORG, new_job_id(), SUCCEEDED)
    receiver.fail_with = 503
    clock = Clock(time.time())
    sender = WebhookSender(store, settings, clock=clock, rng=lambda: 1.0)
    sender.run_once()
    [entry] = outbox(store, layout)
    assert (entry.attempts, entry.next_attempt_at, entry.last_error) == (
        1,
        clock.now + 1,
        "HTTP 503",
    )
    assert sender.run_once() == 0
    assert receiver.failed == 1
    # A new sender (a restart) keeps the attempt count and the schedule.
    clock.now += 1
    restarted = WebhookSender(store, settings, clock=clock, rng=lambda: 1.0)
    restarted.run_once()
    assert outbox(store, layout)[0].attempts == 2
    assert receiver.failed == 2
    clock.now += 2
    restarted.run_once()
    assert receiver.failed == 3
    assert outbox(store, layout) == []
    assert store.get_json(layout.webhook_failed_key(message))["attempts"] == 3
    assert endpoint.secret.get_secret_value() not in caplog.text


def test_a_deleted_endpoint_drops_its_deliveries(
    store: LocalObjectStore, tmp_path: Path, receiver: Receiver
) -> None:
    settings = make_settings(tmp_path)
    layout = settings.object_store.layout()
    endpoint = create_endpoint(
        store, layout, ORG, receiver.url, settings.webhooks, secret=receiver.secret
    )
    [message] = enqueue_job_event(store, layout, ORG, new_job_id(), SUCCEEDED)
    delete_endpoint(store, layout, ORG, endpoint.id)
    assert WebhookSender(store, settings).run_once() == 0
    assert receiver.deliveries == []
    assert store.exists(layout.webhook_failed_key(message))


def test_the_sender_rechecks_targets_before_posting(
    store: LocalObjectStore, tmp_path: Path, receiver: Receiver
) -> None:
    settings = make_settings(tmp_path)
    layout = settings.object_store.layout()
    create_endpoint(store, layout, ORG, receiver.url, settings.webhooks, secret=receiver.secret)
    enqueue_job_event(store, layout, ORG, new_job_id(), SUCCEEDED)
    strict = make_settings(tmp_path, allow_private_targets=False)
    assert WebhookSender(store, strict).run_once() == 0
    assert receiver.deliveries == []
    assert "loopback" in (outbox(store, layout)[0].last_error or "")


def test_no_event_for_an_endpoint_younger_than_it_nor_for_a_given_up_delivery(
    store: LocalObjectStore, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    layout = settings.object_store.layout()
    create_endpoint(store, layout, ORG, "http://127.0.0.1:1/a", settings.webhooks)
    job = new_job_id()
    # The job ended an hour before the endpoint existed (the start-up sweep replays such jobs).
    earlier = int(time.time()) - 3600
    assert enqueue_job_event(store, layout, ORG, job, SUCCEEDED, created_at=earlier) == []
    finished = int(time.time()) + 5
    [message] = enqueue_job_event(store, layout, ORG, job, SUCCEEDED, created_at=finished)
    # The sender gave up on it: a replay does not start another round of attempts.
    store.put_json(layout.webhook_failed_key(message), {})
    store.delete(layout.webhook_outbox_key(message))
    assert enqueue_job_event(store, layout, ORG, job, SUCCEEDED, created_at=finished) == []


def test_the_post_goes_to_the_address_that_was_checked(
    store: LocalObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name answers a public address when checked, then loopback."""
    import socket

    # Created while the name answers a public address; at the first delivery it answers it
    # once more, then loopback.
    answers = iter(["93.184.216.34", "93.184.216.34", "127.0.0.1", "127.0.0.1"])
    lookups: list[str] = []

    def rebinding(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    seen: list[httpx.Request] = []

    def receive(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    settings = make_settings(tmp_path, allow_private_targets=False)
    layout = settings.object_store.layout()
    url = "http://hooks.example.test:8080/hook"
    create_endpoint(store, layout, ORG, url, settings.webhooks, secret=new_secret())
    enqueue_job_event(store, layout, ORG, new_job_id(), SUCCEEDED)
    client = httpx.Client(transport=httpx.MockTransport(receive))
    sender = WebhookSender(store, settings, client=client)
    assert sender.run_once() == 1
    [request] = seen
    assert len(lookups) == 2  # at create, then once per attempt: for the check and the POST
    assert (request.url.host, request.url.port) == ("93.184.216.34", 8080)
    assert request.headers["host"] == "hooks.example.test:8080"
    # The next lookup answers loopback: refused, nothing sent.
    enqueue_job_event(store, layout, ORG, new_job_id(), SUCCEEDED)
    assert sender.run_once() == 0
    assert len(seen) == 1
    assert "loopback" in (outbox(store, layout)[0].last_error or "")


def test_old_delivery_markers_are_pruned_and_their_events_never_queued_again(
    store: LocalObjectStore, tmp_path: Path, receiver: Receiver
) -> None:
    import os

    static = StaticWebhookEndpoint(org=ORG, url=receiver.url, secret=SecretStr(receiver.secret))
    settings = make_settings(tmp_path, endpoints=[static], delivered_retention_hours=1.0)
    layout = settings.object_store.layout()
    endpoints = static_endpoints(settings.webhooks)
    old_job, new_job = new_job_id(), new_job_id()
    [old] = enqueue_job_event(store, layout, ORG, old_job, SUCCEEDED, static=endpoints)
    [new] = enqueue_job_event(store, layout, ORG, new_job, SUCCEEDED, static=endpoints)
    sender = WebhookSender(store, settings)
    assert sender.run_once() == 2
    two_hours_ago = time.time() - 2 * 3600
    marker = store.path_for(layout.webhook_delivered_key(old))
    os.utime(marker, (two_hours_ago, two_hours_ago))
    assert sender.prune_delivered() == 1
    assert not store.exists(layout.webhook_delivered_key(old))
    assert store.exists(layout.webhook_delivered_key(new))
    # Its job finished before the retention: a replay does not queue it again.
    replay = enqueue_job_event(
        store,
        layout,
        ORG,
        old_job,
        SUCCEEDED,
        static=endpoints,
        created_at=int(two_hours_ago),
        max_age_seconds=settings.webhooks.delivered_retention_hours * 3600,
    )
    assert replay == []
    assert sender.run_once() == 0
    assert len(receiver.deliveries) == 2
    # (Without the age rule the pruned marker would let the replay queue it a second time.)
    again = enqueue_job_event(
        store, layout, ORG, old_job, SUCCEEDED, static=endpoints, created_at=int(two_hours_ago)
    )
    assert again == [old]
