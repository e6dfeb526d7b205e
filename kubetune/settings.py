"""All of kubetune's settings, in one pydantic-settings class (environment prefix ``KUBETUNE_``).

Nested groups are set with a double underscore, e.g. ``KUBETUNE_OBJECT_STORE__BUCKET=data``.
Credentials are never settings of a FineTuneJob: S3 keys come from the usual AWS environment or
workload identity, read by boto3 itself.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any, Final
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubetune.storage_layout import StorageLayout

DEFAULT_DATA_DIR: Final = Path.home() / ".local" / "share" / "kubetune"


class Mode(StrEnum):
    """Where jobs run: on Kubernetes (FineTuneJob resources) or in local subprocesses."""

    KUBERNETES = "kubernetes"
    LOCAL = "local"


class WorkloadKind(StrEnum):
    """What runs a job's trainer in a cluster: Kubeflow Trainer v2's TrainJob (on JobSet), or
    Training Operator 1.x's PyTorchJob (kept on its release-1.9 branch only).
    """

    TRAINJOB = "trainjob"
    PYTORCHJOB = "pytorchjob"


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
    connect_timeout_seconds: float = Field(
        default=3.0, gt=0, description="S3: longest wait for a connection."
    )
    read_timeout_seconds: float = Field(
        default=20.0, gt=0, description="S3: longest wait for the next bytes of a response."
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="S3: tries of a request, with the SDK's backoff in between. With the "
        "timeouts above this bounds how long an outage holds a request (the API then answers "
        "503 with Retry-After).",
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


# A base model's name becomes part of ``ft:<base>:<org>:…`` names and of URL paths: no colons
# (the separator), no spaces, nothing a URL would escape; "/" stays allowed for Hub-style ids.
BASE_MODEL_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,255}$"


class BaseModelEntry(BaseModel):
    """A base model users may fine-tune (the catalogue)."""

    id: str = Field(
        pattern=BASE_MODEL_ID_PATTERN,
        description="Name used in requests: letters, digits, '.', '_', '-', '/'; up to 256.",
    )
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
    volume_claim: str | None = Field(
        default=None,
        max_length=253,
        description="A PersistentVolumeClaim for the weights. With a local path: a ReadOnlyMany "
        "claim holding them, mounted read-only at that path in trainer (and vLLM) pods. With a "
        "'store:' path: a ReadWriteMany claim the trainers cache the download in, so a restart "
        "or the next job does not download the weights again.",
    )


_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def url_under(url: str, prefix: str) -> bool:
    """Whether ``url`` lies under ``prefix``: the same scheme, host and port (a default port
    spelt or not), a path inside the prefix's on a segment boundary, and no user info (which
    could make ``https://allowed@elsewhere`` look allowed).
    """
    try:
        got, want = urlsplit(url), urlsplit(prefix)
        got_port = got.port or _DEFAULT_PORTS.get(got.scheme.lower())
        want_port = want.port or _DEFAULT_PORTS.get(want.scheme.lower())
    except ValueError:  # a port that is not a number
        return False
    if got.username is not None or got.password is not None:
        return False
    if (got.scheme.lower(), got.hostname, got_port) != (
        want.scheme.lower(),
        want.hostname,
        want_port,
    ) or not got.hostname:
        return False
    base = want.path.rstrip("/")
    return got.path == base or got.path.startswith(base + "/") or not base


class TrackingSettings(BaseModel):
    """The experiment trackers a job may name: trainer pods call no server a tenant chose."""

    mlflow_tracking_uris: list[str] = Field(
        default_factory=list,
        description="MLflow servers a job may name in integrations[].mlflow.tracking_uri: URL "
        "prefixes (scheme, host and port must match; the path must lie under the entry's). "
        "Empty: a job names none, and trainers use the MLFLOW_TRACKING_URI of their "
        "environment.",
    )

    def mlflow_uri_allowed(self, uri: str) -> bool:
        """Whether a job may send its MLflow runs to ``uri``."""
        return any(url_under(uri, prefix) for prefix in self.mlflow_tracking_uris)


class QueueingSettings(BaseModel):
    """Admission through Kueue, and what a job may ask for.

    The API enforces the queue allow-list and the GPU caps before a job is created (clear 400
    and 429 errors); the job driver enforces the queued-time limit on every runtime.
    """

    kueue: bool = Field(
        default=False,
        description="The cluster runs Kueue with its TrainJob (or PyTorchJob) integration: a job "
        "with a queue is created suspended and started by Kueue's admission, never by the "
        "operator; pause and resume set the Kueue Workload's spec.active.",
    )
    default_queue: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
        description="Kueue LocalQueue of the jobs that name none.",
    )
    org_queues: dict[str, str] = Field(
        default_factory=dict,
        description="Org → its default LocalQueue (instead of default_queue).",
    )
    allowed_queues: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Org → the LocalQueues its jobs may name ('*': every org). An org may always "
        "use its default queue; a queue named by nobody's list is refused.",
    )
    max_gpus_per_job: int | None = Field(
        default=None, ge=1, description="Most GPUs (nodes times GPUs per node) one job may ask for."
    )
    max_gpus_per_org: int | None = Field(
        default=None,
        ge=1,
        description="Most GPUs an org's unfinished jobs may ask for together (429 beyond).",
    )
    gpu_types: list[str] = Field(
        default_factory=list,
        description="The gpu_type values a job may ask for (empty: any, matched by the node "
        "label).",
    )
    max_queued_seconds: float | None = Field(
        default=None,
        gt=0,
        description="A job that waits this long in queued without its trainer starting fails "
        "with queue_timeout (None: it waits as long as it takes).",
    )

    def default_queue_of(self, org: str) -> str | None:
        """The queue of an org's jobs that name none."""
        return self.org_queues.get(org, self.default_queue)

    def queue_allowed(self, org: str, queue: str) -> bool:
        """Whether an org's job may name ``queue``."""
        allowed = {*self.allowed_queues.get(org, ()), *self.allowed_queues.get("*", ())}
        return queue == self.default_queue_of(org) or queue in allowed


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
    sweep_interval_seconds: float = Field(
        default=600,
        ge=0,
        description="How often abandoned uploads and orphaned file bytes are swept (0: never).",
    )
    orphan_grace_seconds: int = Field(
        default=3600,
        ge=60,
        description="How long past its expiry an upload, or file bytes without metadata, are "
        "left alone before the sweep deletes them (longer than the slowest upload).",
    )


