"""The one interface both job backends implement.

Backends store whole :class:`~kubetune.finetunejob.FineTuneJob` objects and know nothing of
HTTP or of OpenAI's wire format. Every call is scoped to an org: a job of another org is
indistinguishable from one that does not exist.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from dataclasses import dataclass

from kubetune.base_models import RegisteredBaseModel
from kubetune.finetunejob import FineTuneJob, FineTuneJobStatus
from kubetune_api.errors import Conflict

ANNOTATION_MODEL_DELETED = "kubetune.io/model-deleted"
ANNOTATION_IDEMPOTENCY_KEY = "kubetune.io/idempotency-key"
# The sha256 of the request that created a job under an idempotency key: the same key with
# another body is refused, not answered with a job that is not what was asked for.
ANNOTATION_IDEMPOTENCY_DIGEST = "kubetune.io/idempotency-request-sha256"
LABEL_IDEMPOTENCY = "kubetune.io/idempotency"


def same_request(stored: FineTuneJob, new: FineTuneJob) -> FineTuneJob:
    """``stored`` when ``new`` was asked for with the same body; else a 409
    ``idempotency_key_reuse`` (a job stored before digests were kept counts as the same).
    """
    had = stored.metadata.annotations.get(ANNOTATION_IDEMPOTENCY_DIGEST)
    asked = new.metadata.annotations.get(ANNOTATION_IDEMPOTENCY_DIGEST)
    if had is not None and asked is not None and had != asked:
        raise Conflict(
            "This Idempotency-Key was already used with a different request (it created "
            f"job {stored.metadata.name}); use a new key for a new job.",
            code="idempotency_key_reuse",
        )
    return stored


@dataclass
class JobPage:
    """Jobs newest first, and whether older ones follow."""

    jobs: list[FineTuneJob]
    has_more: bool


@dataclass(frozen=True)
class OrgUsage:
    """What an org's unfinished (not cancelled) jobs hold or wait for."""

    jobs: int
    gpus: int

    @classmethod
    def of(cls, jobs: list[FineTuneJob]) -> OrgUsage:
        """The usage of these (unfinished) jobs."""
        return cls(jobs=len(jobs), gpus=sum(j.spec.resources.gpus for j in jobs))


class JobBackend(ABC):
    """Storage of FineTuneJobs for the API."""

    # Whether this backend's job driver merges LoRA models into their base on request (the
    # merge annotations): local mode's and the operator do.
    merges_models: bool = False
    # Whether base models can be registered at run time (kubetune.base_models): the backend
    # keeps them and its job driver checks them.
    registers_base_models: bool = False

    @abstractmethod
    def create(self, job: FineTuneJob, idempotency_key: str | None) -> tuple[FineTuneJob, bool]:
        """Store a new job; with an idempotency key already used by this org, return that
        job instead (or raise a 409 when it was made from another request, see
        :func:`same_request`) — atomically, across every API replica. The boolean tells
        whether a job was created.
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
    def active_usage(self, org: str) -> OrgUsage:
        """How many of the org's jobs have not finished, and the GPUs they ask for."""

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
        """Replace the status (local mode's job runner, tests; on Kubernetes only the operator)."""

    @abstractmethod
    def ready(self) -> bool:
        """Whether the backing store answers."""

    # -- base models registered at run time (see registers_base_models) -----------------------
    def base_models(self, org: str | None = None) -> builtins.list[RegisteredBaseModel]:
        """The registered base models of ``org`` (None: every org's), by name."""
        return []

    def get_base_model(self, org: str, model_id: str) -> RegisteredBaseModel | None:
        """The org's registered model of that name, or None."""
        return next((m for m in self.base_models(org) if m.id == model_id), None)

    def add_base_model(self, model: RegisteredBaseModel) -> bool:
        """Register ``model``; False when its org has a model of that name already."""
        raise NotImplementedError("this backend does not register base models")

    def put_base_model(self, model: RegisteredBaseModel) -> None:
        """Replace a registered model's record (its check's outcome); gone is fine."""
        raise NotImplementedError("this backend does not register base models")

    def delete_base_model(self, org: str, model_id: str) -> bool:
        """Forget the org's registered model; False when there was none."""
        raise NotImplementedError("this backend does not register base models")

    def close(self) -> None:  # noqa: B027 - a hook: most backends hold nothing to release
        """Release what the backend holds (threads, connections); called when the app stops."""
