"""Files: upload (streamed, validated and hashed in one pass), list, retrieve, delete, content."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

from kubetune.files import FileMeta, FilePurpose, FileStatus
from kubetune.ids import IdKind, is_valid_id, new_file_id
from kubetune.settings import Settings
from kubetune.storage_layout import FILE_META_SUFFIX, StorageLayout
from kubetune_api.auth import Principal
from kubetune_api.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from kubetune_api.metrics import FILES_CREATED
from kubetune_api.protocol import DeleteFileResponse, ListFilesResponse, OpenAIFile
from kubetune_api.tokens import token_counter
from kubetune_runtime.datasets import JsonlValidator
from kubetune_runtime.objectstore import ObjectNotFound, ObjectStore


def to_openai(meta: FileMeta) -> OpenAIFile:
    """The ``file`` object for a stored file."""
    return OpenAIFile(
        id=meta.id,
        bytes=meta.bytes,
        created_at=meta.created_at,
        filename=meta.filename,
        purpose=meta.purpose.value,
        status=meta.status.value,
        status_details=meta.status_details,
    )


class _SizeGuard:
    """Counts bytes as they stream and stops the upload past the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0

    def __call__(self, chunk: bytes) -> None:
        self.seen += len(chunk)
        if self.seen > self.limit:
            raise PayloadTooLarge(
                f"File exceeds the maximum size of {self.limit} bytes.", param="file"
            )


