"""The one interface both job backends implement.

Backends store whole :class:`~kubetune.finetunejob.FineTuneJob` objects and know nothing of
HTTP or of OpenAI's wire format. Every call is scoped to an org: a job of another org is
indistinguishable from one that does not exist.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from kubetune.finetunejob import FineTuneJob, FineTuneJobStatus

ANNOTATION_MODEL_DELETED = "kubetune.io/model-deleted"
ANNOTATION_IDEMPOTENCY_KEY = "kubetune.io/idempotency-key"
LABEL_IDEMPOTENCY = "kubetune.io/idempotency"


@dataclass
class JobPage:
    """Jobs newest first, and whether older ones follow."""

    jobs: list[FineTuneJob]
    has_more: bool


class JobBackend(ABC):
    """Storage of FineTuneJobs for the API."""

    @abstractmethod
    def create(self, job: FineTuneJob, idempotency_key: str | None) -> tuple[FineTuneJob, bool]:
        """Store a new job; with an idempotency key already used by this org, return that
        job instead. The boolean tells whether a job was created.
        """

    @abstractmethod
    def get(self, org: str, job_id: str) -> FineTuneJob | None:
        """The org's job, or None."""

    @abstractmethod
    def list(
        self, org: str, *, after: str | None, limit: int, metadata: dict[str, str] | None = None
    ) -> JobPage:
        """The org's jobs, newest first, older than ``after``, matching every metadata pair."""

    @abstractmethod
    def count_active(self, org: str) -> int:
        """How many of the org's jobs have not finished."""

    @abstractmethod
    def patch_spec(
        self, org: str, job_id: str, *, cancel: bool | None = None, suspend: bool | None = None
    ) -> FineTuneJob:
        """Set the cancel/suspend flags (the only spec fields that change after creation)."""

    @abstractmethod
    def annotate(self, org: str, job_id: str, annotations: dict[str, str]) -> FineTuneJob:
        """Merge annotations into the job's metadata."""

    @abstractmethod
    def update_status(self, org: str, job_id: str, status: FineTuneJobStatus) -> FineTuneJob:
        """Replace the status (local executor / tests; on Kubernetes only the operator does)."""

    @abstractmethod
    def ready(self) -> bool:
        """Whether the backing store answers."""
