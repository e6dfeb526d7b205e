"""Webhooks as OpenAI sends them, signed per the Standard Webhooks spec.

Shared by the operator and the local executor, so both send the same events:

- :func:`enqueue_job_event` is called on a job's terminal transition. It writes one outbox
  entry per endpoint of the job's org that wants the event. Ids are derived, not drawn: the
  event id from (org, job, type), the message id (``webhook-id``) from (event, endpoint). A
  transition seen twice (an operator restart replays it) therefore names the same entries, and
  an entry is written only if neither it nor its delivered marker exists.
- :class:`WebhookSender` delivers due entries: one signed POST per attempt (``webhook-id``,
  ``webhook-timestamp``, ``webhook-signature`` made by the ``standardwebhooks`` package),
  exponential backoff with jitter, bounded attempts. A 2xx writes the delivered marker, then
  removes the entry. One sender never POSTs a message twice at once, nor after it saw it
  delivered; run exactly one sender per store (the operator runs it where kopf's peering lets
  it act). Delivery is at least once: a process killed between the receiver's 2xx and the
  marker sends that message again, with the same ``webhook-id`` for the receiver to drop.

Endpoint secrets live in the object store next to the org's other data (the sender needs them
to sign) and never appear in an outbox entry, a log line or a listing.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import random
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, Field, SecretStr, ValidationError
from standardwebhooks import Webhook

from kubetune.finetunejob import FineTuneJob, JobPhase
from kubetune.ids import (
    new_webhook_endpoint_id,
    static_webhook_endpoint_id,
    webhook_event_id,
    webhook_message_id,
)
from kubetune.settings import Settings, StaticWebhookEndpoint, WebhookSettings
from kubetune.storage_layout import StorageLayout
from kubetune.version import __version__
from kubetune_runtime.objectstore import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - a format prefix, not a secret
SECRET_BYTES: Final = 32
USER_AGENT: Final = f"kubetune-webhooks/{__version__}"
DELIVERED_CACHE: Final = 10_000  # message ids one sender remembers as delivered
MAX_ERROR_CHARS: Final = 300


class WebhookEventType(StrEnum):
    """The events kubetune sends (OpenAI's names)."""

    JOB_SUCCEEDED = "fine_tuning.job.succeeded"
    JOB_FAILED = "fine_tuning.job.failed"
    JOB_CANCELLED = "fine_tuning.job.cancelled"


ALL_EVENT_TYPES: Final = tuple(WebhookEventType)
EVENT_OF_PHASE: Final[dict[JobPhase, WebhookEventType]] = {
    JobPhase.SUCCEEDED: WebhookEventType.JOB_SUCCEEDED,
    JobPhase.FAILED: WebhookEventType.JOB_FAILED,
    JobPhase.CANCELLED: WebhookEventType.JOB_CANCELLED,
}


class InvalidWebhookTarget(ValueError):
    """An endpoint URL the settings do not allow (scheme, credentials, private address)."""


# Models ------------------------------------------------------------------------------------
class WebhookEventData(BaseModel):
    """The object the event is about."""

    id: str


class WebhookEvent(BaseModel):
    """The body of a webhook, exactly as OpenAI sends it."""

    object: Literal["event"] = "event"
    id: str
    type: WebhookEventType
    created_at: int
    data: WebhookEventData

    def body(self) -> bytes:
        """The bytes that are signed and POSTed (compact JSON, fixed key order)."""
        return self.model_dump_json().encode()


class WebhookEndpoint(BaseModel):
    """A registered endpoint. ``secret`` is a SecretStr so it never shows in a repr or log."""

    id: str
    org: str
    url: str
    secret: SecretStr
    event_types: list[WebhookEventType] = Field(default_factory=lambda: list(ALL_EVENT_TYPES))
    created_at: int = 0
    static: bool = False  # from settings: listed, never deleted through the API

    def stored(self) -> dict[str, object]:
        """What is written to the store (the one place the secret is revealed)."""
        return {**self.model_dump(mode="json"), "secret": self.secret.get_secret_value()}

    def wants(self, event_type: WebhookEventType) -> bool:
        """Whether this endpoint subscribed to ``event_type``."""
        return event_type in self.event_types


class OutboxEntry(BaseModel):
    """One delivery of one event to one endpoint, until it succeeds or is given up."""

    message_id: str
    org: str
    endpoint_id: str
    event: WebhookEvent
    attempts: int = 0
    next_attempt_at: float = 0.0
    enqueued_at: float = 0.0
    last_error: str | None = None


# Secrets and targets -----------------------------------------------------------------------
def new_secret() -> str:
    """A new signing secret, ``whsec_`` + base64 of 32 random bytes (Standard Webhooks)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def check_secret(secret: str) -> str:
    """Return ``secret`` if ``standardwebhooks`` can sign with it, else raise ValueError."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r}")
    try:
        Webhook(secret)
    except Exception as exc:  # the package raises binascii/Empty… errors
        raise ValueError("a webhook secret is whsec_ followed by base64") from exc
    return secret


