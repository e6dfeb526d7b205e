"""The store sweeper, on both backends' stores: what abandoned uploads and crashes leave behind
is deleted once past its grace, and nothing a client can still use is touched.

The state is made through the live API with the official SDK (and, for what only a crash
leaves, written to or deleted from the server's store directly); the sweep then runs in this
process on the same store, at a chosen "now", so the test needs no hour of waiting.
"""

from __future__ import annotations

import time

import openai
import pytest

from kubetune.ids import IdKind, new_file_id, new_id
from kubetune_api.auth import KeyStore
from kubetune_api.services.files import FileService
from kubetune_api.services.uploads import UploadService
from kubetune_api.sweeper import StoreSweeper
from tests.api.conftest import chat_file, settings_of, store_of
from tests.harness.api import ORGS

ORG = "acme"
GRACE = 600


@pytest.fixture
def sweeper_of(api):
    settings = settings_of(api)
    store = store_of(api)
    files = FileService(settings, store)
    uploads = UploadService(settings, store, files)
    return StoreSweeper(files, uploads, lambda: [ORG], interval=0, grace_seconds=GRACE), store


def _parts(store, upload_id: str) -> list[str]:
    return [
        i.key for i in store.list("") if f"/{upload_id}/" in i.key and "upload.json" not in i.key
    ]


def test_an_abandoned_upload_expires_and_loses_its_parts_after_the_grace(api, sweeper_of):
    sweeper, store = sweeper_of
    client = api.client(ORG)
    data = chat_file(12)
    upload = client.uploads.create(
        bytes=len(data),
        filename="abandoned.jsonl",
        mime_type="application/jsonl",
        purpose="fine-tune",
    )
    client.uploads.parts.create(upload_id=upload.id, data=data[:100])
    client.uploads.parts.create(upload_id=upload.id, data=data[100:200])
    assert len(_parts(store, upload.id)) == 2

    # Still open (and within the grace after expiry): a client may yet send parts.
    sweeper.sweep(now=time.time())
    sweeper.sweep(now=upload.expires_at + GRACE - 5)
    assert len(_parts(store, upload.id)) == 2

    report = sweeper.sweep(now=upload.expires_at + GRACE + 5)
    assert report.upload_parts >= 2
    assert _parts(store, upload.id) == []
    stored = store.get_json(settings_of(api).object_store.layout().upload_state_key(ORG, upload.id))
    assert stored["status"] == "expired"
    with pytest.raises(openai.ConflictError, match="expired"):
        client.uploads.cancel(upload.id)


def test_parts_a_crash_left_beside_a_finished_upload_are_swept_at_once(api, sweeper_of):
    sweeper, store = sweeper_of
    client = api.client(ORG)
    data = chat_file(12)
    upload = client.uploads.create(
        bytes=len(data), filename="done.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    part = client.uploads.parts.create(upload_id=upload.id, data=data)
    done = client.uploads.complete(upload_id=upload.id, part_ids=[part.id])
    layout = settings_of(api).object_store.layout()
    # What a crash between saving "completed" and deleting the parts leaves.
    leftover = layout.upload_part_key(ORG, upload.id, new_id(IdKind.PART))
    store.put_bytes(leftover, b"left behind")

    sweeper.sweep(now=time.time())

    assert store.head(leftover) is None
    assert client.files.content(done.file.id).read() == data


def test_file_bytes_without_metadata_are_swept_after_the_grace_and_files_are_kept(api, sweeper_of):
    sweeper, store = sweeper_of
    client = api.client(ORG)
    layout = settings_of(api).object_store.layout()
    kept = client.files.create(file=("kept.jsonl", chat_file(12)), purpose="fine-tune")
    # A delete that crashed after removing the metadata, and bytes still being validated.
    half_deleted = client.files.create(file=("gone.jsonl", chat_file(12)), purpose="fine-tune")
    store.delete(layout.file_meta_key(ORG, half_deleted.id))
    in_flight = layout.file_key(ORG, new_file_id())
    store.put_bytes(in_flight, chat_file(3))

    sweeper.sweep(now=time.time())
    assert store.head(layout.file_key(ORG, half_deleted.id)) is not None
    assert store.head(in_flight) is not None

    report = sweeper.sweep(now=time.time() + GRACE + 5)
    assert report.orphaned_files >= 2
    assert store.head(layout.file_key(ORG, half_deleted.id)) is None
    assert store.head(in_flight) is None
    assert client.files.content(kept.id).read() == chat_file(12)


def test_the_app_sweeps_every_org_that_holds_a_key(local_api):
    keys_file = settings_of(local_api).api.api_keys_file
    assert keys_file is not None
    keys = KeyStore.from_file(keys_file)
    assert keys.orgs() == sorted(ORGS)


def test_the_sweep_thread_sweeps_until_stopped(api, sweeper_of):
    sweeper, store = sweeper_of
    client = api.client(ORG)
    upload = client.uploads.create(
        bytes=10, filename="x.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    client.uploads.cancel(upload.id)
    leftover = (
        settings_of(api).object_store.layout().upload_part_key(ORG, upload.id, new_id(IdKind.PART))
    )
    store.put_bytes(leftover, b"left behind")
    sweeper.interval = 0.05
    sweeper.start()
    deadline = time.monotonic() + 30
    while store.head(leftover) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    sweeper.stop()
    assert store.head(leftover) is None
    thread = sweeper._thread
    assert thread is not None
    assert not thread.is_alive()
