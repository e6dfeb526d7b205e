"""Models: the base-model catalogue plus the org's fine-tuned models, and the weights of a
fine-tuned model or of one of its checkpoints as a download.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Final

from kubetune.base_models import MAX_BASE_MODELS_PER_ORG, RegisteredBaseModel
from kubetune.finetunejob import (
    MERGE_FAILED,
    MERGE_REPORTED,
    MERGE_REQUESTED,
    AdapterType,
    FineTuneJob,
    JobPhase,
    merge_annotation,
)
from kubetune.ids import id_timestamp
from kubetune.settings import Mode
from kubetune.storage_layout import MANIFEST_NAME
from kubetune_api.archive import Member, archive_length, stream_archive
from kubetune_api.auth import Principal, Role
from kubetune_api.backends.base import ANNOTATION_MODEL_DELETED, JobBackend
from kubetune_api.errors import (
    APIError,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ServiceUnavailable,
)
from kubetune_api.protocol import (
    CreateBaseModelRequest,
    DeleteModelResponse,
    ListModelsResponse,
    Model,
    ModelContentFormat,
    RegisteredModel,
)
from kubetune_api.services.jobs import JobService

# How long a client waits between asks while a model is merged.
MERGE_RETRY_SECONDS: Final = 5
# What a checkpoint holds besides the weights, only to resume training (Trainer's and
# DeepSpeed's state): never part of a download.
_TRAINING_STATE: Final = re.compile(
    r"^(optimizer|scheduler|rng_state|trainer_state|training_args|global_step|scaler)"
)


@dataclass(frozen=True)
class ModelArchive:
    """A model's weights as a tar archive: its file name, exact length and bytes."""

    filename: str
    length: int
    chunks: Iterator[bytes]


