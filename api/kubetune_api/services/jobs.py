"""Fine-tuning jobs: create (validated, "auto" resolved, idempotent), list, retrieve, cancel,
pause, resume, events and checkpoints — the same on both backends.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetune.base_models import org_catalogue
from kubetune.events import JobEvent, page_newest_first, read_events, write_control_events
from kubetune.files import FileMeta, FilePurpose
from kubetune.finetunejob import (
    CHECKPOINT_MODEL_MARK,
    LABEL_BASE_MODEL,
    LABEL_ORG,
    Adapter,
    AdapterType,
    ContinueFrom,
    FineTuneJob,
    FineTuneJobSpec,
    JobPhase,
    MethodType,
    ObjectMeta,
    base_of,
    fine_tuned_model_name,
    split_checkpoint_model,
)
from kubetune.hyperparameters import resolve
from kubetune.ids import IdKind, is_valid_id, new_job_id
from kubetune.lifecycle import is_terminal
from kubetune.settings import BaseModelEntry, Settings
from kubetune.trainer_config import tracking_uri_error
from kubetune_api.auth import Principal
from kubetune_api.backends.base import (
    ANNOTATION_IDEMPOTENCY_DIGEST,
    ANNOTATION_MODEL_DELETED,
    JobBackend,
)
from kubetune_api.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    validation_error,
)
from kubetune_api.metrics import JOBS_CREATED
from kubetune_api.protocol import (
    CheckpointMetrics,
    CreateFineTuningJobRequest,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    ListFineTuningJobCheckpointsResponse,
    ListFineTuningJobEventsResponse,
    ListPaginatedFineTuningJobsResponse,
)
from kubetune_api.services.files import FileService
from kubetune_api.services.views import api_status, job_to_openai
from kubetune_api.tokens import token_counter
from kubetune_runtime.datasets import DatasetFormat, format_mismatch_message, validate_jsonl
from kubetune_runtime.objectstore import ObjectStore


class JobService:
    """Jobs of one deployment, scoped by org on every call."""

    def __init__(
        self, settings: Settings, backend: JobBackend, store: ObjectStore, files: FileService
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.store = store
        self.files = files
        self.layout = settings.object_store.layout()
        self._catalogue = {m.id: m for m in settings.models}
        self._transition_lock = threading.Lock()
        # (org, fine-tuned model) → the job that produced it; bounded by the org's own jobs.
        self._model_jobs: dict[tuple[str, str], str] = {}

    # -- helpers ---------------------------------------------------------------------------
    def base_model(self, name: str, org: str | None = None) -> BaseModelEntry | None:
        """The catalogue entry of a base model name; with ``org``, that org's ready
        registered models count too (:mod:`kubetune.base_models`).
        """
        entry = self._catalogue.get(name)
        if entry is None and org is not None and self.backend.registers_base_models:
            entry = next((m for m in self.catalogue(org) if m.id == name), None)
        return entry

    def catalogue(self, org: str) -> list[BaseModelEntry]:
        """The base models ``org`` may list and train on."""
        registered = self.backend.base_models(org) if self.backend.registers_base_models else []
        return org_catalogue(self.settings.models, registered, org)

    def _require(self, principal: Principal, job_id: str) -> FineTuneJob:
        job = self.backend.get(principal.org, job_id) if is_valid_id(job_id, IdKind.JOB) else None
        if job is None:
            raise NotFound(f"No fine-tuning job found with id {job_id}", param="fine_tuning_job_id")
        return job

    def _event(self, job: FineTuneJob, message: str, **kwargs: Any) -> None:
        write_control_events(
            self.store,
            self.layout.events_prefix(job.spec.org, job.metadata.name),
            [JobEvent(message=message, **kwargs)],
        )

    def _resolve_model(self, principal: Principal, model: str) -> ModelChoice:
        """The base model of the requested ``model``, and for an ``ft:`` model (or one of its
        checkpoints, ``…:ckpt-step-N``) the org's job and step whose adapter training goes on
        from. Another org's model is "does not exist", as for inference.
        """
        if model.startswith("ft:"):
            return self._continued(principal, model)
        return ModelChoice(self._catalogue_model(principal.org, model))

    def _continued(self, principal: Principal, model: str) -> ModelChoice:
        try:
            job, step = self.fine_tuned_model(principal, model)
        except NotFound as exc:  # for a job's ``model`` field, that is a bad request
            raise InvalidRequest(exc.message, param="model", code="model_not_available") from None
        if job.spec.adapter.type is AdapterType.FULL:
            raise InvalidRequest(
                f"Model {model} is a full fine-tune; training can continue from an adapter "
                "(lora, qlora) only.",
                param="model",
                code="model_not_supported",
            )
        return ModelChoice(
            self._catalogue_model(principal.org, base_of(model)),
            ContinueFrom(job=job.metadata.name, step=step),
            job.spec.adapter,
        )

    def _catalogue_model(self, org: str, model: str) -> str:
        if self.base_model(model, org) is None:
            available = ", ".join(sorted(m.id for m in self.catalogue(org))) or "none configured"
            raise InvalidRequest(
                f"Model {model} is not available for fine-tuning. Available: {available}.",
                param="model",
                code="model_not_available",
            )
        return model

    def _check_file(
        self, principal: Principal, file_id: str, param: str, method: MethodType
    ) -> FileMeta:
        try:
            meta = self.files.get_meta(principal, file_id, param=param)
        except NotFound:
            raise InvalidRequest(
                f"invalid {param}: {file_id} does not exist", param=param, code="invalid_file"
            ) from None
        if meta.purpose is not FilePurpose.FINE_TUNE:
            raise InvalidRequest(
                f"invalid {param}: {file_id} has purpose '{meta.purpose.value}', not 'fine-tune'",
                param=param,
                code="invalid_file",
            )
        found = meta.stats.get("format")
        if found is not None:
            mismatch = format_mismatch_message(DatasetFormat(found), method)
            if mismatch:
                raise InvalidRequest(
                    f"invalid {param}: {mismatch}", param=param, code="invalid_file_format"
                )
        return meta

    def fine_tuned_model(self, principal: Principal, model: str) -> tuple[FineTuneJob, int | None]:
        """The org's job behind the fine-tuned ``model`` and, for a checkpoint's model
        (``…:ckpt-step-N``), its step; 404 for another org's model, a deleted one, or a
        checkpoint its job no longer keeps (the message lists those it keeps).
        """
        name, step = split_checkpoint_model(model)
        job = self.find_fine_tuned(principal, name) if name.startswith("ft:") else None
        if job is None:
            raise NotFound(
                f"The model '{model}' does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        kept = sorted(c.step for c in (job.status.checkpoints if job.status else []))
        if step is not None and step not in kept:
            names = ", ".join(f"{name}{CHECKPOINT_MODEL_MARK}{s}" for s in kept)
            raise NotFound(
                f"The model '{model}' does not exist: that checkpoint is not kept. Its job "
                f"keeps {names or 'no checkpoints'}.",
                param="model",
                code="model_not_found",
            )
        return job, step

    def find_fine_tuned(self, principal: Principal, model: str) -> FineTuneJob | None:
        """The org's succeeded, undeleted job that produced ``model``.

        Every proxied completion asks this, so the job found is remembered by (org, model) and
        re-checked with one ``get``; only an unknown or changed model pages through the jobs.
        """
        key = (principal.org, model)
        remembered = self._model_jobs.get(key)
        if remembered is not None:
            job = self.backend.get(principal.org, remembered)
            if job is not None and _serves(job, model):
                return job
            self._model_jobs.pop(key, None)
        after = None
        while True:
            page = self.backend.list(principal.org, after=after, limit=500)
            for job in page.jobs:
                if _serves(job, model):
                    self._model_jobs[key] = job.metadata.name
                    return job
            if not page.has_more or not page.jobs:
                return None
            after = page.jobs[-1].metadata.name

    def results_file(self, principal: Principal, file_id: str) -> FileMeta | None:
        """The results file (``file-<job body>``) of a succeeded job of the org, if written."""
        job_id = IdKind.JOB.value + "-" + file_id.partition("-")[2]
        job = self.backend.get(principal.org, job_id) if is_valid_id(job_id, IdKind.JOB) else None
        if job is None or job.status is None or job.status.phase is not JobPhase.SUCCEEDED:
            return None
        key = self.layout.results_key(principal.org, job_id)
        head = self.store.head(key)
        if head is None:
            return None
        finished = job.status.finished_at
        return FileMeta(
            id=file_id,
            org=principal.org,
            filename=f"{job_id}-results.csv",
            purpose=FilePurpose.FINE_TUNE_RESULTS,
            bytes=head.size,
            created_at=int(finished.timestamp()) if finished else int(time.time()),
            sha256=head.sha256 or "",
            object_key=key,
            job_id=job_id,
        )

    def _count_tokens(self, principal: Principal, meta: FileMeta, base: str) -> int | None:
        """Tokens in a training file as the job's base model counts them.

        Uploads are counted with the first catalogue model's tokenizer; a job on another base
        model re-reads the file once (streamed) with its own tokenizer.
        """
        if meta.tokens_model == base:
            tokens = meta.stats.get("n_tokens")
            return int(tokens) if tokens is not None else None
        count = token_counter(self.base_model(base, principal.org))
        if count is None:
            return None
        _, chunks = self.files.content(principal, meta.id)
        report = validate_jsonl(
            chunks, count_tokens=count, max_line_bytes=self.settings.limits.max_line_bytes
        )
        return report.n_tokens

    # -- create ----------------------------------------------------------------------------
    def _spec_from_request(
        self, principal: Principal, req: CreateFineTuningJobRequest, choice: ModelChoice
    ) -> FineTuneJobSpec:
        method_type = MethodType(req.method.type) if req.method else MethodType.SUPERVISED
        hyper: dict[str, Any] = {}
        if req.hyperparameters is not None:
            if req.method is not None:
                raise InvalidRequest(
                    "Give hyperparameters inside method, not both.", param="hyperparameters"
                )
            hyper = req.hyperparameters.model_dump()
        elif req.method is not None:
            block = req.method.dpo if method_type is MethodType.DPO else req.method.supervised
            other = req.method.supervised if method_type is MethodType.DPO else req.method.dpo
            if other is not None:
                raise InvalidRequest(
                    f"method.type is {method_type.value} but a different method block was given.",
                    param="method",
                )
            if block is not None:
                hyper = block.hyperparameters.model_dump()
        if req.n_evals is not None:
            hyper["n_evals"] = req.n_evals
        checkpointing = {
            "every_steps": hyper.pop("save_steps", None),
            "keep": hyper.pop("save_total_limit", None),
        }
        raw: dict[str, Any] = {
            "org": principal.org,
            "model": req.model,
            "training_file": req.training_file,
            "validation_file": req.validation_file,
            "method": {"type": method_type, "hyperparameters": hyper},
            "suffix": req.suffix,
            "seed": req.seed,
            "metadata": req.metadata or {},
            "integrations": [i.model_dump(exclude_none=True) for i in req.integrations or []],
        }
        if req.adapter is not None:
            raw["adapter"] = req.adapter.model_dump()
        if choice.continue_from is not None:
            raw.update(self._continuation(req, choice))
        if req.resources is not None:
            raw["resources"] = req.resources.model_dump()
        if req.strategy is not None:
            raw["strategy"] = req.strategy
        if req.queue is not None:
            raw["queue"] = req.queue
        if any(v is not None for v in checkpointing.values()):
            raw["checkpointing"] = {k: v for k, v in checkpointing.items() if v is not None}
        try:
            return FineTuneJobSpec.model_validate({k: v for k, v in raw.items() if v is not None})
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None

    @staticmethod
    def _continuation(req: CreateFineTuningJobRequest, choice: ModelChoice) -> dict[str, Any]:
        """The spec fields of a job that continues an adapter: where from, and that adapter's
        shape (a different rank or targets would not be the same adapter).
        """
        assert choice.continue_from is not None
        assert choice.adapter is not None
        if req.adapter is not None:
            raise InvalidRequest(
                f"Model {req.model} continues its own adapter "
                f"({choice.adapter.type.value}, r={choice.adapter.r}); leave adapter unset.",
                param="adapter",
            )
        return {
            "continue_from": choice.continue_from.model_dump(),
            "adapter": choice.adapter.model_dump(),
        }

    def _admissible(self, principal: Principal, spec: FineTuneJobSpec) -> FineTuneJobSpec:
        """The job with its queue (the org's default when it names none), if this deployment
        lets the org use that queue and the GPUs and GPU type it asks for.
        """
        rules = self.settings.queueing
        if spec.queue is not None and not rules.queue_allowed(principal.org, spec.queue):
            open_queues = sorted(
                {
                    *filter(None, [rules.default_queue_of(principal.org)]),
                    *rules.allowed_queues.get(principal.org, ()),
                    *rules.allowed_queues.get("*", ()),
                }
            )
            raise InvalidRequest(
                f"Queue {spec.queue!r} is not open to your organization; its queues: "
                f"{', '.join(open_queues) or 'none (leave queue unset)'}.",
                param="queue",
                code="queue_not_allowed",
            )
        gpus = spec.resources.gpus
        if rules.max_gpus_per_job is not None and gpus > rules.max_gpus_per_job:
            raise InvalidRequest(
                f"The job asks for {gpus} GPUs ({spec.resources.nodes} nodes x "
                f"{spec.resources.gpus_per_node}); a job may use at most "
                f"{rules.max_gpus_per_job}.",
                param="resources",
                code="gpu_limit_exceeded",
            )
        gpu_type = spec.resources.gpu_type
        if rules.gpu_types and gpu_type is not None and gpu_type not in rules.gpu_types:
            raise InvalidRequest(
                f"GPU type {gpu_type!r} is not available; choose one of: "
                f"{', '.join(rules.gpu_types)}.",
                param="resources.gpu_type",
                code="invalid_gpu_type",
            )
        self._check_profile(principal, spec.resources.profile)
        tracking = tracking_uri_error(spec.integrations, self.settings)
        if tracking is not None:  # trainer pods would call a server the tenant chose
            raise InvalidRequest(str(tracking), param=tracking.param, code=tracking.code)
        return spec.model_copy(
            update={"queue": spec.queue or rules.default_queue_of(principal.org)}
        )

    def _check_profile(self, principal: Principal, name: str | None) -> None:
        """The hardware profile, if one is named, exists and is open to the org."""
        if name is None:
            return
        profiles = self.settings.operator.hardware_profiles
        profile = self.settings.operator.hardware_profile(name)
        if profile is None or not profile.allows(principal.org):
            offered = [p.name for p in profiles if p.allows(principal.org)]
            raise InvalidRequest(
                f"Hardware profile {name!r} is not available; choose one of: "
                f"{', '.join(offered) or 'none (leave profile unset)'}.",
                param="resources.profile",
                code="invalid_hardware_profile",
            )

    def _check_org_usage(self, principal: Principal, spec: FineTuneJobSpec) -> None:
        """The org's unfinished jobs leave room for this one (count, then GPUs).

        Checked before the job is stored, without a lock: two jobs created at the same moment
        may both pass; Kueue's quota (where the cluster has it) is the hard limit.
        """
        limits, rules = self.settings.limits, self.settings.queueing
        usage = self.backend.active_usage(principal.org)
        if usage.jobs >= limits.max_active_jobs_per_org:
            raise Conflict(
                f"Your organization has {limits.max_active_jobs_per_org} unfinished "
                "jobs, the most allowed; wait for one to finish or cancel one.",
                code="job_limit_reached",
            )
        gpus = spec.resources.gpus
        cap = rules.max_gpus_per_org
        if cap is not None and gpus and usage.gpus + gpus > cap:
            raise QuotaExceeded(
                f"Your organization's unfinished jobs ask for {usage.gpus} GPUs; this job's "
                f"{gpus} more would exceed its limit of {cap}. Wait for a job to finish or "
                "cancel one.",
                param="resources",
                code="gpu_quota_exceeded",
            )

    def create(
        self, principal: Principal, req: CreateFineTuningJobRequest, idempotency_key: str | None
    ) -> FineTuningJob:
        """Validate and store a new job; the same idempotency key returns the same job."""
        choice = self._resolve_model(principal, req.model)
        base = choice.base
        spec = self._admissible(principal, self._spec_from_request(principal, req, choice))
        training = self._check_file(
            principal, spec.training_file, "training_file", spec.method.type
        )
        if spec.validation_file is not None:
            self._check_file(principal, spec.validation_file, "validation_file", spec.method.type)
        self._check_org_usage(principal, spec)
        n_examples = int(training.stats.get("n_examples") or 1)
        spec.method.hyperparameters = resolve(
            spec.method.hyperparameters,
            method=spec.method.type,
            adapter=AdapterType(spec.adapter.type),
            n_examples=n_examples,
        )
        job_id = new_job_id()
        annotations = {}
        if idempotency_key is not None:
            annotations[ANNOTATION_IDEMPOTENCY_DIGEST] = request_digest(req)
        job = FineTuneJob(
            metadata=ObjectMeta(
                name=job_id,
                labels={LABEL_ORG: principal.org, LABEL_BASE_MODEL: _label_value(base)},
                annotations=annotations,
            ),
            spec=spec,
        )
        stored, created = self.backend.create(job, idempotency_key)
        if created:
            JOBS_CREATED.labels(method=spec.method.type.value).inc()
            self._event(stored, f"Created fine-tuning job: {job_id}")
            self._event(stored, f"Validating training file: {spec.training_file}")
            tokens = self._count_tokens(principal, training, base)
            if tokens is not None:
                epochs = spec.method.hyperparameters.n_epochs or 1
                self._event(
                    stored,
                    f"Training file has {n_examples} examples and {tokens} tokens ({base} "
                    f"tokenizer); about {tokens * epochs} tokens will be trained over "
                    f"{epochs} epochs",
                    data={
                        "n_examples": n_examples,
                        "n_tokens": tokens,
                        "estimated_trained_tokens": tokens * epochs,
                    },
                )
        return job_to_openai(stored)

    # -- read ------------------------------------------------------------------------------
    def retrieve(self, principal: Principal, job_id: str) -> FineTuningJob:
        """One of the org's jobs."""
        return job_to_openai(self._require(principal, job_id))

    def list(
        self,
        principal: Principal,
        *,
        after: str | None,
        limit: int,
        metadata: dict[str, str] | None,
    ) -> ListPaginatedFineTuningJobsResponse:
        """The org's jobs, newest first."""
        page = self.backend.list(principal.org, after=after, limit=limit, metadata=metadata)
        return ListPaginatedFineTuningJobsResponse(
            data=[job_to_openai(j) for j in page.jobs], has_more=page.has_more
        )

    def events(
        self, principal: Principal, job_id: str, *, after: str | None, limit: int
    ) -> ListFineTuningJobEventsResponse:
        """The job's events, newest first."""
        job = self._require(principal, job_id)
        events = read_events(
            self.store, self.layout.events_prefix(principal.org, job.metadata.name)
        )
        page, has_more = page_newest_first(events, after=after, limit=limit)
        return ListFineTuningJobEventsResponse(
            data=[
                FineTuningJobEvent(
                    id=e.id,
                    created_at=e.created_at,
                    level=e.level.value,
                    message=e.message,
                    type=e.type.value,
                    data=e.data,
                )
                for e in page
            ],
            has_more=has_more,
        )

    def checkpoints(
        self, principal: Principal, job_id: str, *, after: str | None, limit: int
    ) -> ListFineTuningJobCheckpointsResponse:
        """The job's committed checkpoints, newest first."""
        job = self._require(principal, job_id)
        refs = sorted(
            job.status.checkpoints if job.status else [], key=lambda c: c.step, reverse=True
        )
        if after is not None:
            ids = [c.id for c in refs]
            refs = refs[ids.index(after) + 1 :] if after in ids else []
        base = (
            job.status.fine_tuned_model
            if job.status and job.status.fine_tuned_model
            else fine_tuned_model_name(
                job.spec.model, job.spec.org, job.spec.suffix, job.metadata.name
            )
        )
        data = [
            FineTuningJobCheckpoint(
                id=c.id,
                created_at=int(c.created_at.timestamp()),
                fine_tuned_model_checkpoint=f"{base}{CHECKPOINT_MODEL_MARK}{c.step}",
                fine_tuning_job_id=job.metadata.name,
                step_number=c.step,
                metrics=CheckpointMetrics(
                    step=c.step,
                    train_loss=c.metrics.train_loss if c.metrics else None,
                    train_mean_token_accuracy=c.metrics.train_mean_token_accuracy
                    if c.metrics
                    else None,
                    valid_loss=c.metrics.valid_loss if c.metrics else None,
                    valid_mean_token_accuracy=c.metrics.valid_mean_token_accuracy
                    if c.metrics
                    else None,
                ),
            )
            for c in refs[:limit]
        ]
        return ListFineTuningJobCheckpointsResponse(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=len(refs) > limit,
        )

    # -- transitions -----------------------------------------------------------------------
    def cancel(self, principal: Principal, job_id: str) -> FineTuningJob:
        """Request cancellation; 409 once the job has finished."""
        with self._transition_lock:
            job = self._require(principal, job_id)
            status = api_status(job)
            if is_terminal(JobPhase(status)):
                raise Conflict(f"Job {job_id} has already {status}; it cannot be cancelled.")
            job = self.backend.patch_spec(principal.org, job_id, cancel=True)
        self._event(job, "Fine-tuning job cancelled")
        return job_to_openai(job)

    def pause(self, principal: Principal, job_id: str) -> FineTuningJob:
        """Request a pause (checkpoint, then stop); only queued or running jobs pause."""
        with self._transition_lock:
            job = self._require(principal, job_id)
            status = api_status(job)
            if status not in ("validating_files", "queued", "running"):
                raise Conflict(
                    f"Job {job_id} is {status}; only queued or running jobs can be paused."
                )
            job = self.backend.patch_spec(principal.org, job_id, suspend=True)
        self._event(job, "Fine-tuning job pausing: a checkpoint is taken before it stops")
        return job_to_openai(job)

    def resume(self, principal: Principal, job_id: str) -> FineTuningJob:
        """Resume a paused job from its last checkpoint."""
        with self._transition_lock:
            job = self._require(principal, job_id)
            status = api_status(job)
            if status not in ("paused", "pausing"):
                raise Conflict(f"Job {job_id} is {status}; only paused jobs can be resumed.")
            job = self.backend.patch_spec(principal.org, job_id, suspend=False)
        self._event(job, "Fine-tuning job resumed")
        return job_to_openai(job)


def request_digest(req: CreateFineTuningJobRequest) -> str:
    """The sha256 of a create request's content (key order and unset fields aside)."""
    body = req.model_dump(mode="json", exclude_none=True)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _label_value(value: str) -> str:
    """A model name made safe as a label value (≤ 63 of [A-Za-z0-9._-])."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]", "-", value)[:63].strip("-._") or "unknown"


@dataclass(frozen=True)
class ModelChoice:
    """What a job's ``model`` resolves to: its catalogue base model and, for an ``ft:`` model,
    where training continues from and the adapter it continues.
    """

    base: str
    continue_from: ContinueFrom | None = None
    adapter: Adapter | None = None


def _serves(job: FineTuneJob, model: str) -> bool:
    """Whether ``job`` produced ``model`` and the model still exists."""
    status = job.status
    return (
        status is not None
        and status.fine_tuned_model == model
        and status.phase is JobPhase.SUCCEEDED
        and job.metadata.annotations.get(ANNOTATION_MODEL_DELETED) != "true"
    )
