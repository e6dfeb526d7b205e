"""The local-folder object store: the shared contract, plus what only a filesystem can get wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kubetune.settings import ObjectStoreBackend, ObjectStoreSettings
from kubetune_runtime.objectstore import (
    RESERVED_SEGMENT,
    InvalidKey,
    LocalObjectStore,
    ObjectStore,
    open_object_store,
)
from tests.runtime.objectstore_contract import Backend, ObjectStoreContract

REPO = Path(__file__).resolve().parents[2]


class LocalBackend(Backend):
    def __init__(self, store: LocalObjectStore, prefix: str) -> None:
        super().__init__(store, prefix)
        self.local = store

    def _data_files(self) -> list[Path]:
        internal = self.local.root / RESERVED_SEGMENT
        return [
            p
            for p in self.local.root.rglob("*")
            if not p.is_relative_to(internal) and p.is_file() and not p.is_symlink()
        ]

    def leftovers(self) -> list[str]:
        root = self.local.root
        internal = root / RESERVED_SEGMENT
        found = [f"tmp: {p.name}" for p in (internal / "tmp").iterdir()]
        keys = {p.relative_to(root).as_posix() for p in self._data_files()}
        for meta in (internal / "meta").rglob("*.json"):
            if json.loads(meta.read_text())["key"] not in keys:
                found.append(f"orphan sidecar: {meta.name}")
        found += [
            f"empty folder: {p.relative_to(root)}"
            for p in root.rglob("*")
            if not p.is_relative_to(internal) and p.is_dir() and not any(p.iterdir())
        ]
        return found

    def stored_keys(self) -> list[str]:
        return sorted(p.relative_to(self.local.root).as_posix() for p in self._data_files())

    def tamper(self, key: str, data: bytes) -> None:
        self.local.path_for(key).write_bytes(data)


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "store")


class TestLocalObjectStore(ObjectStoreContract):
    @pytest.fixture
    def backend(self, store: LocalObjectStore) -> Backend:
        return LocalBackend(store, "t-local/")


def test_objects_are_plain_files_and_bookkeeping_is_never_listed(store: LocalObjectStore):
    store.put_bytes("orgs/acme/files/file-1", b"data", metadata={"purpose": "fine-tune"})
    path = store.root / "orgs" / "acme" / "files" / "file-1"
    assert store.path_for("orgs/acme/files/file-1") == path
    assert path.read_bytes() == b"data"
    # A crashed writer's temp file and the sidecars stay out of every listing.
    (store.root / RESERVED_SEGMENT / "tmp" / "put-crashed.tmp").write_bytes(b"partial")
    sidecars = list((store.root / RESERVED_SEGMENT / "meta").rglob("*.json"))
    assert len(sidecars) == 1
    assert json.loads(sidecars[0].read_text())["metadata"]["purpose"] == "fine-tune"
    assert [i.key for i in store.list("")] == ["orgs/acme/files/file-1"]
    # A second store on the same folder sees the same objects and metadata.
    again = LocalObjectStore(store.root)
    info = again.head("orgs/acme/files/file-1")
    assert info is not None
    assert info.metadata is not None
    assert info.metadata["purpose"] == "fine-tune"


def test_a_file_put_in_place_by_hand_is_an_object_without_metadata(store: LocalObjectStore):
    (store.root / "hand").mkdir()
    (store.root / "hand" / "made.txt").write_bytes(b"by hand")
    info = store.head("hand/made.txt")
    assert info is not None
    assert (info.size, info.metadata, info.content_type, info.sha256) == (7, {}, None, None)
    assert store.get_bytes("hand/made.txt") == b"by hand"  # nothing to verify against
    assert [i.key for i in store.list("hand/")] == ["hand/made.txt"]


def test_symlinks_cannot_lead_outside_the_root(store: LocalObjectStore, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (store.root / "t").mkdir()
    (store.root / "t" / "escape").symlink_to(outside, target_is_directory=True)
    (store.root / "t" / "secret-link").symlink_to(outside / "secret")

    with pytest.raises(InvalidKey, match="outside"):
        store.put_bytes("t/escape/planted", b"x")
    with pytest.raises(InvalidKey, match="outside"):
        store.get_bytes("t/escape/secret")
    with pytest.raises(InvalidKey, match="outside"):
        store.get_bytes("t/secret-link")
    with pytest.raises(InvalidKey, match="outside"):
        store.delete("t/secret-link")
    with pytest.raises(InvalidKey, match="outside"):
        list(store.list("t/escape/"))
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"
    # Symlinks are not objects in a listing either.
    assert list(store.list("t/")) == []


def test_an_object_and_a_folder_of_the_same_name_clash(store: LocalObjectStore):
    store.put_bytes("a", b"file a")
    with pytest.raises(InvalidKey, match="clashes"):
        store.put_bytes("a/b", b"under a")
    store.put_bytes("c/d", b"under c")
    with pytest.raises(InvalidKey, match="clashes"):
        store.put_bytes("c", b"file c")
    assert store.get_bytes("a") == b"file a"
    assert store.get_bytes("c/d") == b"under c"
    assert store.head("c") is None  # a folder is not an object
    store.delete("c")  # nor does deleting its name remove what is inside
    assert store.get_bytes("c/d") == b"under c"
    assert [i.key for i in store.list("")] == ["a", "c/d"]
    assert list((store.root / RESERVED_SEGMENT / "tmp").iterdir()) == []
    sidecars = list((store.root / RESERVED_SEGMENT / "meta").rglob("*.json"))
    assert sorted(json.loads(p.read_text())["key"] for p in sidecars) == ["a", "c/d"]


def test_concurrent_puts_and_deletes_in_one_folder(store: LocalObjectStore):
    # Deletes prune empty folders; puts racing them into the same folder must still land.
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(40):
                key = f"shared/sub/k{n}-{i}"
                store.put_bytes(key, key.encode())
                assert store.get_bytes(key) == key.encode()
                store.delete(key)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert list(store.list("")) == []
    assert not (store.root / "shared").exists()


def test_factory_builds_the_local_store(tmp_path: Path):
    configured = ObjectStoreSettings(backend=ObjectStoreBackend.LOCAL, local_root=tmp_path / "a")
    store = open_object_store(configured, root=tmp_path / "b")
    assert isinstance(store, LocalObjectStore)
    assert store.root == (tmp_path / "a").resolve()

    fallback = open_object_store(ObjectStoreSettings(), root=tmp_path / "b")
    assert isinstance(fallback, LocalObjectStore)
    assert fallback.root == (tmp_path / "b").resolve()
    fallback.put_bytes("k", b"v")
    assert (tmp_path / "b" / "k").read_bytes() == b"v"

    with pytest.raises(ValueError, match="local_root"):
        open_object_store(ObjectStoreSettings())


def test_importing_the_module_does_not_need_boto3(tmp_path: Path):
    script = f"""
