"""Metadata of uploaded files, stored beside each file in the object store.

The metadata object is written only after the file's bytes are completely stored (and
validated): its presence is what makes a file exist. The operator reads it to check a job's
files before training, the API to answer ``/v1/files``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class FileStatus(StrEnum):
    """OpenAI's (deprecated but still returned) file status."""

    UPLOADED = "uploaded"
    PROCESSED = "processed"
    ERROR = "error"


class FilePurpose(StrEnum):
    """Purposes kubetune stores: uploads for fine-tuning and the results it writes."""

    FINE_TUNE = "fine-tune"
    FINE_TUNE_RESULTS = "fine-tune-results"


class FileMeta(BaseModel):
    """Everything known about a stored file."""

    model_config = ConfigDict(extra="ignore")

    id: str
    org: str
    filename: str
    purpose: FilePurpose
    bytes: int = Field(ge=0)
    created_at: int
    sha256: str
    status: FileStatus = FileStatus.PROCESSED
    status_details: str | None = None
    # Where the bytes are, when not at the usual files/<id> key (e.g. a job's results.csv).
    object_key: str | None = None
    # The validation report (format, example/token counts, duplicates, warnings).
    stats: dict[str, Any] = Field(default_factory=dict)
    # Whose tokenizer counted ``stats["n_tokens"]`` (None: not counted).
    tokens_model: str | None = None
    job_id: str | None = None
