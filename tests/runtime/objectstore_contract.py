"""The behaviour every ObjectStore backend must show, written once and run against each.

A test module subclasses :class:`ObjectStoreContract` and provides a ``backend`` fixture that
returns a :class:`Backend`: the store under test, a fresh key prefix of the test's own, and ways
to look behind the store's back (leftovers of failed writes, tampering with stored bytes).
"""

from __future__ import annotations

import hashlib
import io
import random
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kubetune_runtime.objectstore import (
    ChecksumMismatch,
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    PutResult,
)

MiB = 1024 * 1024
# Backends are built with 5 MiB parts (S3's minimum) so that this size takes three parts.
LARGE_SIZE = 11 * MiB + 12345


class Backend(ABC):
    """A store under test plus the backend-specific ways to inspect it."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix  # every key a test writes starts with it, e.g. "t-1a2b/"

    def key(self, rest: str) -> str:
        return f"{self.prefix}{rest}"

    @abstractmethod
    def leftovers(self) -> list[str]:
        """Anything a write left behind besides committed objects (temp files, open uploads)."""

    @abstractmethod
    def stored_keys(self) -> list[str]:
        """The keys the backend physically holds under the prefix, without asking the store."""

    @abstractmethod
    def tamper(self, key: str, data: bytes) -> None:
        """Replace an object's bytes behind the store's back, keeping its recorded sha256."""


def large_payload(size: int = LARGE_SIZE, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def odd_chunks(
    data: bytes, sizes: tuple[int, ...] = (1, 777, 65536, 3 * MiB + 5)
) -> Iterator[bytes]:
    """``data`` in chunks of varying, part-unaligned sizes (a non-seekable source)."""
    offset, n = 0, 0
    while offset < len(data):
        size = sizes[n % len(sizes)]
        yield data[offset : offset + size]
        offset += size
        n += 1


class Boom(Exception):
    """What a failing source or on_chunk raises."""


def even_chunks(data: bytes, chunk: int = 64 * 1024) -> Iterator[bytes]:
    for offset in range(0, len(data), chunk):
        yield data[offset : offset + chunk]


def failing_source(data: bytes, fail_after: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < len(data):
        if sent >= fail_after:
            raise Boom("source broke")
        yield data[sent : sent + chunk]
        sent += chunk
    raise Boom("source broke at the end")


class FailingFile(io.BytesIO):
    """A seekable file whose reads fail once ``fail_after`` bytes have been read."""

    def __init__(self, data: bytes, fail_after: int) -> None:
        super().__init__(data)
        self.fail_after = fail_after

    def read(self, size: int | None = -1, /) -> bytes:
        if self.tell() >= self.fail_after:
            raise Boom("disk broke")
        return super().read(size)


class ObjectStoreContract:
    """Tests every backend must pass; subclasses provide the ``backend`` fixture."""

    # Put / get / head ----------------------------------------------------------------------
    def test_put_bytes_round_trip_with_metadata(self, backend: Backend) -> None:
        store, key = backend.store, backend.key("orgs/acme/files/file-1")
        data = b'{"messages": []}\n' * 100
        before = datetime.now(UTC) - timedelta(minutes=5)
        result = store.put_bytes(
            key, data, content_type="application/jsonl", metadata={"purpose": "fine-tune"}
        )
        assert result == PutResult(key, len(data), hashlib.sha256(data).hexdigest())
        assert store.get_bytes(key) == data
        info = store.head(key)
        assert info is not None
        assert (info.key, info.size) == (key, len(data))
        assert info.content_type == "application/jsonl"
        assert info.metadata == {"purpose": "fine-tune", "sha256": result.sha256_hex}
        assert info.sha256 == result.sha256_hex
        assert info.last_modified.tzinfo is not None
        assert before < info.last_modified < datetime.now(UTC) + timedelta(minutes=5)
        assert store.exists(key)

    def test_default_content_type_and_empty_object(self, backend: Backend) -> None:
        store, key = backend.store, backend.key("empty")
        result = store.put_bytes(key, b"")
        assert result.size == 0
        assert result.sha256_hex == hashlib.sha256(b"").hexdigest()
        assert store.get_bytes(key) == b""
        info = store.head(key)
        assert info is not None
        assert info.size == 0
        assert info.content_type == "application/octet-stream"
        assert [i.key for i in store.list(backend.prefix)] == [key]

    def test_put_json_round_trip(self, backend: Backend) -> None:
        store, key = backend.store, backend.key("config.json")
        obj = {"model": "llama", "lr": 1e-4, "steps": [1, 2], "name": "café"}
        store.put_json(key, obj)
        assert store.get_json(key) == obj
        info = store.head(key)
        assert info is not None
        assert info.content_type == "application/json"
        with pytest.raises(ValueError, match="JSON"):
            store.put_json(backend.key("nan.json"), {"loss": float("nan")})
        assert not store.exists(backend.key("nan.json"))

    def test_overwrite_replaces_bytes_and_metadata(self, backend: Backend) -> None:
        store, key = backend.store, backend.key("obj")
        store.put_bytes(key, b"one", metadata={"v": "1"})
        second = store.put_bytes(key, b"second", content_type="text/plain")
        assert store.get_bytes(key) == b"second"
        info = store.head(key)
        assert info is not None
        assert info.metadata == {"sha256": second.sha256_hex}
        assert info.content_type == "text/plain"
        assert [i.key for i in store.list(backend.prefix)] == [key]

    def test_put_if_creates_only_when_absent_and_replaces_only_the_version_read(
        self, backend: Backend
    ) -> None:
        store, key = backend.store, backend.key("lease.json")
        assert store.get_versioned(key) is None
        first = store.put_if(key, b'{"v": 1}', expected_tag=None)
        with pytest.raises(PreconditionFailed):
            store.put_if(key, b'{"v": "again"}', expected_tag=None)
        read = store.get_versioned(key)
        assert read is not None
        assert (read.data, read.tag) == (b'{"v": 1}', first)
        second = store.put_if(key, b'{"v": 2}', expected_tag=first)
        assert second != first
        with pytest.raises(PreconditionFailed):  # the version it names was replaced
            store.put_if(key, b'{"v": 3}', expected_tag=first)
        assert store.get_bytes(key) == b'{"v": 2}'  # a refused write wrote nothing
        store.delete(key)
        with pytest.raises(PreconditionFailed):  # the version it names was deleted
            store.put_if(key, b'{"v": 4}', expected_tag=second)
        assert store.get_versioned(key) is None
        assert backend.leftovers() == []

    def test_open_stream_yields_chunks_and_info(self, backend: Backend) -> None:
        store, key = backend.store, backend.key("big")
        data = large_payload(3 * MiB + 1)
        store.put_bytes(key, data, metadata={"kind": "blob"})
        with store.open_stream(key) as reader:
            assert reader.info.size == len(data)
            assert reader.info.metadata is not None
            assert reader.info.metadata["kind"] == "blob"
            chunks = list(reader)
        assert len(chunks) > 1  # streamed, not read whole
        assert b"".join(chunks) == data

    def test_missing_key_raises_object_not_found(self, backend: Backend) -> None:
        store, key = backend.store, backend.key("nope")
        with pytest.raises(ObjectNotFound) as caught:
            store.get_bytes(key)
        assert isinstance(caught.value, KeyError)
        assert caught.value.key == key
        # open_stream raises when called, not at the first next().
        with pytest.raises(ObjectNotFound):
            store.open_stream(key)
        with pytest.raises(ObjectNotFound):
            store.get_json(key)
        assert store.head(key) is None
        assert not store.exists(key)

    # Listing -------------------------------------------------------------------------------
    def test_list_is_sorted_by_key_and_honours_prefix_and_start_after(
        self, backend: Backend
    ) -> None:
        store = backend.store
        # '-' (0x2d) sorts before '/' (0x2f) and '.' (0x2e): a folder-by-folder walk would
        # yield "a/b" before "a-c" and "a.json"; S3 (and the contract) does not.
        rels = [
            "a/b",
            "a-c",
            "a.json",
            "a/b0/x",
            "b",
            "a/a",
            "é",
            "Z",
            "file-1",
            "file-1.meta.json",
        ]
        shuffled = rels[:]
        random.Random(3).shuffle(shuffled)
        for n, rel in enumerate(shuffled):
            store.put_bytes(backend.key(rel), b"x" * n)
        everything = sorted(backend.key(r) for r in rels)
        listed = list(store.list(backend.prefix))
        assert [i.key for i in listed] == everything
        sizes = {backend.key(rel): n for n, rel in enumerate(shuffled)}
        assert all(i.size == sizes[i.key] for i in listed)
        assert all(i.metadata is None and i.content_type is None for i in listed)

        assert [i.key for i in store.list(backend.key("a/"))] == [
            backend.key("a/a"),
            backend.key("a/b"),
            backend.key("a/b0/x"),
        ]
        # A prefix is a string prefix, not a folder.
        assert [i.key for i in store.list(backend.key("file-1"))] == [
            backend.key("file-1"),
            backend.key("file-1.meta.json"),
        ]
        assert [i.key for i in store.list(backend.key("a/b"))] == [
            backend.key("a/b"),
            backend.key("a/b0/x"),
        ]
        after = [i.key for i in store.list(backend.prefix, start_after=backend.key("a/b"))]
        assert after == [k for k in everything if k > backend.key("a/b")]
        assert backend.key("a/b") not in after
        # start_after need not be an existing key.
        after = [i.key for i in store.list(backend.prefix, start_after=backend.key("a0"))]
        assert after == [backend.key(r) for r in ("b", "file-1", "file-1.meta.json", "é")]
        assert list(store.list(backend.key("zzz"))) == []

    # Failed writes leave nothing -------------------------------------------------------------
    @pytest.mark.parametrize(
        "case",
        ["small-source", "large-source", "large-file", "small-on-chunk", "large-on-chunk"],
    )
    def test_failed_put_leaves_nothing_and_keeps_previous_version(
        self, backend: Backend, case: str
    ) -> None:
        store = backend.store
        old_key, new_key = backend.key("kept"), backend.key("fresh/obj")
        store.put_bytes(old_key, b"previous version", metadata={"v": "1"})
        before = backend.stored_keys()
        # "large" is past one 5 MiB part: failing at 5.5 MiB, after the first part was handed
        # out, means an S3 multipart upload has begun and must be aborted.
        size = 2 * MiB if case.startswith("small") else 6 * MiB
        fail_at = size - MiB // 2
        data = large_payload(size)
        seen = 0

        def explode_late(chunk: bytes) -> None:
            nonlocal seen
            seen += len(chunk)
            if seen > fail_at:
                raise Boom("invalid JSONL")

        def attempt(key: str) -> None:
            if case.endswith("on-chunk"):
                store.put_stream(key, even_chunks(data), on_chunk=explode_late)
            elif case == "large-file":
                store.put_stream(key, FailingFile(data, fail_after=fail_at))
            else:
                store.put_stream(key, failing_source(data, fail_after=fail_at))

        for key in (new_key, old_key):
            seen = 0
            with pytest.raises(Boom):
                attempt(key)
            assert not store.exists(new_key)
            assert store.get_bytes(old_key) == b"previous version"
            old = store.head(old_key)
            assert old is not None
            assert old.metadata is not None
            assert old.metadata["v"] == "1"
            assert [i.key for i in store.list(backend.prefix)] == [old_key]
            assert backend.stored_keys() == before
            assert backend.leftovers() == []

    def test_on_chunk_sees_every_byte_in_order(self, backend: Backend) -> None:
        store = backend.store
        data = large_payload(3 * MiB + 17)
        seen: list[bytes] = []
        store.put_stream(backend.key("iter"), odd_chunks(data), on_chunk=seen.append)
        assert b"".join(seen) == data
        seen.clear()
        store.put_stream(backend.key("file"), io.BytesIO(data), on_chunk=seen.append)
        assert b"".join(seen) == data
        assert store.get_bytes(backend.key("file")) == data

    # Large objects and checksums --------------------------------------------------------------
    @pytest.mark.parametrize("source", ["iterable", "file"])
    def test_multipart_sized_object_sha256(
        self, backend: Backend, source: str, tmp_path: Path
    ) -> None:
        store, key = backend.store, backend.key(f"large-{source}")
        data = large_payload()
        expected = hashlib.sha256(data).hexdigest()
        if source == "file":
            path = tmp_path / "blob"
            path.write_bytes(data)
            with path.open("rb") as stream:
                result = store.put_stream(key, stream, metadata={"origin": "disk"})
        else:
            result = store.put_stream(key, odd_chunks(data), metadata={"origin": "net"})
        assert result == PutResult(key, len(data), expected)
        info = store.head(key)
        assert info is not None
        assert info.size == len(data)
        assert info.sha256 == expected
        assert info.metadata is not None
        assert info.metadata["origin"] in ("disk", "net")
        assert hashlib.sha256(store.get_bytes(key)).hexdigest() == expected
        assert [i.key for i in store.list(backend.prefix)] == [key]
        assert backend.leftovers() == []

    def test_accepts_bytes_and_binary_files_and_refuses_text(self, backend: Backend) -> None:
        store = backend.store
        store.put_stream(backend.key("b"), b"raw bytes")  # type: ignore[arg-type]
        assert store.get_bytes(backend.key("b")) == b"raw bytes"
        with pytest.raises(TypeError):
            store.put_stream(backend.key("t"), io.StringIO("text"))  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            store.put_stream(backend.key("t"), iter(["text"]))  # type: ignore[arg-type]
        assert not store.exists(backend.key("t"))

    def test_tampered_object_fails_verification(self, backend: Backend, tmp_path: Path) -> None:
        store, key = backend.store, backend.key("ckpt/weights.bin")
        store.put_bytes(key, b"original bytes")
        backend.tamper(key, b"tampered bytes")
        with pytest.raises(ChecksumMismatch):
            store.get_bytes(key)
        with store.open_stream(key, verify=False) as reader:
            assert b"".join(reader) == b"tampered bytes"
        dest = tmp_path / "dl"
        with pytest.raises(ChecksumMismatch):
            store.download_prefix(backend.key("ckpt/"), dest)
        # Nothing half-verified is left where a reader would take it for the real file.
        assert [p for p in dest.rglob("*") if p.is_file()] == []

    # Metadata and key validation -----------------------------------------------------------
    @pytest.mark.parametrize(
        ("metadata", "content_type"),
        [
            ({"Upper": "x"}, None),
            ({"under_score": "x"}, None),
            ({"sha256": "forged"}, None),
            ({"name": "café"}, None),
            ({"name": " padded "}, None),
            ({"name": "line\nbreak"}, None),
            ({"big": "x" * 2048}, None),
            (None, "text/plain; charset=ü"),
        ],
    )
    def test_invalid_metadata_is_refused_before_writing(
        self, backend: Backend, metadata: dict[str, str] | None, content_type: str | None
    ) -> None:
        with pytest.raises(ValueError):  # noqa: PT011  (the message varies by field)
            backend.store.put_bytes(
                backend.key("m"), b"x", metadata=metadata, content_type=content_type
            )
        assert backend.stored_keys() == []
        assert backend.leftovers() == []

    @pytest.mark.parametrize(
        "rest",
        [
            "/abs",
            "a/../b",
            "..",
            "a//b",
            "a/",
            "a/./b",
            "nul\x00byte",
            "new\nline",
            "back\\slash",
            ".kubetune/meta",
            "x/.kubetune",
            "k" * 1025,
        ],
    )
    def test_invalid_keys_are_refused_everywhere(self, backend: Backend, rest: str) -> None:
        store = backend.store
        key = rest if rest.startswith("/") else backend.key(rest)
        operations: list[Callable[[], Any]] = [
            lambda: store.put_bytes(key, b"x"),
            lambda: store.put_stream(key, [b"x"]),
            lambda: store.get_bytes(key),
            lambda: store.open_stream(key),
            lambda: store.head(key),
            lambda: store.exists(key),
            lambda: store.delete(key),
        ]
        for operation in operations:
            with pytest.raises(InvalidKey):
                operation()
        assert backend.stored_keys() == []

    @pytest.mark.parametrize("key", ["", 7])
    def test_empty_or_non_string_key_is_refused(self, backend: Backend, key: Any) -> None:
        with pytest.raises(InvalidKey):
            backend.store.put_bytes(key, b"x")
        with pytest.raises(InvalidKey):
            backend.store.head(key)

    @pytest.mark.parametrize("prefix", ["/", "/abs/", "a/../", "a//", "x/.kubetune/"])
    def test_invalid_prefixes_are_refused(
        self, backend: Backend, prefix: str, tmp_path: Path
    ) -> None:
        store = backend.store
        with pytest.raises(InvalidKey):
            list(store.list(prefix))
        with pytest.raises(InvalidKey):
            store.delete_prefix(prefix)
        with pytest.raises(InvalidKey):
            store.download_prefix(prefix, tmp_path / "never-used")
        assert not (tmp_path / "never-used").exists()

    # Deleting ------------------------------------------------------------------------------
    def test_delete_is_idempotent(self, backend: Backend) -> None:
        store, key = backend.store, backend.key("gone")
        store.delete(key)  # never existed
        store.put_bytes(key, b"x")
        store.delete(key)
        assert not store.exists(key)
        with pytest.raises(ObjectNotFound):
            store.get_bytes(key)
        store.delete(key)
        assert backend.stored_keys() == []
        # The name is free again, and deleting "a/b" frees "a" for an object of its own.
        store.put_bytes(backend.key("dir/child"), b"c")
        store.delete(backend.key("dir/child"))
        store.put_bytes(backend.key("dir"), b"now a file")
        assert store.get_bytes(backend.key("dir")) == b"now a file"

    def test_delete_prefix(self, backend: Backend) -> None:
        store = backend.store
        for rel in ("job-1/a", "job-1/sub/b", "job-1/sub/c", "job-10/x", "job-2/a"):
            store.put_bytes(backend.key(rel), rel.encode())
        assert store.delete_prefix(backend.key("job-1/")) == 3
        assert [i.key for i in store.list(backend.prefix)] == [
            backend.key("job-10/x"),
            backend.key("job-2/a"),
        ]
        assert store.delete_prefix(backend.key("job-1/")) == 0
        assert store.delete_prefix(backend.key("job-")) == 2
        assert list(store.list(backend.prefix)) == []
        with pytest.raises(InvalidKey):
            store.delete_prefix("")

    # Folders -----------------------------------------------------------------------------
    def _checkpoint(self, root: Path) -> dict[str, bytes]:
        files = {
            "adapter_config.json": b'{"peft_type": "LORA"}',
            "adapter_model.safetensors": large_payload(64 * 1024, seed=1),
            "optimizer/state.pt": b"opt",
            "optimizer/nested/rng.pt": b"rng",
            "trainer_state.json": b"{}",
            "manifest.json": b'{"step": 10}',
        }
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return files

    def _record_puts(
        self, store: ObjectStore, monkeypatch: pytest.MonkeyPatch, fail_on: str | None = None
    ) -> list[tuple[str, str]]:
        """Wrap the instance's put_stream to log ("start"|"end", key) in order."""
        events: list[tuple[str, str]] = []
        lock = threading.Lock()
        real = store.put_stream

        def recording(key: str, stream: Any, **kwargs: Any) -> PutResult:
            with lock:
                events.append(("start", key))
            if fail_on is not None and key.endswith(fail_on):
                raise Boom(f"upload of {key} failed")
            result = real(key, stream, **kwargs)
            with lock:
                events.append(("end", key))
            return result

        monkeypatch.setattr(store, "put_stream", recording)
        return events

    def test_upload_dir_puts_last_after_everything_else(
        self, backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store = backend.store
        src = tmp_path / "step-10"
        files = self._checkpoint(src)
        events = self._record_puts(store, monkeypatch)
        prefix = backend.key("checkpoints/step-10")  # no trailing '/': it is a folder anyway
        results = store.upload_dir(src, prefix, last="manifest.json")

        manifest = backend.key("checkpoints/step-10/manifest.json")
        assert results[-1].key == manifest
        assert {r.key: r.sha256_hex for r in results} == {
            f"{prefix}/{rel}": hashlib.sha256(data).hexdigest() for rel, data in files.items()
        }
        # The manifest started only after every other upload had finished.
        manifest_start = events.index(("start", manifest))
        others_done = [i for i, (what, k) in enumerate(events) if what == "end" and k != manifest]
        assert len(others_done) == len(files) - 1
        assert max(others_done) < manifest_start
        head = store.head(backend.key("checkpoints/step-10/adapter_config.json"))
        assert head is not None
        assert head.content_type == "application/json"

        dest = tmp_path / "restored"
        paths = store.download_prefix(f"{prefix}/", dest)
        assert paths == sorted(paths, key=lambda p: p.relative_to(dest).as_posix())
        assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in paths} == files
        assert sorted(p for p in dest.rglob("*") if p.is_file()) == sorted(paths)

    def test_upload_dir_never_uploads_last_after_a_failure(
        self, backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store = backend.store
        src = tmp_path / "step-20"
        self._checkpoint(src)
        self._record_puts(store, monkeypatch, fail_on="optimizer/state.pt")
        with pytest.raises(Boom):
            store.upload_dir(src, backend.key("ck/"), last="manifest.json")
        assert not store.exists(backend.key("ck/manifest.json"))

    def test_upload_dir_checks_last_and_keys_before_uploading(
        self, backend: Backend, tmp_path: Path
    ) -> None:
        store = backend.store
        src = tmp_path / "step-30"
        self._checkpoint(src)
        with pytest.raises(FileNotFoundError):
            store.upload_dir(src, backend.key("ck/"), last="missing.json")
        (src / "bad\\name").write_bytes(b"x")
        with pytest.raises(InvalidKey):
            store.upload_dir(src, backend.key("ck/"), last="manifest.json")
        assert backend.stored_keys() == []

    def test_download_prefix_of_nothing(self, backend: Backend, tmp_path: Path) -> None:
        assert backend.store.download_prefix(backend.key("none/"), tmp_path / "d") == []
        assert (tmp_path / "d").is_dir()
