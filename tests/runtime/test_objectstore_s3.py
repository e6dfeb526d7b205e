"""The S3 object store against a real S3-protocol server (moto over HTTP): the shared contract,
plus what only S3 does (multipart uploads, checksums, server-side copies, pagination)."""

from __future__ import annotations

import base64
import hashlib
import io
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from kubetune.settings import ObjectStoreBackend, ObjectStoreSettings
from kubetune.storage_layout import StorageLayout
from kubetune_runtime.objectstore import (
    ChecksumMismatch,
    ObjectNotFound,
    S3ObjectStore,
    open_object_store,
)
from tests.harness.s3 import ACCESS_KEY, REGION, SECRET_KEY
from tests.runtime.objectstore_contract import (
    LARGE_SIZE,
    Backend,
    ObjectStoreContract,
    large_payload,
    odd_chunks,
)

MiB = 1024 * 1024
PART = 5 * MiB


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


@pytest.fixture
def aws_env(monkeypatch):
    """Credentials as boto3 reads them from the environment (never from settings)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def ns() -> str:
    """A key prefix of the test's own: the bucket is shared by the whole session."""
    return f"t-{secrets.token_hex(4)}/"


@pytest.fixture(scope="module")
def boto_session() -> Any:
    # Clients made from one session share its loaded service model: a fresh session per store
    # (what S3ObjectStore does on its own) costs ~0.1 s, too much for every test.
    return boto3.session.Session(
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
    )


@pytest.fixture
def make_store(s3, boto_session, ns) -> Callable[..., S3ObjectStore]:
    def make(**kwargs: Any) -> S3ObjectStore:
        client = boto_session.client(
            "s3", endpoint_url=s3.endpoint_url, config=Config(retries={"mode": "standard"})
        )
        kwargs.setdefault("part_size", PART)
        return S3ObjectStore(s3.bucket, client=client, internal_prefix=ns, **kwargs)

    return make


def record_calls(store: S3ObjectStore) -> list[str]:
    """The S3 operations the store's client makes from now on, in order."""
    calls: list[str] = []

    def record(model: Any, **_: Any) -> None:
        calls.append(model.name)

    store.client.meta.events.register("before-call.s3", record)
    return calls


class S3Backend(Backend):
    def __init__(self, store: S3ObjectStore, prefix: str, raw: Any, bucket: str) -> None:
        super().__init__(store, prefix)
        self.raw = raw  # a client of its own, so the store's is not what checks the store
        self.bucket = bucket

    def _raw_keys(self, prefix: str) -> list[str]:
        pages = self.raw.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def leftovers(self) -> list[str]:
        uploads = self.raw.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix)
        pending = [f"upload: {u['Key']}" for u in uploads.get("Uploads", [])]
        staging = [f"staging: {k}" for k in self._raw_keys(f"{self.prefix}.kubetune/")]
        return pending + staging

    def stored_keys(self) -> list[str]:
        return sorted(self._raw_keys(self.prefix))

    def tamper(self, key: str, data: bytes) -> None:
        head = self.raw.head_object(Bucket=self.bucket, Key=key)
        self.raw.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=data,
            Metadata=head["Metadata"],  # still claims the original sha256
            ContentType=head["ContentType"],
        )


class TestS3ObjectStore(ObjectStoreContract):
    @pytest.fixture
    def backend(self, s3, make_store, ns) -> Iterator[Backend]:
        with make_store() as store:
            yield S3Backend(store, ns, s3.client(), s3.bucket)


