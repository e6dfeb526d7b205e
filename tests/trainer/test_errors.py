"""User errors: a documented exit code, not retried, and an error event that says why."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.events import EventLevel
from kubetune.settings import ObjectStoreSettings
from kubetune.trainer_events import TrainerEventKind, event_kind
from kubetune_runtime.objectstore import LocalObjectStore
from kubetune_trainer import exit_codes
from kubetune_trainer.main import main
from tests.harness.paths import free_port
from tests.trainer.harness import Job, make_job
from tests.trainer.tiny import jsonl, sft_examples


@pytest.fixture(autouse=True)
def _in_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """These runs fail before training: run them in this process (no torch import to wait
    for), with the trainer's SIGTERM handler put back afterwards.
    """
    monkeypatch.setenv("KUBETUNE_TRAINER_WORKDIR", str(tmp_path / "scratch"))
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def _run(job: Job) -> int:
    return main(["--config", str(job.config_path)])


def test_bad_line_exits_with_the_user_error_code_and_names_the_line(
    tiny_model: Path, local_store: tuple[LocalObjectStore, ObjectStoreSettings], tmp_path: Path
) -> None:
    store, settings = local_store
    rows = jsonl(sft_examples(5)) + b'{"messages": [{"role": "user", "content": 5}]}\n'
    job = make_job(store, settings, tiny_model, tmp_path / "job", rows)
    assert _run(job) == exit_codes.USER_ERROR == 65
    error = job.events()[-1]
    assert event_kind(error) is TrainerEventKind.ERROR
    assert error.level is EventLevel.ERROR
    assert "line 6" in error.message
    assert job.config.training_file in error.message
    assert error.data["user_error"] is True
    assert error.data["param"] == "training_file"


def test_missing_model_weights_are_a_user_error(
    local_store: tuple[LocalObjectStore, ObjectStoreSettings], tmp_path: Path
) -> None:
    store, settings = local_store
    job = make_job(store, settings, tmp_path / "nowhere", tmp_path / "job", jsonl(sft_examples(5)))
    assert _run(job) == exit_codes.USER_ERROR
    error = job.events()[-1]
    assert error.data["code"] == "model_not_available"
    assert "tiny-llama" in error.message


def test_unreadable_config_is_an_internal_error(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"job_id": "nope"}))
    assert main(["--config", str(bad)]) == exit_codes.INTERNAL_ERROR


def test_an_object_store_outage_is_retried_not_failed(
    tiny_model: Path,
    local_store: tuple[LocalObjectStore, ObjectStoreSettings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """S3 refuses every connection: the run ends at once with the retryable code, so the
    training controller restarts it (from its newest checkpoint) once the store is back.
    """
    import time

    from kubetune.settings import ObjectStoreBackend

    store, settings = local_store
    job = make_job(store, settings, tiny_model, tmp_path / "job", jsonl(sft_examples(20)))
    dead = free_port()
    down = ObjectStoreSettings(
        backend=ObjectStoreBackend.S3, endpoint_url=f"http://127.0.0.1:{dead}", region="us-east-1"
    )
    config = job.config.model_copy(update={"object_store": down})
    job.config_path.write_text(config.model_dump_json())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    started = time.monotonic()
    assert _run(job) == exit_codes.RETRYABLE_ERROR
    assert time.monotonic() - started < 30


def test_a_peer_gone_before_the_mesh_forms_is_retried_not_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by tests/lifecycle/test_faults.py: a worker pod restarted after a crash while the
    master had moved on could not join the mesh; gloo says so with a bare RuntimeError, which
    was an internal error (exit 1, permanent) and failed a job that a restart would finish.
    """
    import accelerate

    from kubetune_trainer.dist import init_process_group
    from kubetune_trainer.errors import RetryableError
    from kubetune_trainer.main import is_transient

    def mesh_fails(**kwargs: object) -> None:
        raise RuntimeError(
            "Gloo connectFullMesh failed with [gloo/transport/tcp/pair.cc:152] timed out "
            "connecting: SO_ERROR: Connection refused, remote=[127.0.0.1]:15236"
        )

    monkeypatch.setattr(accelerate, "PartialState", mesh_fails)
    with pytest.raises(RetryableError, match="Could not join the other nodes") as excinfo:
        init_process_group(5, cuda=False)
    assert is_transient(excinfo.value)


def test_a_peer_lost_mid_collective_is_transient_and_a_plain_bug_is_not() -> None:
    """Found by tests/lifecycle/test_faults.py: the master exited retryable during an S3
    outage, and the worker's next all-reduce failed with gloo's bare RuntimeError, which was
    an internal error (exit 1, permanent) and failed the whole job.
    """
    from kubetune_trainer.main import is_transient

    lost = RuntimeError(
        "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:11155. This is "
        "typically caused by a remote worker crashing. Check the logs of the remote worker."
    )
    assert is_transient(lost)
    assert not is_transient(RuntimeError("The size of tensor a (4) must match tensor b (5)"))
