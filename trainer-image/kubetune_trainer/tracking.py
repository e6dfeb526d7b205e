"""W&B and MLflow through transformers' own integrations, configured by environment.

transformers' ``WandbCallback`` and ``MLflowCallback`` (selected by ``report_to``) read their
settings from the environment, so this only translates the job's integration blocks. Without
a ``WANDB_API_KEY`` W&B runs offline (files under the work folder, syncable later); MLflow
logs to the job's ``tracking_uri``, else to ``MLFLOW_TRACKING_URI`` from the pod's environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from kubetune.trainer_config import TrainerConfig


def configure_tracking(config: TrainerConfig, workdir: Path) -> None:
    """Set the environment transformers' tracking callbacks read."""
    for integration in config.integrations:
        if integration.wandb is not None:
            wandb = integration.wandb
            os.environ["WANDB_PROJECT"] = wandb.project
            if wandb.entity:
                os.environ["WANDB_ENTITY"] = wandb.entity
            if wandb.tags:
                os.environ["WANDB_TAGS"] = ",".join(wandb.tags)
            if "WANDB_API_KEY" not in os.environ:
                os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_DIR", str(workdir))
            os.environ.setdefault("WANDB_RUN_ID", config.job_id)  # a restart continues the run
            os.environ.setdefault("WANDB_RESUME", "allow")
        if integration.mlflow is not None:
            mlflow = integration.mlflow
            os.environ["MLFLOW_EXPERIMENT_NAME"] = mlflow.experiment
            if mlflow.tracking_uri:
                os.environ["MLFLOW_TRACKING_URI"] = mlflow.tracking_uri
            os.environ.setdefault("MLFLOW_FLATTEN_PARAMS", "1")
