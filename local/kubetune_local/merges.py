"""Local mode's merges: a LoRA model folded into its base model when a download asks for it.

The API asks by annotating the job (:func:`kubetune.finetunejob.merge_annotation` set to
``requested``). Each sweep of the job loop starts, one at a time, ``python -m
kubetune_trainer.merge`` for a requested model whose merged manifest is not in the store yet,
with the job's own trainer config; when the merge fails, the job's annotation says why, for the
API to tell the client. A merge cut short (Ctrl-C, a crash) published no manifest and is
started again by the next sweep, the next start included.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from kubetune.finetunejob import FineTuneJob, merge_annotation, merges_requested
from kubetune.storage_layout import StorageLayout
from kubetune_api.backends.local import LocalJobBackend
from kubetune_local.policy import trainer_env
from kubetune_local.process import ChildProcess, children_registry
from kubetune_runtime.merges import failure_annotation, merges_waiting
from kubetune_runtime.objectstore import ObjectStore

log = logging.getLogger(__name__)

MERGE_MODULE: Final = "kubetune_trainer.merge"
MERGE_GRACE_SECONDS: Final = 10.0


@dataclass
class RunningMerge:
    """The merge in progress: whose model, and its process."""

    job: FineTuneJob
    step: int | None
    process: ChildProcess


class LocalMerges:
    """Runs the merges local mode's jobs ask for, one at a time (see the module docstring)."""

    def __init__(
        self,
        backend: LocalJobBackend,
        store: ObjectStore,
        layout: StorageLayout,
        data_dir: Path,
        *,
        python: str,
        host_env: Mapping[str, str],
    ) -> None:
        self.backend = backend
        self.store = store
        self.layout = layout
        self.data_dir = data_dir
        self.python = python
        self.host_env = host_env
        self.running: RunningMerge | None = None

    def sync(self, jobs: Sequence[FineTuneJob]) -> None:
        """Reap the merge that ended, then start the next one asked for."""
        if self.running is not None:
            code = self.running.process.poll()
            if code is None:
                return
            self._ended(self.running, code)
            self.running = None
        for job in jobs:
            if not merges_requested(job.metadata.annotations):
                continue
            for step in merges_waiting(job, self.store, self.layout):
                self.running = RunningMerge(job, step, self._start(job, step))
                return

    def close(self) -> None:
        """Stop the merge in progress (it starts again on the next start)."""
        if self.running is not None:
            self.running.process.stop(MERGE_GRACE_SECONDS)
            self.running = None

    def _start(self, job: FineTuneJob, step: int | None) -> ChildProcess:
        name = job.metadata.name
        folder = self.data_dir / "merges" / name
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "config.json"
        config.write_bytes(self.store.get_bytes(self.layout.job_config_key(job.spec.org, name)))
        which = "final" if step is None else f"step-{step}"
        env = trainer_env(self.host_env, name, 1, workdir=folder / "scratch", master_port=0)
        argv = [self.python, "-m", MERGE_MODULE, "--config", str(config)]
        return ChildProcess(
            f"merge {name} {which}",
            [*argv, *([] if step is None else ["--step", str(step)])],
            env=env,
            cwd=folder,
            # Not "<job>-N.log": those are the trainer's launches.
            log_path=self.data_dir / "logs" / f"merge-{name}-{which}.log",
            grace=MERGE_GRACE_SECONDS,
            registry=children_registry(self.data_dir),
        )

    def _ended(self, merge: RunningMerge, code: int) -> None:
        org, name = merge.job.spec.org, merge.job.metadata.name
        if code == 0 and self.store.exists(self.layout.merged_manifest_key(org, name, merge.step)):
            log.info("%s merged", merge.process.name)
            return
        lines = [line for line in merge.process.log_tail().splitlines() if line.strip()]
        value = failure_annotation(
            self.store, self.layout, merge.job, merge.step, lines[-1] if lines else f"exit {code}"
        )
        log.warning("%s failed: %s", merge.process.name, value)
        self.backend.annotate(org, name, {merge_annotation(merge.step): value})
