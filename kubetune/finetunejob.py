"""The FineTuneJob custom resource (``kubetune.io/v1alpha1``): the one source of truth.

The CRD schema in ``crds/`` is generated from these models (``make crds``), the API writes them,
the operator reads them and resolves the trainer configuration from them. Field names are
camelCase on the wire (Kubernetes convention) and snake_case in Python.

Hyperparameters accept the string ``"auto"`` on input and store it as an absent value: the CRD
keeps every hyperparameter strictly typed (so the apiserver validates bounds), and "absent"
means "resolve automatically", as OpenAI documents for ``"auto"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from kubetune.ids import ID_PATTERNS, IdKind, short_id

GROUP: Final = "kubetune.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "FineTuneJob"
PLURAL: Final = "finetunejobs"
SINGULAR: Final = "finetunejob"
SHORT_NAMES: Final = ("ftj",)
CRD_NAME: Final = f"{PLURAL}.{GROUP}"

LABEL_ORG: Final = f"{GROUP}/org"
LABEL_JOB: Final = f"{GROUP}/job"
LABEL_BASE_MODEL: Final = f"{GROUP}/base-model"
# Set by the API when a fine-tuned model is deleted: its adapter is unloaded everywhere.
ANNOTATION_MODEL_DELETED: Final = f"{GROUP}/model-deleted"
# Set by the API when a checkpoint's model is asked for: when (Unix seconds) step N was last
# used. The replicas serve the most recently used checkpoints of their base model.
ANNOTATION_CHECKPOINT_USED_PREFIX: Final = f"{GROUP}/checkpoint-used-step-"
# Merging a LoRA model into its base for a download: kubetune.io/merge-final (the final model)
# or kubetune.io/merge-step-N. The API sets "requested"; the job driver merges and, when that
# fails, writes "failed: <reason>"; the API, having told a client, sets "reported". Done is
# the merged model's manifest in the store, not an annotation.
ANNOTATION_MERGE_PREFIX: Final = f"{GROUP}/merge-"
MERGE_REQUESTED: Final = "requested"
MERGE_FAILED: Final = "failed: "
MERGE_REPORTED: Final = "reported"

# Org names appear in object-store keys and label values: a DNS-1123 label keeps both safe.
ORG_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS_LABEL_PATTERN: Final = ORG_PATTERN
SUFFIX_PATTERN: Final = r"^[A-Za-z0-9._-]{1,64}$"
VLLM_LORA_RANKS: Final = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Modules vLLM loads no LoRA weights for: it serves adapters on the linear layers of attention
# and MLP blocks, not on the token embeddings or the output head (names as the common
# architectures spell them; PEFT matches a target against the end of a module's name).
VLLM_UNSERVABLE_MODULES: Final = frozenset(
    {"lm_head", "embed_tokens", "wte", "wpe", "embed_in", "embed_out", "word_embeddings"}
)


class SpecError(ValueError):
    """A rule across fields of a spec, carrying the request parameter a client should fix:
    pydantic places a model-level rule at the model's location, which names no parameter, so
    the API reads ``param`` from here instead.
    """

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_servable_targets(names: list[str]) -> list[str]:
    """``names`` if vLLM can serve LoRA weights on every one; a ValueError naming those it
    cannot (the embeddings and the output head).
    """
    refused = [n for n in names if n.rsplit(".", 1)[-1] in VLLM_UNSERVABLE_MODULES]
    if refused:
        raise ValueError(
            f"target_modules {', '.join(refused)}: vLLM serves LoRA adapters on the linear "
            "layers of attention and MLP blocks only, not on the embeddings or the output head"
        )
    return names


MAX_CHECKPOINTS_IN_STATUS: Final = 10
MAX_CONDITIONS: Final = 16


def _auto_to_none(value: object) -> object:
    """Map OpenAI's ``"auto"`` to an absent value (see the module docstring)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    return value


Auto = BeforeValidator(_auto_to_none)


class CRModel(BaseModel):
    """Base of every part of the custom resource: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=False,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """Serialize as the apiserver stores it: camelCase, JSON types, no null fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---------------------------------------------------------------------------------------------
# Enumerations
# ---------------------------------------------------------------------------------------------


class MethodType(StrEnum):
    """Fine-tuning method, named as in OpenAI's ``method.type``."""

    SUPERVISED = "supervised"
    DPO = "dpo"


class LrScheduler(StrEnum):
    """The learning-rate schedule after warmup, named as transformers names it."""

    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant_with_warmup"


