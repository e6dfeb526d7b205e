"""The object store every component shares: uploads, events, checkpoints, adapters.

One interface, :class:`ObjectStore`, with two backends that pass the same contract tests
(``tests/objectstore_contract.py``):

- :class:`S3ObjectStore`: any S3-protocol endpoint through boto3 (imported lazily, so importing
  this module needs no boto3).
- :class:`LocalObjectStore`: a folder (local mode). Each object is a plain file at
  ``<root>/<key>``; the store's own bookkeeping (temp files, metadata sidecars) lives under
  ``<root>/.kubetune/`` and is never listed.

What every backend guarantees:

- Writes stream with constant memory and compute the object's sha256 on the way; an object is
  visible (readable, listed) only once it is completely written, and a write that fails (the
  source raises, ``on_chunk`` raises, the network fails) leaves nothing behind and leaves any
  previous object at that key untouched.
- Every object written here carries its whole-object sha256 (hex) in its user metadata under
  ``sha256``; readers check it when they reach the end of an object.
- Keys are validated before any I/O (:func:`validate_key`): no leading ``/``, no empty, ``.`` or
  ``..`` segments, no control characters or backslashes, and no ``.kubetune`` segment (reserved
  for the store's own bookkeeping).
- ``list`` returns keys in S3 order (UTF-8 byte order, which is Python's ``str`` order).
- Small objects can be compared and swapped (:meth:`ObjectStore.get_versioned`,
  :meth:`ObjectStore.put_if`): S3's conditional writes (``If-None-Match: *``, ``If-Match``) on
  S3, a check under the key's exclusive lock locally. Leases are built on them.
"""

from __future__ import annotations

import abc
import base64
import builtins
import contextlib
import fcntl
import hashlib
import io
import itertools
import json
import logging
import math
import mimetypes
import os
import re
import stat
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, Final, Self

from kubetune.settings import ObjectStoreBackend, ObjectStoreSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import (
        CompletedPartTypeDef,
        CopySourceTypeDef,
        PaginatorConfigTypeDef,
    )

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024
GiB: Final = 1024 * MiB
DEFAULT_PART_SIZE: Final = 8 * MiB
MIN_PART_SIZE: Final = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS: Final = 10_000  # S3's maximum number of parts in one multipart upload
MAX_SINGLE_COPY: Final = 5 * GiB  # the largest object one CopyObject (or one part copy) may copy
READ_SIZE: Final = 1 * MiB  # what one read of a source or an object returns at most
MAX_KEY_BYTES: Final = 1024  # S3's limit
MAX_METADATA_BYTES: Final = 2048  # S3's limit on user metadata (keys + values, UTF-8)
SHA256_METADATA_KEY: Final = "sha256"
RESERVED_SEGMENT: Final = ".kubetune"
DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
_RACE_RETRIES: Final = 20  # local backend: attempts to create a folder a delete keeps pruning

# Backslashes are separators on Windows and control characters break logs and headers; kubetune
# never builds keys with either, so refusing them costs nothing.
_FORBIDDEN_CHARS: Final = re.compile(r"[\x00-\x1f\x7f\\]")
# S3 lowercases metadata keys; underscores are dropped by common proxies (nginx by default), so
# only names that survive every hop unchanged are accepted.
_METADATA_KEY_RE: Final = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# Metadata travels as HTTP headers: printable ASCII, and surrounding spaces would be trimmed.
_HEADER_VALUE_RE: Final = re.compile(r"^(?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?$")


# Errors ------------------------------------------------------------------------------------
class ObjectStoreError(Exception):
    """Base class of the errors this module raises."""


class ObjectNotFound(ObjectStoreError, KeyError):
    """No object exists at ``key``."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"no object at {self.key!r}"


class InvalidKey(ObjectStoreError, ValueError):
    """A key or prefix that the store refuses (see :func:`validate_key`)."""


class ChecksumMismatch(ObjectStoreError):
    """The bytes read or written do not match the sha256 recorded for them."""


class PreconditionFailed(ObjectStoreError):
    """A conditional write found the object in another version than the one it expected."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"{self.key!r} changed since it was read"


# Values ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PutResult:
    """What a completed write stored."""

    key: str
    size: int
    sha256_hex: str


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object's size, time and (from ``head``/``open_stream`` only) metadata.

    ``metadata`` and ``content_type`` are None on objects returned by ``list``: an S3 listing
    does not carry them, and the local backend mirrors that so callers cannot come to rely on it.
    """

    key: str
    size: int
    last_modified: datetime
    content_type: str | None = None
    metadata: dict[str, str] | None = field(default=None, hash=False)

    @property
    def sha256(self) -> str | None:
        """The whole-object sha256 (hex) recorded when the object was written, if known."""
        return (self.metadata or {}).get(SHA256_METADATA_KEY)


@dataclass(frozen=True, slots=True)
class VersionedObject:
    """A small object's bytes and the version tag a conditional write compares against."""

    data: bytes
    tag: str


# Validation --------------------------------------------------------------------------------
def _check_segments(text: str, what: str, original: str) -> None:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidKey(f"{what} {original!r} is not valid UTF-8") from exc
    if size > MAX_KEY_BYTES:
        raise InvalidKey(f"{what} is longer than {MAX_KEY_BYTES} bytes")
    if _FORBIDDEN_CHARS.search(text):
        raise InvalidKey(f"{what} {original!r} holds a control character or a backslash")
    if text.startswith("/"):
        raise InvalidKey(f"{what} {original!r} starts with '/'")
    for segment in text.split("/"):
        if segment == "":
            raise InvalidKey(f"{what} {original!r} has an empty path segment")
        if segment in (".", ".."):
            raise InvalidKey(f"{what} {original!r} has a {segment!r} path segment")
        if segment == RESERVED_SEGMENT:
            raise InvalidKey(f"{what} {original!r} uses the reserved name {RESERVED_SEGMENT!r}")


