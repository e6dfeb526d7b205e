"""Models: the base-model catalogue plus the org's fine-tuned models."""

from __future__ import annotations

from kubetune.finetunejob import FineTuneJob, JobPhase
from kubetune.ids import id_timestamp
from kubetune_api.auth import Principal
from kubetune_api.backends.base import ANNOTATION_MODEL_DELETED, JobBackend
from kubetune_api.errors import NotFound, PermissionDenied
from kubetune_api.protocol import DeleteModelResponse, ListModelsResponse, Model
from kubetune_api.services.jobs import JobService


def _fine_tuned_model(job: FineTuneJob) -> Model:
    assert job.status is not None
    assert job.status.fine_tuned_model is not None
    finished = job.status.finished_at
    return Model(
        id=job.status.fine_tuned_model,
        created=int(finished.timestamp()) if finished else int(id_timestamp(job.metadata.name)),
        owned_by=job.spec.org,
    )


class ModelService:
    """What ``/v1/models`` shows and deletes."""

    def __init__(self, backend: JobBackend, jobs: JobService) -> None:
        self.backend = backend
        self.jobs = jobs

    def _fine_tuned_jobs(self, principal: Principal) -> list[FineTuneJob]:
        out: list[FineTuneJob] = []
        after = None
        while True:
            page = self.backend.list(principal.org, after=after, limit=500)
            out.extend(
                j
                for j in page.jobs
                if j.status
                and j.status.phase is JobPhase.SUCCEEDED
                and j.status.fine_tuned_model
                and j.metadata.annotations.get(ANNOTATION_MODEL_DELETED) != "true"
            )
            if not page.has_more or not page.jobs:
                return out
            after = page.jobs[-1].metadata.name

    def list(self, principal: Principal) -> ListModelsResponse:
        """Base models, then the org's fine-tuned models (newest first)."""
        base = [
            Model(id=m.id, created=m.created, owned_by=m.owned_by)
            for m in self.jobs.settings.models
        ]
        tuned = [_fine_tuned_model(j) for j in self._fine_tuned_jobs(principal)]
        return ListModelsResponse(data=base + tuned)

    def retrieve(self, principal: Principal, model: str) -> Model:
        """A base model or one of the org's fine-tuned models."""
        entry = self.jobs.base_model(model)
        if entry is not None:
            return Model(id=entry.id, created=entry.created, owned_by=entry.owned_by)
        job = self.jobs.find_fine_tuned(principal, model) if model.startswith("ft:") else None
        if job is None:
            raise NotFound(
                f"The model '{model}' does not exist", param="model", code="model_not_found"
            )
        return _fine_tuned_model(job)

    def delete(self, principal: Principal, model: str) -> DeleteModelResponse:
        """Delete a fine-tuned model: it disappears and is unloaded from serving."""
        if self.jobs.base_model(model) is not None:
            raise PermissionDenied("Base models cannot be deleted.", param="model")
        job = self.jobs.find_fine_tuned(principal, model) if model.startswith("ft:") else None
        if job is None:
            raise NotFound(
                f"The model '{model}' does not exist", param="model", code="model_not_found"
            )
        # The job driver (operator or local mode) unloads annotated models from every replica.
        self.backend.annotate(principal.org, job.metadata.name, {ANNOTATION_MODEL_DELETED: "true"})
        return DeleteModelResponse(id=model, deleted=True)