class AdapterType(StrEnum):
    """What is trained: a LoRA adapter, a LoRA adapter on a 4-bit base (QLoRA), or all weights."""

    LORA = "lora"
    QLORA = "qlora"
    FULL = "full"


class Strategy(StrEnum):
    """How training is distributed across GPUs and nodes."""

    DDP = "ddp"
    FSDP = "fsdp"
    DEEPSPEED_ZERO2 = "deepspeed-zero2"
    DEEPSPEED_ZERO3 = "deepspeed-zero3"


class JobPhase(StrEnum):
    """Lifecycle phase of a fine-tuning job; the values are OpenAI's job statuses plus ours."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class IntegrationType(StrEnum):
    """Experiment trackers a job can report to."""

    WANDB = "wandb"
    MLFLOW = "mlflow"


class ConditionStatus(StrEnum):
    """Status of a condition, as in ``metav1.Condition``."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ConditionType(StrEnum):
    """Every condition type a FineTuneJob's status carries.

    The first six are the training controller's (Kubeflow's ``JobConditionType``), mirrored from
    the job's workload as the controller wrote them; the rest are kubetune's own.
    """

    CREATED = "Created"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    FILES_VALIDATED = "FilesValidated"
    QUEUED = "Queued"
    CANCELLED = "Cancelled"
    SERVED = "Served"


class ErrorKind(StrEnum):
    """Whose fault a failure is: the user's (not retried) or the infrastructure's."""

    USER = "user"
    INFRASTRUCTURE = "infrastructure"


# ---------------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------------

FileId = Annotated[str, StringConstraints(pattern=ID_PATTERNS[IdKind.FILE])]
SourceJobId = Annotated[str, StringConstraints(pattern=ID_PATTERNS[IdKind.JOB])]
CHECKPOINT_MODEL_MARK: Final = ":ckpt-step-"
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class Hyperparameters(CRModel):
    """Training hyperparameters. Omit a field (or send ``"auto"``) to have it resolved."""

    n_epochs: Annotated[int | None, Auto] = Field(
        default=None,
        ge=1,
        le=50,
        description='Full passes over the training file. Omitted or "auto": chosen from the '
        "number of examples, as OpenAI documents.",
    )
    batch_size: Annotated[int | None, Auto] = Field(
        default=None,
        ge=1,
        le=256,
        description="Examples per optimizer step across all GPUs (the global batch). Omitted or "
        '"auto": chosen from the dataset size.',
    )
    learning_rate_multiplier: Annotated[float | None, Auto] = Field(
        default=None,
        gt=0,
        le=10,
        description='Multiplier on the base model\'s default learning rate. Omitted or "auto": '
        "1.0 for LoRA, smaller for full fine-tuning.",
    )
    beta: Annotated[float | None, Auto] = Field(
        default=None,
        gt=0,
        le=2,
        description="DPO only: how strongly the policy is kept close to the reference model. "
        'Omitted or "auto": 0.1.',
    )
    n_evals: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="How many times validation loss and token accuracy are computed over the "
        "run when a validation file is given. Omitted: once per epoch.",
    )
    warmup_ratio: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Fraction of steps over which the learning rate warms up. Omitted: 0.03.",
    )
    max_seq_length: int | None = Field(
        default=None,
        ge=16,
        le=1_048_576,
        description="Longest example in tokens; longer ones are truncated with a warning "
        "event. Omitted: the base model's context length.",
    )
    lr_scheduler_type: LrScheduler | None = Field(
        default=None,
        description="How the learning rate falls after warmup: linear to 0, cosine to 0, or "
        "constant_with_warmup. Omitted: linear.",
    )
    weight_decay: float | None = Field(
        default=None, ge=0, le=1, description="AdamW weight decay. Omitted: 0."
    )
    max_grad_norm: float | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Gradients are clipped to this global norm; 0 turns clipping off. "
        "Omitted: 1.0.",
    )
    train_on_inputs: bool | None = Field(
        default=None,
        description="supervised only: learn every token of each example (system and user "
        "turns, prompts, replies with weight 0) instead of the assistant replies alone. "
        "Omitted: false.",
    )
    packing: bool | None = Field(
        default=None,
        description="supervised only: pack several examples into each training row of up to "
        "max_seq_length tokens (best-fit decreasing; each example attends only to itself), so "
        "batch_size counts rows and a run of many short examples takes fewer, fuller steps. "
        "Omitted: false, one example per row.",
    )
    early_stopping_patience: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Stop once the validation loss has not improved (by more than "
        "early_stopping_threshold) for this many evaluations in a row; needs a "
        "validation_file, and then evaluates at every checkpoint. Omitted: no early stopping.",
    )
    early_stopping_threshold: float | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="The least decrease of the validation loss that counts as an improvement. "
        "Omitted: 0.",
    )
    use_best_checkpoint: bool | None = Field(
        default=None,
        description="The fine-tuned model is the checkpoint with the lowest validation loss, "
        "not the last step's weights; needs a validation_file and an adapter (lora, qlora), "
        "and evaluates at every checkpoint. Omitted: true with early stopping, else false.",
    )

    def selects_by_validation(self) -> bool:
        """Whether early stopping or the best checkpoint is asked for (both judge checkpoints
        by their validation loss).
        """
        return bool(self.early_stopping_patience or self.use_best_checkpoint)


