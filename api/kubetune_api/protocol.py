"""OpenAI's wire format for files, fine-tuning jobs and models, in one module.

Mirrors the schemas of ``openai-fine-tuning.openapi.yaml`` (the subset of OpenAI's spec this
service implements). Routers return these models and nothing else; services build them. Where
kubetune adds something (job statuses ``pausing``/``paused``, the ``adapter``/``resources``
request fields a Together or Kubeflow user expects) it is marked here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from kubetune.base_models import BaseModelPhase, VolumeClaim
from kubetune.finetunejob import (
    DNS_LABEL_PATTERN,
    SUFFIX_PATTERN,
    VLLM_LORA_RANKS,
    VLLM_UNSERVABLE_MODULES,
    LrScheduler,
    check_servable_targets,
)
from kubetune.ids import ID_PATTERNS, IdKind
from kubetune.settings import BASE_MODEL_ID_PATTERN

T = TypeVar("T")

Auto = Literal["auto"]
FilePurpose = Literal[
    "assistants",
    "assistants_output",
    "batch",
    "batch_output",
    "fine-tune",
    "fine-tune-results",
    "vision",
    "user_data",
]
# What a client may ask for on upload (CreateFileRequest.purpose); this service takes fine-tune.
UploadPurpose = Literal["assistants", "batch", "fine-tune", "vision", "user_data", "evals"]
JobStatus = Literal[
    "validating_files",
    "queued",
    "running",
    "pausing",
    "paused",
    "succeeded",
    "failed",
    "cancelled",
]


class Wire(BaseModel):
    """Base of response objects: serialized as OpenAI does, nulls included."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class ErrorBody(Wire):
    """The inside of OpenAI's error envelope."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Wire):
    """``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorBody


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


class OpenAIFile(Wire):
    """The ``file`` object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    # Optional and not nullable in OpenAI's schema: omitted rather than null.
    expires_at: int | None = Field(default=None, exclude_if=lambda v: v is None)
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = Field(default=None, exclude_if=lambda v: v is None)


class ListFilesResponse(Wire):
    """A page of files."""

    object: Literal["list"] = "list"
    data: list[OpenAIFile]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeleteFileResponse(Wire):
    """Answer to ``DELETE /v1/files/{id}``."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool


# ---------------------------------------------------------------------------------------------
# Uploads (files larger than one request)
# ---------------------------------------------------------------------------------------------


class CreateUploadRequest(BaseModel):
    """``CreateUploadRequest``."""

    model_config = ConfigDict(extra="forbid")

    filename: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    purpose: Literal["assistants", "batch", "fine-tune", "vision"]
    bytes: int = Field(ge=1)
    mime_type: Annotated[str, StringConstraints(min_length=1, max_length=128)]


class CompleteUploadRequest(BaseModel):
    """``CompleteUploadRequest``: the parts, in order."""

    model_config = ConfigDict(extra="forbid")

    part_ids: list[str] = Field(min_length=1, max_length=10_000)
    md5: str | None = None


class Upload(Wire):
    """The ``upload`` object."""

    id: str
    object: Literal["upload"] = "upload"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["pending", "completed", "cancelled", "expired"]
    file: OpenAIFile | None = Field(default=None, exclude_if=lambda v: v is None)


class UploadPart(Wire):
    """The ``upload.part`` object."""

    id: str
    object: Literal["upload.part"] = "upload.part"
    created_at: int
    upload_id: str


# ---------------------------------------------------------------------------------------------
# Fine-tuning jobs: requests
# ---------------------------------------------------------------------------------------------


class Request(BaseModel):
    """Base of request bodies: unknown fields are errors, like OpenAI's."""

    model_config = ConfigDict(extra="forbid")


class CommonHyperparameters(Request):
    """OpenAI's hyperparameters of every method, then kubetune's knobs (Together's and
    transformers' names; send them through ``extra_body`` or as extra keys of the dict).
    """

    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=10)] = "auto"
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    # kubetune additions; omitted means the default the FineTuneJob spec documents.
    lr_scheduler_type: LrScheduler | None = None
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] | None = None
    weight_decay: Annotated[float, Field(ge=0, le=1)] | None = None
    max_grad_norm: Annotated[float, Field(ge=0, le=1000)] | None = None
    max_seq_length: Annotated[int, Field(ge=16, le=1_048_576)] | None = None
    save_steps: Annotated[int, Field(ge=1, le=1_000_000)] | None = Field(
        default=None, description="A checkpoint every this many optimizer steps."
    )
    save_total_limit: Annotated[int, Field(ge=1, le=100)] | None = Field(
        default=None, description="The newest checkpoints kept."
    )
    early_stopping_patience: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        default=None, description="Evaluations without improvement before training stops."
    )
    early_stopping_threshold: Annotated[float, Field(ge=0, le=1000)] | None = None
    use_best_checkpoint: bool | None = Field(
        default=None, description="The result is the checkpoint of lowest validation loss."
    )