class FileService:
    """Files of one deployment, scoped by org on every call."""

    def __init__(self, settings: Settings, store: ObjectStore) -> None:
        self.settings = settings
        self.store = store
        self.layout: StorageLayout = settings.object_store.layout()
        # Results files live in their job's folder; the job service knows how to find them.
        self.results_lookup: Callable[[Principal, str], FileMeta | None] | None = None

    def _meta_key(self, org: str, file_id: str) -> str:
        return self.layout.file_meta_key(org, file_id)

    def get_meta(self, principal: Principal, file_id: str, *, param: str = "file_id") -> FileMeta:
        """The org's file metadata, or 404."""
        if not is_valid_id(file_id, IdKind.FILE):
            raise NotFound(f"No such File object: {file_id}", param=param)
        try:
            return FileMeta.model_validate(
                self.store.get_json(self._meta_key(principal.org, file_id))
            )
        except ObjectNotFound:
            results = self.results_lookup(principal, file_id) if self.results_lookup else None
            if results is not None:
                return results
            raise NotFound(f"No such File object: {file_id}", param=param) from None

    def check_new_file(
        self, principal: Principal, *, filename: str, purpose: str, param: str = "file"
    ) -> None:
        """Refuse an upload before reading it: purpose, file type, the org's file count."""
        if purpose != FilePurpose.FINE_TUNE.value:
            raise InvalidRequest(
                f"Invalid purpose '{purpose}': this service accepts 'fine-tune' uploads only.",
                param="purpose",
            )
        if any(ord(c) < 32 or ord(c) == 127 for c in filename) or "/" in filename:
            raise InvalidRequest(
                "Invalid file name: control characters and '/' are not allowed.", param=param
            )
        if not filename.lower().endswith(".jsonl"):
            raise InvalidRequest(
                f"Invalid file '{filename}': fine-tuning files must be JSONL (.jsonl).",
                param=param,
            )
        if self._count(principal.org) >= self.settings.limits.max_files_per_org:
            raise Conflict(
                f"Your organization already stores {self.settings.limits.max_files_per_org} "
                "files; delete some before uploading more.",
                code="file_limit_reached",
            )

    def upload(
        self, principal: Principal, *, filename: str, purpose: str, stream: BinaryIO
    ) -> OpenAIFile:
        """Store an uploaded JSONL file; reject it (storing nothing) if it is invalid."""
        self.check_new_file(principal, filename=filename, purpose=purpose)
        return to_openai(self.store_validated(principal, filename=filename, stream=stream))

    def store_validated(
        self,
        principal: Principal,
        *,
        filename: str,
        stream: BinaryIO | Iterable[bytes],
        param: str = "file",
    ) -> FileMeta:
        """Stream bytes to a new file while validating and hashing them in the same pass.

        The metadata object is written last, only for a valid file: until then the file is
        neither listed nor usable, and an invalid one is deleted before the error is raised.
        """
        file_id = new_file_id()
        key = self.layout.file_key(principal.org, file_id)
        default_model = self.settings.models[0] if self.settings.models else None
        validator = JsonlValidator(
            max_line_bytes=self.settings.limits.max_line_bytes,
            min_examples=self.settings.limits.min_examples,
            count_tokens=token_counter(default_model),
        )
        guard = _SizeGuard(self.settings.limits.max_file_bytes)

        def on_chunk(chunk: bytes) -> None:
            guard(chunk)
            validator.feed(chunk)

        result = self.store.put_stream(
            key, stream, content_type="application/jsonl", on_chunk=on_chunk
        )
        report = validator.finish()
        if not report.valid:
            self.store.delete(key)
            raise InvalidRequest(report.error_message(), param=param, code="invalid_file_format")
        meta = FileMeta(
            id=file_id,
            org=principal.org,
            filename=filename,
            purpose=FilePurpose.FINE_TUNE,
            bytes=result.size,
            created_at=int(time.time()),
            sha256=result.sha256_hex,
            status=FileStatus.PROCESSED,
            stats=report.model_dump(mode="json"),
            tokens_model=default_model.id
            if report.n_tokens is not None and default_model
            else None,
        )
        self.store.put_json(self._meta_key(principal.org, file_id), meta.model_dump(mode="json"))
        FILES_CREATED.labels(purpose=meta.purpose.value).inc()
        return meta

    def sweep_orphans(self, org: str, now: float, grace_seconds: int) -> int:
        """Delete an org's file bytes that have had no metadata for ``grace_seconds``.

        Bytes are written before their metadata and deleted after it, so bytes without
        metadata are either an upload still being validated (hence the grace, longer than the
        slowest upload) or what a crash left between the two writes. The metadata is looked up
        again just before each delete, so a file whose validation finishes meanwhile is kept.
        Returns the number of objects deleted.
        """
        prefix = self.layout.files_prefix(org)
        cutoff = now - grace_seconds
        listed = list(self.store.list(prefix))
        described = {
            info.key[: -len(FILE_META_SUFFIX)]
            for info in listed
            if info.key.endswith(FILE_META_SUFFIX)
        }
        deleted = 0
        for info in listed:
            if info.key.endswith(FILE_META_SUFFIX) or info.key in described:
                continue
            if info.last_modified.timestamp() >= cutoff:
                continue
            if self.store.head(info.key + FILE_META_SUFFIX) is None:
                self.store.delete(info.key)
                deleted += 1
        return deleted

    def _meta_ids(self, org: str) -> list[str]:
        prefix = self.layout.files_prefix(org)
        return [
            info.key[len(prefix) : -len(FILE_META_SUFFIX)]
            for info in self.store.list(prefix)
            if info.key.endswith(FILE_META_SUFFIX)
        ]

    def _count(self, org: str) -> int:
        return len(self._meta_ids(org))

    def list(
        self,
        principal: Principal,
        *,
        purpose: str | None,
        after: str | None,
        limit: int,
        order: str,
    ) -> ListFilesResponse:
        """A page of the org's files, by creation time (ids are time-ordered)."""
        ids = sorted(self._meta_ids(principal.org), reverse=order == "desc")
        if after is not None:
            ids = [i for i in ids if (i < after if order == "desc" else i > after)]
        page: list[OpenAIFile] = []
        has_more = False
        for file_id in ids:
            try:
                meta = FileMeta.model_validate(
                    self.store.get_json(self._meta_key(principal.org, file_id))
                )
            except ObjectNotFound:
                continue  # deleted while listing
            if purpose is not None and meta.purpose.value != purpose:
                continue
            if len(page) == limit:
                has_more = True
                break
            page.append(to_openai(meta))
        return ListFilesResponse(
            data=page,
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=has_more,
        )

    def retrieve(self, principal: Principal, file_id: str) -> OpenAIFile:
        """One of the org's files."""
        return to_openai(self.get_meta(principal, file_id))

    def delete(self, principal: Principal, file_id: str) -> DeleteFileResponse:
        """Delete a file: its metadata first, so it disappears at once, then its bytes."""
        meta = self.get_meta(principal, file_id)
        if meta.purpose is FilePurpose.FINE_TUNE_RESULTS:
            raise Conflict(
                "Results files belong to their job and are deleted with it.", param="file_id"
            )
        self.store.delete(self._meta_key(principal.org, file_id))
        if meta.object_key is None:
            self.store.delete(self.layout.file_key(principal.org, file_id))
        return DeleteFileResponse(id=file_id, deleted=True)

    def content(self, principal: Principal, file_id: str) -> tuple[FileMeta, Iterator[bytes]]:
        """The file's bytes, streamed."""
        meta = self.get_meta(principal, file_id)
        key = meta.object_key or self.layout.file_key(principal.org, file_id)
        try:
            return meta, self.store.open_stream(key)
        except ObjectNotFound:
            raise NotFound(f"No such File object: {file_id}", param="file_id") from None
