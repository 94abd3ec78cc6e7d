"""The uploader and the scheduler in-process, against a real moto_server.

Journal rows are made the way the daemon makes them (``record_discovered`` then
``claim``); the real Uploader, Scheduler, Journal and ObjectStore run on an anyio
event loop and talk to the session's moto_server. Faults are injected by small
subclasses of the real ObjectStore, which still send every request they do not
refuse to the real server.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aioboto3
import anyio
import daemonproc
import pytest
from awscrt import checksums as crt
from pipeline import table_of
from s3server import S3Server
from wiremeter import WireMeter

from cpg_daemon.core.bandwidth import parse_bandwidth
from cpg_daemon.core.checksums import ChecksumName
from cpg_daemon.core.config import S3Config, WatchConfig
from cpg_daemon.core.errors import FileChangedError, RetryableError
from cpg_daemon.core.objectkeys import S3Location
from cpg_daemon.engine.scheduler import Scheduler
from cpg_daemon.engine.sources import SourceFile
from cpg_daemon.engine.uploader import Outcome, Uploader
from cpg_daemon.journal import Discovered, FileRecord, Journal
from cpg_daemon.s3.store import ObjectStore

MiB = 1024 * 1024
PART = 5 * MiB
PREFIX = "plates/"
WATCH = "w"
SETTLED_AGO = 120.0
"""Seconds into the past that test files' mtimes are set: they have settled, as the
watcher requires, so a later rewrite always gets a different mtime (the kernel's
mtime clock is coarse, and the daemon detects changes by size and mtime)."""

S = TypeVar("S", bound=ObjectStore)


# -- helpers -------------------------------------------------------------------------


def s3_config(endpoint_url: str, **overrides: Any) -> S3Config:
    settings: dict[str, Any] = {
        "endpoint_url": endpoint_url,
        "part_size": PART,
        "multipart_threshold": PART,
        "request_attempts": 2,
    }
    settings.update(overrides)
    return S3Config(**settings)


write_file = functools.partial(daemonproc.write_file, age=SETTLED_AGO)
"""Write a file that has settled (its mtime is ``SETTLED_AGO`` seconds old)."""


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def b64(value: int, width: int) -> str:
    return base64.b64encode(value.to_bytes(width, "big")).decode("ascii")


CRCS: dict[str, tuple[Callable[[bytes], int], int]] = {
    "CRC32C": (crt.crc32c, 4),
    "CRC32": (crt.crc32, 4),
    "CRC64NVME": (crt.crc64nvme, 8),
}


def whole_crc(name: str, data: bytes) -> str:
    crc, width = CRCS[name]
    return b64(crc(data), width)


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def sha256_composite(data: bytes, part_size: int) -> str:
    """S3's COMPOSITE SHA256: the hash of the concatenated part hashes, then ``-N``."""
    parts = [data[i : i + part_size] for i in range(0, len(data), part_size)]
    joined = b"".join(hashlib.sha256(p).digest() for p in parts)
    return f"{sha256_b64(joined)}-{len(parts)}"


def object_bytes(s3_client: Any, bucket: str, key: str) -> bytes:
    body: bytes = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def open_uploads(s3_client: Any, bucket: str) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = s3_client.list_multipart_uploads(Bucket=bucket).get(
        "Uploads", []
    )
    return uploads


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@asynccontextmanager
async def opened_journal(path: Path) -> AsyncIterator[Journal]:
    journal = await Journal.open(path)
    try:
        yield journal
    finally:
        await journal.close()


@asynccontextmanager
async def connected(cls: type[S], s3: S3Config) -> AsyncIterator[S]:
    async with cls.connect(aioboto3.Session(), s3) as store:
        assert isinstance(store, cls)
        yield store


async def discover(
    journal: Journal,
    root: Path,
    bucket: str,
    rel_paths: Sequence[str],
    *,
    watch: str = WATCH,
    check_remote: bool = False,
) -> None:
    found = []
    for rel in rel_paths:
        st = (root / rel).stat()
        found.append(
            Discovered(rel, bucket, PREFIX + rel, st.st_size, st.st_mtime_ns, check_remote)
        )
    assert await journal.record_discovered(watch, found) == len(found)


async def claim_one(journal: Journal, rel_path: str, watch: str = WATCH) -> FileRecord:
    """Claim every due row and hand back the one for ``rel_path`` (the others go back)."""
    claimed = await journal.claim(1000)
    mine = [r for r in claimed if (r.watch, r.rel_path) == (watch, rel_path)]
    for other in claimed:
        if other not in mine:
            await journal.requeue(other.id)
    assert len(mine) == 1, f"{rel_path} was not due"
    return mine[0]


async def row(journal: Journal, rel_path: str, watch: str = WATCH) -> FileRecord:
    record = await journal.get(watch, rel_path)
    assert record is not None, f"no journal row for {rel_path}"
    return record


def watch_config(root: Path, bucket: str, name: str = WATCH) -> WatchConfig:
    return WatchConfig(name=name, path=root, destination=S3Location(bucket, PREFIX), settle=0.0)


