"""All of kubetune's settings, in one pydantic-settings class (environment prefix ``KUBETUNE_``).

Nested groups are set with a double underscore, e.g. ``KUBETUNE_OBJECT_STORE__BUCKET=data``.
Credentials are never settings of a FineTuneJob: S3 keys come from the usual AWS environment or
workload identity, read by boto3 itself.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Final

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubetune.storage_layout import StorageLayout

DEFAULT_DATA_DIR: Final = Path.home() / ".local" / "share" / "kubetune"


class Mode(StrEnum):
    """Where jobs run: on Kubernetes (FineTuneJob resources) or in local subprocesses."""

    KUBERNETES = "kubernetes"
    LOCAL = "local"


class ObjectStoreBackend(StrEnum):
    """Where files, events, checkpoints and adapters are stored."""

    S3 = "s3"
    LOCAL = "local"


class ObjectStoreSettings(BaseModel):
    """The object store every component shares."""

    backend: ObjectStoreBackend = Field(
        default=ObjectStoreBackend.LOCAL, description="s3, or a local folder."
    )
    bucket: str = Field(default="kubetune", min_length=3, max_length=63, description="S3 bucket.")
    prefix: str = Field(default="", max_length=256, description="Key prefix inside the bucket.")
    endpoint_url: str | None = Field(
        default=None, description="S3 endpoint for non-AWS stores (MinIO, Ceph, moto)."
    )
    region: str | None = Field(default=None, description="S3 region.")
    local_root: Path | None = Field(
        default=None, description="Folder for the local backend (default: <data_dir>/store)."
    )

    def layout(self) -> StorageLayout:
        """The key builder for this store's prefix."""
        return StorageLayout(prefix=self.prefix)


class KubernetesSettings(BaseModel):
    """How the API and operator reach the cluster."""

    namespace: str = Field(default="kubetune", description="Namespace of FineTuneJobs.")
    kubeconfig: Path | None = Field(
        default=None, description="Kubeconfig file; unset means in-cluster configuration."
    )


class LimitSettings(BaseModel):
    """Sizes and counts that protect the service from one tenant's excess."""

    max_file_bytes: int = Field(default=1 << 30, ge=1, description="Largest uploaded file.")
    max_line_bytes: int = Field(default=8 << 20, ge=1024, description="Longest JSONL line.")
    max_files_per_org: int = Field(default=1000, ge=1, description="Files an org may keep.")
    max_active_jobs_per_org: int = Field(
        default=20, ge=1, description="Jobs an org may have not yet finished."
    )
    min_examples: int = Field(default=10, ge=1, description="Fewest examples in a training file.")


class BaseModelEntry(BaseModel):
    """A base model users may fine-tune (the catalogue)."""

    id: str = Field(min_length=1, max_length=256, description="Name used in requests.")
    owned_by: str = Field(default="kubetune", description="Shown in /v1/models.")
    created: int = Field(default=0, ge=0, description="Unix time shown in /v1/models.")
    tokenizer: Path | None = Field(
        default=None,
        description="Folder or tokenizer.json of the model's tokenizer, for token counts.",
    )
    context_length: int = Field(default=4096, ge=16, description="Longest sequence in tokens.")
    path: str | None = Field(
        default=None,
        max_length=1024,
        description="Where the trainer finds the model's Hugging Face weights and tokenizer: a "
        "local folder (e.g. a volume mounted in the trainer pod), or 'store:<key prefix>' for a "
        "folder in the shared object store.",
    )


class ApiSettings(BaseModel):
    """The HTTP API."""

    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    api_keys_file: Path | None = Field(
        default=None,
        description="JSON list of {name, org, role, sha256} (or {key, …}); keys are stored hashed.",
    )
    requests_per_minute: int = Field(default=600, ge=1, description="Per-org request budget.")
    max_json_body_bytes: int = Field(default=1 << 20, ge=1024, description="Largest JSON body.")
    max_page_size: int = Field(default=100, ge=1, description="Largest list page for jobs.")