class Method(CRModel):
    """The fine-tuning method and its hyperparameters."""

    type: MethodType = Field(
        default=MethodType.SUPERVISED,
        description="supervised: learn to produce the assistant turns of chat examples. "
        "dpo: direct preference optimization on preferred/non-preferred pairs.",
    )
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters,
        description="Training hyperparameters; each may be omitted to be resolved automatically.",
    )

    @model_validator(mode="after")
    def _method_specific(self) -> Self:
        if self.type is not MethodType.DPO and self.hyperparameters.beta is not None:
            raise SpecError(
                "hyperparameters.beta applies only to method type dpo", param="hyperparameters"
            )
        for knob in ("train_on_inputs", "packing"):
            if self.type is not MethodType.SUPERVISED and getattr(self.hyperparameters, knob):
                raise SpecError(
                    f"hyperparameters.{knob} applies only to method type supervised",
                    param="hyperparameters",
                )
        return self


class Adapter(CRModel):
    """What is trained. LoRA ranks are limited to those vLLM can serve."""

    type: AdapterType = Field(
        default=AdapterType.LORA,
        description="lora: a low-rank adapter; qlora: a LoRA adapter on a 4-bit quantized base "
        "(CUDA only); full: every weight of the model.",
    )
    r: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        default=16, description="LoRA rank; one of the ranks vLLM accepts."
    )
    alpha: int = Field(default=32, ge=1, le=4096, description="LoRA scaling numerator (alpha/r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description='Module names that get LoRA weights; "all-linear" means every linear '
        "layer but the output head. Embeddings and the output head are refused: vLLM cannot "
        "serve LoRA weights on them.",
    )

    @field_validator("target_modules")
    @classmethod
    def _servable(cls, value: list[str]) -> list[str]:
        return check_servable_targets(value)


class WandbIntegration(CRModel):
    """Weights & Biases run settings (credentials come from the trainer's environment)."""

    project: str = Field(min_length=1, max_length=128, description="W&B project.")
    name: str | None = Field(default=None, max_length=128, description="Run display name.")
    entity: str | None = Field(default=None, max_length=128, description="Team or user.")
    tags: list[Annotated[str, StringConstraints(max_length=64)]] = Field(
        default_factory=list, max_length=32, description="Tags attached to the run."
    )


class MlflowIntegration(CRModel):
    """MLflow run settings (the tracking URI may also come from the trainer's environment)."""

    experiment: str = Field(min_length=1, max_length=256, description="Experiment name.")
    tracking_uri: str | None = Field(
        default=None, max_length=1024, description="Tracking server URI."
    )
    run_name: str | None = Field(default=None, max_length=256, description="Run name.")


class Integration(CRModel):
    """One experiment tracker to report metrics to."""

    type: IntegrationType = Field(description="Which tracker.")
    wandb: WandbIntegration | None = Field(default=None, description="Settings for type wandb.")
    mlflow: MlflowIntegration | None = Field(default=None, description="Settings for type mlflow.")

    @model_validator(mode="after")
    def _settings_match_type(self) -> Self:
        if getattr(self, self.type.value) is None:
            raise ValueError(
                f"integration of type {self.type.value} needs a {self.type.value} block"
            )
        return self