async def run_scheduler_until(
    scheduler: Scheduler,
    journal: Journal,
    done: Callable[[list[FileRecord]], bool],
    within: float = 20.0,
) -> list[FileRecord]:
    """Run the scheduler until ``done(journal rows)`` holds and no file is in flight.

    The loop wakes the scheduler as the watcher would when it sees a file settle:
    a file re-queued after it changed is otherwise picked up only at the feeder's
    next idle poll (``IDLE_POLL``, 5 s), even with a settle time of 0.
    """
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        with anyio.fail_after(within):
            while True:
                rows = await journal.records()
                if done(rows) and scheduler.statistics().busy == 0:
                    break
                scheduler.wake()
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    return await journal.records()


def all_settled(rows: list[FileRecord]) -> bool:
    return all(r.state in ("uploaded", "failed") for r in rows)


class FailingStore(ObjectStore):
    """Refuses UploadPart ``fail_part`` with a RetryableError (nothing is sent for it).

    Use it with a limiter of one slot, so the parts before it have been sent and
    journaled when it is refused (a part's slot is freed once it is journaled).
    """

    fail_part = 0

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, body: bytes, checksum: str
    ) -> str:
        if number == self.fail_part:
            raise RetryableError(f"UploadPart {number}: injected failure")
        return await super().upload_part(bucket, key, upload_id, number, body, checksum)