def validate_key(key: str) -> str:
    """Return ``key`` if the store accepts it as an object key, else raise :class:`InvalidKey`."""
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"object key must be a non-empty string, got {key!r}")
    _check_segments(key, "object key", key)
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a valid listing prefix (empty, or a key that may end in '/')."""
    if not isinstance(prefix, str):
        raise InvalidKey(f"prefix must be a string, got {prefix!r}")
    if prefix:
        _check_segments(prefix.removesuffix("/"), "prefix", prefix)
    return prefix


def _folder(prefix: str) -> str:
    """A validated prefix that names a folder: empty, or ending in '/'."""
    validate_prefix(prefix)
    return prefix if not prefix or prefix.endswith("/") else f"{prefix}/"


def _user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for name, value in (metadata or {}).items():
        if not isinstance(name, str) or not _METADATA_KEY_RE.match(name):
            raise ValueError(f"metadata key {name!r} must match {_METADATA_KEY_RE.pattern}")
        if name == SHA256_METADATA_KEY:
            raise ValueError(f"metadata key {name!r} is set by the store itself")
        if not isinstance(value, str) or not _HEADER_VALUE_RE.match(value):
            raise ValueError(
                f"metadata value for {name!r} must be printable ASCII without surrounding "
                "spaces (encode anything else, e.g. percent-encoding)"
            )
        result[name] = value
    total = sum(len(k) + len(v) for k, v in result.items()) + len(SHA256_METADATA_KEY) + 64
    if total > MAX_METADATA_BYTES:
        raise ValueError(f"metadata takes {total} bytes; S3 allows {MAX_METADATA_BYTES}")
    return result


def _content_type(content_type: str | None) -> str:
    if content_type is None:
        return DEFAULT_CONTENT_TYPE
    if not content_type or not _HEADER_VALUE_RE.match(content_type):
        raise ValueError(f"content type {content_type!r} must be printable ASCII")
    return content_type


# Streaming helpers -------------------------------------------------------------------------
def _source_chunks(stream: BinaryIO | Iterable[bytes], read_size: int) -> Iterator[bytes]:
    """The bytes of a file-like object or an iterable of chunks, skipping empty chunks."""
    if isinstance(stream, bytes | bytearray | memoryview):
        # bytes is an Iterable[int]; iterating it would send single integers. Take it whole.
        if stream:
            yield bytes(stream)
        return
    read = getattr(stream, "read", None)
    if callable(read):
        while True:
            chunk = read(read_size)
            if chunk is None:  # a non-blocking stream with nothing ready: not ours to poll
                raise TypeError("non-blocking streams are not supported")
            if not chunk:
                return
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError(f"stream must be opened in binary mode, read() gave {chunk!r:.40}")
            yield bytes(chunk)
    else:
        for chunk in stream:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError(f"stream must yield bytes, got {type(chunk).__name__}")
            if chunk:
                yield bytes(chunk)


def _create_temp(folder: Path, prefix: str) -> tuple[int, Path]:
    """A new, empty file for writing, named ``<prefix><random>.tmp``.

    Unlike mkstemp's 0600, its mode follows the umask like any file a program writes: a
    downloaded adapter may be read by another user (vLLM's).
    """
    path = folder / f"{prefix}{uuid.uuid4().hex}.tmp"
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path


class _Digest:
    """sha256 and size of everything fed through it, calling ``on_chunk`` on each chunk."""

    def __init__(self, on_chunk: Callable[[bytes], None] | None = None) -> None:
        self._sha = hashlib.sha256()
        self._on_chunk = on_chunk
        self.size = 0

    def feed(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if self._on_chunk is not None:
                self._on_chunk(chunk)
            self._sha.update(chunk)
            self.size += len(chunk)
            yield chunk

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def b64digest(self) -> str:
        return base64.b64encode(self._sha.digest()).decode("ascii")


def _b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def _split_parts(chunks: Iterable[bytes], part_size: int) -> Iterator[tuple[bytes, bool]]:
    """Regroup chunks into (part, is_last): parts of exactly ``part_size`` bytes, the last 1..all.

    A part is handed out as soon as more data is known to follow it, so at most one part (plus
    one chunk) is held in memory, and the first answer already tells a single PutObject from a
    multipart upload. An empty source gives one empty last part.
    """
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) > part_size:
            yield bytes(buffer[:part_size]), False
            del buffer[:part_size]
    yield bytes(buffer), True


def _remaining_size(stream: object) -> int | None:
    """Bytes left in a seekable binary stream, or None if it cannot tell without reading."""
    seekable = getattr(stream, "seekable", None)
    if not callable(getattr(stream, "read", None)) or not callable(seekable):
        return None
    try:
        if not seekable():
            return None
        file: Any = stream
        start = int(file.tell())
        end = int(file.seek(0, os.SEEK_END))
        file.seek(start)
    except (OSError, ValueError):
        return None
    return max(end - start, 0)


class _ClosedOnExit:
    """``with thing:`` closes ``thing`` at the end (readers and stores alike)."""

    def close(self) -> None:
        """Release what it holds (connections, files); nothing by default."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ObjectReader(_ClosedOnExit, Iterator[bytes]):
    """The chunks of one object, opened eagerly so a missing key raises when it is opened.

    ``info`` describes the object as it is being read. When the last chunk has been read, the
    bytes are checked against the sha256 recorded at write time (if ``verify`` and one was
    recorded) and :class:`ChecksumMismatch` is raised instead of ending the iteration quietly.
    Use it as a context manager (or call ``close``) to release the file or connection early.
    """

    def __init__(
        self,
        info: ObjectInfo,
        chunks: Iterator[bytes],
        close: Callable[[], None],
        *,
        verify: bool = True,
    ) -> None:
        self.info = info
        self._chunks = chunks
        self._close = close
        self._sha = hashlib.sha256() if verify and info.sha256 else None
        self._size = 0
        self._done = False

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self._finish()
            raise
        except BaseException:
            self.close()
            raise
        if self._sha is not None:
            self._sha.update(chunk)
        self._size += len(chunk)
        return chunk

    def _finish(self) -> None:
        self.close()
        if self._sha is not None and self._sha.hexdigest() != self.info.sha256:
            raise ChecksumMismatch(
                f"{self.info.key!r}: read {self._size} bytes with sha256 {self._sha.hexdigest()},"
                f" recorded {self.info.sha256}"
            )

    def close(self) -> None:
        """Release the underlying file or connection; further iteration ends at once."""
        if not self._done:
            self._done = True
            self._close()


# The interface -----------------------------------------------------------------------------
class ObjectStore(_ClosedOnExit, abc.ABC):
    """A flat key → bytes store with S3 semantics. Thread-safe; the API calls it from a pool."""

    @abc.abstractmethod
    def put_stream(
        self,
        key: str,
        stream: BinaryIO | Iterable[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> PutResult:
        """Store everything ``stream`` yields at ``key``, atomically, with constant memory.

        ``on_chunk`` sees every chunk as it is read (to validate the data in the same pass); if it
        or the stream raises, nothing is stored and the exception propagates. The object's sha256
        (hex) is added to its metadata as ``sha256``; ``metadata`` keys must be lowercase
        ``[a-z0-9-]`` and values printable ASCII (they travel as HTTP headers on S3).
        """

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> PutResult:
        """Store ``data`` at ``key``."""
        # A seekable stream: on S3 a large one is hashed first and needs no server-side copy.
        stream = io.BytesIO(data)
        return self.put_stream(key, stream, content_type=content_type, metadata=metadata)

    def put_json(
        self, key: str, obj: object, *, metadata: Mapping[str, str] | None = None
    ) -> PutResult:
        """Store ``obj`` as UTF-8 JSON (strict: NaN and infinities are refused, not written)."""
        data = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
        return self.put_bytes(key, data, content_type="application/json", metadata=metadata)

    @abc.abstractmethod
    def open_stream(self, key: str, *, verify: bool = True) -> ObjectReader:
        """Open ``key`` for reading in chunks; raises :class:`ObjectNotFound` at once if missing.

        With ``verify`` the bytes are checked against the recorded sha256 at the end of the object.
        """

    def get_bytes(self, key: str) -> bytes:
        """The whole object at ``key`` (verified against its sha256)."""
        with self.open_stream(key) as reader:
            return b"".join(reader)

    def get_json(self, key: str) -> Any:
        """The object at ``key`` parsed as JSON."""
        return json.loads(self.get_bytes(key))

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size, time, content type and metadata of ``key``, or None if there is no such object."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""
        return self.head(key) is not None

    @abc.abstractmethod
    def get_versioned(self, key: str) -> VersionedObject | None:
        """A small object's bytes with its version tag (for :meth:`put_if`); None if missing."""

    @abc.abstractmethod
    def put_if(self, key: str, data: bytes, *, expected_tag: str | None) -> str:
        """Store a small JSON document ``data`` at ``key`` only if the object there is still
        the version ``expected_tag`` names (None: only if there is none); returns the new
        version's tag.

        Raises :class:`PreconditionFailed` otherwise, and writes nothing. On S3 the tag is the
        ETag, which names the content: callers that race write distinct bodies (a lease holds
        its holder and time), so an old tag never matches a newer version by accident.
        """

    @abc.abstractmethod
    def list(self, prefix: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a plain string prefix), in key order.

        ``start_after`` skips every key up to and including it. Results carry no metadata.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with ``prefix``; returns how many were listed.

        The prefix must not be empty: wiping a whole store takes more than one call's mistake.
        """
        if not validate_prefix(prefix):
            raise InvalidKey("delete_prefix needs a non-empty prefix")
        keys = [info.key for info in self.list(prefix)]
        for key in keys:
            self.delete(key)
        return len(keys)

    def download_prefix(
        self, prefix: str, dest_dir: Path, *, only: Collection[str] | None = None
    ) -> builtins.list[Path]:
        """Copy every object under the folder ``prefix`` to ``dest_dir``/<rest of the key>, or
        only those whose rest of the key is in ``only`` (each of which must exist, else
        :class:`ObjectNotFound`).

        Each file appears under its name only once completely written and verified. Returns the
        paths written, in key order.
        """
        folder = _folder(prefix)
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest_root = dest_dir.resolve()
        written: builtins.list[Path] = []
        infos = self.list(folder)
        if only is not None:
            wanted = {folder + name for name in only}
            infos = iter([i for i in infos if i.key in wanted])
        for info in infos:
            validate_key(info.key)  # keys written by other tools may not be safe as paths
            target = dest_dir.joinpath(*info.key[len(folder) :].split("/"))
            if not target.resolve().is_relative_to(dest_root):
                raise InvalidKey(f"{info.key!r} would land outside {dest_dir}")
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = _create_temp(target.parent, ".download-")
            try:
                with os.fdopen(fd, "wb") as out, self.open_stream(info.key) as reader:
                    for chunk in reader:
                        out.write(chunk)
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            written.append(target)
        if only is not None and len(written) < len(set(only)):
            missing = sorted(set(only) - {p.relative_to(dest_dir).as_posix() for p in written})
            raise ObjectNotFound(f"{folder}{missing[0]}")
        return written

    def upload_dir(
        self,
        src_dir: Path,
        prefix: str,
        *,
        last: str | None = None,
        max_workers: int = 4,
    ) -> builtins.list[PutResult]:
        """Upload every file under ``src_dir`` to the folder ``prefix``/<relative path>.

        ``last`` (a path relative to ``src_dir``, e.g. ``manifest.json``) is uploaded only after
        every other file has been stored, and not at all if any of them failed: that is the
        checkpoint commit protocol (a checkpoint without its manifest does not exist). Other
        files go up ``max_workers`` at a time. All keys are validated before anything is sent.
        Symlinked files are uploaded as their content; symlinked folders are not followed.
        Returns the results in upload order, ``last`` at the end.
        """
        folder = _folder(prefix)
        if not src_dir.is_dir():
            raise NotADirectoryError(f"{src_dir} is not a folder")
        files: builtins.list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(src_dir):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                rel = path.relative_to(src_dir).as_posix()
                files.append((validate_key(folder + rel), path))
        files.sort()
        final: tuple[str, Path] | None = None
        if last is not None:
            last_key = folder + PurePosixPath(last).as_posix()
            matches = [entry for entry in files if entry[0] == last_key]
            if not matches:
                raise FileNotFoundError(f"{last!r} is not a file under {src_dir}")
            final = matches[0]
            files.remove(final)
        results = self._upload_files(files, max_workers)
        if final is not None:
            results.append(self._upload_file(*final))
        return results

    def _upload_file(self, key: str, path: Path) -> PutResult:
        content_type, _ = mimetypes.guess_type(path.name)
        with path.open("rb") as stream:
            return self.put_stream(key, stream, content_type=content_type)

    def _upload_files(
        self, files: builtins.list[tuple[str, Path]], max_workers: int
    ) -> builtins.list[PutResult]:
        if max_workers <= 1 or len(files) <= 1:
            return [self._upload_file(key, path) for key, path in files]
        with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="upload") as pool:
            futures = [pool.submit(self._upload_file, key, path) for key, path in files]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                # Files not started yet are dropped; the pool waits for those in flight.
                for future in futures:
                    future.cancel()
                raise
        return [future.result() for future in futures]


# Local folder ------------------------------------------------------------------------------
class LocalObjectStore(ObjectStore):
    """Objects as plain files under a folder, for local mode and tests.

    ``<root>/<key>`` holds an object's bytes; ``<root>/.kubetune/meta/`` holds one JSON sidecar
    per object (content type and metadata, named by the sha256 of the key so that no key can
    collide with another's sidecar); ``<root>/.kubetune/tmp/`` holds writes in progress, on the
    same filesystem so that ``os.replace`` publishes them atomically.

    Differences from S3 that the contract cannot hide: a folder cannot hold both an object
    ``a`` and an object ``a/b`` (that raises :class:`InvalidKey`), keys that differ only in case
    collide on case-insensitive filesystems, and ``list`` sorts the matching keys in memory.
    A write publishes its sidecar and its data file under an exclusive ``flock`` and a reader
    opens the data file and reads the sidecar under a shared one, so a reader racing an
    overwrite always pairs bytes and checksum of the same version (across threads and processes
    alike: ``flock`` locks belong to the open file, not to the process). The locks are striped
    over 256 files named by the key's hash, held only for those few system calls, never while
    bytes stream.
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self._fsync = fsync
        internal = self.root / RESERVED_SEGMENT
        self._tmp = internal / "tmp"
        self._meta = internal / "meta"
        self._locks = internal / "locks"
        for folder in (self._tmp, self._meta, self._locks):
            folder.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        """The file that holds (or would hold) ``key``'s bytes.

        Refuses, besides invalid keys, any key that resolves outside the root (through a
        symlink inside it, say): validation is the first line of defence, this the second.
        """
        path = self.root.joinpath(*validate_key(key).split("/"))
        if not path.resolve().is_relative_to(self.root):
            raise InvalidKey(f"{key!r} resolves outside the store's folder")
        return path

    def _meta_path(self, key: str) -> Path:
        name = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self._meta / name[:2] / f"{name}.json"

    @contextlib.contextmanager
    def _key_lock(self, key: str, *, exclusive: bool) -> Iterator[None]:
        """Hold the key's stripe lock: exclusive to publish a version, shared to open one."""
        stripe = hashlib.sha256(key.encode("utf-8")).hexdigest()[:2]
        fd = os.open(self._locks / stripe, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _read_meta(self, key: str) -> dict[str, Any]:
        try:
            meta = json.loads(self._meta_path(key).read_bytes())
        except (OSError, ValueError):
            return {}  # an object put in place by hand has no sidecar; it still exists
        return meta if isinstance(meta, dict) and meta.get("key") == key else {}

    def _write_atomically(self, path: Path, data: bytes) -> None:
        fd, tmp = _create_temp(self._tmp, "meta-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                if self._fsync:
                    out.flush()
                    os.fsync(out.fileno())
            self._replace_into(tmp, path, key=None)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _clashes(self, path: Path) -> bool:
        """Whether ``path`` is a folder or sits below a file: 'a' and 'a/b' cannot coexist."""
        if path.is_dir():
            return True
        folder = path.parent
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                mode = folder.stat().st_mode
            except OSError:
                folder = folder.parent
                continue
            return not stat.S_ISDIR(mode)
        return False

    def _conflict(self, key: str) -> InvalidKey:
        return InvalidKey(
            f"{key!r} clashes with an existing object: the local backend cannot hold both "
            "'a' and 'a/...'"
        )

    def _replace_into(self, tmp: Path, path: Path, *, key: str | None) -> None:
        """``os.replace`` tmp to path, making its folders first.

        Deletes prune empty folders, possibly between our mkdir and our replace (in this
        process or another one on the same folder), so losing that race is retried.
        """
        for attempt in range(_RACE_RETRIES):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, path)
                return
            except OSError as exc:
                if key is not None and self._clashes(path):
                    raise self._conflict(key) from exc
                raced = isinstance(exc, FileNotFoundError | FileExistsError)
                if not raced or attempt == _RACE_RETRIES - 1:
                    raise

    def put_stream(
        self,
        key: str,
        stream: BinaryIO | Iterable[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> PutResult:
        """Write to a temp file under the root, then publish it with ``os.replace``."""
        result, _ = self._put(key, stream, content_type, metadata, on_chunk, precondition=None)
        return result

    def _put(
        self,
        key: str,
        stream: BinaryIO | Iterable[bytes],
        content_type: str | None,
        metadata: Mapping[str, str] | None,
        on_chunk: Callable[[bytes], None] | None,
        *,
        precondition: Callable[[os.stat_result | None], None] | None,
    ) -> tuple[PutResult, os.stat_result]:
        """Write, then publish under the key's exclusive lock once ``precondition`` (given the
        current version's stat) has not raised; returns the published version's stat.
        """
        path = self.path_for(key)
        user = _user_metadata(metadata)
        ctype = _content_type(content_type)
        digest = _Digest(on_chunk)
        fd, tmp = _create_temp(self._tmp, "put-")
        meta_path = self._meta_path(key)
        meta_written = False
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in digest.feed(_source_chunks(stream, READ_SIZE)):
                    out.write(chunk)
                if self._fsync:
                    out.flush()
                    os.fsync(out.fileno())
            # Folders are made only now, so a failed stream leaves no empty folders behind.
            if self._clashes(path):
                raise self._conflict(key)
            sidecar = {
                "key": key,
                "content_type": ctype,
                "metadata": {**user, SHA256_METADATA_KEY: digest.hexdigest()},
            }
            with self._key_lock(key, exclusive=True):
                if precondition is not None:
                    precondition(self._stat(path))
                self._write_atomically(meta_path, json.dumps(sidecar, sort_keys=True).encode())
                meta_written = True
                self._replace_into(tmp, path, key=key)
                published = path.stat()
        except BaseException:
            tmp.unlink(missing_ok=True)
            if meta_written:
                meta_path.unlink(missing_ok=True)
            raise
        return PutResult(key=key, size=digest.size, sha256_hex=digest.hexdigest()), published

    def get_versioned(self, key: str) -> VersionedObject | None:
        """The file's bytes and a tag naming this version of the file."""
        path = self.path_for(key)
        with self._key_lock(key, exclusive=False):
            try:
                with path.open("rb") as file:
                    st = os.fstat(file.fileno())
                    data = file.read() if stat.S_ISREG(st.st_mode) else None
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None
        return None if data is None else VersionedObject(data, _local_tag(st))

    def put_if(self, key: str, data: bytes, *, expected_tag: str | None) -> str:
        """Publish ``data`` if the file is still the version ``expected_tag`` names; the check
        and the publication happen under the key's exclusive lock, so they are one step.
        """

        def still_expected(current: os.stat_result | None) -> None:
            if (None if current is None else _local_tag(current)) != expected_tag:
                raise PreconditionFailed(key)

        _, published = self._put(
            key, io.BytesIO(data), "application/json", None, None, precondition=still_expected
        )
        return _local_tag(published)

    def _stat(self, path: Path) -> os.stat_result | None:
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st if stat.S_ISREG(st.st_mode) else None

    def _info(self, key: str, st: os.stat_result, *, with_meta: bool) -> ObjectInfo:
        modified = datetime.fromtimestamp(st.st_mtime, UTC)
        if not with_meta:
            return ObjectInfo(key=key, size=st.st_size, last_modified=modified)
        meta = self._read_meta(key)
        user = meta.get("metadata")
        ctype = meta.get("content_type")
        return ObjectInfo(
            key=key,
            size=st.st_size,
            last_modified=modified,
            content_type=ctype if isinstance(ctype, str) else None,
            metadata={str(k): str(v) for k, v in user.items()} if isinstance(user, dict) else {},
        )

    def open_stream(self, key: str, *, verify: bool = True) -> ObjectReader:
        """Open the object's file; a missing key raises :class:`ObjectNotFound` here."""
        path = self.path_for(key)
        with self._key_lock(key, exclusive=False):
            try:
                file = path.open("rb")
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
                raise ObjectNotFound(key) from exc
            st = os.fstat(file.fileno())
            if not stat.S_ISREG(st.st_mode):
                file.close()
                raise ObjectNotFound(key)
            info = self._info(key, st, with_meta=True)
        chunks = iter(lambda: file.read(READ_SIZE), b"")
        return ObjectReader(info, chunks, file.close, verify=verify)

    def head(self, key: str) -> ObjectInfo | None:
        """Stat the file and read its sidecar."""
        path = self.path_for(key)
        with self._key_lock(key, exclusive=False):
            st = self._stat(path)
            return None if st is None else self._info(key, st, with_meta=True)

    def list(self, prefix: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Walk the folder that holds ``prefix`` and yield matching files in key order."""
        validate_prefix(prefix)
        base_rel = prefix.rpartition("/")[0]
        base = self.root.joinpath(*base_rel.split("/")) if base_rel else self.root
        if not base.resolve().is_relative_to(self.root):
            raise InvalidKey(f"prefix {prefix!r} resolves outside the store's folder")
        keys: builtins.list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            rel = "" if rel == "." else f"{rel}/"
            # Skip bookkeeping and any folder that cannot hold a matching key.
            dirnames[:] = [
                d
                for d in dirnames
                if d != RESERVED_SEGMENT
                and (f"{rel}{d}/".startswith(prefix) or prefix.startswith(f"{rel}{d}/"))
            ]
            for name in filenames:
                key = rel + name
                if key.startswith(prefix) and (start_after is None or key > start_after):
                    keys.append(key)
        # Python orders str by code point, which is the UTF-8 byte order S3 lists in.
        keys.sort()
        for key in keys:
            try:
                validate_key(key)  # a file dropped in by hand may not be a valid key
            except InvalidKey:
                continue
            try:
                st = self.root.joinpath(*key.split("/")).lstat()
            except OSError:
                continue  # deleted since the walk
            if stat.S_ISREG(st.st_mode):  # symlinks and other oddities are not objects
                yield self._info(key, st, with_meta=False)

    def delete(self, key: str) -> None:
        """Remove the file, then its sidecar, then folders left empty."""
        path = self.path_for(key)
        meta_path = self._meta_path(key)
        with self._key_lock(key, exclusive=True):  # a racing put keeps its file and sidecar
            if path.is_file():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            meta_path.unlink(missing_ok=True)
        self._prune(path.parent, self.root)
        self._prune(meta_path.parent, self._meta)

    @staticmethod
    def _prune(folder: Path, stop: Path) -> None:
        # Empty folders would otherwise block a later object named like them ('a' after 'a/b').
        while folder != stop and folder.is_relative_to(stop):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent


# S3 ----------------------------------------------------------------------------------------
# Checksums, as found against moto 5.2 (server mode) with botocore 1.44:
# - moto records a checksum only when the request carries ``x-amz-sdk-checksum-algorithm``,
#   which botocore sends only if ``ChecksumAlgorithm`` is passed. Passing ``ChecksumSHA256``
#   alone sends ``x-amz-checksum-sha256`` (AWS stores and checks it) but moto drops it, so
#   head/get with ``ChecksumMode=ENABLED`` show nothing. Passing both works on both.
#   ``request_checksum_calculation``/``response_checksum_validation`` make no difference here:
#   an explicit ``ChecksumSHA256`` is always sent as is. They are left to botocore's defaults
#   (and so to AWS_REQUEST_CHECKSUM_CALCULATION / AWS_RESPONSE_CHECKSUM_VALIDATION), which
#   owners of older MinIO/Ceph set to ``when_required``.
# - moto never validates a sent checksum (AWS answers BadDigest); botocore's default response
#   validation does catch a wrong full-object checksum on GET (FlexibleChecksumError, turned into
#   ChecksumMismatch here), and our own reader checks the ``sha256`` metadata at the end.
# - A multipart upload's SHA256 is a checksum of the part checksums ("<b64>-<parts>", type
#   COMPOSITE), not the object's sha256; S3 offers full-object multipart checksums only for CRCs.
#   CopyObject with ChecksumAlgorithm=SHA256 makes S3 (and moto) compute a full-object SHA256.
# - User metadata is fixed when a multipart upload is created, before a stream's sha256 is
#   known. So: a seekable source (a file) is hashed in a first pass and uploaded in a second;
#   an unseekable one (an HTTP body) is uploaded to a staging key under
#   ``<internal_prefix>.kubetune/staging/`` and server-side copied to its key with the sha256
#   in its metadata (the copy is atomic, and its full-object checksum is compared with ours).
class S3ObjectStore(ObjectStore):
    """Objects in an S3 bucket (AWS, MinIO, Ceph, moto), through one boto3 client.

    Credentials come from the environment as boto3 reads them (env vars, profile, web identity).
    Writes of at most ``part_size`` bytes are one PutObject; larger ones a multipart upload,
    aborted if anything fails. ``internal_prefix`` is the folder (normally the settings' key
    prefix) under which in-flight staging objects live; a bucket lifecycle rule that expires
    ``<prefix>.kubetune/`` and aborts incomplete multipart uploads after a day cleans up after
    processes that die mid-write.

    ``client`` replaces the client the store would make from ``endpoint_url`` and ``region``;
    ``part_size`` (at least 5 MiB), ``copy_part_size`` (largest single server-side copy, at most
    5 GiB) and ``page_size`` (keys per listing request) exist mostly so tests can stay small.
    Make one store per process and share it: creating a client costs about 0.1 s.
    """

    def __init__(
        self,
        bucket: str,
        *,
        client: S3Client | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        internal_prefix: str = "",
        part_size: int = DEFAULT_PART_SIZE,
        copy_part_size: int = MAX_SINGLE_COPY,
        page_size: int = 1000,
        timeouts: S3Timeouts | None = None,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} (S3's minimum)")
        if not MIN_PART_SIZE <= copy_part_size <= MAX_SINGLE_COPY:
            raise ValueError(f"copy_part_size must be in [{MIN_PART_SIZE}, {MAX_SINGLE_COPY}]")
        if client is None:
            import boto3
            from botocore.config import Config

            # A session of its own: boto3's default session is not safe to share across threads.
            timeouts = timeouts or S3Timeouts()
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                config=Config(
                    connect_timeout=timeouts.connect_seconds,
                    read_timeout=timeouts.read_seconds,
                    retries={"mode": "standard", "total_max_attempts": timeouts.max_attempts},
                ),
            )
        self.bucket = bucket
        self._client: S3Client = client
        internal = _folder(internal_prefix.strip("/"))
        self._staging = f"{internal}{RESERVED_SEGMENT}/staging/"
        self._part_size = part_size
        self._copy_part_size = copy_part_size
        self._page_size = page_size

    def __repr__(self) -> str:
        return f"S3ObjectStore(bucket={self.bucket!r})"

    @property
    def client(self) -> S3Client:
        """The boto3 S3 client this store uses."""
        return self._client

    def close(self) -> None:
        """Close the client's connection pool."""
        self._client.close()

    # Writing ---------------------------------------------------------------------------------
    def put_stream(
        self,
        key: str,
        stream: BinaryIO | Iterable[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> PutResult:
        """One PutObject up to ``part_size`` bytes, else a multipart upload (see module notes)."""
        validate_key(key)
        user = _user_metadata(metadata)
        ctype = _content_type(content_type)
        remaining = _remaining_size(stream)
        if remaining is not None and remaining > self._part_size:
            return self._put_seekable(key, stream, ctype, user, on_chunk)
        digest = _Digest(on_chunk)
        parts = _split_parts(digest.feed(_source_chunks(stream, READ_SIZE)), self._part_size)
        first, is_last = next(parts)
        if is_last:
            sha = digest.hexdigest()
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=first,
                ContentType=ctype,
                Metadata={**user, SHA256_METADATA_KEY: sha},
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=digest.b64digest(),
            )
            return PutResult(key=key, size=digest.size, sha256_hex=sha)
        rest = (part for part, _ in parts)
        return self._put_staged(key, itertools.chain([first], rest), digest, ctype, user)

    def _put_seekable(
        self,
        key: str,
        stream: BinaryIO | Iterable[bytes],
        ctype: str,
        user: dict[str, str],
        on_chunk: Callable[[bytes], None] | None,
    ) -> PutResult:
        file: Any = stream
        start = file.tell()
        first_pass = _Digest(on_chunk)
        for _ in first_pass.feed(_source_chunks(stream, READ_SIZE)):
            pass
        file.seek(start)
        sha = first_pass.hexdigest()
        # Parts must number at most 10,000: grow them for huge files (rounded to whole MiB).
        part_size = max(self._part_size, math.ceil(first_pass.size / MAX_PARTS / MiB) * MiB)
        second_pass = _Digest()

        def parts() -> Iterator[bytes]:
            chunks = second_pass.feed(_source_chunks(stream, READ_SIZE))
            for part, _ in _split_parts(chunks, part_size):
                yield part
            # Raised before the upload completes, so a file that changed is never published.
            if (second_pass.size, second_pass.hexdigest()) != (first_pass.size, sha):
                raise ChecksumMismatch(f"{key!r}: the source changed while it was uploaded")

        self._multipart(key, parts(), ctype, {**user, SHA256_METADATA_KEY: sha})
        return PutResult(key=key, size=first_pass.size, sha256_hex=sha)

    def _put_staged(
        self,
        key: str,
        parts: Iterator[bytes],
        digest: _Digest,
        ctype: str,
        user: dict[str, str],
    ) -> PutResult:
        staging = f"{self._staging}{uuid.uuid4().hex}"
        self._multipart(staging, parts, ctype, user)
        sha = digest.hexdigest()
        try:
            s3_sum = self._copy(
                staging, key, digest.size, ctype, {**user, SHA256_METADATA_KEY: sha}
            )
            # The copy holds the bytes we hashed, so S3's full-object checksum of it must equal
            # ours; checked afterwards because CopyObject takes no expected value.
            if s3_sum is not None and "-" not in s3_sum and s3_sum != digest.b64digest():
                self._client.delete_object(Bucket=self.bucket, Key=key)
                raise ChecksumMismatch(f"{key!r}: S3 computed {s3_sum}, sent {digest.b64digest()}")
        finally:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=staging)
            except Exception:
                log.warning("could not delete staging object %s", staging, exc_info=True)
        return PutResult(key=key, size=digest.size, sha256_hex=sha)

    def _multipart(
        self, key: str, parts: Iterable[bytes], ctype: str, metadata: dict[str, str]
    ) -> None:
        upload_id = self._client.create_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            ContentType=ctype,
            Metadata=metadata,
            ChecksumAlgorithm="SHA256",
        )["UploadId"]
        try:
            done: builtins.list[CompletedPartTypeDef] = []
            for number, part in enumerate(parts, start=1):
                if number > MAX_PARTS:
                    raise ValueError(
                        f"{key!r} needs more than {MAX_PARTS} parts of {self._part_size} bytes"
                    )
                checksum = _b64_sha256(part)
                response = self._client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=part,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=checksum,
                )
                done.append(
                    {"ETag": response["ETag"], "PartNumber": number, "ChecksumSHA256": checksum}
                )
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
            )
        except BaseException:
            self._abort(key, upload_id)
            raise

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception:
            log.warning("could not abort multipart upload of %s", key, exc_info=True)

    def _copy(
        self, src: str, dst: str, size: int, ctype: str, metadata: dict[str, str]
    ) -> str | None:
        """Server-side copy; returns S3's full-object SHA256 of the copy when it reports one."""
        source: CopySourceTypeDef = {"Bucket": self.bucket, "Key": src}
        if size <= self._copy_part_size:
            response = self._client.copy_object(
                Bucket=self.bucket,
                Key=dst,
                CopySource=source,
                MetadataDirective="REPLACE",
                ContentType=ctype,
                Metadata=metadata,
                ChecksumAlgorithm="SHA256",
            )
            return response.get("CopyObjectResult", {}).get("ChecksumSHA256")
        # Beyond 5 GiB one CopyObject is not allowed: copy in ranges (still atomic at complete).
        upload_id = self._client.create_multipart_upload(
            Bucket=self.bucket,
            Key=dst,
            ContentType=ctype,
            Metadata=metadata,
            ChecksumAlgorithm="SHA256",
        )["UploadId"]
        try:
            done: builtins.list[CompletedPartTypeDef] = []
            for number, offset in enumerate(range(0, size, self._copy_part_size), start=1):
                end = min(offset + self._copy_part_size, size) - 1
                result = self._client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=dst,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=source,
                    CopySourceRange=f"bytes={offset}-{end}",
                )["CopyPartResult"]
                part: CompletedPartTypeDef = {"ETag": result["ETag"], "PartNumber": number}
                if "ChecksumSHA256" in result:  # AWS returns it (and then requires it); moto not
                    part["ChecksumSHA256"] = result["ChecksumSHA256"]
                done.append(part)
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=dst, UploadId=upload_id, MultipartUpload={"Parts": done}
            )
        except BaseException:
            self._abort(dst, upload_id)
            raise
        return None  # a composite checksum of the parts, not comparable with the object's

    # Reading ---------------------------------------------------------------------------------
    def _get_object(self, key: str) -> Any:
        """GetObject's response (the body not read yet); ObjectNotFound on 404."""
        validate_key(key)
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_not_found(exc):
                raise ObjectNotFound(key) from exc
            raise

    def open_stream(self, key: str, *, verify: bool = True) -> ObjectReader:
        """GetObject now (a missing key raises here); the body is read as it is iterated."""
        return _reader(key, self._get_object(key), verify=verify)

    def get_versioned(self, key: str) -> VersionedObject | None:
        """GetObject: the body (verified against its sha256) and its ETag."""
        try:
            response = self._get_object(key)
        except ObjectNotFound:
            return None
        with _reader(key, response, verify=True) as reader:
            data = b"".join(reader)
        return VersionedObject(data, str(response["ETag"]))

    def put_if(self, key: str, data: bytes, *, expected_tag: str | None) -> str:
        """A conditional PutObject: ``If-None-Match: *`` to create, ``If-Match`` to replace."""
        validate_key(key)
        from botocore.exceptions import ClientError

        condition: dict[str, str] = (
            {"IfNoneMatch": "*"} if expected_tag is None else {"IfMatch": expected_tag}
        )
        try:
            response = self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType="application/json",
                Metadata={SHA256_METADATA_KEY: hashlib.sha256(data).hexdigest()},
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=_b64_sha256(data),
                **condition,  # type: ignore[arg-type]
            )
        except ClientError as exc:
            # 412 when the version differs; 409 when a concurrent conditional write won; 404
            # when If-Match names an object that is gone.
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _CONDITION_CODES or _is_not_found(exc):
                raise PreconditionFailed(key) from exc
            raise
        return str(response["ETag"])

    def head(self, key: str) -> ObjectInfo | None:
        """HeadObject; None on 404."""
        validate_key(key)
        from botocore.exceptions import ClientError

        try:
            response = self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise
        return ObjectInfo(
            key=key,
            size=response["ContentLength"],
            last_modified=response["LastModified"].astimezone(UTC),
            content_type=response.get("ContentType"),
            metadata=dict(response.get("Metadata", {})),
        )

    def list(self, prefix: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """ListObjectsV2, page after page, hiding the store's staging objects."""
        validate_prefix(prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        config: PaginatorConfigTypeDef = {"PageSize": self._page_size}
        if start_after is None:
            pages = paginator.paginate(Bucket=self.bucket, Prefix=prefix, PaginationConfig=config)
        else:
            pages = paginator.paginate(
                Bucket=self.bucket, Prefix=prefix, StartAfter=start_after, PaginationConfig=config
            )
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if RESERVED_SEGMENT in key.split("/"):
                    continue
                yield ObjectInfo(
                    key=key, size=obj["Size"], last_modified=obj["LastModified"].astimezone(UTC)
                )

    # Deleting --------------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        """DeleteObject (S3 answers success for a missing key too)."""
        validate_key(key)
        self._client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str) -> int:
        """List and DeleteObjects in batches of 1000 (S3's limit per request)."""
        if not validate_prefix(prefix):
            raise InvalidKey("delete_prefix needs a non-empty prefix")
        count = 0
        batch: builtins.list[str] = []
        for info in self.list(prefix):
            batch.append(info.key)
            if len(batch) == 1000:
                count += self._delete_batch(batch)
                batch = []
        if batch:
            count += self._delete_batch(batch)
        return count

    def _delete_batch(self, keys: builtins.list[str]) -> int:
        response = self._client.delete_objects(
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
        )
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise ObjectStoreError(
                f"could not delete {len(errors)} of {len(keys)} objects, e.g. "
                f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
            )
        return len(keys)


def _reader(key: str, response: Any, *, verify: bool) -> ObjectReader:
    """A reader over a GetObject response."""
    body = response["Body"]
    info = ObjectInfo(
        key=key,
        size=response["ContentLength"],
        last_modified=response["LastModified"].astimezone(UTC),
        content_type=response.get("ContentType"),
        metadata=dict(response.get("Metadata", {})),
    )
    return ObjectReader(info, _read_body(key, body), body.close, verify=verify)


def _read_body(key: str, body: Any) -> Iterator[bytes]:
    from botocore.exceptions import FlexibleChecksumError

    try:
        yield from body.iter_chunks(READ_SIZE)
    except FlexibleChecksumError as exc:
        raise ChecksumMismatch(f"{key!r}: {exc}") from exc


def _local_tag(st: os.stat_result) -> str:
    """A local file version: each publication is a new file (a new inode and time)."""
    return f"{st.st_ino:x}.{st.st_mtime_ns:x}.{st.st_size:x}"


# S3's answers to a conditional write that lost: the version differs, or a concurrent one won.
_CONDITION_CODES: Final = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412"})


def _is_not_found(exc: Exception) -> bool:
    # By code, not by HTTP status: a missing bucket is a 404 too, and must not pass for a
    # missing object. HEAD responses have no body, so their code is just "404"; a HEAD on a
    # missing bucket therefore does read as "no such object".
    response: Any = getattr(exc, "response", {})
    return str(response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound")


# Factory -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class S3Timeouts:
    """How long one S3 request may take: the connection, each read, and the tries (the SDK's
    defaults, 60 s reads and up to 5 tries, let an outage hold a caller for minutes).
    """

    connect_seconds: float = 3.0
    read_seconds: float = 20.0
    max_attempts: int = 3


def store_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the object store cannot be reached or is overloaded right now
    (connection refused or timed out, a 5xx, throttling): worth a retry later, not a 500.
    """
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - the local backend without boto3
        return False
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or error.get("Code") in {"SlowDown", "Throttling", "RequestTimeout"}
    return isinstance(exc, BotoCoreError)


def open_object_store(settings: ObjectStoreSettings, *, root: Path | None = None) -> ObjectStore:
    """The store ``settings`` describe.

    For the local backend the folder is ``settings.local_root``, else ``root`` (callers pass
    ``Settings.store_root()``). Keys are used as given: they already carry the settings' prefix
    (see :class:`kubetune.storage_layout.StorageLayout`).
    """
    if settings.backend is ObjectStoreBackend.S3:
        return S3ObjectStore(
            settings.bucket,
            endpoint_url=settings.endpoint_url,
            region=settings.region,
            internal_prefix=settings.prefix,
            timeouts=S3Timeouts(
                settings.connect_timeout_seconds,
                settings.read_timeout_seconds,
                settings.max_attempts,
            ),
        )
    folder = settings.local_root or root
    if folder is None:
        raise ValueError("the local object store needs settings.local_root or a root folder")
    return LocalObjectStore(folder)
