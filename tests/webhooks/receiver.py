"""A webhook receiver on loopback that verifies every delivery with ``standardwebhooks``.

It plays the customer's endpoint: a real HTTP server on 127.0.0.1 that checks each request's
signature with the reference package (independent of kubetune's signing code), records what it
accepted, and can be told to fail (``fail_with=503``) or be taken down and brought back on the
same port, to force the sender's retries.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass(frozen=True)
class Delivery:
    """One request the receiver accepted: its headers and the verified JSON body."""

    webhook_id: str
    timestamp: int
    body: dict[str, Any]


@dataclass
class Receiver:
    """A loopback endpoint with one signing secret."""

    secret: str
    port: int = 0
    fail_with: int | None = None
    delay: float = 0.0  # seconds to hold each request before answering
    deliveries: list[Delivery] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # requests whose signature did not verify
    failed: int = 0  # requests answered with ``fail_with``
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        """The endpoint URL."""
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        """Listen (again, on the same port after :meth:`stop`)."""
        handler = _handler(self)
        server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused until :meth:`start`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _accept(self, body: bytes, headers: dict[str, str]) -> int:
        try:
            payload = Webhook(self.secret).verify(body, headers)
        except WebhookVerificationError as exc:
            with self._lock:
                self.rejected.append(str(exc))
            return 400
        time.sleep(self.delay)
        with self._lock:
            if self.fail_with is not None:
                self.failed += 1
                return self.fail_with
            self.deliveries.append(
                Delivery(headers["webhook-id"], int(headers["webhook-timestamp"]), payload)
            )
        return 200

    def events(self) -> list[dict[str, Any]]:
        """Bodies accepted so far."""
        with self._lock:
            return [d.body for d in self.deliveries]

    def wait_for(self, predicate: Callable[[Receiver], bool], timeout: float = 30.0) -> None:
        """Wait until ``predicate(self)`` holds."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver: timed out; got {json.dumps(self.events())}")
            time.sleep(0.05)


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            status = receiver._accept(body, {k.lower(): v for k, v in self.headers.items()})
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass  # quiet test output

    return Handler


@contextmanager
def running(secret: str) -> Iterator[Receiver]:
    """A started receiver, stopped afterwards."""
    receiver = Receiver(secret).start()
    try:
        yield receiver
    finally:
        receiver.stop()