class SupervisedHyperparameters(CommonHyperparameters):
    """``FineTuneSupervisedHyperparameters``."""

    train_on_inputs: bool | None = None
    packing: bool | None = Field(
        default=None,
        description="Several examples per training row of up to max_seq_length tokens; "
        "batch_size then counts rows.",
    )


class DpoHyperparameters(CommonHyperparameters):
    """``FineTuneDPOHyperparameters``."""

    beta: Auto | Annotated[float, Field(gt=0, le=2)] = "auto"


class SupervisedMethod(Request):
    """``FineTuneSupervisedMethod``."""

    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class DpoMethod(Request):
    """``FineTuneDPOMethod``."""

    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class MethodRequest(Request):
    """``FineTuneMethod`` (``reinforcement`` is not offered)."""

    type: Literal["supervised", "dpo"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


class WandbSettings(Request):
    """W&B settings of an integration."""

    project: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    name: str | None = None
    entity: str | None = None
    tags: list[str] = Field(default_factory=list, max_length=32)


class MlflowSettings(Request):
    """MLflow settings of an integration (a kubetune addition)."""

    experiment: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    tracking_uri: str | None = None
    run_name: str | None = None


class WandbIntegrationRequest(Request):
    """``FineTuningIntegration``: Weights & Biases."""

    type: Literal["wandb"]
    wandb: WandbSettings


class MlflowIntegrationRequest(Request):
    """An MLflow integration (a kubetune addition), shaped like ``FineTuningIntegration``."""

    type: Literal["mlflow"]
    mlflow: MlflowSettings


# Each type carries its own block: a W&B integration without ``wandb`` is refused by the
# document as by the code.
IntegrationRequest = Annotated[
    WandbIntegrationRequest | MlflowIntegrationRequest, Field(discriminator="type")
]


# An id the API gave a file: anything else names no file, and the document says so.
FileId = Annotated[str, StringConstraints(pattern=ID_PATTERNS[IdKind.FILE])]

# A module name vLLM can serve LoRA weights on: the document says what the validator checks.
ServableModule = Annotated[
    str,
    Field(
        json_schema_extra={
            "not": {"pattern": rf"(^|\.)({'|'.join(sorted(VLLM_UNSERVABLE_MODULES))})$"}
        }
    ),
]


class AdapterRequest(Request):
    """kubetune addition (``extra_body={"adapter": …}``): what is trained."""

    type: Literal["lora", "qlora", "full"] = "lora"
    r: int = Field(default=16, json_schema_extra={"enum": list(VLLM_LORA_RANKS)})
    alpha: int = Field(default=32, ge=1, le=4096)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[ServableModule] = Field(
        default_factory=lambda: ["all-linear"], min_length=1
    )

    @field_validator("target_modules")
    @classmethod
    def _modules_vllm_can_serve(cls, value: list[str]) -> list[str]:
        return check_servable_targets(value)

    @field_validator("r")
    @classmethod
    def _rank_vllm_can_serve(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            allowed = ", ".join(map(str, VLLM_LORA_RANKS))
            raise ValueError(f"r must be one of the ranks vLLM serves: {allowed}")
        return value


class ResourcesRequest(Request):
    """kubetune addition (``extra_body={"resources": …}``): nodes and GPUs."""

    nodes: int = Field(default=1, ge=1, le=64)
    gpus_per_node: int = Field(default=1, ge=0, le=16)
    gpu_type: Annotated[str, StringConstraints(max_length=128)] | None = None
    profile: Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, max_length=40)] | None = (
        Field(default=None, description="A hardware profile's name.")
    )


class CreateFineTuningJobRequest(Request):
    """``CreateFineTuningJobRequest`` plus kubetune's extra fields (sent as ``extra_body``)."""

    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    training_file: FileId
    validation_file: FileId | None = None
    hyperparameters: SupervisedHyperparameters | None = Field(
        default=None, description="Deprecated by OpenAI in favour of method; still accepted."
    )
    method: MethodRequest | None = None
    suffix: Annotated[str, StringConstraints(pattern=SUFFIX_PATTERN)] | None = None
    seed: int | None = Field(default=None, ge=0, le=2_147_483_647)
    metadata: (
        dict[
            Annotated[str, StringConstraints(min_length=1, max_length=64)],
            Annotated[str, StringConstraints(max_length=512)],
        ]
        | None
    ) = Field(default=None, max_length=16)
    integrations: list[IntegrationRequest] | None = Field(default=None, max_length=5)
    # kubetune additions
    adapter: AdapterRequest | None = None
    resources: ResourcesRequest | None = None
    strategy: Literal["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"] | None = None
    n_evals: int | None = Field(default=None, ge=0, le=1000)
    queue: Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN)] | None = Field(
        default=None, description="Kueue LocalQueue to admit the job through."
    )


