"""The in-memory S3 store: what it does beyond the contract suite, and a pipeline on it.

tests/test_s3_contract.py holds it to what moto does; these tests cover the S3 rules
moto does not enforce and the fault injection, and show the uploader running on it
in milliseconds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest
from memory_s3 import Call, MemoryStore

from cpg_daemon.core.checksums import ALGORITHMS, encode
from cpg_daemon.core.config import S3Config
from cpg_daemon.core.errors import (
    CredentialsError,
    RetryableError,
    ThrottledError,
    UploadGoneError,
)
from cpg_daemon.engine.uploader import Uploader
from cpg_daemon.journal import Discovered, Journal

MiB = 1024 * 1024


def crc32c(data: bytes) -> str:
    return encode(ALGORITHMS["CRC32C"].digest(data))


@pytest.mark.anyio
async def test_an_injected_fault_is_raised_then_calls_go_through() -> None:
    store = MemoryStore(buckets=("b",))
    store.fail("PutObject", ThrottledError("PutObject s3://b/k: SlowDown"), times=2)
    for _ in range(2):
        with pytest.raises(ThrottledError, match="SlowDown"):
            await store.put_object("b", "k", b"x", crc32c(b"x"))
    await store.put_object("b", "k", b"x", crc32c(b"x"))
    assert store.object_bytes("b", "k") == b"x"
    assert [c.operation for c in store.calls] == ["PutObject"] * 3


@pytest.mark.anyio
async def test_the_hook_sees_every_call_and_may_refuse_one_key() -> None:
    store = MemoryStore(buckets=("b",))

    def expired_for_secret_keys(call: Call) -> None:
        if call.key.startswith("secret/"):
            raise CredentialsError(f"{call.operation} s3://{call.bucket}/{call.key}: ExpiredToken")

    store.before = expired_for_secret_keys
    await store.put_object("b", "open/k", b"x", crc32c(b"x"))
    with pytest.raises(CredentialsError, match="ExpiredToken"):
        await store.head("b", "secret/k")
    assert store.calls == [Call("PutObject", "b", "open/k"), Call("HeadObject", "b", "secret/k")]


@pytest.mark.anyio
async def test_an_aborted_upload_takes_no_parts_and_cannot_complete() -> None:
    # moto answers these with a 500; S3 says NoSuchUpload.
    store = MemoryStore(buckets=("b",))
    upload_id = await store.create_multipart_upload("b", "k")
    etag = await store.upload_part("b", "k", upload_id, 1, b"x", crc32c(b"x"))
    await store.abort_multipart_upload("b", "k", upload_id)
    with pytest.raises(UploadGoneError, match="NoSuchUpload"):
        await store.upload_part("b", "k", upload_id, 2, b"y", crc32c(b"y"))
    with pytest.raises(UploadGoneError, match="NoSuchUpload"):
        await store.complete_multipart_upload("b", "k", upload_id, [(1, etag, "")], "")


@pytest.mark.anyio
async def test_what_s3_checks_and_moto_does_not() -> None:
    store = MemoryStore(buckets=("b",))
    with pytest.raises(RetryableError, match="BadDigest"):
        await store.put_object("b", "k", b"sent", crc32c(b"other"))
    upload_id = await store.create_multipart_upload("b", "k")
    one = await store.upload_part("b", "k", upload_id, 1, b"a" * 5 * MiB, crc32c(b"a" * 5 * MiB))
    two = await store.upload_part("b", "k", upload_id, 2, b"b", crc32c(b"b"))
    with pytest.raises(RetryableError, match="InvalidPartOrder"):
        await store.complete_multipart_upload("b", "k", upload_id, [(2, two, ""), (1, one, "")], "")
    with pytest.raises(RetryableError, match="InvalidPart"):
        await store.complete_multipart_upload("b", "k", upload_id, [(1, two, "")], "")
    with pytest.raises(RetryableError, match="BadDigest"):
        await store.complete_multipart_upload(
            "b", "k", upload_id, [(1, one, ""), (2, two, "")], "AAAAAA=="
        )
    assert await store.head("b", "k") is None


def _settled_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    then = time.time() - 120
    os.utime(path, (then, then))


@pytest.mark.anyio
async def test_the_uploader_resumes_a_multipart_upload_after_a_failed_part(tmp_path: Path) -> None:
    data = os.urandom(2 * 5 * MiB + 100)
    _settled_file(tmp_path / "plate.bin", data)
    s3 = S3Config(part_size=5 * MiB, multipart_threshold=5 * MiB)
    store = MemoryStore(buckets=("b",))
    journal = await Journal.open(tmp_path / "journal.sqlite")
    try:
        uploader = Uploader(journal, s3, anyio.CapacityLimiter(1))
        st = (tmp_path / "plate.bin").stat()
        found = [Discovered("plate.bin", "b", "p/plate.bin", st.st_size, st.st_mtime_ns, False)]
        await journal.record_discovered("w", found)
        (record,) = await journal.claim(10)

        store.fail("UploadPart", RetryableError("UploadPart 2: injected"), part_number=2)
        with pytest.raises(RetryableError, match="injected"):
            await uploader.upload(store, record, tmp_path / "plate.bin")
        again = await journal.get("w", "plate.bin")
        assert again is not None and again.upload_id is not None
        assert await uploader.upload(store, again, tmp_path / "plate.bin") == "uploaded"
    finally:
        await journal.close()
    parts = [c.part_number for c in store.calls if c.operation == "UploadPart"]
    assert parts == [1, 2, 2, 3]  # part 1 was not sent again
    assert store.object_bytes("b", "p/plate.bin") == data
    assert store.uploads == {}
