"""The contract the uploader and verify rely on, passed by every S3 store we have.

One suite, three implementations: ObjectStore with the botocore data plane on the
real moto server, ObjectStore with the CRT data plane on it, and the in-memory store
of tests/memory_s3.py that fast pipeline tests use. What one of them does and
another does not is a bug in the fake, or news about the server.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aioboto3
import pytest
from memory_s3 import MemoryStore

from cpg_daemon.core.checksums import ALGORITHMS, PartDigest, encode
from cpg_daemon.core.config import S3Config
from cpg_daemon.core.errors import (
    FileChangedError,
    RetryableError,
    SkipFileError,
    UploadGoneError,
    VanishedError,
)
from cpg_daemon.s3.store import Level, ObjectStore

MiB = 1024 * 1024
KEY = "multi part/plate 1+2.sqlite"
"""A key a hand-made request line gets wrong (the CRT plane builds its own)."""
CRC32C = ALGORITHMS["CRC32C"]


def crc32c(data: bytes) -> str:
    return encode(CRC32C.digest(data))


def md5_etag(*parts: bytes) -> str:
    """S3's ETag: the quoted MD5 of the bytes, or of the parts' MD5s with "-N"."""
    if len(parts) == 1:
        return f'"{hashlib.md5(parts[0]).hexdigest()}"'
    joined = b"".join(hashlib.md5(p).digest() for p in parts)
    return f'"{hashlib.md5(joined).hexdigest()}-{len(parts)}"'


@dataclass
class Subject:
    """A store under test, a fresh bucket in it, and a way to read an object's bytes."""

    store: Any
    bucket: str
    read: Callable[[str], bytes]


@pytest.fixture(params=["botocore", "crt", "memory"])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    if request.param == "memory":
        memory = MemoryStore("CRC32C")
        memory.create_bucket("contract")
        yield Subject(memory, "contract", lambda key: memory.object_bytes("contract", key))
        return
    server = request.getfixturevalue("s3_server")
    client = request.getfixturevalue("s3_client")
    bucket = f"c-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    s3 = S3Config(endpoint_url=server.endpoint_url, data_plane=request.param, checksum="CRC32C")
    async with ObjectStore.connect(aioboto3.Session(), s3) as store:
        assert store.data_plane == request.param

        def read(key: str) -> bytes:
            body: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            return body

        yield Subject(store, bucket, read)


@pytest.mark.anyio
async def test_put_then_head_round_trip_with_the_checksum(subject: Subject) -> None:
    store, bucket = subject.store, subject.bucket
    data = b"cell painting " * 1000
    etag = await store.put_object(bucket, "plate/a b+c.tif", data, crc32c(data))
    assert etag == md5_etag(data)
    head = await store.head(bucket, "plate/a b+c.tif")
    assert head is not None
    assert (head.key, head.size, head.etag) == ("plate/a b+c.tif", len(data), etag)
    assert head.checksums == {"CRC32C": crc32c(data)}
    assert subject.read("plate/a b+c.tif") == data
    assert await store.first_part_size(bucket, "plate/a b+c.tif") is None  # not multipart


@pytest.mark.anyio
async def test_a_stream_body_is_sent_from_its_position(subject: Subject) -> None:
    import io

    stream = io.BytesIO(b"skipped|sent")
    stream.seek(8)
    await subject.store.put_object(subject.bucket, "k", stream, crc32c(b"sent"))
    assert subject.read("k") == b"sent"


@pytest.mark.anyio
async def test_an_empty_object(subject: Subject) -> None:
    etag = await subject.store.put_object(subject.bucket, "empty", b"", crc32c(b""))
    head = await subject.store.head(subject.bucket, "empty")
    assert head is not None and (head.size, head.etag) == (0, etag) == (0, md5_etag(b""))