# ---------------------------------------------------------------------------------------------
# Fine-tuning jobs: responses
# ---------------------------------------------------------------------------------------------


class JobError(Wire):
    """Why a job failed."""

    code: str
    message: str
    param: str | None


class JobHyperparameters(Wire):
    """Resolved hyperparameters (numbers once the job has been planned); kubetune's knobs are
    shown once resolved, or as the request gave them before.
    """

    batch_size: Auto | int | None = "auto"
    learning_rate_multiplier: Auto | float = "auto"
    n_epochs: Auto | int = "auto"
    lr_scheduler_type: str | None = Field(default=None, exclude_if=lambda v: v is None)
    warmup_ratio: float | None = Field(default=None, exclude_if=lambda v: v is None)
    weight_decay: float | None = Field(default=None, exclude_if=lambda v: v is None)
    max_grad_norm: float | None = Field(default=None, exclude_if=lambda v: v is None)
    max_seq_length: int | None = Field(default=None, exclude_if=lambda v: v is None)
    train_on_inputs: bool | None = Field(default=None, exclude_if=lambda v: v is None)
    packing: bool | None = Field(default=None, exclude_if=lambda v: v is None)
    save_steps: int | None = Field(default=None, exclude_if=lambda v: v is None)
    save_total_limit: int | None = Field(default=None, exclude_if=lambda v: v is None)
    early_stopping_patience: int | None = Field(default=None, exclude_if=lambda v: v is None)
    early_stopping_threshold: float | None = Field(default=None, exclude_if=lambda v: v is None)
    use_best_checkpoint: bool | None = Field(default=None, exclude_if=lambda v: v is None)


class DpoJobHyperparameters(JobHyperparameters):
    """Resolved DPO hyperparameters."""

    beta: Auto | float = "auto"


class SupervisedMethodOut(Wire):
    """``method.supervised`` in a job object."""

    hyperparameters: JobHyperparameters


class DpoMethodOut(Wire):
    """``method.dpo`` in a job object."""

    hyperparameters: DpoJobHyperparameters


class MethodOut(Wire):
    """``method`` in a job object."""

    type: Literal["supervised", "dpo"]
    supervised: SupervisedMethodOut | None = Field(default=None, exclude_if=lambda v: v is None)
    dpo: DpoMethodOut | None = Field(default=None, exclude_if=lambda v: v is None)


class FineTuningJob(Wire):
    """The ``fine_tuning.job`` object."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    status: JobStatus
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    integrations: list[dict[str, Any]] | None = None
    seed: int
    estimated_finish: int | None = None
    method: MethodOut
    metadata: dict[str, str] | None = None
    # kubetune additions
    adapter: dict[str, Any] | None = None
    resources: dict[str, Any] | None = None
    strategy: str | None = None


class ListPaginatedFineTuningJobsResponse(Wire):
    """A page of jobs."""

    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(Wire):
    """The ``fine_tuning.job.event`` object."""

    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] = Field(default_factory=dict)


class ListFineTuningJobEventsResponse(Wire):
    """A page of events, newest first."""

    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointMetrics(Wire):
    """Metrics of a checkpoint; a metric not measured is omitted (the schema has no nulls)."""

    step: float | None = Field(default=None, exclude_if=lambda v: v is None)
    train_loss: float | None = Field(default=None, exclude_if=lambda v: v is None)
    train_mean_token_accuracy: float | None = Field(default=None, exclude_if=lambda v: v is None)
    valid_loss: float | None = Field(default=None, exclude_if=lambda v: v is None)
    valid_mean_token_accuracy: float | None = Field(default=None, exclude_if=lambda v: v is None)
    full_valid_loss: float | None = Field(default=None, exclude_if=lambda v: v is None)
    full_valid_mean_token_accuracy: float | None = Field(
        default=None, exclude_if=lambda v: v is None
    )


class FineTuningJobCheckpoint(Wire):
    """The ``fine_tuning.job.checkpoint`` object."""

    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class ListFineTuningJobCheckpointsResponse(Wire):
    """A page of checkpoints, newest first."""

    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    first_id: str | None
    last_id: str | None
    has_more: bool


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class Model(Wire):
    """The ``model`` object."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class RegisteredModel(Model):
    """A base model the org registered (a kubetune addition, ``POST /v1/models``): the model
    object and what its check found. Only ``ready`` ones are listed and trainable.
    """

    status: BaseModelPhase
    status_details: str | None = Field(description="Why the check failed.")
    path: str
    volume_claim: str | None = None
    architecture: str | None
    context_length: int | None = Field(description="Longest sequence it trains on.")


