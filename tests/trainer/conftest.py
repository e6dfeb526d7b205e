"""Fixtures of the trainer tests: the tiny model (built once), object stores, a reference run."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.settings import ObjectStoreBackend, ObjectStoreSettings
from kubetune_runtime.objectstore import LocalObjectStore, S3ObjectStore
from tests.harness.s3 import REGION, S3Server
from tests.trainer.harness import Job, make_job
from tests.trainer.tiny import build_model, jsonl, sft_examples

# Without the trainer extra (torch, transformers, trl, peft) only the Dockerfile checks can run.
if importlib.util.find_spec("trl") is None:  # pragma: no cover - the Makefile installs it
    collect_ignore_glob = ["test_[!d]*.py", "test_data.py"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer Llama and its locally trained tokenizer, in HF format."""
    return build_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def local_store(tmp_path: Path) -> tuple[LocalObjectStore, ObjectStoreSettings]:
    """A local-folder object store and the settings that point the trainer at it."""
    root = tmp_path / "store"
    return LocalObjectStore(root), ObjectStoreSettings(local_root=root)


@pytest.fixture(scope="session")
def s3_store(s3: S3Server) -> Iterator[tuple[S3ObjectStore, ObjectStoreSettings]]:
    """The S3 server as a store, and the settings the trainer subprocesses use."""
    settings = ObjectStoreSettings(
        backend=ObjectStoreBackend.S3,
        bucket=s3.bucket,
        endpoint_url=s3.endpoint_url,
        region=REGION,
    )
    store = S3ObjectStore(s3.bucket, client=s3.client())
    yield store, settings
    store.close()


TRAIN = jsonl(sft_examples(40))
VALID = jsonl(sft_examples(8, seed=9))


@pytest.fixture(scope="session")
def reference_run(
    tiny_model: Path,
    s3: S3Server,
    s3_store: tuple[S3ObjectStore, ObjectStoreSettings],
    tmp_path_factory: pytest.TempPathFactory,
) -> Job:
    """One process, 20 steps uninterrupted, on S3: what resumed and 2-process runs must equal."""
    store, settings = s3_store
    job = make_job(store, settings, tiny_model, tmp_path_factory.mktemp("reference"), TRAIN, VALID)
    assert job.run(env=s3.env()) == 0, (job.workdir / "log-0.txt").read_text()[-3000:]
    return job