class Toleration(BaseModel):
    """A Kubernetes toleration (spot and GPU node pools are usually tainted)."""

    key: str | None = None
    operator: str = "Equal"
    value: str | None = None
    effect: str | None = None


class HardwareProfile(BaseModel):
    """A named pod overlay an admin defines and a job selects (``resources.profile``): what a
    trainer pod needs on one kind of node — RDMA/EFA devices, NCCL environment, a Multus network
    annotation, affinity, tolerations, a runtime class, extra volumes.

    Applied to the trainer pods of both runtimes. Everything here is trusted configuration
    (Helm values), never user input; profiles that add capabilities or host volumes need a
    namespace above the restricted Pod Security level (docs/helm-gpu.md). Keys may be written
    as Kubernetes writes them (``nodeSelector``, ``runtimeClassName``, ``volumeMounts``).
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    name: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40, description="What jobs name."
    )
    description: str = Field(default="", max_length=512, description="Shown to admins.")
    orgs: list[str] = Field(
        default_factory=list, description="Orgs that may select it (empty: every org)."
    )
    resources: dict[str, str] = Field(
        default_factory=dict,
        description="Extra resources per pod, as requests and limits (e.g. "
        "{'vpc.amazonaws.com/efa': '32'} or {'rdma/rdma_shared_device_a': '1'}).",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Trainer environment (e.g. NCCL_IB_HCA, FI_PROVIDER)."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Pod labels.")
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Pod annotations (e.g. k8s.v1.cni.cncf.io/networks)."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Added node labels.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Added tolerations.")
    affinity: dict[str, Any] | None = Field(default=None, description="Pod affinity (whole).")
    runtime_class_name: str | None = Field(
        default=None,
        max_length=253,
        description="Pod runtimeClassName. TrainJobs get it from the chart's per-profile "
        "ClusterTrainingRuntime (<training runtime>-<profile>): a runtime patch cannot set it.",
    )
    capabilities: list[str] = Field(
        default_factory=list, description="Capabilities added to the trainer (e.g. IPC_LOCK)."
    )
    volumes: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra pod volumes (Kubernetes Volume objects)."
    )
    volume_mounts: list[dict[str, Any]] = Field(
        default_factory=list, description="Where the trainer mounts them (VolumeMount objects)."
    )

    def allows(self, org: str) -> bool:
        """Whether ``org``'s jobs may select this profile."""
        return not self.orgs or org in self.orgs


