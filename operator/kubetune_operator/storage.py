"""Moved to :mod:`kubetune.job_inputs` (shared with the local executor); re-exported here."""

from __future__ import annotations

from kubetune.job_inputs import (
    TRAINING_FILE,
    VALIDATION_FILE,
    CheckedFile,
    EventLogReader,
    JobInputError,
    adapter_stored,
    check_file,
    check_files,
    load_config_text,
    resolve_trainer_config,
    store_config,
)

__all__ = [
    "TRAINING_FILE",
    "VALIDATION_FILE",
    "CheckedFile",
    "EventLogReader",
    "JobInputError",
    "adapter_stored",
    "check_file",
    "check_files",
    "load_config_text",
    "resolve_trainer_config",
    "store_config",
]
