"""What the job driver reads and writes in the store: file checks, the trainer config, the
event-log reader (no cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.events import JobEvent, encode_chunk, write_control_events
from kubetune.files import FileMeta, FilePurpose
from kubetune.finetunejob import ErrorKind, FineTuneJobSpec, MethodType
from kubetune.ids import new_file_id
from kubetune.storage_layout import StorageLayout
from kubetune.trainer_config import TrainerConfig
from kubetune_runtime.datasets import validate_jsonl
from kubetune_runtime.job_inputs import (
    EventLogReader,
    JobInputError,
    check_files,
    load_config_text,
    store_config,
)
from kubetune_runtime.objectstore import LocalObjectStore

LAYOUT = StorageLayout(prefix="p")
ORG = "acme"


def chat_rows(n: int) -> bytes:
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    return b"".join(json.dumps(row).encode() + b"\n" for _ in range(n))


def upload(store: LocalObjectStore, data: bytes, *, stats: bool = True, **meta: object) -> str:
    file_id = new_file_id()
    store.put_bytes(LAYOUT.file_key(ORG, file_id), data)
    report = validate_jsonl([data], min_examples=1)
    fields = {
        "id": file_id,
        "org": ORG,
        "filename": "f.jsonl",
        "purpose": FilePurpose.FINE_TUNE,
        "bytes": len(data),
        "created_at": 0,
        "sha256": report.sha256,
        "stats": report.model_dump(mode="json") if stats else {},
        **meta,
    }
    store.put_json(LAYOUT.file_meta_key(ORG, file_id), FileMeta(**fields).model_dump(mode="json"))
    return file_id


def spec(
    training: str, method: MethodType = MethodType.SUPERVISED, **extra: object
) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {"org": ORG, "model": "m", "trainingFile": training, "method": {"type": method}, **extra}
    )


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "store")


def test_a_valid_file_gives_its_example_count(store: LocalObjectStore) -> None:
    training = upload(store, chat_rows(12))
    assert check_files(store, LAYOUT, spec(training), min_examples=10).n_examples == 12


def test_metadata_without_a_report_is_validated_from_the_bytes(store: LocalObjectStore) -> None:
    assert (
        check_files(
            store, LAYOUT, spec(upload(store, chat_rows(11), stats=False)), min_examples=10
        ).n_examples
        == 11
    )
    short = upload(store, chat_rows(3), stats=False)
    with pytest.raises(JobInputError) as caught:
        check_files(store, LAYOUT, spec(short), min_examples=10)
    assert caught.value.error.code == "invalid_file_format"


@pytest.mark.parametrize(
    ("case", "code", "param"),
    [
        ("missing training", "invalid_file", "training_file"),
        ("wrong method", "invalid_file_format", "training_file"),
        ("results purpose", "invalid_file", "training_file"),
        ("missing validation", "invalid_file", "validation_file"),
    ],
)
def test_files_that_cannot_train_the_job_are_user_errors(
    store: LocalObjectStore, case: str, code: str, param: str
) -> None:
    good = upload(store, chat_rows(12))
    job = {
        "missing training": spec(new_file_id()),
        "wrong method": spec(good, MethodType.DPO),
        "results purpose": spec(
            upload(store, chat_rows(12), purpose=FilePurpose.FINE_TUNE_RESULTS)
        ),
        "missing validation": spec(good, validationFile=new_file_id()),
    }[case]
    with pytest.raises(JobInputError) as caught:
        check_files(store, LAYOUT, job, min_examples=10)
    error = caught.value.error
    assert (error.kind, error.code, error.param) == (ErrorKind.USER, code, param)


def test_the_first_stored_config_wins(store: LocalObjectStore, tmp_path: Path) -> None:
    key = LAYOUT.job_config_key(ORG, "ftjob-0mhx5k2ab00000000000001")
    assert load_config_text(store, key) is None
    config = TrainerConfig.model_validate_json(
        json.dumps(
            {
                "job_id": "ftjob-0mhx5k2ab00000000000001",
                "org": ORG,
                "fine_tuned_model": "ft:m:acme::1",
                "base_model": {"name": "m", "path": "/m", "context_length": 64},
                "training_file": "file-0mhx5k2ab00000000000001",
                "object_store": {},
                "hyperparameters": {
                    "n_epochs": 1,
                    "batch_size": 2,
                    "learning_rate_multiplier": 1,
                    "learning_rate": 0.1,
                    "warmup_ratio": 0,
                },
                "seed": 1,
                "max_seq_length": 64,
                "n_evals": 0,
                "n_train_examples": 4,
                "total_steps": 2,
            }
        )
    )
    first = store_config(store, key, config)
    changed = config.model_copy(update={"image": "new:tag"})
    assert store_config(store, key, changed) == first == load_config_text(store, key)


def test_the_event_reader_fetches_each_chunk_once(store: LocalObjectStore) -> None:
    prefix = LAYOUT.events_prefix(ORG, "ftjob-0mhx5k2ab00000000000001")
    store.put_bytes(f"{prefix}0000000000.jsonl", encode_chunk([JobEvent(message="a")]))
    reader = EventLogReader(store, prefix)
    assert [e.message for e in reader.read()] == ["a"]
    write_control_events(store, prefix, [JobEvent(message="b")])
    store.put_bytes(f"{prefix}0000000001.jsonl", encode_chunk([JobEvent(message="c")]))
    assert [e.message for e in reader.read()] == ["a", "b", "c"]
    store.delete(f"{prefix}0000000000.jsonl")  # chunks never change; a cached one is kept
    assert len(reader.read()) == 3
