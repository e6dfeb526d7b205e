"""An in-process cache of the namespace's FineTuneJobs, kept by list + watch.

Listing an org's jobs from the apiserver costs a full quorum read and a parse of every job
(about 200 ms at 400 jobs); the cache answers in microseconds. Reads stay consistent the way
client-go's consistent reads from cache do (KEP-2340): before answering, the cache learns the
apiserver's current resourceVersion from a one-item list and waits until its watch has caught
up to it, so a client never misses a write that finished before its request began (its own,
the operator's, or another API replica's). If the watch does not catch up in time, the caller
falls back to listing from the apiserver.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kubetune.finetunejob import GROUP, PLURAL, VERSION, FineTuneJob

log = logging.getLogger(__name__)
WATCH_TIMEOUT_SECONDS = 300
CATCH_UP_SECONDS = 2.0
# Retries after a failed list or watch wait 1, 2, 4 … seconds, never more than this.
RETRY_CAP_SECONDS = 30.0
STOP_JOIN_SECONDS = 5.0


def _rv(obj: dict[str, Any]) -> int:
    # resourceVersions are etcd revisions; comparing them is what keeps a late watch event
    # from overwriting a newer object this process wrote itself.
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return 0


class JobCache:
    """FineTuneJobs of one namespace by name, parsed once per change."""

    def __init__(self, api: Any, namespace: str) -> None:
        self._api = api
        self._namespace = namespace
        self._jobs: dict[str, tuple[int, FineTuneJob]] = {}
        self._seen_rv = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, name="jobcache", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching, and wait a little for the thread to end (a watch blocked on a quiet
        apiserver ends at its next event or timeout; the thread is a daemon either way).
        """
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.stop()
        if threading.current_thread() is not self._thread:
            self._thread.join(STOP_JOIN_SECONDS)

    @property
    def running(self) -> bool:
        """Whether the watch thread still runs."""
        return self._thread.is_alive()

    # -- keeping up ------------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                rv = self._relist()
                failures = 0
                self._follow(rv)
            except Exception as exc:
                if self._stop.is_set():
                    return
                failures += 1
                delay = min(RETRY_CAP_SECONDS, 2.0 ** (failures - 1))
                # One line per retry: the cause, not a traceback (the apiserver being away is
                # an expected condition, and a traceback a second drowns the log).
                log.warning(
                    "job cache: the apiserver's FineTuneJobs cannot be listed or watched "
                    "(%s: %s); retrying in %.0f s",
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                    delay,
                )
                log.debug("job cache: failure detail", exc_info=True)
                self._stop.wait(delay)

    def _relist(self) -> int:
        listing = self._api.list_namespaced_custom_object(GROUP, VERSION, self._namespace, PLURAL)
        rv = _rv(listing)
        with self._cond:
            self._jobs = {}
            for item in listing.get("items", []):
                self._put_locked(item)
            self._advance_locked(rv)
        return rv

    def _follow(self, rv: int) -> None:
        from kubernetes import watch

        self._watch = watch.Watch()  # type: ignore[no-untyped-call]
        stream = self._watch.stream(
            self._api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self._namespace,
            PLURAL,
            resource_version=str(rv),
            timeout_seconds=WATCH_TIMEOUT_SECONDS,
            allow_watch_bookmarks=True,
        )
        for event in stream:
            if self._stop.is_set() or not self._apply(event):
                return  # stopped, or e.g. 410 Gone: relist

    def _apply(self, event: dict[str, Any]) -> bool:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR" or not isinstance(obj, dict):
            return False
        with self._cond:
            if kind in ("ADDED", "MODIFIED"):
                self._put_locked(obj)
            elif kind == "DELETED":
                self._jobs.pop(obj.get("metadata", {}).get("name", ""), None)
            self._advance_locked(_rv(obj))
        return True

    def _put_locked(self, obj: dict[str, Any]) -> None:
        name = obj.get("metadata", {}).get("name", "")
        rv = _rv(obj)
        current = self._jobs.get(name)
        if current is not None and current[0] >= rv:
            return
        try:
            self._jobs[name] = (rv, FineTuneJob.from_manifest(obj))
        except ValueError:
            log.warning("job cache: skipping unparsable FineTuneJob %s", name)

    def _advance_locked(self, rv: int) -> None:
        if rv > self._seen_rv:
            self._seen_rv = rv
            self._cond.notify_all()

    def upsert(self, obj: dict[str, Any]) -> None:
        """Record an object this process just wrote (the watch will confirm it later)."""
        with self._cond:
            self._put_locked(obj)

    # -- reading ---------------------------------------------------------------------------
    def _current_rv(self) -> int:
        head = self._api.list_namespaced_custom_object(
            GROUP, VERSION, self._namespace, PLURAL, limit=1
        )
        return _rv(head)

    def snapshot(self) -> list[FineTuneJob] | None:
        """Every cached job, consistent with the apiserver as of this call; None if the
        watch could not catch up in time (the caller then lists from the apiserver).
        """
        target = self._current_rv()
        deadline = time.monotonic() + CATCH_UP_SECONDS
        with self._cond:
            while self._seen_rv < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return [job for _, job in self._jobs.values()]