class Resources(CRModel):
    """Compute the job runs on."""

    nodes: int = Field(default=1, ge=1, le=64, description="Pods (one per node) in the job.")
    gpus_per_node: int = Field(
        default=1, ge=0, le=16, description="GPUs per pod; 0 trains on CPU (for tests)."
    )
    gpu_type: str | None = Field(
        default=None,
        max_length=128,
        description="GPU product to schedule on (matched against the node label configured in "
        "the operator's settings), e.g. NVIDIA-H100-80GB-HBM3.",
    )

    profile: str | None = Field(
        default=None,
        pattern=DNS_LABEL_PATTERN,
        max_length=40,
        description="Hardware profile (an admin-defined pod overlay: RDMA/EFA, NCCL, runtime "
        "class) the trainer pods run with.",
    )

    @property
    def gpus(self) -> int:
        """GPUs the job asks for in all (nodes times GPUs per node)."""
        return self.nodes * self.gpus_per_node


class Checkpointing(CRModel):
    """When checkpoints are written and how many are kept."""

    every_steps: int = Field(
        default=50, ge=1, le=1_000_000, description="Write a checkpoint every N optimizer steps."
    )
    keep: int = Field(default=3, ge=1, le=100, description="Newest checkpoints kept in storage.")


class ContinueFrom(CRModel):
    """The adapter a job continues to train: the result of an earlier job of the same org, or
    one of its checkpoints.
    """

    job: SourceJobId = Field(description="The job (ftjob-…) whose adapter is the start.")
    step: int | None = Field(
        default=None,
        ge=1,
        description="A checkpoint's step (its model is <ft model>:ckpt-step-<step>); omitted: "
        "the job's final adapter.",
    )


def split_checkpoint_model(model: str) -> tuple[str, int | None]:
    """``ft:…:ckpt-step-N`` → (``ft:…``, N); any other name → (name, None)."""
    head, mark, step = model.rpartition(CHECKPOINT_MODEL_MARK)
    if mark and step.isdigit() and int(step) > 0:
        return head, int(step)
    return model, None


def checkpoint_used_annotation(step: int) -> str:
    """The annotation that records when checkpoint ``step``'s model was last used."""
    return f"{ANNOTATION_CHECKPOINT_USED_PREFIX}{step}"


def checkpoints_in_use(annotations: Mapping[str, str]) -> dict[int, float]:
    """Checkpoint step → when its model was last used, from a job's annotations (a value that
    is not a number is ignored: annotations can be written by hand).
    """
    used: dict[int, float] = {}
    for key, value in annotations.items():
        head, mark, step = key.partition(ANNOTATION_CHECKPOINT_USED_PREFIX)
        if mark and not head and step.isdigit():
            try:
                when = float(value)
            except ValueError:
                continue
            if math.isfinite(when):
                used[int(step)] = when
    return used


def merge_annotation(step: int | None) -> str:
    """The annotation that asks for (and reports on) the merge of a job's final model
    (``step`` None) or of checkpoint ``step``'s.
    """
    return f"{ANNOTATION_MERGE_PREFIX}{'final' if step is None else f'step-{step}'}"


def merges_requested(annotations: Mapping[str, str]) -> list[int | None]:
    """The models of a job whose merge is asked for and not yet tried: None for the final
    model, else checkpoint steps (annotations written by hand that mean nothing are ignored).
    """
    wanted: list[int | None] = []
    for key, value in sorted(annotations.items()):
        head, mark, which = key.partition(ANNOTATION_MERGE_PREFIX)
        if head or not mark or value != MERGE_REQUESTED:
            continue
        step = which.removeprefix("step-")
        if which == "final":
            wanted.append(None)
        elif step != which and step.isdigit() and int(step) > 0:
            wanted.append(int(step))
    return wanted


def base_of(model: str) -> str:
    """The catalogue base model under ``model`` (``ft:<base>:…`` names it second)."""
    return model.split(":")[1] if model.startswith("ft:") else model


class Serving(CRModel):
    """What happens to the trained adapter."""

    # "register" is also an attribute of pydantic's ABC-based metaclass: keep it the wire name only.
    register_adapter: bool = Field(
        default=True,
        alias="register",
        description="Load the adapter on the vLLM deployment of the base model when the job "
        "succeeds.",
    )