class CreateBaseModelRequest(BaseModel):
    """``POST /v1/models`` (a kubetune addition): a Hugging Face model folder registered as a
    base model of the org (admin keys), checked before it is listed.
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        pattern=BASE_MODEL_ID_PATTERN,
        description="Its name in requests: letters, digits, '.', '_', '-', '/'; up to 256.",
    )
    path: str = Field(
        min_length=1,
        max_length=1024,
        description="The model's folder, an absolute path (on a cluster: as trainer pods see "
        "it), or 'store:<prefix>' for a folder in the object store (cluster mode).",
    )
    volume_claim: VolumeClaim | None = None
    context_length: int | None = Field(
        default=None, ge=16, le=1_048_576, description="Longest sequence (default: the model's)."
    )


class ModelContentFormat(StrEnum):
    """What ``GET /v1/models/{model}/content`` returns (Together's ``checkpoint`` parameter)."""

    ADAPTER = "adapter"  # the LoRA adapter: adapter_config.json and adapter_model.safetensors
    MERGED = "merged"  # a whole model: a full fine-tune, or a LoRA model merged into its base


class ListModelsResponse(Wire):
    """Every model the caller may use."""

    object: Literal["list"] = "list"
    data: list[Model]


class DeleteModelResponse(Wire):
    """Answer to ``DELETE /v1/models/{id}``."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool


class Page(BaseModel, Generic[T]):
    """A slice of a list plus whether more follow (used between services and routers)."""

    items: list[T]
    has_more: bool


# Webhooks (kubetune's admin API; OpenAI manages endpoints in its dashboard) ----------------
WebhookEventTypeName = Literal[
    "fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"
]


class CreateWebhookEndpointRequest(Request):
    """Body of ``POST /v1/webhooks/endpoints``; the signing secret is generated."""

    url: str = Field(min_length=1, max_length=2048)
    event_types: list[WebhookEventTypeName] | None = Field(default=None, min_length=1)


class WebhookEndpointObject(Wire):
    """A webhook endpoint. ``secret`` is shown once, in the answer to its creation."""

    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    event_types: list[WebhookEventTypeName]
    created_at: int
    static: bool = Field(description="Configured by the cluster's operators; not deletable here.")
    secret: str | None = None


class ListWebhookEndpointsResponse(Wire):
    """An org's webhook endpoints."""

    object: Literal["list"] = "list"
    data: list[WebhookEndpointObject]
    has_more: bool = False


class DeleteWebhookEndpointResponse(Wire):
    """Answer to ``DELETE /v1/webhooks/endpoints/{id}``."""

    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool


# Inference (forwarded to vLLM) ---------------------------------------------------------------
class InferenceRequest(BaseModel):
    """What the API reads of a ``/v1/chat/completions`` or ``/v1/completions`` body: the model
    (to check who may use it and which vLLM serves it) and whether to stream. Every other field
    is vLLM's to validate and is forwarded as sent.
    """

    model_config = ConfigDict(extra="allow")

    model: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    stream: bool | None = None


# ---------------------------------------------------------------------------------------------
# Usage (the shape of OpenAI's organization usage API: pages of time buckets of results)
# ---------------------------------------------------------------------------------------------


class BucketWidth(StrEnum):
    """How long one bucket of a usage page is."""

    HOUR = "1h"
    DAY = "1d"


class FineTuningUsageResult(Wire):
    """An org's fine-tuning in one bucket: jobs created in it; jobs that finished in it, with
    the tokens they trained and the time their workers ran.
    """

    object: Literal["organization.usage.fine_tuning.result"] = (
        "organization.usage.fine_tuning.result"
    )
    org: str
    jobs_created: int
    jobs_succeeded: int
    jobs_failed: int
    jobs_cancelled: int
    trained_tokens: int
    run_seconds: float
    gpu_seconds: float


class UsageBucket(Wire):
    """One time bucket, [start_time, end_time)."""

    object: Literal["bucket"] = "bucket"
    start_time: int
    end_time: int
    results: list[FineTuningUsageResult]


class UsagePage(Wire):
    """Buckets, oldest first; ``next_page`` continues after the last."""

    object: Literal["page"] = "page"
    data: list[UsageBucket]
    has_more: bool
    next_page: str | None