@pytest.mark.anyio
async def test_multipart_upload_with_the_whole_object_checksum(subject: Subject) -> None:
    store, bucket = subject.store, subject.bucket
    parts = [bytes([n]) * (5 * MiB) for n in (1, 2)] + [b"tail" * 1000]
    upload_id = await store.create_multipart_upload(bucket, KEY)
    sent = []
    for number, data in enumerate(parts, start=1):
        etag = await store.upload_part(bucket, KEY, upload_id, number, data, crc32c(data))
        assert etag == md5_etag(data)
        sent.append((number, etag, crc32c(data)))
    listed = await store.list_parts(bucket, KEY, upload_id)
    assert [(p.number, p.etag, p.size) for p in listed] == [
        (n, etag, len(data)) for (n, etag, _), data in zip(sent, parts, strict=True)
    ]
    whole = CRC32C.object_checksum([PartDigest(CRC32C.digest(d), len(d)) for d in parts], True)
    etag = await store.complete_multipart_upload(bucket, KEY, upload_id, sent, whole)
    assert etag == md5_etag(*parts)
    head = await store.head(bucket, KEY)
    assert head is not None
    assert (head.size, head.etag) == (sum(map(len, parts)), etag)
    assert head.checksums == {"CRC32C": whole}
    assert head.checksum_type == "FULL_OBJECT"
    assert await store.first_part_size(bucket, KEY) == (5 * MiB, 3)
    assert subject.read(KEY) == b"".join(parts)
    with pytest.raises(UploadGoneError):  # a completed upload is gone
        await store.list_parts(bucket, KEY, upload_id)


@pytest.mark.anyio
async def test_parts_below_5_mib_but_the_last_are_refused_at_completion(subject: Subject) -> None:
    store, bucket = subject.store, subject.bucket
    upload_id = await store.create_multipart_upload(bucket, "small")
    sent = []
    for number, data in enumerate([b"a" * 100, b"b" * 100], start=1):
        etag = await store.upload_part(bucket, "small", upload_id, number, data, crc32c(data))
        sent.append((number, etag, crc32c(data)))
    with pytest.raises(RetryableError, match="EntityTooSmall"):
        await store.complete_multipart_upload(bucket, "small", upload_id, sent, "")
    await store.abort_multipart_upload(bucket, "small", upload_id)


@pytest.mark.anyio
async def test_an_aborted_upload_is_gone(subject: Subject) -> None:
    store, bucket = subject.store, subject.bucket
    upload_id = await store.create_multipart_upload(bucket, "aborted")
    await store.upload_part(bucket, "aborted", upload_id, 1, b"x", crc32c(b"x"))
    await store.abort_multipart_upload(bucket, "aborted", upload_id)
    with pytest.raises(UploadGoneError, match="NoSuchUpload"):
        await store.list_parts(bucket, "aborted", upload_id)
    await store.abort_multipart_upload(bucket, "aborted", upload_id)  # gone counts as aborted
    assert await store.head(bucket, "aborted") is None


@pytest.mark.anyio
async def test_head_of_a_missing_key_or_bucket_is_none(subject: Subject) -> None:
    assert await subject.store.head(subject.bucket, "nothing/here") is None
    assert await subject.store.first_part_size(subject.bucket, "nothing/here") is None
    assert await subject.store.head(f"missing-{uuid.uuid4().hex[:8]}", "k") is None


@pytest.mark.anyio
async def test_listing_with_a_prefix(subject: Subject) -> None:
    store, bucket = subject.store, subject.bucket
    contents = {"p/1.tif": b"1", "p/sub/2.tif": b"22", "q/3.tif": b"333", "p-not/4": b"4"}
    for key, data in contents.items():
        await store.put_object(bucket, key, data, crc32c(data))
    listed = [obj async for obj in store.list_objects(bucket, "p/")]
    assert [(o.key, o.size, o.etag) for o in listed] == [
        (key, len(contents[key]), md5_etag(contents[key])) for key in ("p/1.tif", "p/sub/2.tif")
    ]
    await store.delete_object(bucket, "p/1.tif")
    assert [o.key async for o in store.list_objects(bucket, "p/")] == ["p/sub/2.tif"]
    assert await store.head(bucket, "p/1.tif") is None


async def put_and_list(subject: Subject, key: str, data: bytes) -> Any:
    """Put ``data`` at ``key`` (alone in its folder): the object as its listing shows it."""
    await subject.store.put_object(subject.bucket, key, data, crc32c(data))
    (listed,) = [o async for o in subject.store.list_objects(subject.bucket, key)]
    return listed


