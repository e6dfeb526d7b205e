"""The Uploads API: one file sent as several parts, assembled and validated on completion.

State lives in the object store beside the parts (``uploads/<id>/upload.json``), so any API
replica can take any request of an upload. Completing streams the parts, in the order the
client gives, through the same validation and hashing as a direct upload: memory stays
constant whatever the size.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from enum import StrEnum
from typing import BinaryIO

from pydantic import BaseModel

from kubetune.ids import IdKind, is_valid_id, new_id
from kubetune.settings import Settings
from kubetune_api.auth import Principal
from kubetune_api.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from kubetune_api.protocol import (
    CompleteUploadRequest,
    CreateUploadRequest,
    Upload,
    UploadPart,
)
from kubetune_api.services.files import FileService, to_openai
from kubetune_runtime.objectstore import ObjectNotFound, ObjectStore

UPLOAD_TTL_SECONDS = 3600  # OpenAI: an upload expires an hour after it is created
MAX_PART_BYTES = 64 * 1024 * 1024  # OpenAI: a part is at most 64 MB
MAX_PARTS = 10_000  # S3's own cap on a multipart upload's parts


class UploadStatus(StrEnum):
    """Where an upload is in its life."""

    PENDING = "pending"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class UploadState(BaseModel):
    """An upload as stored."""

    id: str
    org: str
    filename: str
    purpose: str
    bytes: int
    mime_type: str
    created_at: int
    expires_at: int
    status: UploadStatus = UploadStatus.PENDING
    file_id: str | None = None


class UploadService:
    """Uploads of one deployment, scoped by org."""

    def __init__(self, settings: Settings, store: ObjectStore, files: FileService) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.layout = settings.object_store.layout()
        self._lock = threading.Lock()

    def _load(self, principal: Principal, upload_id: str) -> UploadState:
        if not is_valid_id(upload_id, IdKind.UPLOAD):
            raise NotFound(f"No such Upload: {upload_id}", param="upload_id")
        try:
            raw = self.store.get_json(self.layout.upload_state_key(principal.org, upload_id))
        except ObjectNotFound:
            raise NotFound(f"No such Upload: {upload_id}", param="upload_id") from None
        state = UploadState.model_validate(raw)
        if state.status is UploadStatus.PENDING and time.time() > state.expires_at:
            state.status = UploadStatus.EXPIRED
        return state

    def _save(self, state: UploadState) -> None:
        self.store.put_json(
            self.layout.upload_state_key(state.org, state.id), state.model_dump(mode="json")
        )

    def _view(self, principal: Principal, state: UploadState) -> Upload:
        file = None
        if state.file_id is not None:
            file = to_openai(self.files.get_meta(principal, state.file_id))
        return Upload(
            id=state.id,
            bytes=state.bytes,
            created_at=state.created_at,
            expires_at=state.expires_at,
            filename=state.filename,
            purpose=state.purpose,
            status=state.status.value,
            file=file,
        )

    def _require_pending(self, state: UploadState) -> None:
        if state.status is not UploadStatus.PENDING:
            raise Conflict(
                f"Upload {state.id} is {state.status.value}; it no longer accepts changes."
            )

    def create(self, principal: Principal, req: CreateUploadRequest) -> Upload:
        """Start an upload of ``req.bytes`` bytes."""
        self.files.check_new_file(
            principal, filename=req.filename, purpose=req.purpose, param="filename"
        )
        if req.bytes > self.settings.limits.max_file_bytes:
            raise PayloadTooLarge(
                f"An upload may hold at most {self.settings.limits.max_file_bytes} bytes.",
                param="bytes",
            )
        now = int(time.time())
        state = UploadState(
            id=new_id(IdKind.UPLOAD),
            org=principal.org,
            filename=req.filename,
            purpose=req.purpose,
            bytes=req.bytes,
            mime_type=req.mime_type,
            created_at=now,
            expires_at=now + UPLOAD_TTL_SECONDS,
        )
        self._save(state)
        return self._view(principal, state)

    def add_part(self, principal: Principal, upload_id: str, data: BinaryIO) -> UploadPart:
        """Store one part (at most 64 MB). The parts together may hold at most one part more
        than the upload was created for (room for a part the client sent again after a
        timeout), and number at most ``MAX_PARTS``: checked as the bytes arrive, so parts
        cannot grow without bound before ``complete``.
        """
        state = self._load(principal, upload_id)
        self._require_pending(state)
        stored, count = self._stored(principal, upload_id)
        if count >= MAX_PARTS:
            raise Conflict(f"An upload may have at most {MAX_PARTS} parts.", code="too_many_parts")
        slack = min(state.bytes, MAX_PART_BYTES)  # one part resent, at most
        room = min(MAX_PART_BYTES, state.bytes + slack - stored)
        part_id = new_id(IdKind.PART)
        seen = 0

        def guard(chunk: bytes) -> None:
            nonlocal seen
            seen += len(chunk)
            if seen > room:
                raise PayloadTooLarge(
                    f"A part may hold at most {MAX_PART_BYTES} bytes, and the parts of upload "
                    f"{upload_id} at most one part more than the {state.bytes} bytes it was "
                    f"created for ({stored} stored already).",
                    param="data",
                )

        self.store.put_stream(
            self.layout.upload_part_key(principal.org, upload_id, part_id), data, on_chunk=guard
        )
        return UploadPart(id=part_id, created_at=int(time.time()), upload_id=upload_id)

    def _stored(self, principal: Principal, upload_id: str) -> tuple[int, int]:
        """Bytes and number of the parts stored so far.

        Listed, not kept as a running total in the upload's state: parts arrive in parallel and
        on several API replicas, and a total would need a compare-and-swap on every part.
        """
        prefix = self.layout.upload_prefix(principal.org, upload_id)
        state_key = self.layout.upload_state_key(principal.org, upload_id)
        sizes = [info.size for info in self.store.list(prefix) if info.key != state_key]
        return sum(sizes), len(sizes)

    def _parts(self, principal: Principal, upload_id: str, part_ids: list[str]) -> Iterator[bytes]:
        for part_id in part_ids:
            key = self.layout.upload_part_key(principal.org, upload_id, part_id)
            yield from self.store.open_stream(key)

    def complete(self, principal: Principal, upload_id: str, req: CompleteUploadRequest) -> Upload:
        """Assemble the parts into a validated file (400 and nothing stored if invalid)."""
        with self._lock:
            state = self._load(principal, upload_id)
            self._require_pending(state)
            if len(set(req.part_ids)) != len(req.part_ids):
                raise InvalidRequest("part_ids lists a part twice.", param="part_ids")
            total = 0
            for part_id in req.part_ids:
                if not is_valid_id(part_id, IdKind.PART):
                    raise InvalidRequest(f"Unknown part {part_id}.", param="part_ids")
                head = self.store.head(
                    self.layout.upload_part_key(principal.org, upload_id, part_id)
                )
                if head is None:
                    raise InvalidRequest(f"Unknown part {part_id}.", param="part_ids")
                total += head.size
            if total != state.bytes:
                raise InvalidRequest(
                    f"The parts hold {total} bytes but the upload was created for "
                    f"{state.bytes} bytes.",
                    param="part_ids",
                )
            meta = self.files.store_validated(
                principal,
                filename=state.filename,
                stream=self._parts(principal, upload_id, req.part_ids),
                param="part_ids",
            )
            state.status = UploadStatus.COMPLETED
            state.file_id = meta.id
            self._save(state)
        self._drop_parts(principal, upload_id)
        return self._view(principal, state)

    def cancel(self, principal: Principal, upload_id: str) -> Upload:
        """Cancel a pending upload and delete its parts."""
        with self._lock:
            state = self._load(principal, upload_id)
            self._require_pending(state)
            state.status = UploadStatus.CANCELLED
            self._save(state)
        self._drop_parts(principal, upload_id)
        return self._view(principal, state)

    def _drop_parts(self, principal: Principal, upload_id: str) -> None:
        self._drop_parts_of(principal.org, upload_id)

    def _drop_parts_of(self, org: str, upload_id: str) -> int:
        prefix = self.layout.upload_prefix(org, upload_id)
        state_key = self.layout.upload_state_key(org, upload_id)
        parts = [info.key for info in self.store.list(prefix) if info.key != state_key]
        for key in parts:
            self.store.delete(key)
        return len(parts)

    def sweep(self, org: str, now: float, grace_seconds: int) -> int:
        """Delete the parts an org's uploads no longer need; the number of parts deleted.

        An upload still pending ``grace_seconds`` after it expired is marked expired and its
        parts deleted (a part sent just before the expiry may still be arriving, hence the
        grace); a completed or cancelled one loses any parts a crash left behind between
        saving its state and deleting them. States are kept: they are small, and a client may
        still ask what became of its upload.
        """
        prefix = self.layout.uploads_prefix(org)
        upload_ids = {info.key[len(prefix) :].partition("/")[0] for info in self.store.list(prefix)}
        deleted = 0
        for upload_id in sorted(upload_ids):
            if is_valid_id(upload_id, IdKind.UPLOAD) and self._sweepable(
                org, upload_id, now - grace_seconds
            ):
                deleted += self._drop_parts_of(org, upload_id)
        return deleted

    def _sweepable(self, org: str, upload_id: str, cutoff: float) -> bool:
        """Whether an upload's parts may go; marks an abandoned pending upload expired."""
        try:
            raw = self.store.get_json(self.layout.upload_state_key(org, upload_id))
        except ObjectNotFound:
            # Parts without a state: written by a request that outlived a concurrent delete.
            prefix = self.layout.upload_prefix(org, upload_id)
            return all(info.last_modified.timestamp() < cutoff for info in self.store.list(prefix))
        state = UploadState.model_validate(raw)
        if state.status is not UploadStatus.PENDING:
            return True
        if state.expires_at >= cutoff:
            return False
        with self._lock:
            state.status = UploadStatus.EXPIRED
            self._save(state)
        return True
