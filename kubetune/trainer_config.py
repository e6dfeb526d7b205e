"""The resolved trainer configuration: what the trainer reads, and nothing else.

The operator (and the local executor) turn a FineTuneJob into a :class:`TrainerConfig` with
:func:`build_trainer_config`, store it at ``jobs/<job>/config.json`` and mount it into the
trainer's pods. Every "auto" is resolved to a number here, so a restarted trainer trains exactly
the same run; nothing in it is a secret (object-store credentials come from the environment).

This module is part of the shared contract: it must not import torch or any component.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from kubetune.finetunejob import (
    ORG_PATTERN,
    Adapter,
    AdapterType,
    Checkpointing,
    FileId,
    FineTuneJob,
    FineTuneJobSpec,
    Integration,
    LrScheduler,
    MethodType,
    Resources,
    Strategy,
    fine_tuned_model_name,
)
from kubetune.hyperparameters import resolve, total_steps
from kubetune.ids import ID_PATTERNS, IdKind, default_seed
from kubetune.settings import ObjectStoreSettings, Settings

SCHEMA_VERSION: Final = 1
STORE_SCHEME: Final = "store:"
# OpenAI's learning_rate_multiplier multiplies a base rate; 2e-4 is the usual LoRA rate, and
# "auto" already gives full fine-tuning a 0.1 multiplier (see kubetune.hyperparameters).
BASE_LEARNING_RATE: Final = 2e-4
DEFAULT_MICRO_BATCH_SIZE: Final = 8
DEFAULT_METRICS_PORT: Final = 9400
DEFAULT_STOP_GRACE_SECONDS: Final = 600
# torch's default is ten minutes; a full 8B checkpoint upload or a 70B download takes longer.
DEFAULT_COLLECTIVE_TIMEOUT_SECONDS: Final = 3600

JobId = Annotated[str, StringConstraints(pattern=ID_PATTERNS[IdKind.JOB])]
Org = Annotated[str, StringConstraints(pattern=ORG_PATTERN)]


class ConfigError(ValueError):
    """A FineTuneJob the trainer cannot run; ``param`` names the field at fault."""

    def __init__(self, message: str, *, param: str, code: str = "invalid_model") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Where a trainer pod mounts the claim that caches weights downloaded from the object store.
MODEL_CACHE_DIR: Final = "/var/cache/kubetune/models"


class BaseModelSource(_Config):
    """The model being fine-tuned: its served name and where its weights are."""

    name: str = Field(min_length=1, max_length=256, description="Name vLLM serves it under.")
    path: str | None = Field(default=None, description="Local folder with HF weights.")
    store_prefix: str | None = Field(
        default=None, description="Object-store folder with HF weights and tokenizer."
    )
    context_length: int = Field(ge=16, description="Longest sequence the model takes.")
    volume_claim: str | None = Field(
        default=None,
        description="PersistentVolumeClaim the runtime mounts: read-only at ``path``, or as the "
        "download cache at ``cache_dir`` (store models).",
    )
    cache_dir: str | None = Field(
        default=None,
        description="Folder (a shared volume) store weights are downloaded into once and reused "
        "from, by restarts and later jobs; None: a scratch folder per run.",
    )

    @model_validator(mode="after")
    def _one_location(self) -> Self:
        if (self.path is None) == (self.store_prefix is None):
            raise ValueError("exactly one of path and store_prefix must be set")
        if self.cache_dir is not None and self.store_prefix is None:
            raise ValueError("cache_dir is for weights in the object store")
        return self


class ResolvedHyperparameters(_Config):
    """Hyperparameters with every "auto" resolved to a number."""

    n_epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="Examples per optimizer step, all ranks together.")
    learning_rate_multiplier: float = Field(gt=0)
    learning_rate: float = Field(gt=0, description="Peak learning rate actually used.")
    warmup_ratio: float = Field(ge=0, lt=1)
    beta: float | None = Field(default=None, gt=0, description="DPO only.")
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    lr_scheduler: LrScheduler = LrScheduler.LINEAR
    train_on_inputs: bool = Field(
        default=False, description="SFT: every token is learnt, not only the replies."
    )
    packing: bool = Field(
        default=False, description="SFT: several examples per row of max_seq_length tokens."
    )
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="Evaluations without improvement before stopping."
    )
    early_stopping_threshold: float = Field(default=0.0, ge=0)
    use_best_checkpoint: bool = Field(
        default=False, description="The result is the checkpoint of lowest validation loss."
    )

    def selects_by_validation(self) -> bool:
        """Whether evaluations come with every checkpoint and judge them."""
        return bool(self.early_stopping_patience or self.use_best_checkpoint)

    micro_batch_size: int = Field(
        default=DEFAULT_MICRO_BATCH_SIZE,
        ge=1,
        description="Most examples one rank runs in one forward pass; the rest of the batch is "
        "gradient accumulation.",
    )


class TrainerConfig(_Config):
    """Everything one run of the trainer needs (``jobs/<job>/config.json``)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: JobId
    org: Org
    fine_tuned_model: str = Field(description="The ft:… name the result is served under.")
    base_model: BaseModelSource
    training_file: FileId
    validation_file: FileId | None = None
    object_store: ObjectStoreSettings
    method: MethodType = MethodType.SUPERVISED
    hyperparameters: ResolvedHyperparameters
    initial_adapter_prefix: str | None = Field(
        default=None,
        description="Store folder of the adapter training starts from (a continued job): "
        "its weights are loaded, not initialised, and its configuration is the adapter's.",
    )
    adapter: Adapter = Field(default_factory=Adapter)
    strategy: Strategy = Strategy.DDP
    resources: Resources = Field(default_factory=Resources)
    checkpointing: Checkpointing = Field(default_factory=Checkpointing)
    seed: int = Field(ge=0, le=2_147_483_647)
    integrations: list[Integration] = Field(default_factory=list)
    max_seq_length: int = Field(ge=16)
    n_evals: int = Field(ge=0, description="Validations over the run (0: none).")
    n_train_examples: int = Field(ge=1)
    total_steps: int = Field(ge=1, description="Planned optimizer steps.")
    image: str | None = Field(default=None, description="Trainer image reference, recorded.")
    metrics_port: int | None = Field(
        default=DEFAULT_METRICS_PORT, ge=0, le=65535, description="Prometheus port on rank 0."
    )
    event_flush_seconds: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Longest time an event waits before the trainer writes it to the store "
        "(each flush is one object: S3 wants few; a local folder can take one a second).",
    )
    cpu_fallback: bool = Field(
        default=False,
        description="Train on the CPU when the job asks for GPUs and none is usable (local mode "
        "on a machine without one); otherwise such a job fails at once with an infrastructure "
        "error.",
    )
    stop_grace_seconds: float = Field(
        default=DEFAULT_STOP_GRACE_SECONDS,
        gt=0,
        description="Time the pod gives the trainer after SIGTERM (its "
        "terminationGracePeriodSeconds): torchrun's workers get most of it to commit their "
        "checkpoint.",
    )
    writer_lease_seconds: float = Field(
        default=60.0,
        ge=5,
        le=3600,
        description="Time to live of the lease the writing trainer holds on the job (renewed "
        "every third of it): how long a trainer of another replica waits after the holder "
        "crashed without releasing it. Keep it well above the hosts' clock skew.",
    )
    collective_timeout_seconds: int = Field(
        default=DEFAULT_COLLECTIVE_TIMEOUT_SECONDS,
        ge=60,
        description="Longest a rank waits in a collective (NCCL's watchdog) while another rank "
        "downloads the base model or uploads a checkpoint.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.method is MethodType.DPO) != (self.hyperparameters.beta is not None):
            raise ValueError("hyperparameters.beta is required for dpo and only for dpo")
        if self.validation_file is None and self.n_evals:
            raise ValueError("n_evals needs a validation file")
        return self


def parse_model_location(location: str) -> tuple[str | None, str | None]:
    """Split a catalogue ``path`` into ``(local path, object-store prefix)``."""
    if location.startswith(STORE_SCHEME):
        prefix = location[len(STORE_SCHEME) :].strip("/")
        if not prefix:
            raise ValueError(f"{location!r} names no object-store folder")
        return None, prefix + "/"
    return location, None


def build_trainer_config(
    job: FineTuneJob,
    settings: Settings,
    *,
    n_train_examples: int,
    image: str | None = None,
) -> TrainerConfig:
    """Resolve a FineTuneJob into the trainer's configuration (pure: no I/O).

    ``n_train_examples`` comes from the training file's validation report; it decides the
    "auto" epochs and batch size, as OpenAI documents. Raises :class:`ConfigError` (a
    ValueError) when the job's model is not in the catalogue, the catalogue does not say where
    its weights are, or an explicit batch size cannot be shared by the job's processes.
    """
    spec = job.spec
    base_name = spec.base_model
    entry = next((m for m in settings.models if m.id == base_name), None)
    if entry is None:
        raise ConfigError(f"model {base_name!r} is not in the catalogue", param="model")
    if entry.path is None:
        raise ConfigError(
            f"the catalogue does not say where the weights of {base_name!r} are", param="model"
        )
    _check_tracking(spec.integrations, settings)
    path, prefix = parse_model_location(entry.path)
    hp = resolve(
        spec.method.hyperparameters,
        method=spec.method.type,
        adapter=spec.adapter.type,
        n_examples=n_train_examples,
    )
    # resolve() fills every one of these; the asserts tell the type checker.
    assert hp.n_epochs is not None
    assert hp.batch_size is not None
    assert hp.learning_rate_multiplier is not None
    assert hp.warmup_ratio is not None
    assert hp.weight_decay is not None
    assert hp.max_grad_norm is not None
    assert hp.lr_scheduler_type is not None
    batch_size = _batch_for_world(
        spec.method.hyperparameters.batch_size, hp.batch_size, spec.resources
    )
    n_evals = 0
    if spec.validation_file is not None:
        n_evals = hp.n_evals if hp.n_evals is not None else hp.n_epochs
    max_len = min(hp.max_seq_length or entry.context_length, entry.context_length)
    job_id = job.metadata.name
    return TrainerConfig(
        job_id=job_id,
        org=spec.org,
        fine_tuned_model=fine_tuned_model_name(spec.model, spec.org, spec.suffix, job_id),
        base_model=BaseModelSource(
            name=base_name,
            path=path,
            store_prefix=prefix,
            context_length=entry.context_length,
            volume_claim=entry.volume_claim,
            cache_dir=MODEL_CACHE_DIR if entry.volume_claim and prefix else None,
        ),
        training_file=spec.training_file,
        validation_file=spec.validation_file,
        object_store=settings.object_store,
        method=spec.method.type,
        hyperparameters=ResolvedHyperparameters(
            n_epochs=hp.n_epochs,
            batch_size=batch_size,
            learning_rate_multiplier=hp.learning_rate_multiplier,
            learning_rate=BASE_LEARNING_RATE * hp.learning_rate_multiplier,
            warmup_ratio=hp.warmup_ratio,
            beta=hp.beta,
            weight_decay=hp.weight_decay,
            max_grad_norm=hp.max_grad_norm,
            lr_scheduler=hp.lr_scheduler_type,
            train_on_inputs=bool(hp.train_on_inputs),
            packing=bool(hp.packing),
            early_stopping_patience=hp.early_stopping_patience,
            early_stopping_threshold=hp.early_stopping_threshold or 0.0,
            use_best_checkpoint=bool(hp.use_best_checkpoint),
        ),
        initial_adapter_prefix=_initial_adapter_prefix(spec, settings),
        adapter=spec.adapter,
        strategy=spec.strategy,
        resources=spec.resources,
        checkpointing=spec.checkpointing,
        seed=spec.seed if spec.seed is not None else default_seed(job_id),
        integrations=spec.integrations,
        max_seq_length=max_len,
        n_evals=n_evals,
        n_train_examples=n_train_examples,
        total_steps=total_steps(n_train_examples, hp.n_epochs, batch_size),
        image=image,
    )


def _initial_adapter_prefix(spec: FineTuneJobSpec, settings: Settings) -> str | None:
    """Where the adapter a continued job starts from is stored (in the job's own org: the
    layout's keys are per org, so no spec can name another tenant's weights).
    """
    source = spec.continue_from
    if source is None:
        return None
    layout = settings.object_store.layout()
    if source.step is None:
        return layout.adapter_prefix(spec.org, source.job)
    return layout.checkpoint_prefix(spec.org, source.job, source.step)


def tracking_uri_error(integrations: list[Integration], settings: Settings) -> ConfigError | None:
    """The error of the first MLflow tracking URI this deployment does not allow, if any."""
    for index, integration in enumerate(integrations):
        uri = integration.mlflow.tracking_uri if integration.mlflow else None
        if uri is not None and not settings.tracking.mlflow_uri_allowed(uri):
            allowed = ", ".join(settings.tracking.mlflow_tracking_uris)
            return ConfigError(
                f"MLflow tracking URI {uri!r} is not allowed here; "
                + (f"allowed: {allowed}" if allowed else "leave it unset to use the deployment's")
                + ".",
                param=f"integrations[{index}].mlflow.tracking_uri",
                code="tracking_uri_not_allowed",
            )
    return None


def _check_tracking(integrations: list[Integration], settings: Settings) -> None:
    error = tracking_uri_error(integrations, settings)
    if error is not None:
        raise error


def world_size(resources: Resources) -> int:
    """Trainer processes of a job: one per GPU, or one per node on CPU."""
    return resources.nodes * max(1, resources.gpus_per_node)


def _batch_for_world(requested: int | None, resolved: int, resources: Resources) -> int:
    """The global batch, a multiple of the number of processes (each takes an equal share).

    An "auto" batch is rounded up; an explicit one that cannot be shared is refused.
    """
    world = world_size(resources)
    if requested is None:
        return -(-resolved // world) * world
    if requested % world:
        raise ConfigError(
            f"batch_size {requested} cannot be shared by {world} processes "
            f"({resources.nodes} nodes x {max(1, resources.gpus_per_node)}); "
            f"use a multiple of {world}",
            param="method.hyperparameters.batch_size",
        )
    return requested


def is_adapter(config: TrainerConfig) -> bool:
    """Whether the run trains a LoRA adapter (LoRA or QLoRA) rather than every weight."""
    return config.adapter.type is not AdapterType.FULL
