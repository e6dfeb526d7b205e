"""Downloading a model's weights (``GET /v1/models/{model}/content``, a tar archive) with a
progress bar, into a folder or as the archive itself; a LoRA model's merged weights once the
server has merged them (a spinner shows the wait).

The OpenAI SDK has no call for this endpoint, so it goes through the SDK's client for
undocumented endpoints (``client.get(..., cast_to=httpx2.Response)``): the same base URL, key,
retries and error handling as every other command, with the body streamed instead of read
whole (a merged model is many gigabytes). Nothing half-written is left behind: the archive or
folder is written under a temporary name beside the target and renamed into place at the end;
extraction uses tarfile's ``data`` filter, which refuses links and paths that leave the folder.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import httpx2
import openai

from kubetune_cli.errors import ExitCode, fail, stderr
from kubetune_cli.upload import progress_bar

CHUNK_BYTES: Final = 1 << 20
# The error code of a LoRA model the server is still merging for a merged download.
MERGING: Final = "model_merging"
MERGE_WAIT_SECONDS: Final = 3600.0
# The SDK's own marker for "do not read the body" (what its with_streaming_response sends).
STREAM_BODY: Final = {"X-Stainless-Raw-Response": "stream"}


class BodyReader(io.RawIOBase):
    """A response body as a forward-only readable stream, reporting each chunk it takes."""

    def __init__(self, chunks: Iterator[bytes], on_read: Callable[[int], None]) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = b""
        self._on_read = on_read

    def readable(self) -> bool:
        """Always readable."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the body; 0 at its end."""
        if not self._pending:
            self._pending = next(self._chunks, b"")
            self._on_read(len(self._pending))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def archive_name(response: httpx2.Response, model: str) -> str:
    """The archive's file name from ``Content-Disposition`` (else made from the model's)."""
    for part in response.headers.get("content-disposition", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == "filename" and value.strip('"'):
            return Path(value.strip('"')).name
    return model.replace(":", "-") + ".tar"


def download_model(
    client: openai.OpenAI, model: str, weights: str, output: Path | None, *, extract: bool
) -> Path:
    """Download ``model``'s weights; returns the folder (or, not ``extract``ed, the archive)."""
    response = _archive_response(client, model, weights)
    try:
        name = archive_name(response, model)
        folder = name.removesuffix(".tar")
        target = output or Path(folder if extract else name)
        if target.exists():
            fail(f"{target} already exists; choose another --output", ExitCode.USAGE)
        total = int(response.headers.get("content-length") or 0) or None
        with progress_bar() as progress:
            task = progress.add_task(f"Downloading {folder}", total=total)
            body = io.BufferedReader(
                BodyReader(response.iter_bytes(CHUNK_BYTES), lambda n: progress.advance(task, n)),
                CHUNK_BYTES,
            )
            if extract:
                _extract(body, folder, target)
            else:
                _save(body, target)
    except httpx2.HTTPError as exc:  # the body broke off: nothing was kept
        raise openai.APIConnectionError(
            message=f"the download broke off: {exc}", request=response.request
        ) from exc
    finally:
        response.close()
    return target


def _archive_response(client: openai.OpenAI, model: str, weights: str) -> httpx2.Response:
    """The archive's response, its body not read yet. While the server merges a LoRA model
    into its base first (503 ``model_merging``), a spinner shows the wait and the request is
    made again when the server's ``Retry-After`` says.
    """
    path = f"/models/{quote(model, safe=':')}/content"
    options: Any = {"params": {"format": weights}, "headers": STREAM_BODY}
    started = time.monotonic()
    with stderr.status(f"Merging {model} into its base model...") as spinner:
        while True:
            try:
                response: httpx2.Response = client.get(
                    path, cast_to=httpx2.Response, options=options
                )
                return response
            except openai.APIStatusError as exc:
                if exc.code != MERGING or time.monotonic() - started > MERGE_WAIT_SECONDS:
                    raise
                waited = int(time.monotonic() - started)
                spinner.update(f"Merging {model} into its base model ({waited}s)...")
                time.sleep(_retry_after(exc.response))


def _retry_after(response: httpx2.Response) -> float:
    """The server's ``Retry-After`` in seconds (a few when it gives none)."""
    try:
        return min(max(float(response.headers.get("retry-after", "")), 0.5), 60.0)
    except ValueError:
        return 5.0


def _temporary_parent(target: Path) -> Path:
    parent = target.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _save(body: io.BufferedIOBase, target: Path) -> None:
    """Write the archive to ``target`` (through a temporary file beside it)."""
    fd, raw = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=_temporary_parent(target))
    tmp = Path(raw)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(body, out, CHUNK_BYTES)
        tmp.rename(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _extract(body: io.BufferedIOBase, folder: str, target: Path) -> None:
    """Unpack the archive, whose files are in ``folder``, into the new folder ``target``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=_temporary_parent(target)))
    try:
        with tarfile.open(fileobj=body, mode="r|") as archive:
            archive.extractall(tmp, filter="data")
        unpacked = tmp / folder
        if not unpacked.is_dir():
            raise OSError(f"the archive holds no folder {folder}")
        unpacked.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
