"""Local mode's merges, one level below the server: a requested merge runs the real
``kubetune_trainer.merge`` as a child, and one that fails leaves its reason on the job for the
API to tell (the merge that succeeds is tests/local/test_local_mode.py's, through the API).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from kubetune.finetunejob import (
    MERGE_FAILED,
    MERGE_REQUESTED,
    FineTuneJob,
    FineTuneJobStatus,
    JobPhase,
    merge_annotation,
)
from kubetune.settings import ObjectStoreSettings
from kubetune_api.backends.local import LocalJobBackend
from kubetune_local.merges import LocalMerges
from kubetune_local.process import children_registry
from kubetune_runtime.objectstore import LocalObjectStore
from tests.trainer.harness import ORG, make_job
from tests.trainer.tiny import jsonl, sft_examples


def test_a_merge_whose_adapter_is_gone_fails_with_the_reason_on_the_job(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    settings = ObjectStoreSettings(local_root=tmp_path / "store")
    layout = settings.layout()
    # A succeeded job whose trainer config is stored, but whose adapter is not (deleted).
    trainer = make_job(
        store, settings, tmp_path / "no-model", tmp_path / "t", jsonl(sft_examples(4))
    )
    job_id = trainer.config.job_id
    store.put_bytes(layout.job_config_key(ORG, job_id), trainer.config_path.read_bytes())
    backend = LocalJobBackend(tmp_path / "data" / "jobs.sqlite3")
    job = FineTuneJob.from_manifest(
        {
            "metadata": {"name": job_id, "annotations": {merge_annotation(None): MERGE_REQUESTED}},
            "spec": {
                "org": ORG,
                "model": "tiny-llama",
                "trainingFile": trainer.config.training_file,
            },
        }
    )
    backend.create(job, None)
    backend.update_status(ORG, job_id, FineTuneJobStatus(phase=JobPhase.SUCCEEDED))
    merges = LocalMerges(
        backend, store, layout, tmp_path / "data", python=sys.executable, host_env=os.environ
    )

    merges.sync(backend.scan(unfinished=False))
    assert merges.running is not None  # started
    deadline = time.monotonic() + 120
    while merges.running is not None and time.monotonic() < deadline:
        time.sleep(0.5)
        merges.sync(backend.scan(unfinished=False))
    assert merges.running is None
    stored = backend.get(ORG, job_id)
    assert stored is not None
    state = stored.metadata.annotations[merge_annotation(None)]
    assert state.startswith(MERGE_FAILED)
    assert "no longer stored" in state
    # Tried once: a failure waits for the API to report it, it is not retried by itself.
    merges.sync(backend.scan(unfinished=False))
    assert merges.running is None
    assert not any(children_registry(tmp_path / "data").iterdir())  # no child left behind
    assert not store.exists(layout.merged_manifest_key(ORG, job_id))
