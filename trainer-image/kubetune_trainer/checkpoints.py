"""Checkpoints in the object store: commit (manifest last), find the newest, fetch, prune.

A checkpoint is the folder transformers' Trainer writes (adapter or model weights, optimizer,
scheduler, ``rng_state_<rank>.pth`` of every rank, ``trainer_state.json`` with the global step)
plus ``kubetune_state.json`` (results rows, base-model evaluation), uploaded to
``checkpoints/step-<n>/``. Every node uploads the files its ranks wrote; when all have, rank 0
writes ``manifest.json``, which lists every file with its sha256. A folder without a manifest is
not a checkpoint: it is ignored on resume and deleted when pruning. A checkpoint whose files do
not match its manifest (torn by a crash mid-upload, damaged in the store) is skipped on resume
for the one before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from kubetune.storage_layout import MANIFEST_NAME, StorageLayout, checkpoint_step_from_key
from kubetune_runtime.objectstore import ObjectStore

log = logging.getLogger(__name__)

KUBETUNE_STATE: Final = "kubetune_state.json"
HF_CHECKPOINT_PREFIX: Final = "checkpoint-"


@dataclass(frozen=True)
class CommittedCheckpoint:
    """A checkpoint whose manifest exists."""

    step: int
    prefix: str
    manifest: dict[str, Any]


class CheckpointStore:
    """One job's checkpoints in the object store."""

    def __init__(self, store: ObjectStore, layout: StorageLayout, org: str, job_id: str) -> None:
        self.store = store
        self.layout = layout
        self.org = org
        self.job_id = job_id

    def prefix(self, step: int) -> str:
        """Folder of the checkpoint at ``step``."""
        return self.layout.checkpoint_prefix(self.org, self.job_id, step)

    def _steps(self) -> tuple[set[int], set[int]]:
        """Steps that have any object, and steps that have a manifest."""
        present: set[int] = set()
        committed: set[int] = set()
        for info in self.store.list(self.layout.checkpoints_prefix(self.org, self.job_id)):
            step = checkpoint_step_from_key(info.key)
            if step is None:
                continue
            present.add(step)
            if info.key.endswith("/" + MANIFEST_NAME):
                committed.add(step)
        return present, committed

    def newest(self) -> CommittedCheckpoint | None:
        """The committed checkpoint with the highest step, if any."""
        steps = self.committed_steps()
        return self.load(steps[0]) if steps else None

    def committed_steps(self) -> list[int]:
        """The steps of committed checkpoints, newest first."""
        _, committed = self._steps()
        return sorted(committed, reverse=True)

    def load(self, step: int) -> CommittedCheckpoint:
        """The committed checkpoint of ``step`` (its manifest read)."""
        manifest = self.store.get_json(
            self.layout.checkpoint_manifest_key(self.org, self.job_id, step)
        )
        return CommittedCheckpoint(step=step, prefix=self.prefix(step), manifest=manifest)

    def uncommit(self, step: int) -> None:
        """Delete the manifest of ``step``: its files are leftovers that pruning removes."""
        self.store.delete(self.layout.checkpoint_manifest_key(self.org, self.job_id, step))

    def upload_files(self, local_dir: Path, step: int) -> None:
        """Upload this node's files of the checkpoint at ``step`` (no manifest)."""
        self.store.upload_dir(local_dir, self.prefix(step))

    def commit(self, step: int, manifest: dict[str, Any]) -> None:
        """Write the manifest: from now on the checkpoint exists."""
        self.store.put_json(
            self.layout.checkpoint_manifest_key(self.org, self.job_id, step), manifest
        )

    def download(self, checkpoint: CommittedCheckpoint, dest_root: Path) -> Path:
        """Fetch a checkpoint into ``dest_root/checkpoint-<step>`` (the Trainer's naming)."""
        dest = dest_root / f"{HF_CHECKPOINT_PREFIX}{checkpoint.step}"
        if dest.exists():
            shutil.rmtree(dest)
        self.store.download_prefix(checkpoint.prefix, dest)
        return dest

    def prune(self, keep: int, *, protect: int | None = None) -> list[int]:
        """Keep the newest ``keep`` committed checkpoints (and ``protect``, the best one when
        the best becomes the model); delete older ones and leftovers of uploads that never
        committed (older than the newest commit). Returns deleted steps.
        """
        present, committed = self._steps()
        if not committed:
            return []
        kept = set(sorted(committed)[-keep:]) | ({protect} if protect is not None else set())
        newest = max(committed)
        doomed = sorted(s for s in present if s not in kept and s < newest)
        for step in doomed:
            # The manifest goes first, so a half-deleted folder is never taken for a checkpoint.
            self.store.delete(self.layout.checkpoint_manifest_key(self.org, self.job_id, step))
            self.store.delete_prefix(self.prefix(step))
        return doomed


def file_digests(folder: Path) -> dict[str, str]:
    """``relative path → sha256`` of every file under ``folder``."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digests[path.relative_to(folder).as_posix()] = _sha256(path)
    return digests


def damaged_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """The files a downloaded checkpoint's manifest lists that are missing or differ (none for
    a manifest that lists no files: one written before manifests had them).
    """
    damaged = []
    for name, digest in sorted((manifest.get("files") or {}).items()):
        path = folder / name
        if digest is not None and (not path.is_file() or _sha256(path) != digest):
            damaged.append(name)
    return damaged


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_kubetune_state(folder: Path, state: dict[str, Any]) -> None:
    """Store kubetune's own resume state beside the Trainer's files."""
    (folder / KUBETUNE_STATE).write_text(json.dumps(state, allow_nan=False))


def read_kubetune_state(folder: Path) -> dict[str, Any]:
    """Kubetune's resume state of a downloaded checkpoint (empty if it has none)."""
    path = folder / KUBETUNE_STATE
    if not path.is_file():
        return {}
    state: dict[str, Any] = json.loads(path.read_text())
    return state