class Toleration(BaseModel):
    """A Kubernetes toleration (spot and GPU node pools are usually tainted)."""

    key: str | None = None
    operator: str = "Equal"
    value: str | None = None
    effect: str | None = None


class OperatorSettings(BaseModel):
    """How the operator turns FineTuneJobs into PyTorchJobs."""

    trainer_image: str = Field(
        default="ghcr.io/kubetune/trainer:0.1.0", description="Image of the trainer pods."
    )
    image_pull_policy: str = Field(default="IfNotPresent", description="For the trainer image.")
    service_account: str | None = Field(
        default=None,
        description="ServiceAccount of trainer pods (workload identity for the object store).",
    )
    credentials_secret: str | None = Field(
        default=None,
        description="Secret whose keys become the trainer's environment (e.g. AWS keys, "
        "WANDB_API_KEY); never copied into a FineTuneJob.",
    )
    gpu_resource: str = Field(default="nvidia.com/gpu", description="Extended resource name.")
    gpu_type_label: str = Field(
        default="nvidia.com/gpu.product",
        description="Node label matched against spec.resources.gpuType.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node selector for trainer pods (e.g. a spot pool)."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations for trainer pods."
    )
    priority_class: str | None = Field(default=None, description="PriorityClass of trainers.")
    backoff_limit: int = Field(
        default=6, ge=0, description="Pod restarts before the PyTorchJob fails."
    )
    active_deadline_seconds: int | None = Field(
        default=7 * 24 * 3600, ge=60, description="Longest a job may run."
    )
    termination_grace_seconds: int = Field(
        default=600,
        ge=30,
        description="Time a trainer gets after SIGTERM to commit its checkpoint.",
    )
    master_port: int = Field(default=23456, ge=1, le=65535, description="torchrun rendezvous.")
    cpu_request: str = Field(default="4", description="CPU request per trainer pod.")
    memory_request: str = Field(default="32Gi", description="Memory request per trainer pod.")
    shm_size: str = Field(default="16Gi", description="Size of /dev/shm (NCCL, dataloaders).")
    trainer_metrics_port: int | None = Field(
        default=9400,
        ge=0,
        le=65535,
        description="Prometheus port of the trainer's rank 0, written into each trainer config "
        "(0: any free port, for hosts that run several trainers; None: no endpoint).",
    )
    metrics_port: int = Field(
        default=8080, ge=0, le=65535, description="Port of the operator's /metrics and /healthz."
    )
    metrics_host: str = Field(default="0.0.0.0", description="Address /metrics listens on.")  # noqa: S104 - scraped from other pods
    reconcile_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Longest time between two reconciles of an active job (changes of the job "
        "or its PyTorchJob are reconciled at once).",
    )
    progress_seconds: float = Field(
        default=15.0, gt=0, description="How often a running job's trainer events are read."
    )
    peering: str | None = Field(
        default=None,
        description="kopf peering object (KopfPeering in the namespace): replicas pause for the "
        "one with the highest priority. None: standalone, for exactly one replica.",
    )
    peering_priority: int | None = Field(
        default=None, description="This replica's peering priority (None: a random one)."
    )


class Settings(BaseSettings):
    """kubetune's settings, read from ``KUBETUNE_*`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="KUBETUNE_", env_nested_delimiter="__", extra="ignore"
    )

    mode: Mode = Field(default=Mode.LOCAL, description="kubernetes or local.")
    data_dir: Path = Field(default=DEFAULT_DATA_DIR, description="Local state (local mode).")
    object_store: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    operator: OperatorSettings = Field(default_factory=OperatorSettings)
    models: list[BaseModelEntry] = Field(
        default_factory=list, description="The base-model catalogue (JSON in KUBETUNE_MODELS)."
    )

    def store_root(self) -> Path:
        """Folder of the local object-store backend."""
        return self.object_store.local_root or self.data_dir / "store"