class FineTuneJobSpec(CRModel):
    """What the user asked for."""

    org: str = Field(
        default="default",
        pattern=ORG_PATTERN,
        description="Organization (tenant) that owns the job, its files and its model.",
    )
    model: str = Field(
        min_length=1,
        max_length=256,
        description="Base model name from the catalogue, or an ft: model to continue from.",
    )
    training_file: FileId = Field(description="Id of an uploaded JSONL file (file-…).")
    validation_file: FileId | None = Field(
        default=None, description="Id of an uploaded JSONL file used for evaluation."
    )
    continue_from: ContinueFrom | None = Field(
        default=None,
        description="With an ft: model: the job (and checkpoint) whose adapter training "
        "starts from. The API fills it in from the model's name.",
    )
    method: Method = Field(default_factory=Method, description="Method and hyperparameters.")
    adapter: Adapter = Field(default_factory=Adapter, description="What is trained.")
    suffix: str | None = Field(
        default=None,
        pattern=SUFFIX_PATTERN,
        description="Up to 64 characters added to the fine-tuned model's name.",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=2_147_483_647,
        description="Random seed; the same seed and data give the same result.",
    )
    metadata: dict[MetadataKey, MetadataValue] = Field(
        default_factory=dict,
        max_length=16,
        description="Up to 16 key-value pairs (keys ≤ 64, values ≤ 512 characters).",
    )
    integrations: list[Integration] = Field(
        default_factory=list, max_length=8, description="Experiment trackers to report to."
    )
    resources: Resources = Field(default_factory=Resources, description="Nodes and GPUs.")
    strategy: Strategy = Field(
        default=Strategy.DDP, description="How training is distributed across GPUs."
    )
    checkpointing: Checkpointing = Field(
        default_factory=Checkpointing, description="Checkpoint interval and retention."
    )
    queue: str | None = Field(
        default=None,
        pattern=DNS_LABEL_PATTERN,
        description="Kueue LocalQueue to admit the job through.",
    )
    serving: Serving = Field(default_factory=Serving, description="Serving of the result.")
    suspend: bool = Field(
        default=False,
        description="true pauses the job after a checkpoint; false resumes it from there.",
    )
    cancel: bool = Field(default=False, description="true cancels the job; it cannot be undone.")

    @property
    def base_model(self) -> str:
        """The catalogue model the job trains on (an ft: model's base)."""
        return base_of(self.model)

    @model_validator(mode="after")
    def _continued_from_an_adapter(self) -> Self:
        if self.model.startswith("ft:") and self.continue_from is None:
            raise SpecError(
                "an ft: model needs continueFrom.job, the job that produced it (the API sets it)",
                param="model",
            )
        if self.continue_from is not None and not self.model.startswith("ft:"):
            raise SpecError("continueFrom needs model to be the ft: model it names", param="model")
        if self.continue_from is not None and self.adapter.type is AdapterType.FULL:
            raise SpecError(
                "continuing from an adapter trains an adapter: not type full", param="adapter"
            )
        return self

    @model_validator(mode="after")
    def _validation_for_early_stopping(self) -> Self:
        hp = self.method.hyperparameters
        if hp.selects_by_validation() and self.validation_file is None:
            knob = (
                "early_stopping_patience" if hp.early_stopping_patience else "use_best_checkpoint"
            )
            raise SpecError(
                f"hyperparameters.{knob} needs a validation_file: checkpoints are judged by "
                "their validation loss",
                param="validation_file",
            )
        if hp.use_best_checkpoint and self.adapter.type is AdapterType.FULL:
            raise SpecError(
                "hyperparameters.use_best_checkpoint needs an adapter (lora, qlora); a full "
                "fine-tune's result is its last step",
                param="hyperparameters",
            )
        return self

    @model_validator(mode="after")
    def _qlora_needs_gpus(self) -> Self:
        if self.adapter.type is AdapterType.QLORA and self.resources.gpus_per_node == 0:
            raise SpecError(
                "adapter type qlora needs gpusPerNode ≥ 1 (4-bit kernels are CUDA-only)",
                param="adapter",
            )
        return self


# ---------------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------------