def _blocked(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidWebhookTarget(f"cannot resolve {host!r}: {exc.strerror or exc}") from None
    return [str(info[4][0]) for info in infos]


def check_target(url: str, opts: WebhookSettings, *, resolve: bool = True) -> str:
    """Return ``url`` if webhooks may be sent to it, else raise :class:`InvalidWebhookTarget`.

    https only and public addresses only, unless the settings allow otherwise: an endpoint is
    a URL a tenant chose, and the sender runs inside the cluster (SSRF). With ``resolve`` the
    host name's addresses are checked too; the sender checks again before every POST, since
    DNS answers change.
    """
    parts = urlsplit(url)
    allowed = ("https", "http") if opts.allow_insecure_targets else ("https",)
    if parts.scheme not in allowed:
        raise InvalidWebhookTarget(f"the URL must use {' or '.join(allowed)}")
    if not parts.hostname:
        raise InvalidWebhookTarget("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidWebhookTarget("the URL must not carry credentials")
    if opts.allow_private_targets:
        return url
    host = parts.hostname
    if host == "localhost" or host.endswith(".localhost"):
        raise InvalidWebhookTarget("the URL points at a loopback address")
    try:
        literal = [str(ipaddress.ip_address(host))]
    except ValueError:
        literal = None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = literal or (_resolve(host, port) if resolve else [])
    if any(_blocked(a) for a in addresses):
        raise InvalidWebhookTarget("the URL points at a loopback, private or link-local address")
    return url


@dataclass(frozen=True)
class PinnedTarget:
    """Where a POST goes: the URL with the checked address in place of the host name, and the
    name for the Host header and TLS (SNI and certificate check), so the connection is made
    to the address that was checked — a DNS answer that changes in between (rebinding) does
    not move it.
    """

    url: str
    host_header: str
    tls_name: str | None  # https: the name the certificate must carry


def pin_target(url: str, opts: WebhookSettings) -> PinnedTarget:
    """Check ``url`` (see :func:`check_target`) and resolve its host once, to an address that
    passes the check; raise :class:`InvalidWebhookTarget` otherwise.
    """
    check_target(url, opts, resolve=False)
    parts = urlsplit(url)
    host = parts.hostname
    assert host is not None  # check_target refuses a URL without one
    host_header = parts.netloc.rsplit("@", 1)[-1]
    try:
        ipaddress.ip_address(host)
        return PinnedTarget(url, host_header, None)  # a literal address: nothing to resolve
    except ValueError:
        pass
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = _resolve(host, port)
    if not opts.allow_private_targets and any(_blocked(a) for a in addresses):
        raise InvalidWebhookTarget("the URL points at a loopback, private or link-local address")
    if not addresses:
        raise InvalidWebhookTarget(f"cannot resolve {host!r}")
    address = addresses[0].split("%", 1)[0]
    netloc = f"[{address}]" if ":" in address else address
    if parts.port is not None:
        netloc += f":{parts.port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return PinnedTarget(pinned, host_header, host if parts.scheme == "https" else None)


# Endpoint registry -------------------------------------------------------------------------
def static_endpoints(opts: WebhookSettings, org: str | None = None) -> list[WebhookEndpoint]:
    """The endpoints from settings (of ``org``, or all)."""
    return [_static(e) for e in opts.endpoints if org is None or e.org == org]


def _static(entry: StaticWebhookEndpoint) -> WebhookEndpoint:
    types = [WebhookEventType(t) for t in entry.event_types or ALL_EVENT_TYPES]
    return WebhookEndpoint(
        id=static_webhook_endpoint_id(entry.org, entry.url),
        org=entry.org,
        url=entry.url,
        secret=entry.secret,
        event_types=types,
        static=True,
    )


def list_endpoints(store: ObjectStore, layout: StorageLayout, org: str) -> list[WebhookEndpoint]:
    """The endpoints registered for ``org`` in the store, oldest first."""
    out = []
    for info in store.list(layout.webhook_endpoints_prefix(org)):
        endpoint = _read_endpoint(store, info.key)
        if endpoint is not None:
            out.append(endpoint)
    return sorted(out, key=lambda e: (e.created_at, e.id))


def _read_endpoint(store: ObjectStore, key: str) -> WebhookEndpoint | None:
    try:
        return WebhookEndpoint.model_validate(store.get_json(key))
    except ObjectNotFound:
        return None
    except (ValidationError, ValueError):
        log.warning("ignoring an unreadable webhook endpoint at %s", key)
        return None


def get_endpoint(
    store: ObjectStore, layout: StorageLayout, org: str, endpoint_id: str
) -> WebhookEndpoint | None:
    """One registered endpoint of ``org``, or None."""
    return _read_endpoint(store, layout.webhook_endpoint_key(org, endpoint_id))


def create_endpoint(
    store: ObjectStore,
    layout: StorageLayout,
    org: str,
    url: str,
    opts: WebhookSettings,
    *,
    event_types: Sequence[WebhookEventType] = ALL_EVENT_TYPES,
    secret: str | None = None,
) -> WebhookEndpoint:
    """Register an endpoint for ``org``; the returned object is the only one holding the
    secret in the clear for the caller to show once.

    Raises :class:`InvalidWebhookTarget` for a URL the settings refuse and ``OverflowError``
    when the org already has ``max_endpoints_per_org``.
    """
    check_target(url, opts)
    existing = list(store.list(layout.webhook_endpoints_prefix(org)))
    if len(existing) >= opts.max_endpoints_per_org:
        raise OverflowError(f"an org may register at most {opts.max_endpoints_per_org} endpoints")
    endpoint = WebhookEndpoint(
        id=new_webhook_endpoint_id(),
        org=org,
        url=url,
        secret=SecretStr(check_secret(secret) if secret else new_secret()),
        event_types=list(dict.fromkeys(event_types)) or list(ALL_EVENT_TYPES),
        created_at=int(time.time()),
    )
    store.put_json(layout.webhook_endpoint_key(org, endpoint.id), endpoint.stored())
    return endpoint


def delete_endpoint(store: ObjectStore, layout: StorageLayout, org: str, endpoint_id: str) -> bool:
    """Remove an endpoint of ``org``; False if it has none of that id. Pending deliveries to it
    are dropped by the sender.
    """
    key = layout.webhook_endpoint_key(org, endpoint_id)
    if not store.exists(key):
        return False
    store.delete(key)
    return True


# Enqueueing --------------------------------------------------------------------------------
def job_event(org: str, job_id: str, event_type: WebhookEventType, created_at: int) -> WebhookEvent:
    """The event for a job's terminal transition, with its derived id."""
    return WebhookEvent(
        id=webhook_event_id(org, job_id, event_type.value),
        type=event_type,
        created_at=created_at,
        data=WebhookEventData(id=job_id),
    )


def enqueue_job_event(
    store: ObjectStore,
    layout: StorageLayout,
    org: str,
    job_id: str,
    event_type: WebhookEventType,
    *,
    created_at: int | None = None,
    static: Iterable[WebhookEndpoint] = (),
    now: float | None = None,
    max_age_seconds: float | None = None,
) -> list[str]:
    """Queue ``event_type`` of ``job_id`` for every endpoint of ``org`` that wants it.

    ``created_at`` is when the job finished (pass the status's time, so a replay writes the
    same payload); ``static`` the endpoints from settings (:func:`static_endpoints`); an event
    older than ``max_age_seconds`` (the delivered markers' retention) is not queued: its
    marker may be pruned already. Idempotent: returns the message ids written now, empty when
    a previous call already queued (or delivered) them.
    """
    when = time.time() if now is None else now
    event = job_event(org, job_id, event_type, int(when) if created_at is None else created_at)
    if max_age_seconds is not None and when - event.created_at > max_age_seconds:
        return []
    targets = [*list_endpoints(store, layout, org), *(e for e in static if e.org == org)]
    written = []
    for endpoint in targets:
        # An endpoint hears of what happens after it is registered, not before (a replay
        # or the start-up sweep must not send it older events).
        if not endpoint.wants(event_type) or endpoint.created_at > event.created_at:
            continue
        entry = OutboxEntry(
            message_id=webhook_message_id(event.id, endpoint.id),
            org=org,
            endpoint_id=endpoint.id,
            event=event,
            next_attempt_at=when,
            enqueued_at=when,
        )
        if _create_if_absent(store, layout, entry):
            written.append(entry.message_id)
    return written


def announce_job_end(
    store: ObjectStore, layout: StorageLayout, opts: WebhookSettings, job: FineTuneJob
) -> list[str]:
    """Queue the event of a job that reached a terminal phase (the operator's and the local
    executor's one call). Idempotent; returns the message ids written now.
    """
    status = job.status
    event_type = EVENT_OF_PHASE.get(status.phase) if status and status.phase else None
    if status is None or not opts.enabled or event_type is None:
        return []
    org = job.spec.org
    return enqueue_job_event(
        store,
        layout,
        org,
        job.metadata.name,
        event_type,
        # The job's own end time, so a replay writes the same payload.
        created_at=int(status.finished_at.timestamp()) if status.finished_at else None,
        static=static_endpoints(opts, org),
        max_age_seconds=opts.delivered_retention_hours * 3600,
    )


def _create_if_absent(store: ObjectStore, layout: StorageLayout, entry: OutboxEntry) -> bool:
    # The store has no conditional put. Check-then-write is enough here: racing writers write
    # the same derived ids and payload, and a delivered marker is checked first, so a message
    # already delivered — or given up on — is never queued again (the sender also checks
    # before each POST).
    for done in (layout.webhook_delivered_key, layout.webhook_failed_key):
        if store.exists(done(entry.message_id)):
            return False
    key = layout.webhook_outbox_key(entry.message_id)
    if store.exists(key):
        return False
    store.put_json(key, entry.model_dump(mode="json"))
    return True


# Sending -----------------------------------------------------------------------------------
def backoff_delay(
    attempts: int, opts: WebhookSettings, rng: Callable[[], float] = random.random
) -> float:
    """Seconds before try ``attempts + 1``: base·2^(attempts-1), capped, with "equal jitter"
    (half fixed, half random) so a receiver coming back is not hit by every sender at once.
    """
    growth = 2.0 ** max(attempts - 1, 0)
    delay = min(opts.backoff_cap_seconds, opts.backoff_base_seconds * growth)
    return delay / 2 + rng() * delay / 2


def _retry_after(response: httpx.Response, cap: float) -> float | None:
    value = response.headers.get("retry-after", "")
    return min(float(value), cap) if value.isdigit() else None


def sign(secret: str, message_id: str, timestamp: datetime, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt (the timestamp is the attempt's)."""
    signature = Webhook(secret).sign(message_id, timestamp, body.decode())
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
    }


PRUNE_SECONDS: Final = 3600.0


class WebhookSender:
    """Delivers due outbox entries. Thread-safe; meant to run once per store.

    The sender is the only writer of an entry once it exists, so it keeps the entries it has
    read in memory and reads from the store only keys it has not seen.
    """

    def __init__(
        self,
        store: ObjectStore,
        settings: Settings,
        *,
        client: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.opts = settings.webhooks
        self.layout = settings.object_store.layout()
        self._static = {e.id: e for e in static_endpoints(self.opts)}
        self._client = client or httpx.Client(
            timeout=self.opts.timeout_seconds,
            follow_redirects=False,  # a redirect could lead anywhere, past the target check
            headers={"user-agent": USER_AGENT, "content-type": "application/json"},
        )
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self._entries: dict[str, OutboxEntry] = {}
        self._in_flight: set[str] = set()
        self._delivered: OrderedDict[str, None] = OrderedDict()

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()

    def run_forever(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set, reading the outbox every ``poll_seconds`` and pruning
        old delivery markers every ``PRUNE_SECONDS``.
        """
        pruned_at = 0.0
        while not stop.is_set():
            try:
                self.run_once()
                if self._clock() - pruned_at >= PRUNE_SECONDS:
                    pruned_at = self._clock()
                    self.prune_delivered()
            except Exception:  # a store outage must not end the loop
                log.exception("webhook sender pass failed")
            stop.wait(self.opts.poll_seconds)

    def prune_delivered(self) -> int:
        """Delete the delivery markers older than their retention; returns how many."""
        cutoff = self._clock() - self.opts.delivered_retention_hours * 3600
        old = [
            info.key
            for info in self.store.list(self.layout.webhook_delivered_prefix())
            if info.last_modified.timestamp() < cutoff
        ]
        for key in old:
            self.store.delete(key)
        if old:
            log.info("webhooks: pruned %d delivery markers older than their retention", len(old))
        return len(old)

    def run_once(self) -> int:
        """Make one attempt at every due delivery; returns how many were delivered."""
        due = self._claim_due()
        if not due:
            return 0
        workers = min(len(due), self.opts.concurrency)
        with ThreadPoolExecutor(workers, thread_name_prefix="webhook") as pool:
            return sum(pool.map(self._attempt_claimed, due))

    # -- the outbox ----------------------------------------------------------------------------
    def _claim_due(self) -> list[OutboxEntry]:
        now = self._clock()
        due = []
        for entry in self._refresh():
            with self._lock:
                if entry.message_id in self._in_flight or entry.next_attempt_at > now:
                    continue
                self._in_flight.add(entry.message_id)
            due.append(entry)
        return due

    def _refresh(self) -> list[OutboxEntry]:
        prefix = self.layout.webhook_outbox_prefix()
        keys = {
            info.key.removeprefix(prefix).removesuffix(".json") for info in self.store.list(prefix)
        }
        with self._lock:
            for gone in set(self._entries) - keys:
                del self._entries[gone]
            unseen = keys - set(self._entries)
        for message_id in unseen:
            entry = self._read_entry(message_id)
            if entry is not None:
                with self._lock:
                    self._entries.setdefault(message_id, entry)
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.next_attempt_at)

    def _read_entry(self, message_id: str) -> OutboxEntry | None:
        key = self.layout.webhook_outbox_key(message_id)
        try:
            return OutboxEntry.model_validate(self.store.get_json(key))
        except ObjectNotFound:
            return None
        except (ValidationError, ValueError):
            log.warning("removing an unreadable webhook outbox entry %s", message_id)
            self.store.delete(key)
            return None

    def _forget(self, entry: OutboxEntry) -> None:
        self.store.delete(self.layout.webhook_outbox_key(entry.message_id))
        with self._lock:
            self._entries.pop(entry.message_id, None)

    # -- one attempt ---------------------------------------------------------------------------
    def _attempt_claimed(self, entry: OutboxEntry) -> bool:
        try:
            return self._attempt(entry)
        except Exception:
            log.exception("webhook %s: attempt failed unexpectedly", entry.message_id)
            return False
        finally:
            with self._lock:
                self._in_flight.discard(entry.message_id)

    def _was_delivered(self, message_id: str) -> bool:
        with self._lock:
            if message_id in self._delivered:
                return True
        return self.store.exists(self.layout.webhook_delivered_key(message_id))

    def _endpoint(self, entry: OutboxEntry) -> WebhookEndpoint | None:
        static = self._static.get(entry.endpoint_id)
        if static is not None:
            return static if static.org == entry.org else None
        return get_endpoint(self.store, self.layout, entry.org, entry.endpoint_id)

    def _attempt(self, entry: OutboxEntry) -> bool:
        if self._was_delivered(entry.message_id):
            self._forget(entry)  # delivered before a crash, or re-queued by a replay
            return False
        endpoint = self._endpoint(entry)
        if endpoint is None:
            self._give_up(entry, "the endpoint was deleted")
            return False
        try:
            target = pin_target(endpoint.url, self.opts)
        except InvalidWebhookTarget as exc:
            return self._failed(entry, str(exc))
        return self._post(entry, endpoint, target)

    def _post(self, entry: OutboxEntry, endpoint: WebhookEndpoint, target: PinnedTarget) -> bool:
        body = entry.event.body()
        now = datetime.fromtimestamp(self._clock(), UTC)
        headers = sign(endpoint.secret.get_secret_value(), entry.message_id, now, body)
        headers["host"] = target.host_header
        extensions = {"sni_hostname": target.tls_name} if target.tls_name else {}
        try:
            response = self._client.post(
                target.url, content=body, headers=headers, extensions=extensions
            )
        except httpx.HTTPError as exc:
            return self._failed(entry, f"{type(exc).__name__}: {exc}")
        if response.is_success:
            self._delivered_now(entry, response.status_code)
            return True
        retry_after = _retry_after(response, self.opts.backoff_cap_seconds)
        return self._failed(entry, f"HTTP {response.status_code}", retry_after)

    def _delivered_now(self, entry: OutboxEntry, status: int) -> None:
        with self._lock:  # remembered first: even if the marker cannot be written, no re-POST
            self._delivered[entry.message_id] = None
            while len(self._delivered) > DELIVERED_CACHE:
                self._delivered.popitem(last=False)
        marker = {
            "message_id": entry.message_id,
            "event_id": entry.event.id,
            "endpoint_id": entry.endpoint_id,
            "attempts": entry.attempts + 1,
            "status": status,
            "delivered_at": self._clock(),
        }
        self.store.put_json(self.layout.webhook_delivered_key(entry.message_id), marker)
        self._forget(entry)
        log.info(
            "webhook %s (%s of %s) delivered",
            entry.message_id,
            entry.event.type,
            entry.event.data.id,
        )

    def _failed(self, entry: OutboxEntry, error: str, retry_after: float | None = None) -> bool:
        attempts = entry.attempts + 1
        if attempts >= self.opts.max_attempts:
            self._give_up(entry.model_copy(update={"attempts": attempts}), error)
            return False
        delay = backoff_delay(attempts, self.opts, self._rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        updated = entry.model_copy(
            update={
                "attempts": attempts,
                "next_attempt_at": self._clock() + delay,
                "last_error": error[:MAX_ERROR_CHARS],
            }
        )
        # Persisted so a restarted sender keeps the backoff and the attempt count.
        self.store.put_json(
            self.layout.webhook_outbox_key(entry.message_id), updated.model_dump(mode="json")
        )
        with self._lock:
            self._entries[entry.message_id] = updated
        log.warning(
            "webhook %s: attempt %d failed (%s); next in %.1fs",
            entry.message_id,
            attempts,
            error[:MAX_ERROR_CHARS],
            delay,
        )
        return False

    def _give_up(self, entry: OutboxEntry, error: str) -> None:
        record = entry.model_copy(update={"last_error": error[:MAX_ERROR_CHARS]})
        self.store.put_json(
            self.layout.webhook_failed_key(entry.message_id), record.model_dump(mode="json")
        )
        self._forget(entry)
        log.error(
            "webhook %s: given up after %d attempts: %s", entry.message_id, entry.attempts, error
        )