def archive_folder(model: str) -> str:
    """The folder a model's files are in inside its archive (a name any file system takes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-.") or "model"


def _fine_tuned_model(job: FineTuneJob) -> Model:
    assert job.status is not None
    assert job.status.fine_tuned_model is not None
    finished = job.status.finished_at
    return Model(
        id=job.status.fine_tuned_model,
        created=int(finished.timestamp()) if finished else int(id_timestamp(job.metadata.name)),
        owned_by=job.spec.org,
    )


def _registered_model(model: RegisteredBaseModel) -> RegisteredModel:
    report = model.report
    return RegisteredModel(
        id=model.id,
        created=model.created,
        owned_by=model.org,
        status=model.phase,
        status_details=model.message,
        path=model.path,
        volume_claim=model.volume_claim,
        architecture=report.architecture if report else None,
        context_length=model.effective_context_length,
    )


def _require_admin(principal: Principal, what: str) -> None:
    if principal.role is not Role.ADMIN:
        raise PermissionDenied(f"{what} needs an admin API key.", param="model")


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
        """Base models (the catalogue, then the org's ready registered ones), then the org's
        fine-tuned models (newest first).
        """
        base = [
            Model(id=m.id, created=m.created, owned_by=m.owned_by)
            for m in self.jobs.catalogue(principal.org)
        ]
        tuned = [_fine_tuned_model(j) for j in self._fine_tuned_jobs(principal)]
        return ListModelsResponse(data=base + tuned)

    def retrieve(self, principal: Principal, model: str) -> Model:
        """A base model, one the org registered (in any state), or one of the org's fine-tuned
        models.
        """
        entry = self.jobs.base_model(model)
        if entry is not None:
            return Model(id=entry.id, created=entry.created, owned_by=entry.owned_by)
        registered = self._registered(principal, model)
        if registered is not None:
            return _registered_model(registered)
        job = self.jobs.find_fine_tuned(principal, model) if model.startswith("ft:") else None
        if job is None:
            raise NotFound(
                f"The model '{model}' does not exist", param="model", code="model_not_found"
            )
        return _fine_tuned_model(job)

    # -- registered base models --------------------------------------------------------------
    def _registered(self, principal: Principal, model: str) -> RegisteredBaseModel | None:
        if not self.backend.registers_base_models or model.startswith("ft:"):
            return None
        return self.backend.get_base_model(principal.org, model)

    def register(self, principal: Principal, req: CreateBaseModelRequest) -> RegisteredModel:
        """Register a base model of the org (admin keys); the job driver checks it, and it is
        listed and trainable once ``ready``.
        """
        _require_admin(principal, "Registering base models")
        if not self.backend.registers_base_models:
            raise InvalidRequest(
                "This deployment takes base models from its catalogue only (the chart's "
                "models); ask its administrators to add one.",
                param="id",
                code="not_supported",
            )
        if self.jobs.base_model(req.id) is not None:
            raise Conflict(f"'{req.id}' is a catalogue model already.", param="id")
        self._check_location(req)
        if len(self.backend.base_models(principal.org)) >= MAX_BASE_MODELS_PER_ORG:
            raise InvalidRequest(
                f"An org may register at most {MAX_BASE_MODELS_PER_ORG} base models; delete "
                "one first.",
                param="id",
                code="too_many_models",
            )
        model = RegisteredBaseModel(
            id=req.id,
            org=principal.org,
            path=req.path,
            volume_claim=req.volume_claim,
            context_length=req.context_length,
            created=int(time.time()),
        )
        if not self.backend.add_base_model(model):
            raise Conflict(f"The org has a base model named '{req.id}' already.", param="id")
        return _registered_model(model)

    def _check_location(self, req: CreateBaseModelRequest) -> None:
        """A folder local mode can read; on a cluster, a place the administrators allowed
        (``model_registry``): trainer pods read it with the platform's credentials.
        """
        store = req.path.startswith("store:")
        if not store and not PurePosixPath(req.path).is_absolute():
            raise InvalidRequest(f"path must be an absolute folder, not {req.path!r}", param="path")
        if self.jobs.settings.mode is Mode.LOCAL:
            if store or req.volume_claim is not None:
                raise InvalidRequest(
                    "Local mode registers a folder of this machine: no store: path, no "
                    "volume_claim.",
                    param="volume_claim" if req.volume_claim is not None else "path",
                )
            return
        registry = self.jobs.settings.model_registry
        if not registry.path_allowed(req.path):
            raise InvalidRequest(
                f"{req.path!r} is not under a folder this deployment's administrators allow "
                f"models to be read from ({', '.join(registry.allowed_paths) or 'none yet'}).",
                param="path",
                code="path_not_allowed",
            )
        if req.volume_claim is not None and req.volume_claim not in registry.allowed_volume_claims:
            raise InvalidRequest(
                f"The volume claim {req.volume_claim!r} is not one this deployment's "
                "administrators allow models to be read from.",
                param="volume_claim",
                code="path_not_allowed",
            )

    def delete(self, principal: Principal, model: str) -> DeleteModelResponse:
        """Delete a fine-tuned model (it disappears and is unloaded from serving), or forget a
        base model the org registered (admin keys; its fine-tuned models stay).
        """
        if self.jobs.base_model(model) is not None:
            raise PermissionDenied("Catalogue base models cannot be deleted.", param="model")
        if self._registered(principal, model) is not None:
            _require_admin(principal, "Deleting registered base models")
            self.backend.delete_base_model(principal.org, model)
            return DeleteModelResponse(id=model, deleted=True)
        job = self.jobs.find_fine_tuned(principal, model) if model.startswith("ft:") else None
        if job is None:
            raise NotFound(
                f"The model '{model}' does not exist", param="model", code="model_not_found"
            )
        # The job driver (operator or local mode) unloads annotated models from every replica.
        self.backend.annotate(principal.org, job.metadata.name, {ANNOTATION_MODEL_DELETED: "true"})
        return DeleteModelResponse(id=model, deleted=True)

    def content(self, principal: Principal, model: str, fmt: ModelContentFormat) -> ModelArchive:
        """The weights of a fine-tuned model or checkpoint (``ft:…[:ckpt-step-N]``) as a tar
        archive: the LoRA adapter (``adapter``), or the whole model (``merged``: what a full
        fine-tune trained). The optimizer state a checkpoint keeps for resuming is left out.
        """
        if self.jobs.base_model(model, principal.org) is not None:
            raise InvalidRequest(
                f"The model '{model}' is a base model: its weights come from where the "
                "deployment's catalogue (or the org's registration) takes them, not from this "
                "API.",
                param="model",
                code="model_not_downloadable",
            )
        job, step = self.jobs.fine_tuned_model(principal, model)
        _check_format(job, model, fmt, merges=self.backend.merges_models)
        store, layout = self.jobs.store, self.jobs.layout
        org, job_id = job.spec.org, job.metadata.name
        if not store.exists(layout.model_manifest_key(org, job_id, step)):
            raise NotFound(
                f"The weights of '{model}' are no longer stored.",
                param="model",
                code="model_not_found",
            )
        if fmt is ModelContentFormat.MERGED and job.spec.adapter.type is not AdapterType.FULL:
            prefix = self._merged_prefix(job, step, model)
        else:
            prefix = layout.model_prefix(org, job_id, step)
        folder = archive_folder(model)
        members = [
            Member(f"{folder}/{rel}", info.key, info.size, info.last_modified.timestamp())
            for info in store.list(prefix)
            if not _TRAINING_STATE.match(rel := info.key[len(prefix) :])
        ]
        # The manifest (every file's sha256) goes last, as it was written.
        members.sort(key=lambda m: (m.name.endswith(f"/{MANIFEST_NAME}"), m.name))
        return ModelArchive(
            f"{folder}.tar", archive_length(members), stream_archive(store, members)
        )

    def _merged_prefix(self, job: FineTuneJob, step: int | None, model: str) -> str:
        """Where the LoRA model merged into its base is, once merged. Until then the job
        driver is asked to merge it (a 503 ``model_merging`` with ``Retry-After`` each time);
        a merge that failed is told once, and the next request tries again.
        """
        store, layout = self.jobs.store, self.jobs.layout
        org, job_id = job.spec.org, job.metadata.name
        if store.exists(layout.merged_manifest_key(org, job_id, step)):
            return layout.merged_prefix(org, job_id, step)
        key = merge_annotation(step)
        state = job.metadata.annotations.get(key, "")
        if state.startswith(MERGE_FAILED):
            self.backend.annotate(org, job_id, {key: MERGE_REPORTED})
            raise APIError(
                f"Merging '{model}' into its base model failed: {state[len(MERGE_FAILED) :]}",
                param="model",
                code="merge_failed",
            )
        if state != MERGE_REQUESTED:
            self.backend.annotate(org, job_id, {key: MERGE_REQUESTED})
        raise ServiceUnavailable(
            f"'{model}' is being merged into its base model (minutes for a large model); "
            f"retry in {MERGE_RETRY_SECONDS} seconds.",
            param="model",
            code="model_merging",
            headers={"retry-after": str(MERGE_RETRY_SECONDS)},
        )


def _check_format(job: FineTuneJob, model: str, fmt: ModelContentFormat, *, merges: bool) -> None:
    """A LoRA model downloads as its adapter, or merged where the job driver merges; a full
    fine-tune as the whole model.
    """
    full = job.spec.adapter.type is AdapterType.FULL
    if fmt is ModelContentFormat.ADAPTER and full:
        raise InvalidRequest(
            f"The model '{model}' is a full fine-tune: it has no adapter. Download it with "
            "format=merged.",
            param="format",
            code="format_not_available",
        )
    if fmt is ModelContentFormat.MERGED and not full and not merges:
        raise InvalidRequest(
            f"Merged weights of the LoRA model '{model}' are not available on this "
            "deployment: download "
            "format=adapter and merge it with PEFT (PeftModel.from_pretrained(base, "
            "folder).merge_and_unload()).",
            param="format",
            code="format_not_available",
        )