# -- 1. checksum algorithms ------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("checksum", ["CRC32C", "CRC32", "CRC64NVME", "SHA256", "none"])
async def test_checksum_algorithms_single_and_multipart(
    checksum: ChecksumName, tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    root = tmp_path / "watch"
    files = {
        "single.bin": write_file(root / "single.bin", payload(300_000, 1)),
        "multi.bin": write_file(root / "multi.bin", payload(PART + 12_345, 2)),
    }
    s3 = s3_config(s3_server.endpoint_url, checksum=checksum)
    async with (
        opened_journal(tmp_path / "journal.sqlite") as journal,
        connected(ObjectStore, s3) as store,
    ):
        uploader = Uploader(journal, s3, anyio.CapacityLimiter(4))
        await discover(journal, root, bucket, list(files))
        for rel in files:
            record = await claim_one(journal, rel)
            assert await uploader.upload(store, record, root / rel) == "uploaded"
        rows = {rel: await row(journal, rel) for rel in files}

    logged = s3_server.requests()
    assert len([r for r in logged if r.bucket == bucket and r.is_upload_part]) == 2
    for rel, data in files.items():
        key = PREFIX + rel
        record = rows[rel]
        assert record.state == "uploaded"
        assert record.checksum_algorithm == checksum
        assert object_bytes(s3_client, bucket, key) == data
        head = s3_client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        multipart = rel == "multi.bin"
        if checksum == "none":
            assert record.checksum == ""
        elif checksum == "SHA256":
            if multipart:
                expected = sha256_composite(data, PART)
                assert expected.endswith("-2")
                assert record.checksum == expected
                # GetObject reports S3's form ("...-2"). moto's HeadObject omits the
                # "-N" suffix of COMPOSITE checksums (moto/s3/responses.py, head_object;
                # get_object adds it), unlike S3: compare HEAD on the hash itself.
                got = s3_client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
                got["Body"].read()
                assert got["ChecksumSHA256"] == expected
                assert head["ChecksumSHA256"] in (expected, expected.rsplit("-", 1)[0])
            else:
                assert record.checksum == sha256_b64(data)
                assert head["ChecksumSHA256"] == record.checksum
        else:
            assert record.checksum == whole_crc(checksum, data)
            assert head[f"Checksum{checksum}"] == record.checksum
            if multipart:
                assert head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
    assert open_uploads(s3_client, bucket) == []


@pytest.mark.anyio
async def test_a_group_of_small_files_ends_each_file_as_alone(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    """Small files go in groups (``upload_many``: one read trip, one journal write): a
    file deleted or rewritten after it settled, or one S3 refuses, ends as it would
    alone; the others of its group are uploaded, each with its own checksum and row."""
    root = tmp_path / "watch"
    files = {f"B/f{i}.csv": write_file(root / f"B/f{i}.csv", payload(100 + i, i)) for i in range(6)}

    class RefusingStore(ObjectStore):
        async def put_object(self, bucket: str, key: str, body: Any, checksum: str) -> str:
            if key.endswith("f4.csv"):
                raise RetryableError("PutObject: injected failure")
            return await super().put_object(bucket, key, body, checksum)

    s3 = s3_config(s3_server.endpoint_url)
    async with (
        opened_journal(tmp_path / "journal.sqlite") as journal,
        connected(RefusingStore, s3) as store,
    ):
        uploader = Uploader(journal, s3, anyio.CapacityLimiter(4))
        await discover(journal, root, bucket, list(files))
        records = sorted(await journal.claim(100), key=lambda r: r.rel_path)
        assert all(uploader.batchable(r) for r in records)
        (root / "B/f1.csv").unlink()
        write_file(root / "B/f2.csv", b"rewritten after it settled", age=0)
        errors: dict[int, str] = {}

        async def failed(index: int, exc: Exception) -> None:
            errors[index] = type(exc).__name__

        paths = [root / r.rel_path for r in records]
        results = await uploader.upload_many(store, records, paths, failed)
        rows = {rel: await row(journal, rel) for rel in files}

    assert results == ["uploaded", None, None, "uploaded", None, "uploaded"]
    assert errors == {1: "VanishedError", 2: "FileChangedError", 4: "RetryableError"}
    for i in (0, 3, 5):
        rel = f"B/f{i}.csv"
        assert object_bytes(s3_client, bucket, PREFIX + rel) == files[rel]
        assert rows[rel].state == "uploaded"
        assert rows[rel].checksum == whole_crc("CRC32C", files[rel])
    # The others are still the scheduler's to decide on (forget, re-queue, retry).
    assert {rel: rows[rel].state for rel in ("B/f1.csv", "B/f2.csv", "B/f4.csv")} == {
        "B/f1.csv": "uploading",
        "B/f2.csv": "uploading",
        "B/f4.csv": "uploading",
    }
    keys = {
        r.key for r in s3_server.requests() if r.bucket == bucket and r.method == "PUT" and r.key
    }
    assert keys == {PREFIX + f"B/f{i}.csv" for i in (0, 3, 5)}


# -- 2. files deleted before their upload ------------------------------------------------


@pytest.mark.anyio
async def test_deleted_files_are_forgotten_and_their_uploads_aborted(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    root = tmp_path / "watch"
    write_file(root / "small.bin", payload(10_000, 3))
    write_file(root / "partial.bin", payload(2 * PART + 100, 4))
    keep = write_file(root / "keep.bin", payload(20_000, 5))
    s3 = s3_config(s3_server.endpoint_url)
    async with (
        opened_journal(tmp_path / "journal.sqlite") as journal,
        connected(FailingStore, s3) as failing,
        connected(ObjectStore, s3) as store,
    ):
        uploader = Uploader(journal, s3, anyio.CapacityLimiter(4))
        await discover(journal, root, bucket, ["small.bin", "partial.bin", "keep.bin"])

        # A first attempt at partial.bin sends part 1, then fails on part 2.
        first = await claim_one(journal, "partial.bin")
        failing.fail_part = 2
        one_at_a_time = Uploader(journal, s3, anyio.CapacityLimiter(1))
        with pytest.raises(RetryableError, match="injected"):
            await one_at_a_time.upload(failing, first, root / "partial.bin")
        await journal.requeue(first.id)
        upload_id = (await row(journal, "partial.bin")).upload_id
        assert upload_id is not None
        assert [u["UploadId"] for u in open_uploads(s3_client, bucket)] == [upload_id]

        # Claimed, then deleted before the upload: driven one file at a time.
        small = await claim_one(journal, "small.bin")
        (root / "small.bin").unlink()
        scheduler = Scheduler(
            journal, uploader, table_of({WATCH: watch_config(root, bucket)}, {WATCH: store}), 2, 3
        )
        await scheduler._process(small)
        assert await journal.get(WATCH, "small.bin") is None

        # Deleted with an open multipart upload, picked up by a running scheduler.
        (root / "partial.bin").unlink()
        rows = await run_scheduler_until(
            scheduler,
            journal,
            lambda rows: {r.rel_path: r.state for r in rows} == {"keep.bin": "uploaded"},
        )
        assert scheduler.statistics().recent_errors == ()

    assert [(r.rel_path, r.state, r.attempts, r.last_error) for r in rows] == [
        ("keep.bin", "uploaded", 0, None)
    ]
    assert open_uploads(s3_client, bucket) == []
    listed = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [o["Key"] for o in listed] == [PREFIX + "keep.bin"]
    assert object_bytes(s3_client, bucket, PREFIX + "keep.bin") == keep
    aborts = [
        r
        for r in s3_server.requests()
        if r.method == "DELETE" and r.bucket == bucket and r.query.get("uploadId") == upload_id
    ]
    assert len(aborts) == 1


# -- 2b. uploads created in the attempt that ends with the file gone or failed ----------


class RewritingStore(ObjectStore):
    """After the first UploadPart, rewrites (or, given None, deletes) the file once.

    Records the contents of every object it completes.
    """

    path: Path
    new_contents: bytes | None = b""
    rewritten = False
    completed: list[bytes]

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, body: bytes, checksum: str
    ) -> str:
        etag = await super().upload_part(bucket, key, upload_id, number, body, checksum)
        if not self.rewritten:
            self.rewritten = True
            if self.new_contents is None:
                await anyio.Path(self.path).unlink()
            else:
                await anyio.Path(self.path).write_bytes(self.new_contents)
        return etag

    async def complete_multipart_upload(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        parts: list[tuple[int, str, str]],
        checksum: str,
    ) -> str:
        etag = await super().complete_multipart_upload(bucket, key, upload_id, parts, checksum)
        reply = await self._client.get_object(Bucket=bucket, Key=key)
        async with reply["Body"] as body:
            self.completed.append(await body.read())
        return etag


@pytest.mark.anyio
async def test_file_deleted_during_its_first_multipart_upload_has_it_aborted(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    root = tmp_path / "watch"
    write_file(root / "gone.bin", payload(PART + 100, 17))
    s3 = s3_config(s3_server.endpoint_url)
    async with (
        opened_journal(tmp_path / "journal.sqlite") as journal,
        connected(RewritingStore, s3) as store,
    ):
        store.path, store.new_contents, store.completed = root / "gone.bin", None, []
        uploader = Uploader(journal, s3, anyio.CapacityLimiter(1))
        await discover(journal, root, bucket, ["gone.bin"])
        record = await claim_one(journal, "gone.bin")
        assert record.upload_id is None  # its first attempt
        scheduler = Scheduler(
            journal, uploader, table_of({WATCH: watch_config(root, bucket)}, {WATCH: store}), 2, 3
        )
        await scheduler._process(record)
        assert store.rewritten
        assert await journal.records() == []
        assert scheduler.statistics().recent_errors == ()
    assert open_uploads(s3_client, bucket) == []


@pytest.mark.anyio
async def test_giving_up_aborts_an_upload_created_in_the_last_attempt(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    root = tmp_path / "watch"
    write_file(root / "big.bin", payload(PART + 100, 18))
    s3 = s3_config(s3_server.endpoint_url)
    async with (
        opened_journal(tmp_path / "journal.sqlite") as journal,
        connected(FailingStore, s3) as store,
    ):
        store.fail_part = 2
        uploader = Uploader(journal, s3, anyio.CapacityLimiter(1))
        await discover(journal, root, bucket, ["big.bin"])
        record = await claim_one(journal, "big.bin")
        scheduler = Scheduler(
            journal, uploader, table_of({WATCH: watch_config(root, bucket)}, {WATCH: store}), 2, 1
        )
        await scheduler._process(record)
        failed = await row(journal, "big.bin")
    assert (failed.state, failed.attempts) == ("failed", 1)
    assert failed.last_error is not None and "injected" in failed.last_error
    assert open_uploads(s3_client, bucket) == []
    assert failed.upload_id is None


class DeletingUploader(Uploader):
    """A writer that deletes the file right after the uploader saw it change."""

    async def upload(
        self, store: ObjectStore, record: FileRecord, path: Path | SourceFile
    ) -> Outcome:
        try:
            return await super().upload(store, record, path)
        except FileChangedError:
            await anyio.Path(path if isinstance(path, Path) else path.name).unlink()
            raise


@pytest.mark.anyio
async def test_file_changed_then_deleted_has_its_upload_aborted(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    root = tmp_path / "watch"
    write_file(root / "gone.bin", payload(PART + 100, 16))
    s3 = s3_config(s3_server.endpoint_url)
    async with (
        opened_journal(tmp_path / "journal.sqlite") as journal,
        connected(RewritingStore, s3) as store,
    ):
        store.path, store.new_contents, store.completed = root / "gone.bin", b"x" * 10, []
        uploader = DeletingUploader(journal, s3, anyio.CapacityLimiter(1))
        await discover(journal, root, bucket, ["gone.bin"])
        record = await claim_one(journal, "gone.bin")
        scheduler = Scheduler(
            journal, uploader, table_of({WATCH: watch_config(root, bucket)}, {WATCH: store}), 2, 3
        )
        await scheduler._process(record)
        assert store.rewritten
        assert not (root / "gone.bin").exists()
        assert await journal.records() == []
    assert open_uploads(s3_client, bucket) == []


# -- 3. a file that changes during a multipart upload -------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("concurrency", [1, 4])
@pytest.mark.parametrize(
    "new_size",
    [
        pytest.param(PART + 100, id="same"),
        pytest.param(PART + 107, id="+7"),
        pytest.param(1000, id="small"),
    ],
)
async def test_file_changed_during_multipart_is_never_mixed(
    concurrency: int,
    new_size: int,
    tmp_path: Path,
    s3_server: S3Server,
    s3_client: Any,
    bucket: str,
) -> None:
    root = tmp_path / "watch"
    old = write_file(root / "grows.bin", payload(PART + 100, 6))
    new = payload(new_size, 7)
    s3 = s3_config(s3_server.endpoint_url)
    async with (
        opened_journal(tmp_path / "journal.sqlite") as journal,
        connected(RewritingStore, s3) as store,
    ):
        store.path, store.new_contents, store.completed = root / "grows.bin", new, []
        uploader = Uploader(journal, s3, anyio.CapacityLimiter(concurrency))
        await discover(journal, root, bucket, ["grows.bin"])
        scheduler = Scheduler(
            journal, uploader, table_of({WATCH: watch_config(root, bucket)}, {WATCH: store}), 2, 3
        )
        rows = await run_scheduler_until(scheduler, journal, all_settled)

    assert store.rewritten
    assert [(r.state, r.size, r.attempts, r.last_error) for r in rows] == [
        ("uploaded", len(new), 0, None)
    ]
    assert rows[0].checksum == whole_crc("CRC32C", new)
    # Every multipart object that ever existed held one version of the file, never a mix
    # (the new version goes up in one PutObject when it is below the threshold).
    assert all(content in (old, new) for content in store.completed)
    assert store.completed[-1:] == ([new] if len(new) >= PART else [])
    assert object_bytes(s3_client, bucket, PREFIX + "grows.bin") == new
    assert open_uploads(s3_client, bucket) == []


# -- 4. resuming a partial multipart upload ----------------------------------------------


@pytest.mark.anyio
async def test_resume_sends_each_part_once(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    root = tmp_path / "watch"
    data = write_file(root / "big.bin", payload(2 * PART + 4321, 8))
    key = PREFIX + "big.bin"
    s3 = s3_config(s3_server.endpoint_url)
    mark = s3_server.mark()
    async with (
        opened_journal(tmp_path / "journal.sqlite") as journal,
        connected(FailingStore, s3) as failing,
        connected(ObjectStore, s3) as store,
    ):
        uploader = Uploader(journal, s3, anyio.CapacityLimiter(4))
        await discover(journal, root, bucket, ["big.bin"])
        first = await claim_one(journal, "big.bin")
        failing.fail_part = 3
        one_at_a_time = Uploader(journal, s3, anyio.CapacityLimiter(1))
        with pytest.raises(RetryableError, match="injected"):
            await one_at_a_time.upload(failing, first, root / "big.bin")
        await journal.requeue(first.id)

        second = await claim_one(journal, "big.bin")
        assert second.upload_id is not None
        assert [p.number for p in await journal.parts(second.id, second.upload_id)] == [1, 2]
        assert await uploader.upload(store, second, root / "big.bin") == "uploaded"
        done = await row(journal, "big.bin")

    parts = s3_server.upload_part_requests(bucket, key, since=mark)
    assert Counter(int(r.query["partNumber"]) for r in parts) == {1: 1, 2: 1, 3: 1}
    assert {r.query["uploadId"] for r in parts} == {second.upload_id}
    creates = [
        r
        for r in s3_server.requests(since=mark)
        if r.method == "POST" and r.key == key and "uploads" in r.query
    ]
    assert len(creates) == 1
    assert done.state == "uploaded"
    assert done.checksum == whole_crc("CRC32C", data)
    assert object_bytes(s3_client, bucket, key) == data
    assert open_uploads(s3_client, bucket) == []


class PartGatedStore(ObjectStore):
    """Holds UploadPart ``gated_part`` until ``gate`` is set; tells ``reached`` it arrived."""

    gated_part = 0
    gate: anyio.Event
    reached: anyio.Event

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, body: bytes, checksum: str
    ) -> str:
        if number == self.gated_part:
            self.reached.set()
            await self.gate.wait()
        return await super().upload_part(bucket, key, upload_id, number, body, checksum)


@pytest.mark.anyio
async def test_a_multipart_upload_reports_each_part_s3_holds_before_the_file_is_done(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    """What ``upload``'s progress display shows for a large file: parts resumed from an
    earlier attempt count at once, each part sent counts when S3 took it, and the file
    leaves the list once the journal counts it uploaded."""
    root = tmp_path / "watch"
    size = 4 * PART + 100
    data = write_file(root / "big.bin", payload(size, 31))
    s3 = s3_config(s3_server.endpoint_url)
    async with (
        opened_journal(tmp_path / "journal.sqlite") as journal,
        connected(FailingStore, s3) as failing,
        connected(PartGatedStore, s3) as gated,
    ):
        await discover(journal, root, bucket, ["big.bin"])
        failing.fail_part = 2  # an earlier attempt that got part 1 through
        first = await claim_one(journal, "big.bin")
        with pytest.raises(RetryableError):
            await Uploader(journal, s3, anyio.CapacityLimiter(1)).upload(
                failing, first, root / "big.bin"
            )
        await journal.requeue(first.id)
        uploader = Uploader(journal, s3, anyio.CapacityLimiter(1))  # parts in order
        assert uploader.statistics().multipart == ()
        gated.gated_part, gated.gate, gated.reached = 4, anyio.Event(), anyio.Event()
        record = await claim_one(journal, "big.bin")
        async with anyio.create_task_group() as tg:
            tg.start_soon(uploader.upload, gated, record, root / "big.bin")
            await gated.reached.wait()
            held = uploader.statistics().multipart  # parts 1 (resumed), 2 and 3
            gated.gate.set()
        assert uploader.statistics().multipart == ()
        assert (await row(journal, "big.bin")).state == "uploaded"
    assert [(p.key, p.size, p.done) for p in held] == [(PREFIX + "big.bin", size, 3 * PART)]
    assert object_bytes(s3_client, bucket, PREFIX + "big.bin") == data


# -- 5. an unreachable endpoint: retry with backoff, then give up -------------------------


@pytest.mark.anyio
async def test_unreachable_endpoint_retries_later_then_fails(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    port = closed_port()
    bad_s3 = s3_config(f"http://127.0.0.1:{port}", request_attempts=1)
    good_s3 = s3_config(s3_server.endpoint_url)
    bad_root, good_root = tmp_path / "bad", tmp_path / "good"
    write_file(bad_root / "a.bin", payload(1000, 12))
    write_file(bad_root / "b.bin", payload(PART + 10, 13))
    good = {
        "c.bin": write_file(good_root / "c.bin", payload(2000, 14)),
        "d.bin": write_file(good_root / "d.bin", payload(PART + 20, 15)),
    }
    watches = {
        "bad": watch_config(bad_root, bucket, "bad"),
        "good": watch_config(good_root, bucket, "good"),
    }
    async with (
        opened_journal(tmp_path / "journal.sqlite") as journal,
        connected(ObjectStore, bad_s3) as bad,
        connected(ObjectStore, good_s3) as good_store,
    ):
        stores = {"bad": bad, "good": good_store}
        uploader = Uploader(journal, good_s3, anyio.CapacityLimiter(4))
        await discover(journal, bad_root, bucket, ["a.bin", "b.bin"], watch="bad")
        await discover(journal, good_root, bucket, list(good), watch="good")

        # One attempt: the uploader raises a RetryableError that names the problem.
        record = await claim_one(journal, "a.bin", watch="bad")
        with anyio.fail_after(10), pytest.raises(RetryableError) as raised:
            await uploader.upload(bad, record, bad_root / "a.bin")
        assert "cannot reach the S3 endpoint" in str(raised.value)
        assert f"127.0.0.1:{port}" in str(raised.value)

        # With attempts left, the scheduler queues it again for later.
        before = time.time()
        retrying = Scheduler(journal, uploader, table_of(watches, stores), 4, 3)
        with anyio.fail_after(10):
            await retrying._process(record)
        a = await row(journal, "a.bin", "bad")
        assert (a.state, a.attempts) == ("queued", 1)
        assert a.not_before >= before + 4.0  # backoff(0): 5 s +- 20 %
        assert a.last_error is not None and "cannot reach the S3 endpoint" in a.last_error
        due = await journal.claim(10, watches=["bad"])
        assert [r.rel_path for r in due] == ["b.bin"]  # a.bin is not due yet
        await journal.requeue(due[0].id)

        # With one attempt per file, the other bad file fails; the good watch is unaffected.
        giving_up = Scheduler(journal, uploader, table_of(watches, stores), 4, 1)
        rows = await run_scheduler_until(
            giving_up,
            journal,
            lambda rows: (
                {r.rel_path: r.state for r in rows}
                == {"a.bin": "queued", "b.bin": "failed", "c.bin": "uploaded", "d.bin": "uploaded"}
            ),
        )

    by_name = {r.rel_path: r for r in rows}
    b = by_name["b.bin"]
    assert b.attempts == 1
    assert b.last_error is not None
    assert "cannot reach the S3 endpoint" in b.last_error
    assert f"127.0.0.1:{port}" in b.last_error
    assert "(after 1 attempts)" in b.last_error
    assert [e.key for e in giving_up.statistics().recent_errors] == [PREFIX + "b.bin"]
    assert (by_name["a.bin"].attempts, by_name["a.bin"].not_before) == (1, a.not_before)
    for rel, data in good.items():
        assert (by_name[rel].attempts, by_name[rel].last_error) == (0, None)
        assert object_bytes(s3_client, bucket, PREFIX + rel) == data
    assert open_uploads(s3_client, bucket) == []


# -- 6. bounded concurrency --------------------------------------------------------------


class CountingStore(ObjectStore):
    """Counts PutObject and UploadPart calls in flight (each held a little longer)."""

    def __init__(self, client: Any, s3: S3Config, data_plane: Any = None) -> None:
        super().__init__(client, s3, data_plane)
        self.in_flight = 0
        self.max_in_flight = 0
        self.bytes_in_flight = 0
        self.max_bytes_in_flight = 0
        self.calls = 0

    @asynccontextmanager
    async def _counted(self, body: Any) -> AsyncIterator[None]:
        size = len(body) if isinstance(body, bytes) else len(body.getvalue())
        self.in_flight += 1
        self.bytes_in_flight += size
        self.calls += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.max_bytes_in_flight = max(self.max_bytes_in_flight, self.bytes_in_flight)
        try:
            await anyio.sleep(0.02)
            yield
        finally:
            self.in_flight -= 1
            self.bytes_in_flight -= size

    async def put_object(self, bucket: str, key: str, body: bytes, checksum: str) -> str:
        async with self._counted(body):
            return await super().put_object(bucket, key, body, checksum)

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, body: bytes, checksum: str
    ) -> str:
        async with self._counted(body):
            return await super().upload_part(bucket, key, upload_id, number, body, checksum)


async def upload_counted(
    tmp_path: Path,
    root: Path,
    bucket: str,
    contents: dict[str, bytes],
    s3: S3Config,
    requests: int,
    within: float,
) -> CountingStore:
    """Upload ``contents`` with 8 workers and ``requests`` in flight; every file must land."""
    async with (
        opened_journal(tmp_path / "journal.sqlite") as journal,
        connected(CountingStore, s3) as store,
    ):
        uploader = Uploader(journal, s3, anyio.CapacityLimiter(requests))
        await discover(journal, root, bucket, sorted(contents))
        scheduler = Scheduler(
            journal, uploader, table_of({WATCH: watch_config(root, bucket)}, {WATCH: store}), 8, 3
        )
        rows = await run_scheduler_until(scheduler, journal, all_settled, within=within)
    assert {r.rel_path: r.state for r in rows} == dict.fromkeys(contents, "uploaded")
    return store


@pytest.mark.anyio
async def test_requests_in_flight_are_bounded_by_the_limiter(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    root = tmp_path / "watch"
    contents = {
        f"small/{i:02d}.bin": write_file(root / f"small/{i:02d}.bin", payload(3000 + i, i))
        for i in range(30)
    }
    contents["big.bin"] = write_file(root / "big.bin", payload(5 * PART + 1, 99))
    s3 = s3_config(s3_server.endpoint_url)
    store = await upload_counted(tmp_path, root, bucket, contents, s3, requests=3, within=30)
    assert store.calls == 30 + 6
    assert 2 <= store.max_in_flight <= 3
    assert store.in_flight == 0
    for rel, data in contents.items():
        assert object_bytes(s3_client, bucket, PREFIX + rel) == data


@pytest.mark.anyio
@pytest.mark.parametrize("budget", [2 * PART + 4096, PART // 2])
async def test_bytes_in_flight_stay_within_max_bytes_in_flight(
    budget: int, tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    """Parts of several big files and small files share one memory budget; a body
    larger than the whole budget goes alone instead of never."""
    root = tmp_path / "watch"

    def make() -> dict[str, bytes]:  # 47 MiB: in a thread, not as one step of the loop
        made = {
            f"big{i}.bin": write_file(root / f"big{i}.bin", payload(3 * PART + i, 40 + i))
            for i in range(3)
        }
        for i in range(12):
            made[f"small/{i:02d}.bin"] = write_file(root / f"small/{i:02d}.bin", payload(4000, i))
        return made

    contents = await anyio.to_thread.run_sync(make)
    s3 = s3_config(s3_server.endpoint_url, max_bytes_in_flight=budget)
    store = await upload_counted(tmp_path, root, bucket, contents, s3, requests=8, within=60)
    if budget > PART:
        assert PART < store.max_bytes_in_flight <= budget
    else:  # every part is bigger than the budget: one at a time, small files beside none
        assert store.max_bytes_in_flight <= PART + 3
    assert store.bytes_in_flight == 0
    for rel, data in contents.items():
        assert object_bytes(s3_client, bucket, PREFIX + rel) == data


# -- 7. check_remote ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_check_remote_skips_identical_objects_only(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    root = tmp_path / "watch"
    same = write_file(root / "same.bin", payload(50_000, 20))
    differs = write_file(root / "differs.bin", payload(50_000, 21))
    unproven = write_file(root / "unproven.bin", payload(50_000, 22))
    other = payload(50_000, 23)
    for rel, body, crc in [
        ("same.bin", same, True),
        ("differs.bin", other, True),
        ("unproven.bin", unproven, False),  # identical, but nothing proves it
    ]:
        extra = {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": whole_crc("CRC32C", body)}
        s3_client.put_object(Bucket=bucket, Key=PREFIX + rel, Body=body, **(extra if crc else {}))
    seeded = s3_client.head_object(Bucket=bucket, Key=PREFIX + "same.bin", ChecksumMode="ENABLED")
    assert seeded["ChecksumCRC32C"] == whole_crc("CRC32C", same)
    mark = s3_server.mark()
    s3 = s3_config(s3_server.endpoint_url)
    async with (
        opened_journal(tmp_path / "journal.sqlite") as journal,
        connected(ObjectStore, s3) as store,
    ):
        uploader = Uploader(journal, s3, anyio.CapacityLimiter(4))
        await discover(
            journal, root, bucket, ["same.bin", "differs.bin", "unproven.bin"], check_remote=True
        )
        outcomes = {}
        for record in await journal.claim(10):
            assert record.check_remote
            outcomes[record.rel_path] = await uploader.upload(store, record, root / record.rel_path)
        rows = {r.rel_path: r for r in await journal.records()}

    assert outcomes == {
        "same.bin": "already-present",
        "differs.bin": "uploaded",
        "unproven.bin": "uploaded",
    }
    assert s3_server.put_object_requests(bucket, PREFIX + "same.bin", since=mark) == []
    assert len(s3_server.put_object_requests(bucket, PREFIX + "differs.bin", since=mark)) == 1
    assert len(s3_server.put_object_requests(bucket, PREFIX + "unproven.bin", since=mark)) == 1
    assert [r for r in s3_server.requests(since=mark) if r.is_upload_part] == []
    for rel, data in [("same.bin", same), ("differs.bin", differs), ("unproven.bin", unproven)]:
        record = rows[rel]
        assert (record.state, record.check_remote) == ("uploaded", False)
        assert (record.checksum_algorithm, record.checksum) == ("CRC32C", whole_crc("CRC32C", data))
        assert object_bytes(s3_client, bucket, PREFIX + rel) == data
    assert rows["same.bin"].etag == seeded["ETag"]


# -- 8. draining ------------------------------------------------------------------------


class GatedStore(ObjectStore):
    """Holds every PutObject until ``gate`` is set (requests then go to the real server)."""

    gate: anyio.Event

    async def put_object(self, bucket: str, key: str, body: Any, checksum: str) -> str:
        await self.gate.wait()
        return await super().put_object(bucket, key, body, checksum)


async def busy(scheduler: Scheduler, files: int) -> None:
    """Wait until ``files`` files are in flight."""
    with anyio.fail_after(10):
        while True:
            if scheduler.statistics().busy >= files:
                return
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_wait_idle_returns_once_files_that_overlapped_have_finished(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    """What a graceful stop waits on: files that start while another is in flight count too."""
    root = tmp_path / "root"
    write_file(root / "first.tif", b"1")
    s3 = s3_config(s3_server.endpoint_url)
    async with (
        opened_journal(tmp_path / "j.sqlite3") as journal,
        connected(GatedStore, s3) as store,
    ):
        store.gate = anyio.Event()
        uploader = Uploader(journal, s3, anyio.CapacityLimiter(4))
        scheduler = Scheduler(
            journal, uploader, table_of({WATCH: watch_config(root, bucket)}, {WATCH: store}), 2, 3
        )
        idle = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            await discover(journal, root, bucket, ["first.tif"])
            scheduler.wake()
            await busy(scheduler, 1)

            async def wait_idle() -> None:
                await scheduler.wait_idle()
                idle.set()

            tg.start_soon(wait_idle)  # waiting from while one file is in flight ...
            write_file(root / "second.tif", b"2")
            await discover(journal, root, bucket, ["second.tif"])
            scheduler.wake()
            await busy(scheduler, 2)  # ... and a second one starts
            assert not idle.is_set()
            store.gate.set()
            with anyio.fail_after(10):
                await idle.wait()
            tg.cancel_scope.cancel()
        assert {r.state for r in await journal.records()} == {"uploaded"}


# -- 9. bandwidth on the wire -------------------------------------------------------------


def busiest_second(arrivals: list[tuple[float, int]]) -> int:
    """The most bytes that arrived within any one second."""
    return max(sum(n for t, n in arrivals if start <= t < start + 1.0) for start, _ in arrivals)


@pytest.mark.anyio
async def test_max_bandwidth_paces_the_bytes_on_the_wire(
    tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    """7.5 MiB at 2 MiB/s, measured where the bytes reach the server: a multipart file
    (botocore streams its parts, paced a read at a time), bodies of a few reads (the
    same) and bodies of one read (paid up front, then sent by the CRT). A loaded machine
    can only make it slower, so only upper bounds are asserted."""
    limit = 2 * MiB
    root = tmp_path / "watch"
    contents = {"big.bin": write_file(root / "big.bin", payload(PART + MiB, 1))}
    for i in range(2):
        contents[f"mid{i}.bin"] = write_file(root / f"mid{i}.bin", payload(MiB // 2, 10 + i))
    for i in range(8):
        contents[f"small{i}.bin"] = write_file(root / f"small{i}.bin", payload(64 * 1024, 20 + i))
    with WireMeter(s3_server.endpoint_url) as meter:
        s3 = s3_config(meter.endpoint_url, max_bandwidth=parse_bandwidth("2MiB"), max_concurrency=4)
        async with (
            opened_journal(tmp_path / "journal.sqlite") as journal,
            connected(ObjectStore, s3) as store,
        ):
            assert store.data_plane == "crt"
            uploader = Uploader(journal, s3, anyio.CapacityLimiter(4))
            await discover(journal, root, bucket, sorted(contents))
            table = table_of({WATCH: watch_config(root, bucket)}, {WATCH: store})
            scheduler = Scheduler(journal, uploader, table, 4, 3)
            rows = await run_scheduler_until(scheduler, journal, all_settled, within=30)
        arrivals = meter.arrivals()
    assert {r.rel_path: r.state for r in rows} == dict.fromkeys(contents, "uploaded")
    total = sum(n for _, n in arrivals)
    body_bytes = sum(len(data) for data in contents.values())
    assert body_bytes <= total < body_bytes + 100 * 1024  # the bodies, and requests' heads
    seconds = arrivals[-1][0] - arrivals[0][0]
    rate, busiest = total / seconds, busiest_second(arrivals)
    measured = (
        f"{total} bytes in {seconds:.2f} s: {rate / MiB:.2f} MiB/s, the busiest second "
        f"{busiest / MiB:.2f} MiB (limit {limit / MiB:.0f} MiB/s)"
    )
    print(measured)  # shown by pytest -rP
    assert rate <= 1.3 * limit, measured
    assert busiest <= 1.3 * limit, measured
    for rel, data in contents.items():
        assert object_bytes(s3_client, bucket, PREFIX + rel) == data
