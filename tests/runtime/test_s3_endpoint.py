"""The S3 fixture is a real S3-protocol endpoint: boto3 talks HTTP to it."""

from __future__ import annotations

import pytest

from kubetune.ids import new_file_id
from kubetune.storage_layout import StorageLayout


def test_put_get_list_delete(s3):
    client = s3.client()
    layout = StorageLayout(prefix="t-basic")
    file_id = new_file_id()
    key = layout.file_key("acme", file_id)
    body = b'{"messages": []}\n' * 1000
    client.put_object(Bucket=s3.bucket, Key=key, Body=body)

    got = client.get_object(Bucket=s3.bucket, Key=key)
    assert got["Body"].read() == body
    assert got["ContentLength"] == len(body)

    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix=layout.files_prefix("acme"))
    assert [o["Key"] for o in listed["Contents"]] == [key]
    assert (
        client.list_objects_v2(Bucket=s3.bucket, Prefix=layout.files_prefix("other"))["KeyCount"]
        == 0
    )

    client.delete_object(Bucket=s3.bucket, Key=key)
    with pytest.raises(client.exceptions.NoSuchKey):
        client.get_object(Bucket=s3.bucket, Key=key)


def test_multipart_upload_assembles_parts_in_order(s3):
    client = s3.client()
    key = StorageLayout(prefix="t-multipart").file_key("acme", new_file_id())
    parts = [bytes([65 + i]) * (5 * 1024 * 1024) for i in range(2)] + [b"tail"]
    upload = client.create_multipart_upload(Bucket=s3.bucket, Key=key)
    etags = [
        client.upload_part(
            Bucket=s3.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=n + 1, Body=part
        )["ETag"]
        for n, part in enumerate(parts)
    ]
    # Nothing is visible until the upload completes.
    assert client.list_objects_v2(Bucket=s3.bucket, Prefix=key)["KeyCount"] == 0
    client.complete_multipart_upload(
        Bucket=s3.bucket,
        Key=key,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n + 1} for n, e in enumerate(etags)]},
    )
    assert client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == b"".join(parts)