# What only S3 does -----------------------------------------------------------------------
def test_small_put_is_one_put_object_with_its_sha256_checksum(s3, make_store, ns):
    store = make_store()
    calls = record_calls(store)
    data = b"x" * (PART - 1)
    store.put_stream(f"{ns}small", odd_chunks(data))
    store.put_bytes(f"{ns}exactly-one-part", b"y" * PART)
    assert calls == ["PutObject", "PutObject"]
    head = s3.client().head_object(Bucket=s3.bucket, Key=f"{ns}small", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == b64sha(data)
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_unseekable_large_upload_is_staged_then_copied_with_full_checksum(s3, make_store, ns):
    store = make_store()
    calls = record_calls(store)
    data = large_payload()
    key = f"{ns}orgs/acme/files/file-big"
    store.put_stream(key, odd_chunks(data), content_type="application/jsonl")
    assert calls == [
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPart",
        "UploadPart",
        "CompleteMultipartUpload",
        "CopyObject",
        "DeleteObject",
    ]
    raw = s3.client()
    head = raw.head_object(Bucket=s3.bucket, Key=key, ChecksumMode="ENABLED")
    # The copy gives the object a full-object SHA256 (a multipart upload cannot).
    assert head["ChecksumSHA256"] == b64sha(data)
    assert head["Metadata"] == {"sha256": hashlib.sha256(data).hexdigest()}
    assert head["ContentType"] == "application/jsonl"
    listed = raw.list_objects_v2(Bucket=s3.bucket, Prefix=ns)
    assert [o["Key"] for o in listed["Contents"]] == [key]  # the staging object is gone
    assert raw.list_multipart_uploads(Bucket=s3.bucket, Prefix=ns).get("Uploads", []) == []


def test_seekable_large_upload_is_one_multipart_upload_with_part_checksums(
    s3, make_store, ns, tmp_path
):
    store = make_store()
    calls = record_calls(store)
    data = large_payload(LARGE_SIZE, seed=11)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(data)
    key = f"{ns}adapter/adapter_model.safetensors"
    with path.open("rb") as stream:
        store.put_stream(key, stream)
    # Hashed in a first pass, so the sha256 is in the metadata from the start: no copy needed.
    assert calls == [
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPart",
        "UploadPart",
        "CompleteMultipartUpload",
    ]
    head = s3.client().head_object(Bucket=s3.bucket, Key=key, ChecksumMode="ENABLED")
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    # S3's SHA256 of a multipart object is the checksum of the parts' checksums: proof that
    # each part went up with its own correct checksum.
    parts = [data[i : i + PART] for i in range(0, len(data), PART)]
    composite = base64.b64encode(
        hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).digest()
    ).decode()
    assert head["ChecksumSHA256"].split("-")[0] == composite
    assert store.get_bytes(key) == data


