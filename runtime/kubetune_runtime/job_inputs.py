"""What an executor (the operator, or local mode's executor) reads and writes in the object
store for a job: file checks, the trainer config, the trainer's events and the final adapter's
manifest.

Every call here is blocking I/O; async callers run it in worker threads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from pydantic import ValidationError

from kubetune.events import JobEvent, decode_chunk
from kubetune.files import FileMeta, FilePurpose, FileStatus
from kubetune.finetunejob import FineTuneJob, FineTuneJobSpec, JobError, MethodType
from kubetune.settings import Settings
from kubetune.storage_layout import StorageLayout
from kubetune.trainer_config import ConfigError, TrainerConfig, build_trainer_config
from kubetune_runtime.datasets import (
    DatasetFormat,
    format_for_method,
    format_mismatch_message,
    validate_jsonl,
)
from kubetune_runtime.objectstore import ObjectNotFound, ObjectStore
from kubetune_runtime.reconcile import user_error

log = logging.getLogger(__name__)

TRAINING_FILE: Final = "training_file"
VALIDATION_FILE: Final = "validation_file"


class JobInputError(Exception):
    """The job's input is wrong and the user must fix it: permanent, never retried.

    The executor's pass turns it into a failed status with a user error.
    """

    def __init__(self, error: JobError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True)
class CheckedFile:
    """A file that passed the checks, with what the trainer config needs from it."""

    file_id: str
    n_examples: int
    format: DatasetFormat


def _chunks(store: ObjectStore, key: str) -> Iterator[bytes]:
    with store.open_stream(key) as reader:
        yield from reader


def check_file(
    store: ObjectStore,
    layout: StorageLayout,
    org: str,
    file_id: str,
    *,
    param: str,
    method: MethodType,
    min_examples: int,
) -> CheckedFile:
    """Check one of a job's files the way the API does before it creates a job.

    A file exists when its metadata does (the API writes it after the bytes). Its validation
    report gives the format and example count; a file whose metadata carries no report (written
    by another tool) is validated here, streaming, in constant memory.
    """
    try:
        raw = store.get_json(layout.file_meta_key(org, file_id))
        meta = FileMeta.model_validate(raw)
    except ObjectNotFound:
        raise JobInputError(
            user_error("invalid_file", f"invalid {param}: {file_id} does not exist", param)
        ) from None
    except ValidationError as exc:
        raise JobInputError(
            user_error("invalid_file", f"invalid {param}: unreadable metadata: {exc}", param)
        ) from None
    if meta.purpose is not FilePurpose.FINE_TUNE:
        raise JobInputError(
            user_error(
                "invalid_file",
                f"invalid {param}: {file_id} has purpose '{meta.purpose.value}', not 'fine-tune'",
                param,
            )
        )
    if meta.status is FileStatus.ERROR:
        detail = meta.status_details or "it failed validation"
        raise JobInputError(user_error("invalid_file", f"invalid {param}: {detail}", param))
    found = meta.stats.get("format")
    n_examples = meta.stats.get("n_examples")
    if found is None or n_examples is None:
        report = validate_jsonl(
            _chunks(store, meta.object_key or layout.file_key(org, file_id)),
            expected=format_for_method(method),
            min_examples=min_examples,
        )
        if not report.valid or report.format is None:
            raise JobInputError(
                user_error(
                    "invalid_file_format", f"invalid {param}: {report.error_message()}", param
                )
            )
        found, n_examples = report.format.value, report.n_examples
    fmt = DatasetFormat(found)
    mismatch = format_mismatch_message(fmt, method)
    if mismatch:
        raise JobInputError(
            user_error("invalid_file_format", f"invalid {param}: {mismatch}", param)
        )
    if int(n_examples) < 1:
        raise JobInputError(
            user_error("invalid_file_format", f"invalid {param}: it holds no example", param)
        )
    return CheckedFile(file_id=file_id, n_examples=int(n_examples), format=fmt)


def check_files(
    store: ObjectStore, layout: StorageLayout, spec: FineTuneJobSpec, *, min_examples: int
) -> CheckedFile:
    """Check the training file and, if given, the validation file; return the training file."""
    training = check_file(
        store,
        layout,
        spec.org,
        spec.training_file,
        param=TRAINING_FILE,
        method=spec.method.type,
        min_examples=min_examples,
    )
    if spec.validation_file is not None:
        check_file(
            store,
            layout,
            spec.org,
            spec.validation_file,
            param=VALIDATION_FILE,
            method=spec.method.type,
            min_examples=1,
        )
    return training


def store_config(store: ObjectStore, key: str, config: TrainerConfig) -> str:
    """Write the trainer config unless one is already stored; return the stored text.

    The first config wins: a job that restarts after the operator's settings changed (a new
    trainer image, a new default) must resume with exactly the configuration it started with.
    """
    existing = load_config_text(store, key)
    if existing is not None:
        return existing
    text = config.model_dump_json(indent=2)
    store.put_bytes(key, text.encode(), content_type="application/json")
    return text


def load_config_text(store: ObjectStore, key: str) -> str | None:
    """The stored trainer config, or None."""
    try:
        return store.get_bytes(key).decode()
    except ObjectNotFound:
        return None


class EventLogReader:
    """Reads a job's event log, fetching each chunk once (chunks are never rewritten).

    ``kubetune_runtime.progress.fold_events`` wants the whole log on every pass; keeping the decoded
    chunks of this job turns each poll into one listing plus the new chunks only.
    """

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self._store = store
        self._prefix = prefix
        self._chunks: dict[str, list[JobEvent]] = {}

    def read(self) -> list[JobEvent]:
        """Every event so far, oldest first."""
        for info in self._store.list(self._prefix):
            if info.key not in self._chunks:
                try:
                    self._chunks[info.key] = decode_chunk(self._store.get_bytes(info.key))
                except ObjectNotFound:  # deleted between the listing and the read
                    continue
        events = [event for chunk in self._chunks.values() for event in chunk]
        events.sort(key=lambda e: e.id)
        return events


def adapter_stored(store: ObjectStore, layout: StorageLayout, org: str, job_id: str) -> bool:
    """Whether the final adapter is complete (its manifest is written after its files)."""
    return store.exists(layout.adapter_manifest_key(org, job_id))


def resolve_trainer_config(
    store: ObjectStore,
    layout: StorageLayout,
    job: FineTuneJob,
    settings: Settings,
    *,
    image: str | None,
    metrics_port: int | None,
) -> TrainerConfig:
    """Check the job's files and resolve its trainer config; bad input raises JobInputError."""
    training = check_files(store, layout, job.spec, min_examples=settings.limits.min_examples)
    try:
        config = build_trainer_config(
            job, settings, n_train_examples=training.n_examples, image=image
        )
    except ConfigError as exc:
        raise JobInputError(user_error(exc.code, str(exc), exc.param)) from None
    except ValueError as exc:
        raise JobInputError(user_error("invalid_model", str(exc), "model")) from None
    # Replicas of one job share no host in a cluster; on one machine they do (0: any free port).
    return config.model_copy(update={"metrics_port": metrics_port})
