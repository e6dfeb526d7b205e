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
        self._thread = threading.Thread(target=self._run, name="jobcache", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (the thread ends at its next event or timeout)."""
        self._stop.set()

    # -- keeping up ------------------------------------------------------------------------
    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                listing = self._api.list_namespaced_custom_object(
                    GROUP, VERSION, self._namespace, PLURAL
                )
                rv = _rv(listing)
                with self._cond:
                    self._jobs = {}
                    for item in listing.get("items", []):
                        self._put_locked(item)
                    self._advance_locked(rv)
                stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
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
                    if self._stop.is_set():
                        return
                    if not self._apply(event):
                        break  # e.g. 410 Gone: relist
            except Exception:
                log.warning("job cache: watch failed; relisting", exc_info=True)
                self._stop.wait(1.0)

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
