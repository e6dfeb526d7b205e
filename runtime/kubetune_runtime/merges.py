"""What both job drivers (local mode, the operator) share about merging LoRA models into their
base for ``format=merged`` downloads: which merges a job waits for, and why one failed.

The API asks with :func:`kubetune.finetunejob.merge_annotation` set to ``requested``; a merge is
done when its manifest is in the store; ``kubetune_trainer.merge`` leaves the reason of a
failure in the store (:meth:`~kubetune.storage_layout.StorageLayout.merge_failure_key`), which
the driver copies onto the annotation for the API to tell.
"""

from __future__ import annotations

from typing import Final

from kubetune.finetunejob import MERGE_FAILED, FineTuneJob, JobPhase, merges_requested
from kubetune.storage_layout import StorageLayout
from kubetune_runtime.objectstore import ObjectNotFound, ObjectStore

# How much of a reason an annotation carries.
REASON_CHARS: Final = 500


def merges_waiting(job: FineTuneJob, store: ObjectStore, layout: StorageLayout) -> list[int | None]:
    """The models of a succeeded job whose merge is asked for and not published yet (None:
    the final model; else checkpoint steps).
    """
    if job.status is None or job.status.phase is not JobPhase.SUCCEEDED:
        return []
    org, name = job.spec.org, job.metadata.name
    return [
        step
        for step in merges_requested(job.metadata.annotations)
        if not store.exists(layout.merged_manifest_key(org, name, step))
    ]


def failure_annotation(
    store: ObjectStore, layout: StorageLayout, job: FineTuneJob, step: int | None, fallback: str
) -> str:
    """The annotation value of a merge that failed: the reason it recorded, else ``fallback``."""
    key = layout.merge_failure_key(job.spec.org, job.metadata.name, step)
    try:
        recorded = store.get_json(key)
    except (ObjectNotFound, ValueError):
        recorded = None
    message = recorded.get("message") if isinstance(recorded, dict) else None
    reason = message if isinstance(message, str) and message else fallback
    return MERGE_FAILED + reason[-REASON_CHARS:]