class Condition(CRModel):
    """A condition in the shape of ``metav1.Condition``."""

    type: str = Field(min_length=1, max_length=64, description="Condition type, e.g. Running.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str | None = Field(default=None, max_length=128, description="CamelCase reason.")
    message: str | None = Field(default=None, max_length=2048, description="Human explanation.")
    last_transition_time: datetime | None = Field(
        default=None, description="When status last changed."
    )


class Metrics(CRModel):
    """The latest values of the training metrics."""

    train_loss: float | None = Field(default=None, description="Training loss.")
    train_mean_token_accuracy: float | None = Field(
        default=None, description="Share of assistant tokens predicted correctly in training."
    )
    valid_loss: float | None = Field(default=None, description="Validation loss.")
    valid_mean_token_accuracy: float | None = Field(
        default=None, description="Share of assistant tokens predicted correctly in validation."
    )
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    grad_norm: float | None = Field(default=None, description="Gradient norm before clipping.")
    tokens_per_second: float | None = Field(
        default=None, description="Trained (non-padding) tokens per second, all ranks."
    )


class CheckpointRef(CRModel):
    """A committed checkpoint (its manifest exists in the object store)."""

    id: str = Field(pattern=ID_PATTERNS[IdKind.CHECKPOINT], description="ftckpt-… id.")
    step: int = Field(ge=0, description="Optimizer step the checkpoint was taken at.")
    created_at: datetime = Field(description="When the checkpoint was committed.")
    metrics: Metrics | None = Field(default=None, description="Metrics at that step.")


class JobError(CRModel):
    """Why a job failed, shaped like OpenAI's job error plus who is at fault."""

    code: str = Field(min_length=1, max_length=128, description="Machine-readable error code.")
    message: str = Field(min_length=1, max_length=4096, description="What went wrong.")
    param: str | None = Field(
        default=None, max_length=256, description="The input field at fault, if any."
    )
    kind: ErrorKind = Field(
        description="user: fix the input and start a new job; infrastructure: retried or "
        "reported to the operators of the cluster."
    )


class FineTuneJobStatus(CRModel):
    """What the operator observed. Small on purpose: the full event log is in the object store."""

    phase: JobPhase | None = Field(default=None, description="Lifecycle phase.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The spec generation this status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list, max_length=MAX_CONDITIONS, description="Latest conditions."
    )
    progress: str | None = Field(
        default=None, max_length=32, description="step/totalSteps, for kubectl get."
    )
    step: int = Field(default=0, ge=0, description="Last completed optimizer step.")
    total_steps: int | None = Field(default=None, ge=0, description="Planned optimizer steps.")
    epoch: float | None = Field(default=None, ge=0, description="Fractional epoch reached.")
    trained_tokens: int = Field(default=0, ge=0, description="Tokens trained on so far.")
    metrics: Metrics | None = Field(default=None, description="Latest metrics.")
    hyperparameters: Hyperparameters | None = Field(
        default=None, description='The hyperparameters after "auto" was resolved.'
    )
    checkpoints: list[CheckpointRef] = Field(
        default_factory=list,
        max_length=MAX_CHECKPOINTS_IN_STATUS,
        description="Newest committed checkpoints (bounded; all are in the object store).",
    )
    fine_tuned_model: str | None = Field(
        default=None, max_length=512, description="Name of the resulting model (ft:…)."
    )
    served_on: list[Annotated[str, StringConstraints(max_length=253)]] = Field(
        default_factory=list, max_length=64, description="vLLM replicas the adapter is loaded on."
    )
    serving_error: JobError | None = Field(
        default=None,
        description="Why the adapter cannot be served (the job itself succeeded), e.g. a LoRA "
        "rank above the vLLM deployment's limit.",
    )
    error: JobError | None = Field(default=None, description="Why the job failed.")
    restarts: int = Field(default=0, ge=0, description="Times the trainer was restarted.")
    estimated_finish: datetime | None = Field(
        default=None, description="Estimated completion time while running."
    )
    started_at: datetime | None = Field(default=None, description="When training started.")
    finished_at: datetime | None = Field(
        default=None, description="When the job reached a terminal phase."
    )
    running_since: datetime | None = Field(
        default=None,
        description="Since when the job's workers run (phase running or pausing); unset "
        "between runs.",
    )
    run_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Seconds the job's workers ran in its finished runs (the current one, "
        "since runningSince, not included). Its GPU-seconds are this times the GPUs it asked "
        "for.",
    )


class ObjectMeta(BaseModel):
    """The subset of ``metav1.ObjectMeta`` kubetune reads and writes."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    name: str = Field(pattern=DNS_LABEL_PATTERN)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: datetime | None = None


class FineTuneJob(BaseModel):
    """A whole FineTuneJob object, as stored by the apiserver."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    def to_manifest(self) -> dict[str, Any]:
        """Serialize for the apiserver (camelCase, no null fields)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> FineTuneJob:
        """Parse an object returned by the apiserver."""
        return cls.model_validate(manifest)


def fine_tuned_model_name(base_model: str, org: str, suffix: str | None, job_id: str) -> str:
    """Name a fine-tuned model the way OpenAI does: ``ft:<base>:<org>:<suffix>:<short-id>``.

    A job that continues from an ``ft:`` model names its result after the original base model.
    """
    return f"ft:{base_of(base_model)}:{org}:{suffix or ''}:{short_id(job_id)}"
