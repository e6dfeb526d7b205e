"""Uploading a file with a progress bar: one request for small files, the Uploads API in parts
for big ones (as the OpenAI SDK's ``upload_file_chunked`` does).

Why two paths: ``POST /v1/files`` is one request, which is all a small file needs. For a big
file one request means a dropped connection restarts the whole transfer and a proxy's body-size
limit can refuse it; the Uploads API sends parts of at most 64 MB (OpenAI's part limit), each
its own request that the SDK retries on its own, and the server validates the assembled file
when the upload completes — so errors (with line numbers) come back the same way on both paths.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import openai
from openai.types import FileObject
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from kubetune_cli.errors import stderr

MAX_PART_BYTES = 64 * 1024 * 1024  # OpenAI's (and kubetune's) largest Uploads part
MIME_TYPE = "text/jsonl"


class ProgressReader(io.RawIOBase):
    """A readable stream that reports every read, so the bar follows the bytes httpx sends.

    It is an ``io.IOBase`` (the SDK only accepts those as file content) and seekable (httpx
    takes the length from it and rewinds it when the SDK retries a request).
    """

    def __init__(self, inner: BinaryIO, on_read: Callable[[int], None]) -> None:
        super().__init__()
        self._inner = inner
        self._on_read = on_read

    def readable(self) -> bool:
        """Always readable."""
        return True

    def seekable(self) -> bool:
        """Seekable when the wrapped stream is."""
        return self._inner.seekable()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Seek the wrapped stream; a rewind takes the bar back too."""
        before = self._inner.tell()
        after = self._inner.seek(offset, whence)
        if after != before:
            self._on_read(after - before)
        return after

    def tell(self) -> int:
        """Position in the wrapped stream."""
        return self._inner.tell()

    def read(self, size: int = -1) -> bytes:
        """Read from the wrapped stream and report how much."""
        data = self._inner.read(size)
        self._on_read(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        """Read into ``buffer`` (what ``io`` helpers call)."""
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def progress_bar() -> Progress:
    """A bar of bytes moved: done, speed and time left (on stderr)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
    )


def upload_file(
    client: openai.OpenAI, path: Path, purpose: str, *, part_size: int = MAX_PART_BYTES
) -> FileObject:
    """Upload ``path``; files larger than ``part_size`` go through the Uploads API."""
    size = path.stat().st_size
    with progress_bar() as progress:
        task = progress.add_task(f"Uploading {path.name}", total=size)

        def advance(n: int) -> None:
            progress.advance(task, n)

        if size <= part_size:
            return _single_request(client, path, purpose, advance)
        return _in_parts(client, path, purpose, size, part_size, advance)


def _single_request(
    client: openai.OpenAI, path: Path, purpose: str, advance: Callable[[int], None]
) -> FileObject:
    with path.open("rb") as raw:
        reader = ProgressReader(raw, advance)
        return client.files.create(file=(path.name, reader), purpose=purpose)  # type: ignore[arg-type]


def _in_parts(
    client: openai.OpenAI,
    path: Path,
    purpose: str,
    size: int,
    part_size: int,
    advance: Callable[[int], None],
) -> FileObject:
    upload = client.uploads.create(
        bytes=size,
        filename=path.name,
        mime_type=MIME_TYPE,
        purpose=purpose,  # type: ignore[arg-type]
    )
    part_ids: list[str] = []
    try:
        with path.open("rb") as raw:
            while chunk := raw.read(part_size):
                reader = ProgressReader(io.BytesIO(chunk), advance)
                part = client.uploads.parts.create(upload.id, data=(path.name, reader))  # type: ignore[arg-type]
                part_ids.append(part.id)
        done = client.uploads.complete(upload.id, part_ids=part_ids)
    except BaseException:
        # Leave nothing half-uploaded behind: the server deletes a cancelled upload's parts.
        _cancel_quietly(client, upload.id)
        raise
    if done.file is None:  # pragma: no cover - a completed upload always names its file
        raise RuntimeError(f"upload {upload.id} completed without a file")
    return done.file


def _cancel_quietly(client: openai.OpenAI, upload_id: str) -> None:
    # The original error is the one worth showing, not a failure to clean up after it.
    with contextlib.suppress(openai.OpenAIError):
        client.uploads.cancel(upload_id)
