"""/v1/uploads (files sent in parts) through the official OpenAI SDK, on both backends."""

from __future__ import annotations

import io

import openai
import pytest

from tests.api.conftest import chat_file, chat_line, jsonl, store_of
from tests.harness.api import error_of
from tests.harness.openapi import validate


def start(client, data: bytes, name: str = "big.jsonl"):
    return client.uploads.create(
        bytes=len(data), filename=name, mime_type="application/jsonl", purpose="fine-tune"
    )


def test_parts_in_any_order_assemble_into_a_validated_file(api):
    client = api.client()
    data = chat_file(40)
    third = len(data) // 3
    chunks = [data[:third], data[third : 2 * third], data[2 * third :]]
    raw = client.uploads.with_raw_response.create(
        bytes=len(data), filename="big.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    validate("Upload", raw.http_response.json())
    upload = raw.parse()
    assert upload.status == "pending"
    # Parts may arrive in any order; the client names the order on completion.
    part_ids = {}
    for index in (2, 0, 1):
        part = client.uploads.parts.with_raw_response.create(
            upload_id=upload.id, data=chunks[index]
        )
        validate("UploadPart", part.http_response.json())
        part_ids[index] = part.parse().id
    done = client.uploads.with_raw_response.complete(
        upload_id=upload.id, part_ids=[part_ids[i] for i in range(3)]
    )
    validate("Upload", done.http_response.json())
    completed = done.parse()
    assert completed.status == "completed"
    assert completed.file.bytes == len(data)
    assert client.files.content(completed.file.id).read() == data
    # The parts are gone once assembled.
    store = store_of(api)
    assert [i.key for i in store.list("") if upload.id in i.key and "/part-" in i.key] == []
    with pytest.raises(openai.ConflictError):
        client.uploads.cancel(upload.id)


def test_invalid_assembled_file_is_rejected_and_nothing_is_stored(api):
    client = api.client()
    data = jsonl([chat_line(i) for i in range(12)]) + b"{broken\n"
    upload = start(client, data)
    part = client.uploads.parts.create(upload_id=upload.id, data=data)
    files_before = {f.id for f in client.files.list()}
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.uploads.complete(upload_id=upload.id, part_ids=[part.id])
    assert "line 13" in error_of(excinfo)["message"].lower()
    assert {f.id for f in client.files.list()} == files_before
    # Still pending: the client may cancel it.
    assert client.uploads.cancel(upload.id).status == "cancelled"


def test_size_mismatch_unknown_part_and_cancel(api):
    client = api.client()
    data = chat_file(12)
    upload = start(client, data)
    part = client.uploads.parts.create(upload_id=upload.id, data=data[:100])
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.uploads.complete(upload_id=upload.id, part_ids=[part.id])
    assert error_of(excinfo)["param"] == "part_ids"
    with pytest.raises(openai.BadRequestError):
        client.uploads.complete(upload_id=upload.id, part_ids=["part-0000000000000000000000000"])
    cancelled = client.uploads.cancel(upload.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.uploads.parts.create(upload_id=upload.id, data=b"x")


def test_uploads_are_private_to_their_org(api):
    data = chat_file(12)
    upload = start(api.client("acme"), data)
    other = api.client("globex")
    with pytest.raises(openai.NotFoundError):
        other.uploads.parts.create(upload_id=upload.id, data=data)
    with pytest.raises(openai.NotFoundError):
        other.uploads.cancel(upload.id)
    with pytest.raises(openai.NotFoundError):
        other.uploads.complete(upload_id=upload.id, part_ids=["part-0000000000000000000000000"])


def test_wrong_purpose_is_refused(api):
    with pytest.raises(openai.BadRequestError) as excinfo:
        api.client().uploads.create(
            bytes=10, filename="x.jsonl", mime_type="application/jsonl", purpose="batch"
        )
    assert error_of(excinfo)["param"] == "purpose"
    with pytest.raises(openai.BadRequestError):
        api.client().files.create(file=("x.jsonl", io.BytesIO(b"")), purpose="fine-tune")


def test_parts_cannot_grow_past_the_declared_size(api, monkeypatch):
    """Parts are bounded before ``complete``: at most one part more than the upload declared
    (a part sent again after a timeout still fits), checked as the bytes arrive.
    """
    from kubetune_api.services import uploads

    client = api.client()
    data = chat_file(12)
    upload = start(client, data)
    client.uploads.parts.create(upload_id=upload.id, data=data)
    retried = client.uploads.parts.create(upload_id=upload.id, data=data)  # a retry fits
    with pytest.raises(openai.APIStatusError) as excinfo:
        client.uploads.parts.create(upload_id=upload.id, data=data)
    assert excinfo.value.status_code == 413
    assert "at most one part more than the" in error_of(excinfo)["message"]
    assert client.uploads.complete(upload_id=upload.id, part_ids=[retried.id]).status == (
        "completed"
    )
    assert uploads.MAX_PARTS == 10_000