class ChangingFile(io.BytesIO):
    """A file whose last byte changes once it has been read to the end (before a second pass)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.changed = False

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        if not data and not self.changed:
            self.getbuffer()[-1] ^= 0xFF
            self.changed = True
        return data


def test_a_file_that_changes_during_upload_is_not_published(s3, make_store, ns):
    store = make_store()
    source = ChangingFile(large_payload(PART + MiB))
    with pytest.raises(ChecksumMismatch, match="changed"):
        store.put_stream(f"{ns}moving", source)
    assert source.changed
    assert store.head(f"{ns}moving") is None
    raw = s3.client()
    assert raw.list_multipart_uploads(Bucket=s3.bucket, Prefix=ns).get("Uploads", []) == []
    assert raw.list_objects_v2(Bucket=s3.bucket, Prefix=ns)["KeyCount"] == 0


def test_staging_objects_a_crash_left_behind_are_never_listed(s3, make_store, ns):
    store = make_store()
    s3.client().put_object(Bucket=s3.bucket, Key=f"{ns}.kubetune/staging/0123abcd", Body=b"x")
    store.put_bytes(f"{ns}real", b"y")
    assert [i.key for i in store.list(ns)] == [f"{ns}real"]
    assert not any(".kubetune" in i.key for i in store.list(""))


def test_copies_beyond_copy_part_size_go_in_ranges(s3, make_store, ns):
    store = make_store(copy_part_size=PART)
    calls = record_calls(store)
    data = large_payload(LARGE_SIZE, seed=5)
    key = f"{ns}huge"
    result = store.put_stream(key, odd_chunks(data), metadata={"origin": "upload"})
    assert calls.count("UploadPartCopy") == 3
    assert "CopyObject" not in calls
    assert calls[-1] == "DeleteObject"  # the staging object
    info = store.head(key)
    assert info is not None
    assert info.metadata == {"origin": "upload", "sha256": result.sha256_hex}
    assert store.get_bytes(key) == data
    assert [i.key for i in store.list(ns)] == [key]
    assert s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=ns)["KeyCount"] == 1


def test_list_paginates_transparently(s3, make_store, ns):
    store = make_store(page_size=2)
    keys = [f"{ns}events/{n:010d}.jsonl" for n in range(7)]
    for key in reversed(keys):
        store.put_bytes(key, b"{}\n")
    calls = record_calls(store)
    assert [i.key for i in store.list(ns)] == keys
    assert calls == ["ListObjectsV2"] * 4
    assert [i.key for i in store.list(ns, start_after=keys[2])] == keys[3:]
    assert store.delete_prefix(f"{ns}events/") == 7
    assert "DeleteObjects" in calls


def test_a_wrong_s3_checksum_is_caught_on_read(s3, make_store, ns):
    # moto stores whatever checksum it is sent; AWS would refuse this upload with BadDigest.
    raw = s3.client()
    key = f"{ns}bad-checksum"
    raw.put_object(
        Bucket=s3.bucket,
        Key=key,
        Body=b"payload",
        ChecksumAlgorithm="SHA256",
        ChecksumSHA256=b64sha(b"something else"),
    )
    store = make_store()
    # Not our metadata check (there is no sha256 metadata): botocore's response validation.
    with pytest.raises(ChecksumMismatch), store.open_stream(key, verify=False) as reader:
        b"".join(reader)


def test_a_missing_bucket_is_an_error_not_a_missing_object(s3, boto_session, ns):
    client = boto_session.client("s3", endpoint_url=s3.endpoint_url)
    store = S3ObjectStore("no-such-bucket-kt", client=client)
    with pytest.raises(ClientError) as caught:
        store.get_bytes(f"{ns}k")
    assert not isinstance(caught.value, ObjectNotFound)
    assert caught.value.response["Error"]["Code"] == "NoSuchBucket"


def test_factory_builds_an_s3_store_from_settings(s3, aws_env, ns):
    settings = ObjectStoreSettings(
        backend=ObjectStoreBackend.S3,
        bucket=s3.bucket,
        prefix=ns.rstrip("/"),
        endpoint_url=s3.endpoint_url,
        region=REGION,
    )
    store = open_object_store(settings)
    assert isinstance(store, S3ObjectStore)
    assert store.client.meta.endpoint_url == s3.endpoint_url
    assert store.client.meta.region_name == REGION
    config: Any = store.client.meta.config
    # Short timeouts and three tries in all: an outage holds a request seconds, not minutes.
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert (config.connect_timeout, config.read_timeout) == (3.0, 20.0)
    created: list[str] = []
    store.client.meta.events.register(
        "before-parameter-build.s3.CreateMultipartUpload",
        lambda params, **_: created.append(params["Key"]),
    )

    layout = settings.layout()
    key = layout.file_key("acme", "file-0mhx5k2ab00000000000001")
    data = large_payload(9 * MiB, seed=2)  # over the default 8 MiB part: staged
    store.put_stream(key, odd_chunks(data))
    assert key.startswith(ns)
    # Staging stays inside the configured prefix (IAM policies may allow nothing else).
    assert len(created) == 1
    assert created[0].startswith(f"{ns}.kubetune/staging/")
    assert store.get_bytes(key) == data
    assert [i.key for i in store.list(layout.org_prefix("acme"))] == [key]
    store.close()


def test_module_layout_and_store_agree_on_keys():
    layout = StorageLayout(prefix="kt")
    # Every key the layout builds is one the store accepts.
    from kubetune_runtime.objectstore import validate_key, validate_prefix

    job = "ftjob-0mhx5k2ab00000000000001"
    validate_key(layout.checkpoint_manifest_key("acme", job, 10))
    validate_key(layout.event_chunk_key("acme", job, 0))
    validate_prefix(layout.adapter_prefix("acme", job))
