"""The Prometheus metrics every kubetune process exports, declared in one place.

The API's metrics live in ``kubetune_api.metrics`` (it exports them today). The operator and
the trainer export the metrics declared here: their code creates its ``prometheus_client``
objects from these declarations (name, type, help, labels), and the Helm chart's dashboards
and alerts (``charts/kubetune``) use only names declared here or exported by the API. A test
(``tests/chart/test_observability.py``) parses every PromQL expression of the chart and fails
on a name that is neither.

Pure Python: no ``prometheus_client`` import, so the contract stays importable everywhere.

Label names: the trainer's per-job label is ``job_id``, not ``job`` — Prometheus sets ``job``
to the scrape job on every series, and a metric's own ``job`` label would be renamed to
``exported_job``. ``base_model`` is the catalogue id of a base model, which is also vLLM's
served model name (its metrics' ``model_name``); ``replica`` is a vLLM pod's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class MetricType(StrEnum):
    """The Prometheus metric types kubetune uses."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its full name (counters end in ``_total``), type, help text and labels."""

    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()

    def sample_names(self) -> frozenset[str]:
        """The series names this metric appears as on ``/metrics`` and in PromQL."""
        if self.type is MetricType.HISTOGRAM:
            return frozenset(f"{self.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        return frozenset({self.name})


# Ports (also the chart's defaults; a chart test checks they agree).
API_PORT: Final = 8000
OPERATOR_METRICS_PORT: Final = 8080
ADAPTER_SYNC_PORT: Final = 8081
TRAINER_METRICS_PORT: Final = 9400
VLLM_PORT: Final = 8000

#: Phases as the ``phase`` label carries them: the values of ``kubetune.finetunejob.JobPhase``.
PHASE_LABEL: Final = "phase"
#: The tenant a job belongs to (``spec.org``): what usage is charged to.
ORG_LABEL: Final = "org"

# ---------------------------------------------------------------------------------------------
# Operator (``python -m kubetune_operator``, metrics on OPERATOR_METRICS_PORT at /metrics)
# ---------------------------------------------------------------------------------------------
OPERATOR_JOBS = MetricSpec(
    "kubetune_operator_jobs",
    MetricType.GAUGE,
    "FineTuneJobs in the watched namespace, by lifecycle phase.",
    (PHASE_LABEL,),
)
OPERATOR_JOBS_FINISHED = MetricSpec(
    "kubetune_operator_jobs_finished_total",
    MetricType.COUNTER,
    "Jobs that reached a terminal phase (succeeded, failed, cancelled), by org and that phase.",
    (ORG_LABEL, PHASE_LABEL),
)
OPERATOR_GPU_SECONDS = MetricSpec(
    "kubetune_operator_gpu_seconds_total",
    MetricType.COUNTER,
    "GPU-seconds the jobs' workers held (running or pausing, times the GPUs asked for), by "
    "org; a run is counted when it ends (a pause, a preemption, the end of the job).",
    (ORG_LABEL,),
)
OPERATOR_TRAINED_TOKENS = MetricSpec(
    "kubetune_operator_trained_tokens_total",
    MetricType.COUNTER,
    "Tokens trained by the jobs that finished (their trained_tokens), by org.",
    (ORG_LABEL,),
)
OPERATOR_GPUS_IN_USE = MetricSpec(
    "kubetune_operator_gpus_in_use",
    MetricType.GAUGE,
    "GPUs held now by the workers of running or pausing jobs, by org.",
    (ORG_LABEL,),
)
OPERATOR_QUEUE_WAIT = MetricSpec(
    "kubetune_operator_queue_wait_seconds",
    MetricType.HISTOGRAM,
    "Time from a job's creation until its trainer started running.",
)
OPERATOR_QUEUE_OLDEST = MetricSpec(
    "kubetune_operator_queue_oldest_seconds",
    MetricType.GAUGE,
    "Age of the longest-waiting job still queued (0 when none is queued).",
)
OPERATOR_RUN_SECONDS = MetricSpec(
    "kubetune_operator_run_seconds",
    MetricType.HISTOGRAM,
    "Running time of finished jobs, from start of training to a terminal phase, by phase.",
    (PHASE_LABEL,),
)
OPERATOR_RECONCILE_ERRORS = MetricSpec(
    "kubetune_operator_reconcile_errors_total",
    MetricType.COUNTER,
    "Reconcile handler failures, by handler.",
    ("handler",),
)
OPERATOR_ADAPTER_REGISTRATION_SECONDS = MetricSpec(
    "kubetune_operator_adapter_registration_seconds",
    MetricType.HISTOGRAM,
    "Time to register one adapter on one vLLM replica (download to its volume + load).",
    ("base_model",),
)
OPERATOR_ADAPTER_REGISTRATIONS = MetricSpec(
    "kubetune_operator_adapter_registrations_total",
    MetricType.COUNTER,
    "Adapter registrations on vLLM replicas, by base model and result (success or failure).",
    ("base_model", "result"),
)
OPERATOR_ADAPTERS_LOADED = MetricSpec(
    "kubetune_operator_adapters_loaded",
    MetricType.GAUGE,
    "Adapters loaded on each ready vLLM replica (pod name), by base model.",
    ("replica", "base_model"),
)

# ---------------------------------------------------------------------------------------------
# Trainer (rank 0 of each job, metrics on TRAINER_METRICS_PORT at /metrics; one series per job)
# ---------------------------------------------------------------------------------------------
TRAINER_LABELS: Final = ("job_id",)
TRAINER_STEP = MetricSpec(
    "kubetune_trainer_step", MetricType.GAUGE, "Last optimizer step.", TRAINER_LABELS
)
TRAINER_TOTAL_STEPS = MetricSpec(
    "kubetune_trainer_total_steps", MetricType.GAUGE, "Planned optimizer steps.", TRAINER_LABELS
)
TRAINER_TRAIN_LOSS = MetricSpec(
    "kubetune_trainer_train_loss",
    MetricType.GAUGE,
    "Training loss of the last step.",
    TRAINER_LABELS,
)
TRAINER_VALID_LOSS = MetricSpec(
    "kubetune_trainer_valid_loss",
    MetricType.GAUGE,
    "Last validation loss (absent without a validation file).",
    TRAINER_LABELS,
)
TRAINER_VALID_ACCURACY = MetricSpec(
    "kubetune_trainer_valid_mean_token_accuracy",
    MetricType.GAUGE,
    "Last validation token accuracy (absent without a validation file).",
    TRAINER_LABELS,
)
TRAINER_LEARNING_RATE = MetricSpec(
    "kubetune_trainer_learning_rate",
    MetricType.GAUGE,
    "Learning rate of the last step.",
    TRAINER_LABELS,
)
TRAINER_GRAD_NORM = MetricSpec(
    "kubetune_trainer_grad_norm", MetricType.GAUGE, "Gradient norm before clipping.", TRAINER_LABELS
)
TRAINER_TOKENS_PER_SECOND = MetricSpec(
    "kubetune_trainer_tokens_per_second",
    MetricType.GAUGE,
    "Trained tokens per second over the last logging interval, all ranks together.",
    TRAINER_LABELS,
)
TRAINER_MFU = MetricSpec(
    "kubetune_trainer_mfu",
    MetricType.GAUGE,
    "Model FLOPs utilization, 0 to 1 (GPU only).",
    TRAINER_LABELS,
)
TRAINER_MEMORY_BYTES = MetricSpec(
    "kubetune_trainer_memory_bytes",
    MetricType.GAUGE,
    "Peak memory of rank 0: GPU memory allocated (the process' RSS on CPU).",
    TRAINER_LABELS,
)
TRAINER_CHECKPOINTS = MetricSpec(
    "kubetune_trainer_checkpoints_total",
    MetricType.COUNTER,
    "Checkpoints committed (with their manifest).",
    TRAINER_LABELS,
)

OPERATOR_METRICS: Final = (
    OPERATOR_JOBS,
    OPERATOR_JOBS_FINISHED,
    OPERATOR_GPU_SECONDS,
    OPERATOR_TRAINED_TOKENS,
    OPERATOR_GPUS_IN_USE,
    OPERATOR_QUEUE_WAIT,
    OPERATOR_QUEUE_OLDEST,
    OPERATOR_RUN_SECONDS,
    OPERATOR_RECONCILE_ERRORS,
    OPERATOR_ADAPTER_REGISTRATION_SECONDS,
    OPERATOR_ADAPTER_REGISTRATIONS,
    OPERATOR_ADAPTERS_LOADED,
)
TRAINER_METRICS: Final = (
    TRAINER_STEP,
    TRAINER_TOTAL_STEPS,
    TRAINER_TRAIN_LOSS,
    TRAINER_VALID_LOSS,
    TRAINER_VALID_ACCURACY,
    TRAINER_LEARNING_RATE,
    TRAINER_GRAD_NORM,
    TRAINER_TOKENS_PER_SECOND,
    TRAINER_MFU,
    TRAINER_MEMORY_BYTES,
    TRAINER_CHECKPOINTS,
)
ALL_METRICS: Final = OPERATOR_METRICS + TRAINER_METRICS


def sample_name_index() -> dict[str, MetricSpec]:
    """Every series name (``_bucket``/``_sum``/``_count`` for histograms) to its metric."""
    return {sample: spec for spec in ALL_METRICS for sample in spec.sample_names()}