class OperatorSettings(BaseModel):
    """How the operator turns FineTuneJobs into TrainJobs or PyTorchJobs."""

    runtime: WorkloadKind = Field(
        default=WorkloadKind.TRAINJOB,
        description="trainjob: Kubeflow Trainer v2 TrainJobs (the chart ships their "
        "ClusterTrainingRuntime); pytorchjob: Training Operator 1.x PyTorchJobs.",
    )
    training_runtime: str = Field(
        default="kubetune-trainer",
        min_length=1,
        max_length=253,
        description="The ClusterTrainingRuntime every TrainJob references (the chart's).",
    )

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
    hardware_profiles: list[HardwareProfile] = Field(
        default_factory=list,
        description="Pod overlays jobs select by name (JSON in "
        "KUBETUNE_OPERATOR__HARDWARE_PROFILES; the API checks the names too).",
    )
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
    collective_timeout_seconds: int = Field(
        default=3600,
        ge=60,
        description="Longest a trainer rank waits in a collective (NCCL's watchdog) while "
        "another downloads the base model or uploads a checkpoint.",
    )
    writer_lease_seconds: int = Field(
        default=60,
        ge=5,
        le=3600,
        description="Time to live of the writer lease a trainer holds on its job: how long a "
        "trainer on another node waits after the holder crashed without releasing it.",
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
    max_reconcile_failures: int = Field(
        default=20,
        ge=1,
        description="Consecutive failed passes over one job (retried with backoff up to a "
        "minute) after which it fails with reconcile_failed instead of retrying forever.",
    )
    scheduler_name: str | None = Field(
        default=None,
        description="Scheduler of PyTorchJob pods that gang-schedules them (volcano, or the "
        "scheduler-plugins scheduler); the job then asks for all its pods at once "
        "(runPolicy.schedulingPolicy.minAvailable).",
    )
    scratch_size: str = Field(
        default="50Gi",
        description="Size limit and ephemeral-storage request of a trainer's scratch emptyDir "
        "(downloaded weights, checkpoints being written).",
    )

    peering: str | None = Field(
        default=None,
        description="kopf peering object (KopfPeering in the namespace): replicas pause for the "
        "one with the highest priority. None: standalone, for exactly one replica.",
    )
    peering_priority: int | None = Field(
        default=None, description="This replica's peering priority (None: a random one)."
    )

    def hardware_profile(self, name: str | None) -> HardwareProfile | None:
        """The profile called ``name`` (None for None or an unknown name)."""
        return next((p for p in self.hardware_profiles if p.name == name), None)


class StaticWebhookEndpoint(BaseModel):
    """A webhook endpoint configured by the cluster's operators (Helm values, from a Secret)."""

    org: str = Field(min_length=1, max_length=63, description="The org whose events it gets.")
    url: str = Field(min_length=1, max_length=2048, description="Where events are POSTed.")
    secret: SecretStr = Field(description="Signing secret, whsec_<base64>.")
    event_types: list[str] | None = Field(
        default=None, description="Event types to send (None: every fine_tuning.job event)."
    )


class WebhookSettings(BaseModel):
    """Webhooks as OpenAI sends them (see kubetune/webhooks.py and docs/webhooks.md)."""

    enabled: bool = Field(default=True, description="Enqueue and send webhook events.")
    max_attempts: int = Field(default=10, ge=1, le=100, description="Tries per delivery.")
    backoff_base_seconds: float = Field(
        default=5.0, gt=0, description="Delay after the first failed try (doubled each time)."
    )
    backoff_cap_seconds: float = Field(default=3600.0, gt=0, description="Longest delay.")
    timeout_seconds: float = Field(default=10.0, gt=0, description="Timeout of one POST.")
    poll_seconds: float = Field(default=2.0, gt=0, description="How often the outbox is read.")
    concurrency: int = Field(default=4, ge=1, le=64, description="Deliveries at once.")
    allow_insecure_targets: bool = Field(
        default=False, description="Accept http:// endpoint URLs (tests, trusted networks)."
    )
    allow_private_targets: bool = Field(
        default=False,
        description="Accept endpoints on loopback, private or link-local addresses (SSRF guard).",
    )
    max_endpoints_per_org: int = Field(default=10, ge=1, description="Endpoints an org may add.")
    sweep_hours: float = Field(
        default=24.0,
        ge=0,
        description="At start, the sender queues the events of jobs finished this recently "
        "that no event was queued for (a process stopped in between).",
    )
    delivered_retention_hours: float = Field(
        default=168.0,
        gt=0,
        description="How long a delivery's marker is kept (the sender prunes older ones). An "
        "event of a job that finished longer ago than this is never queued again, so a pruned "
        "marker cannot let a replay send it twice; keep it above sweep_hours.",
    )
    endpoints: list[StaticWebhookEndpoint] = Field(
        default_factory=list,
        description="Endpoints from configuration (JSON in KUBETUNE_WEBHOOKS__ENDPOINTS).",
    )


class ServingSettings(BaseModel):
    """Serving adapters on vLLM: the adapter-sync sidecar's settings and the operator's sync.

    vLLM's ``--max-loras`` bounds the adapters one batch may use, not how many are registered
    (vLLM keeps ``--max-cpu-loras`` of them in memory and reloads others from their folder), so
    it is reported, never used to refuse a registration.
    """

    base_model: str | None = Field(
        default=None, description="Catalogue id of the model the sidecar's vLLM serves."
    )
    adapter_dir: Path = Field(
        default=Path("/adapters"), description="Folder shared with vLLM that adapters land in."
    )
    vllm_model: str | None = Field(
        default=None,
        description="vLLM's --model, written into adapter_config.json base_model_name_or_path "
        "(vLLM's filesystem resolver compares them).",
    )
    vllm_url: str = Field(
        default="http://127.0.0.1:8000", description="Base URL of the sidecar's vLLM (no /v1)."
    )
    adapter_sync_host: str = Field(
        default="127.0.0.1", description="Address the adapter-sync sidecar listens on."
    )
    adapter_sync_port: int = Field(
        default=8081, ge=0, le=65535, description="Port of the adapter-sync sidecar."
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Port where the sidecar serves vLLM's /metrics and nothing else, so "
        "Prometheus never needs vLLM's own port (None: not served).",
    )
    max_lora_rank: int = Field(
        default=16, description="vLLM's --max-lora-rank: adapters of a larger rank are refused."
    )
    max_loras: int = Field(
        default=4, ge=1, description="vLLM's --max-loras (adapters in one batch; reported only)."
    )
    sync_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Longest time between two syncs of a vLLM replica's adapters by the operator "
        "(a change of the desired set is synced at once).",
    )
    request_timeout_seconds: float = Field(
        default=120.0, gt=0, description="Timeout of one call to vLLM or to a sidecar."
    )
    checkpoint_slots: int = Field(
        default=4,
        ge=0,
        le=64,
        description="Checkpoint models (ft:…:ckpt-step-N) each vLLM replica serves at once, "
        "loaded when first asked for; the least recently used is unloaded to make room. 0: "
        "checkpoints are not served.",
    )
    checkpoint_load_seconds: float = Field(
        default=90.0,
        gt=0,
        description="How long the API's inference proxy waits for a checkpoint's model to be "
        "loaded before it answers 503 (retry later).",
    )
    vllm_api_key: SecretStr | None = Field(
        default=None,
        description="vLLM's API key (its --api-key / VLLM_API_KEY): sent as a bearer token by "
        "the API's inference proxy and by the adapter-sync sidecar, so nothing else on the "
        "network may load adapters or run inference on vLLM.",
    )
    vllm_urls: dict[str, str] = Field(
        default_factory=dict,
        description="Base model id → base URL of the vLLM deployment serving it (the API's "
        "inference proxy).",
    )


