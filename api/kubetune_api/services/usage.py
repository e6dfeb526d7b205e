"""What an org used: jobs, trained tokens and worker time, in time buckets (admin keys only).

The answer has the shape of OpenAI's organization usage API (``/v1/organization/usage/…``:
pages of ``bucket`` objects holding ``results``), computed from the org's jobs: a job counts
in the bucket it was created in (``jobs_created``) and in the bucket it finished in (its phase,
its ``trained_tokens``, its ``run_seconds`` and their GPU-seconds), so each job is charged once,
when its usage is final. What runs now is on the operator's ``kubetune_operator_gpus_in_use``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Final

from kubetune.finetunejob import FineTuneJob, JobPhase
from kubetune_api.auth import Principal, Role
from kubetune_api.backends.base import JobBackend
from kubetune_api.errors import InvalidRequest, PermissionDenied
from kubetune_api.protocol import BucketWidth, FineTuningUsageResult, UsageBucket, UsagePage
from kubetune_api.services.views import created_at

BUCKET_SECONDS: Final = {BucketWidth.HOUR: 3600, BucketWidth.DAY: 86400}
# Buckets per page: OpenAI's defaults and limits for its usage API.
DEFAULT_BUCKETS: Final = {BucketWidth.HOUR: 24, BucketWidth.DAY: 7}
MAX_BUCKETS: Final = {BucketWidth.HOUR: 168, BucketWidth.DAY: 31}
_FINISHED: Final = {
    JobPhase.SUCCEEDED: "jobs_succeeded",
    JobPhase.FAILED: "jobs_failed",
    JobPhase.CANCELLED: "jobs_cancelled",
}


def _bucket_of(when: float | None, start: int, width: int, count: int) -> int | None:
    """The index of the bucket holding ``when`` (Unix seconds), or None outside the page."""
    if when is None:
        return None
    offset = int(when) - start
    index = offset // width
    return index if offset >= 0 and index < count else None


class UsageService:
    """Usage of the caller's org."""

    def __init__(self, backend: JobBackend) -> None:
        self.backend = backend

    def _jobs(self, org: str) -> Iterator[FineTuneJob]:
        after = None
        while True:
            page = self.backend.list(org, after=after, limit=500)
            yield from page.jobs
            if not page.has_more or not page.jobs:
                return
            after = page.jobs[-1].metadata.name

    def fine_tuning(
        self,
        principal: Principal,
        *,
        start_time: int,
        end_time: int | None,
        width: BucketWidth,
        limit: int | None,
        page: str | None,
    ) -> UsagePage:
        """Buckets of ``width`` from ``start_time`` (or the ``page`` cursor) to ``end_time``."""
        if principal.role is not Role.ADMIN:
            raise PermissionDenied("Reading usage needs an admin API key.")
        seconds = BUCKET_SECONDS[width]
        start = _cursor(page) if page is not None else start_time
        end = end_time if end_time is not None else int(time.time())
        if end <= start_time:
            raise InvalidRequest("end_time must be after start_time.", param="end_time")
        wanted = -(-(end - start) // seconds)  # buckets up to end_time, the last one partial
        count = max(0, min(wanted, limit or DEFAULT_BUCKETS[width], MAX_BUCKETS[width]))
        totals = [_Totals() for _ in range(count)]
        for job in self._jobs(principal.org):
            _count(job, totals, start, seconds)
        buckets = [
            UsageBucket(
                start_time=start + i * seconds,
                end_time=min(start + (i + 1) * seconds, end),
                results=t.results(principal.org),
            )
            for i, t in enumerate(totals)
        ]
        more = count < wanted
        return UsagePage(
            data=buckets, has_more=more, next_page=str(start + count * seconds) if more else None
        )


class _Totals:
    """One bucket's sums."""

    def __init__(self) -> None:
        self.counts = {"jobs_created": 0, **dict.fromkeys(_FINISHED.values(), 0)}
        self.trained_tokens = 0
        self.run_seconds = 0.0
        self.gpu_seconds = 0.0

    def results(self, org: str) -> list[FineTuningUsageResult]:
        if not any(self.counts.values()):
            return []  # as OpenAI's usage API shows a bucket without activity
        return [
            FineTuningUsageResult(
                org=org,
                trained_tokens=self.trained_tokens,
                run_seconds=round(self.run_seconds, 3),
                gpu_seconds=round(self.gpu_seconds, 3),
                **self.counts,
            )
        ]


def _count(job: FineTuneJob, totals: list[_Totals], start: int, width: int) -> None:
    """Add ``job`` to the buckets it was created and finished in."""
    created = _bucket_of(created_at(job), start, width, len(totals))
    if created is not None:
        totals[created].counts["jobs_created"] += 1
    status = job.status
    if status is None or status.phase not in _FINISHED:
        return
    at = status.finished_at
    finished = _bucket_of(at.timestamp() if at else None, start, width, len(totals))
    if finished is None:
        return
    bucket = totals[finished]
    bucket.counts[_FINISHED[status.phase]] += 1
    bucket.trained_tokens += status.trained_tokens
    bucket.run_seconds += status.run_seconds
    bucket.gpu_seconds += status.run_seconds * job.spec.resources.gpus


def _cursor(page: str) -> int:
    """The start time a ``next_page`` cursor stands for."""
    if not page.isdigit():
        raise InvalidRequest("page is not a cursor this endpoint returned.", param="page")
    return int(page)