@pytest.mark.anyio
async def test_a_range_of_an_object_and_only_of_the_version_listed(subject: Subject) -> None:
    store, bucket = subject.store, subject.bucket
    data = bytes(range(256)) * 40
    listed = await put_and_list(subject, "src/a.bin", data)
    assert await store.get_range(bucket, "src/a.bin", 100, 5000) == data[100:5100]
    assert await store.get_range(bucket, "src/a.bin", 0, len(data), listed.etag, whole=True) == data
    await store.put_object(bucket, "src/empty", b"", crc32c(b""))
    assert await store.get_range(bucket, "src/empty", 0, 0) == b""
    replaced = b"another version" * 10
    await store.put_object(bucket, "src/a.bin", replaced, crc32c(replaced))
    with pytest.raises(FileChangedError, match="changed since it was listed"):
        await store.get_range(bucket, "src/a.bin", 0, 10, listed.etag)
    with pytest.raises(FileChangedError):  # shorter than when it was listed
        await store.get_range(bucket, "src/a.bin", 100, 5000)
    with pytest.raises(VanishedError):
        await store.get_range(bucket, "src/gone.bin", 0, 10)


@pytest.mark.anyio
async def test_a_copy_within_s3_reports_its_checksum(subject: Subject) -> None:
    store, bucket = subject.store, subject.bucket
    data = bytes(range(256)) * 50
    listed = await put_and_list(subject, "src/a.bin", data)
    etag, checksum = await store.copy_object((bucket, "src/a.bin", listed.etag), bucket, "dst/a")
    assert subject.read("dst/a") == data
    assert checksum == crc32c(data)
    assert etag == md5_etag(data)
    with pytest.raises(VanishedError):
        await store.copy_object((bucket, "src/gone", ""), bucket, "dst/gone")


@pytest.mark.anyio
async def test_an_object_copied_part_by_part_within_s3(subject: Subject) -> None:
    store, bucket = subject.store, subject.bucket
    data = bytes(range(256)) * (5 * MiB // 256) + b"tail" * 1000
    listed = await put_and_list(subject, "src/big.bin", data)
    pieces = [data[: 5 * MiB], data[5 * MiB :]]
    upload_id = await store.create_multipart_upload(bucket, KEY)
    sent = []
    for number, (first, piece) in enumerate(((0, pieces[0]), (5 * MiB, pieces[1])), start=1):
        etag, checksum = await store.upload_part_copy(
            (bucket, "src/big.bin", listed.etag),
            bucket,
            KEY,
            upload_id,
            number,
            (first, first + len(piece) - 1),
        )
        assert checksum in ("", crc32c(piece))  # reported (AWS), or not (moto): never wrong
        sent.append((number, etag, crc32c(piece)))
    whole = CRC32C.object_checksum([PartDigest(CRC32C.digest(p), len(p)) for p in pieces], True)
    await store.complete_multipart_upload(bucket, KEY, upload_id, sent, whole)
    assert subject.read(KEY) == data


@pytest.mark.anyio
async def test_one_level_lists_folders_and_the_objects_directly_in_it(subject: Subject) -> None:
    store, bucket = subject.store, subject.bucket
    for key in ("d/a.csv", "d/b/1.tif", "d/b/2.tif", "d/c/x/3.tif", "d-not/4", "e/5"):
        await store.put_object(bucket, key, b"xy", crc32c(b"xy"))
    level = await store.list_level(bucket, "d/")
    assert level.folders == ("d/b/", "d/c/")
    assert [(o.key, o.size) for o in level.objects] == [("d/a.csv", 2)]
    top = await store.list_level(bucket, "")
    assert top.folders == ("d-not/", "d/", "e/") and top.objects == ()
    assert await store.list_level(bucket, "nothing/") == Level((), ())


@pytest.mark.anyio
async def test_a_missing_bucket_is_a_per_file_error(subject: Subject) -> None:
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(SkipFileError, match="the bucket does not exist") as caught:
        await subject.store.put_object(missing, "k", b"x", crc32c(b"x"))
    assert f"PutObject s3://{missing}/k" in str(caught.value)
    with pytest.raises(SkipFileError, match="the bucket does not exist"):
        await subject.store.create_multipart_upload(missing, "k")