import sys
sys.modules["boto3"] = None  # any import of it now fails
sys.modules["botocore"] = None
from kubetune_runtime.objectstore import LocalObjectStore, S3ObjectStore
store = LocalObjectStore(__import__("pathlib").Path({str(tmp_path / "s")!r}))
store.put_bytes("k", b"v")
assert store.get_bytes("k") == b"v"
try:
    S3ObjectStore("bucket")
except ImportError:
    print("boto3 needed only for S3")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "boto3 needed only for S3"


def test_store_is_an_object_store(store: LocalObjectStore):
    assert isinstance(store, ObjectStore)
    with store as same:
        assert same is store


_REWRITER = """
import sys
from pathlib import Path
from kubetune_runtime.objectstore import LocalObjectStore
store = LocalObjectStore(Path(sys.argv[1]))
version = 0
while True:
    version += 1
    store.put_json("race/entry.json", {"version": version, "pad": "y" * (version % 500)})
"""


def _read_whole(store: LocalObjectStore, key: str, streaming: bool) -> int:
    if streaming:
        with store.open_stream(key) as reader:
            return int(json.loads(b"".join(reader))["version"])
    return int(store.get_json(key)["version"])


@pytest.mark.parametrize("writer_kind", ["thread", "process"])
def test_a_read_racing_an_overwrite_gets_one_whole_version(
    store: LocalObjectStore, writer_kind: str
):
    """An outbox entry rewritten while others read it: by a thread (the webhook sender) or by
    another process (the trainer and the API share the local store)."""
    key = "race/entry.json"
    store.put_json(key, {"version": 0, "pad": "x" * 1000})
    stop = threading.Event()

    def rewrite() -> None:
        version = 0
        while not stop.is_set():
            version += 1
            store.put_json(key, {"version": version, "pad": "y" * (version % 500)})

    writer = threading.Thread(target=rewrite)
    child: subprocess.Popen[bytes] | None = None
    if writer_kind == "thread":
        writer.start()
    else:
        child = subprocess.Popen([sys.executable, "-c", _REWRITER, str(store.root)])
    try:
        deadline = time.monotonic() + 30
        while store.get_json(key)["version"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # a process writer starts only once Python has imported the store
        seen = set()
        for attempt in range(2000):
            # Never a ChecksumMismatch, streaming or whole, and always a version that was written.
            seen.add(_read_whole(store, key, streaming=attempt % 2 == 1))
        assert len(seen) > 1, "the writer never overwrote during the reads: nothing was tested"
    finally:
        stop.set()
        if child is None:
            writer.join()
        else:
            child.kill()
            child.wait()


def test_a_damaged_object_still_fails_its_checksum(store: LocalObjectStore):
    from kubetune_runtime.objectstore import ChecksumMismatch

    store.put_bytes("damaged", b"the bytes that were written")
    store.path_for("damaged").write_bytes(b"other bytes")
    with pytest.raises(ChecksumMismatch):
        store.get_bytes("damaged")


_SWAPPER = """
import sys
from pathlib import Path
from kubetune_runtime.objectstore import LocalObjectStore, PreconditionFailed
store = LocalObjectStore(Path(sys.argv[1]))
print("ready", flush=True)
tag = sys.stdin.readline().strip()  # every writer read the same version, then races
try:
    store.put_if("race/lease.json", sys.argv[2].encode(), expected_tag=tag)
except PreconditionFailed:
    print("lost")
else:
    print("won")
"""


def test_put_if_lets_exactly_one_of_racing_processes_win(store: LocalObjectStore):
    """The check and the publication are one step under the key's lock, across processes."""
    base = store.put_if("race/lease.json", b"0", expected_tag=None)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _SWAPPER, str(store.root), f"writer-{n}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for n in range(6)
    ]
    for writer in writers:
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"ready\n"
    for writer in writers:  # released together, once every one has started
        assert writer.stdin is not None
        writer.stdin.write(f"{base}\n".encode())
        writer.stdin.flush()
    answers = [writer.communicate(timeout=60)[0].decode().strip() for writer in writers]
    assert sorted(answers) == ["lost"] * 5 + ["won"]
    assert store.get_bytes("race/lease.json") == f"writer-{answers.index('won')}".encode()
