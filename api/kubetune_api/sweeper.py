"""The store sweeper: deletes what abandoned uploads and crashes leave in the object store.

One background thread per API process, started and stopped with the app. Every replica
sweeps; that is safe because each step is idempotent (a delete of what is gone already is a
no-op) and only touches objects past a grace period that no request still writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kubetune_api.metrics import SWEPT_OBJECTS
from kubetune_api.services.files import FileService
from kubetune_api.services.uploads import UploadService

log = logging.getLogger("kubetune.api.sweeper")


@dataclass(frozen=True)
class SweepReport:
    """What one sweep deleted."""

    upload_parts: int = 0
    orphaned_files: int = 0


class StoreSweeper:
    """Sweeps the uploads and files of every org, now and every ``interval`` seconds."""

    def __init__(
        self,
        files: FileService,
        uploads: UploadService,
        orgs: Callable[[], Iterable[str]],
        *,
        interval: float,
        grace_seconds: int,
    ) -> None:
        self.files = files
        self.uploads = uploads
        self.orgs = orgs
        self.interval = interval
        self.grace_seconds = grace_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self, now: float | None = None) -> SweepReport:
        """One pass over every org; a store error ends the pass (the next one retries)."""
        now = time.time() if now is None else now
        parts = orphans = 0
        for org in self.orgs():
            parts += self.uploads.sweep(org, now, self.grace_seconds)
            orphans += self.files.sweep_orphans(org, now, self.grace_seconds)
        SWEPT_OBJECTS.labels(kind="upload_part").inc(parts)
        SWEPT_OBJECTS.labels(kind="orphaned_file").inc(orphans)
        if parts or orphans:
            log.info("swept %d upload parts and %d orphaned files", parts, orphans)
        return SweepReport(upload_parts=parts, orphaned_files=orphans)

    def start(self) -> None:
        """Sweep in a daemon thread until :meth:`stop` (never, if the interval is 0)."""
        if self.interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="store-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for a pass in progress to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception as exc:  # the store may be down: one line, and the next pass
                log.warning("store sweep failed (retrying in %.0f s): %s", self.interval, exc)
            self._stop.wait(self.interval)
