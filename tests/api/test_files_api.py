"""/v1/files through the official OpenAI SDK, on both backends."""

from __future__ import annotations

import hashlib
import io

import openai
import pytest

from tests.api.conftest import chat_file, chat_line, dpo_file, jsonl, store_of
from tests.harness.api import error_of
from tests.harness.openapi import validate


def upload(client, data: bytes, name: str = "train.jsonl", purpose: str = "fine-tune"):
    return client.files.create(file=(name, io.BytesIO(data)), purpose=purpose)


def test_upload_retrieve_content_list_delete(api):
    client = api.client()
    data = chat_file(12)
    raw = client.files.with_raw_response.create(
        file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune"
    )
    assert raw.headers["x-request-id"].startswith("req_")
    validate("OpenAIFile", raw.http_response.json())
    created = raw.parse()
    assert created.bytes == len(data)
    assert created.status == "processed"
    assert created.purpose == "fine-tune"

    assert client.files.retrieve(created.id).filename == "train.jsonl"
    assert client.files.content(created.id).read() == data

    listed = client.files.with_raw_response.list()
    validate("ListFilesResponse", listed.http_response.json())
    assert created.id in [f.id for f in listed.parse().data]

    # Integrity: the store recorded the sha256 computed while streaming.
    store = store_of(api)
    head = next(info for info in store.list("") if info.key.endswith(created.id))
    assert store.head(head.key).sha256 == hashlib.sha256(data).hexdigest()

    deleted = client.files.with_raw_response.delete(created.id)
    validate("DeleteFileResponse", deleted.http_response.json())
    assert deleted.parse().deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    assert not [i for i in store.list("") if created.id in i.key]


def test_list_pages_in_both_orders(api):
    client = api.client("globex")
    ids = [upload(client, chat_file(10)).id for _ in range(3)]
    newest_first = [f.id for f in client.files.list(limit=2)]  # auto-paginates
    mine = [i for i in newest_first if i in ids]
    assert mine == sorted(ids, reverse=True)
    page = client.files.list(limit=1, order="asc", after=ids[0])
    assert page.data[0].id == ids[1]
    assert page.has_more


BAD_FILES = {
    "malformed json": (jsonl([chat_line(i) for i in range(11)]) + b'{"messages": [\n', ["line 12"]),
    "missing assistant": (
        jsonl(
            [chat_line(i) for i in range(11)] + [{"messages": [{"role": "user", "content": "hi"}]}]
        ),
        ["line 12", "assistant"],
    ),
    "unknown role": (
        jsonl(
            [chat_line(i) for i in range(4)]
            + [
                {
                    "messages": [
                        {"role": "robot", "content": "x"},
                        {"role": "assistant", "content": "y"},
                    ]
                }
            ]
            + [chat_line(i) for i in range(10)]
        ),
        ["line 5", "robot"],
    ),
    "wrong weight": (
        jsonl(
            [
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "weight": 2},
                    ]
                }
            ]
            + [chat_line(i) for i in range(10)]
        ),
        ["line 1", "weight"],
    ),
    "empty file": (b"", ["empty"]),
    "nine examples": (chat_file(9), ["9 examples", "10"]),
    "non utf-8": (chat_file(10) + b'{"messages": "\xff\xfe"}\n', ["line 11", "UTF-8"]),
    "10 MB line": (
        chat_file(10) + b'{"messages": "' + b"x" * (10 * 1024 * 1024) + b'"}\n',
        ["line 11"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_are_rejected_with_line_numbers_and_nothing_stored(api, case):
    data, fragments = BAD_FILES[case]
    client = api.client()
    store = store_of(api)
    before = {i.key for i in store.list("")}
    with pytest.raises(openai.BadRequestError) as excinfo:
        upload(client, data)
    body = error_of(excinfo)
    assert excinfo.value.status_code == 400
    assert body["type"] == "invalid_request_error"
    assert body["code"] == "invalid_file_format"
    assert body["param"] == "file"
    for fragment in fragments:
        assert fragment.lower() in body["message"].lower(), body["message"]
    assert {i.key for i in store.list("")} == before


@pytest.mark.parametrize(
    "data",
    [b"\xef\xbb\xbf" + chat_file(10), chat_file(10).replace(b"\n", b"\r\n")],
    ids=["bom", "crlf"],
)
def test_bom_and_crlf_are_accepted(api, data):
    created = upload(api.client(), data)
    assert created.status == "processed"
    assert api.client().files.content(created.id).read() == data


def test_wrong_purpose_and_wrong_extension(api):
    client = api.client()
    with pytest.raises(openai.BadRequestError) as excinfo:
        upload(client, chat_file(10), purpose="assistants")
    assert error_of(excinfo)["param"] == "purpose"
    with pytest.raises(openai.BadRequestError) as excinfo:
        upload(client, chat_file(10), name="train.csv")
    assert error_of(excinfo)["param"] == "file"


def test_dpo_file_is_accepted_as_a_file(api):
    assert upload(api.client(), dpo_file()).status == "processed"


def test_missing_or_wrong_key_is_401_in_openai_shape(api):
    bad = api.client()
    bad.api_key = "kt-wrong-key-000000000000"
    with pytest.raises(openai.AuthenticationError) as excinfo:
        bad.files.list()
    assert error_of(excinfo)["type"] == "invalid_request_error"
    assert error_of(excinfo)["code"] == "invalid_api_key"
    import json
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(f"{api.base_url}/v1/files")  # noqa: S310 - our loopback server
    assert http_error.value.code == 401
    assert set(json.loads(http_error.value.read())["error"]) == {"message", "type", "param", "code"}
