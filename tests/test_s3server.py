"""Tests of the local S3 server fixture and its access-log parser."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from s3server import Request, S3Server, parse_log_line

MIB = 1024 * 1024


def test_put_get_round_trip_is_byte_identical(
    s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    body = os.urandom(256 * 1024) + bytes(range(256))
    mark = s3_server.mark()
    s3_client.put_object(Bucket=bucket, Key="dir/blob.bin", Body=body)
    got = s3_client.get_object(Bucket=bucket, Key="dir/blob.bin")["Body"].read()
    assert got == body

    puts = s3_server.put_object_requests(bucket, "dir/blob.bin", since=mark)
    assert puts == [Request("PUT", bucket, "dir/blob.bin", {}, 200)]
    gets = [r for r in s3_server.requests(since=mark) if r.method == "GET"]
    assert [(r.bucket, r.key, r.status) for r in gets] == [(bucket, "dir/blob.bin", 200)]


def _multipart_upload(s3_client: Any, bucket: str, key: str, parts: list[bytes]) -> str:
    upload_id: str = s3_client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    done = []
    for number, data in enumerate(parts, start=1):
        etag = s3_client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
        )["ETag"]
        done.append({"PartNumber": number, "ETag": etag})
    s3_client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": done}
    )
    return upload_id


def test_counts_exactly_the_upload_part_requests(
    s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    parts = [os.urandom(5 * MIB), b"tail of the object"]
    first_id = _multipart_upload(s3_client, bucket, "big.bin", parts)

    uploads = s3_server.upload_part_requests(bucket, "big.bin")
    assert [(r.query["partNumber"], r.query["uploadId"], r.status) for r in uploads] == [
        ("1", first_id, 200),
        ("2", first_id, 200),
    ]
    # Create/complete are POSTs and are not counted; neither is anything in other buckets.
    assert s3_server.put_object_requests(bucket, "big.bin") == []
    posts = [r for r in s3_server.requests() if r.bucket == bucket and r.method == "POST"]
    assert [sorted(r.query) for r in posts] == [["uploads"], ["uploadId"]]

    got = s3_client.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert got == b"".join(parts)

    # Requests before a mark are excluded.
    mark = s3_server.mark()
    assert s3_server.upload_part_requests(bucket, "big.bin", since=mark) == []
    assert s3_server.requests(since=mark) == []
    second_id = _multipart_upload(s3_client, bucket, "big.bin", [b"x" * 10])
    assert [r.query for r in s3_server.upload_part_requests(bucket, "big.bin", since=mark)] == [
        {"partNumber": "1", "uploadId": second_id}
    ]
    assert len(s3_server.upload_part_requests(bucket, "big.bin")) == 3


@pytest.mark.parametrize(
    "key",
    [
        "plate 1/image 01.tiff",
        "Ünïcødé/画像_ß.tif",
        "odd/a+b=c&d?e#f%41;g,h'i\"j.txt",
        "deep//slashes/ end ",
    ],
)
def test_keys_are_parsed_back_unquoted(
    s3_server: S3Server, s3_client: Any, bucket: str, key: str
) -> None:
    mark = s3_server.mark()
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"data")
    assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"data"
    [put] = s3_server.put_object_requests(bucket, key, since=mark)
    assert put == Request("PUT", bucket, key, {}, 200)
    gets = [r for r in s3_server.requests(since=mark) if r.method == "GET"]
    assert [(r.bucket, r.key) for r in gets] == [(bucket, key)]


def test_parse_log_line_strips_ansi_and_ignores_other_lines() -> None:
    line = (
        "127.0.0.1 - - [25/Nov/2026 11:41:14] "
        '"\x1b[33mPUT /bkt/big%20file?partNumber=1&uploadId=abc HTTP/1.1\x1b[0m" 404 -'
    )
    assert parse_log_line(line) == Request(
        "PUT", "bkt", "big file", {"partNumber": "1", "uploadId": "abc"}, 404
    )
    plain = '127.0.0.1 - - [25/Nov/2026 11:41:14] "GET /bkt?list-type=2 HTTP/1.1" 200 -'
    assert parse_log_line(plain) == Request("GET", "bkt", "", {"list-type": "2"}, 200)
    assert parse_log_line(" * Running on http://127.0.0.1:5000") is None
    assert parse_log_line("Traceback (most recent call last):") is None


def test_start_stop_context_manager(tmp_path: Path) -> None:
    with S3Server.start(tmp_path) as server:
        assert server.running
        assert server.endpoint_url == f"http://127.0.0.1:{server.port}"
        assert server.log_path.parent == tmp_path
    assert not server.running
    server.stop()  # idempotent