class ModelRegistrySettings(BaseModel):
    """Where the base models an org's admin registers at run time may be read from.

    On a cluster a registered model's folder is read by trainer pods (and the check's), so a
    tenant must not point them at another team's weights or at the image's own files: the
    platform's administrators name the places. Local mode is one user's machine: any folder.
    """

    allowed_paths: list[str] = Field(
        default_factory=list,
        description="Folders (absolute, as mounted in trainer pods) and 'store:<prefix>' "
        "object-store prefixes a registered model's path must lie under. Empty: registering "
        "is off in cluster mode (local mode takes any folder of its machine).",
    )
    allowed_volume_claims: list[str] = Field(
        default_factory=list,
        description="PersistentVolumeClaims a registered model may name (mounted read-only at "
        "its path). Empty: none.",
    )

    def path_allowed(self, path: str) -> bool:
        """Whether ``path`` lies under one of the allowed folders or prefixes (on a segment
        boundary; no ``..``).
        """
        if ".." in PurePosixPath(path.removeprefix("store:")).parts:
            return False
        for allowed in self.allowed_paths:
            base = allowed.rstrip("/")
            if path == base or path.startswith(base + "/"):
                return True
        return False


class LocalSettings(BaseModel):
    """Local mode's job runner (``python -m kubetune_local``): trainers as subprocesses."""

    max_running_jobs: int = Field(default=1, ge=1, description="Trainers running at once.")
    poll_seconds: float = Field(default=1.0, gt=0, description="How often jobs are looked at.")
    progress_seconds: float = Field(
        default=2.0, gt=0, description="How often a running job's trainer events are read."
    )
    trainer_grace_seconds: float = Field(
        default=120.0, gt=0, description="Time a trainer gets after SIGTERM to commit."
    )
    backoff_limit: int = Field(
        default=3, ge=0, description="Relaunches after retryable trainer exits before failing."
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
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)
    queueing: QueueingSettings = Field(default_factory=QueueingSettings)
    model_registry: ModelRegistrySettings = Field(default_factory=ModelRegistrySettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    models: list[BaseModelEntry] = Field(
        default_factory=list, description="The base-model catalogue (JSON in KUBETUNE_MODELS)."
    )

    def store_root(self) -> Path:
        """Folder of the local object-store backend."""
        return self.object_store.local_root or self.data_dir / "store"
