"""Files put in the object store the way the API stores an upload, for tests and benchmarks
that skip the API: the bytes, then the metadata with the validation report.
"""

from __future__ import annotations

import time
from typing import Any

from kubetune.files import FileMeta, FilePurpose
from kubetune.ids import new_file_id
from kubetune.storage_layout import StorageLayout
from kubetune_runtime.datasets import validate_jsonl
from kubetune_runtime.objectstore import ObjectStore


def store_training_file(
    store: ObjectStore,
    layout: StorageLayout,
    org: str,
    data: bytes,
    *,
    stats: dict[str, Any] | None = None,
) -> str:
    """Store ``data`` as ``org``'s fine-tune file; return its id.

    ``stats`` replaces the validation report in the metadata (to test what the operator does
    with a file the API's report calls something else).
    """
    file_id = new_file_id()
    store.put_bytes(layout.file_key(org, file_id), data)
    report = validate_jsonl([data], min_examples=1)
    meta = FileMeta(
        id=file_id,
        org=org,
        filename="train.jsonl",
        purpose=FilePurpose.FINE_TUNE,
        bytes=len(data),
        created_at=int(time.time()),
        sha256=report.sha256,
        stats=report.model_dump(mode="json") if stats is None else stats,
    )
    store.put_json(layout.file_meta_key(org, file_id), meta.model_dump(mode="json"))
    return file_id
