"""One file to one object: PutObject below the threshold, resumable multipart above.

The uploader owns the protocol with S3 for one file at a time; the scheduler
decides which files, how often to retry and when to give up. Every request
takes its body's size from the shared memory budget (``max_bytes_in_flight``)
and then a slot of the one shared limiter (``max_concurrency``), both *before*
its bytes are read: file bytes in memory stay within the budget (a single body
larger than the whole budget goes alone), and requests in flight within the limit.
Bodies are handed over paced by the shared ``Bandwidth`` (``s3.max_bandwidth``): the
data plane writes them no faster than the limit in force.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import anyio
import structlog

from cpg_daemon.core import files
from cpg_daemon.core.checksums import ALGORITHMS, ChecksumName, PartDigest, decode, encode
from cpg_daemon.core.clock import SYSTEM_CLOCK, Clock
from cpg_daemon.core.config import S3Config
from cpg_daemon.core.errors import (
    CpgError,
    FileChangedError,
    RetryableError,
    SkipFileError,
    UploadGoneError,
)
from cpg_daemon.core.objectkeys import (
    MAX_SINGLE_PUT,
    PartRange,
    choose_part_size,
    part_count,
    part_ranges,
)
from cpg_daemon.engine.pacing import Bandwidth, InFlightPolicy, MemoryBudget
from cpg_daemon.engine.sources import LocalFile, ObjectFile, SourceFile
from cpg_daemon.journal import FileRecord, Journal, PartRecord, Uploaded
from cpg_daemon.s3.dataplane import memory_cost
from cpg_daemon.s3.store import RemoteObject, Storage

log = structlog.get_logger(__name__)

Outcome = Literal["uploaded", "already-present", "changed"]


@dataclass(frozen=True)
class PartsDone:
    """One multipart upload in progress: the bytes of its parts S3 holds (sent now, or
    before a resume), so a large file shows progress long before it is complete."""

    key: str
    size: int
    done: int


@dataclass(frozen=True)
class UploaderStatistics:
    requests_in_flight: int
    bytes_sent: int
    files_uploaded: int
    throughput_bytes_per_s: float
    """Bytes sent per second over the last THROUGHPUT_WINDOW seconds."""
    requests_allowed: int = 0
    """Requests allowed in flight now (adapted to the link, up to s3.max_concurrency)."""
    multipart: tuple[PartsDone, ...] = ()
    """The multipart uploads in progress, with how much of each file S3 holds."""


THROUGHPUT_WINDOW = 20.0
SMALL_FILE = 256 * 1024
"""Files up to this size may be sent in groups (``Uploader.upload_many``)."""
GROUP_FILES = 8
"""Small files a worker sends together, at most."""


class Throughput:
    """Bytes per second over a sliding window, from (time, bytes) samples."""

    def __init__(self, window: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self._window = window
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()
        self._sum = 0

    def add(self, amount: int) -> None:
        self._samples.append((self._clock.monotonic(), amount))
        self._sum += amount
        self._trim()

    def per_second(self) -> float:
        """Over the window, or since the first sample in it (at least 1 s) when that is less."""
        self._trim()
        if not self._samples:
            return 0.0
        span = min(self._window, max(self._clock.monotonic() - self._samples[0][0], 1.0))
        return self._sum / span

    def _trim(self) -> None:
        horizon = self._clock.monotonic() - self._window
        while self._samples and self._samples[0][0] < horizon:
            self._sum -= self._samples.popleft()[1]


@dataclass
class _SentPart:
    number: int
    etag: str
    digest: bytes
    length: int


COPY_PART_SIZE = 512 * 1024**2
"""Parts of a copy within S3 (UploadPartCopy) at least: none of their bytes pass through
this machine, so larger parts only mean fewer requests (S3 takes up to 5 GiB)."""


class Uploader:
    """Uploads files described by journal records, recording progress as it goes."""

    def __init__(
        self,
        journal: Journal,
        s3: S3Config,
        limiter: anyio.CapacityLimiter,
        *,
        clock: Clock = SYSTEM_CLOCK,
        in_flight: InFlightPolicy | None = None,
    ) -> None:
        """``in_flight``: adapts the limiter's size to the link (else it stays as given)."""
        self._journal = journal
        self._s3 = s3
        self._limiter = limiter
        self._in_flight = in_flight
        if in_flight is not None:
            limiter.total_tokens = in_flight.limit
        self._clock = clock
        self.bandwidth = Bandwidth(s3.max_bandwidth, clock)
        """``s3.max_bandwidth``: paces the request bodies as they are written."""
        self._memory = MemoryBudget(s3.max_bytes_in_flight)
        self._checksum: ChecksumName = s3.checksum
        self._bytes_sent = 0
        self._files_uploaded = 0
        self.bytes_copied = 0
        """Bytes of objects copied within S3 (``_copy``): not sent by this machine."""
        self._rate = Throughput(THROUGHPUT_WINDOW, clock)
        self._parts_done: dict[int, PartsDone] = {}
        """File id -> its multipart upload's progress, while it is in progress."""

    def statistics(self) -> UploaderStatistics:
        stats = self._limiter.statistics()
        return UploaderStatistics(
            stats.borrowed_tokens,
            self._bytes_sent,
            self._files_uploaded,
            round(self._rate.per_second(), 1),
            int(stats.total_tokens),
            tuple(self._parts_done.values()),
        )

    def _sent(self, amount: int) -> None:
        """A request's body went through (called while it still holds its slot)."""
        self._bytes_sent += amount
        self._rate.add(amount)
        if self._in_flight is not None:
            stats = self._limiter.statistics()
            saturated = (
                stats.borrowed_tokens >= stats.total_tokens
                or stats.tasks_waiting > 0
                or self._memory.waiting
            )
            now = self._clock.monotonic()
            finished = self._in_flight.finished(now, amount, bool(saturated), stats.borrowed_tokens)
            self._allow(finished)

    def congested(self) -> None:
        """A request failed as an overloaded link or server fails: fewer at once."""
        if self._in_flight is not None:
            self._allow(self._in_flight.failed())

    def files_at_once(self, workers: int) -> int:
        """Files worth having in hand: those the requests allowed can serve, and a quarter
        as many again waiting (which shows the requests are the limit), at least a group
        of small files (``GROUP_FILES``: a group frees its files only once its last
        request is done, and the next one fills the slots meanwhile), within ``workers``."""
        allowed = int(self._limiter.total_tokens)
        return min(workers, allowed + max(GROUP_FILES, allowed // 4))

    def _allow(self, number: int | None) -> None:
        if number is None:
            return
        before = int(self._limiter.total_tokens)
        self._limiter.total_tokens = number
        if self._in_flight is not None:
            # The memory budget is set for the starting number of requests: it grows and
            # shrinks with them (a long round trip needs more bytes on their way).
            self._memory.scale(number / self._in_flight.start)
        log.debug(
            "requests_allowed", allowed=number, before=before, memory_budget=self._memory.limit
        )

    async def upload(self, store: Storage, record: FileRecord, path: Path | SourceFile) -> Outcome:
        """Upload one file (a path, or a ``SourceFile``: an object of another bucket).
        Raises an error class from ``errors`` when it cannot."""
        source = LocalFile(path) if isinstance(path, Path) else path
        expected = files.FileStat(record.size, record.mtime_ns)
        plain = record.size < self._s3.multipart_threshold and record.upload_id is None
        if not plain or record.check_remote:
            # (A plain PutObject needs no look first: its one read checks size and
            # mtime before and after, one thread hop less per small file.)
            current = await source.stat()
            if current != expected:
                raise FileChangedError(f"{source.name} changed since it settled")
        started = self._clock.monotonic()
        with structlog.contextvars.bound_contextvars(path=source.name, key=record.key):
            if record.check_remote and record.upload_id is None:
                remote = await store.head(record.bucket, record.key)
                proof = None if remote is None else await same_content(remote, source, expected)
                if remote is not None and proof is not None:
                    algorithm, checksum = proof
                    await self._journal.mark_uploaded(
                        record, etag=remote.etag, checksum_algorithm=algorithm, checksum=checksum
                    )
                    log.info("already_present", size=record.size)
                    return "already-present"
            copied = None
            if isinstance(source, ObjectFile) and source.copies:
                copied = await self._copy(store, record, source, expected)
            try:
                if copied is not None:
                    etag, checksum = copied
                elif record.size < self._s3.multipart_threshold:
                    if record.upload_id is not None:  # the file shrank below the threshold
                        await self.abort(store, record)
                    etag, checksum = await self._single(store, record, source, expected)
                else:
                    etag, checksum = await self._multipart(store, record, source, expected)
                done = await self._journal.mark_uploaded(
                    record, etag=etag, checksum_algorithm=self._checksum, checksum=checksum
                )
            finally:
                # A multipart upload's progress shows until the journal counts the file.
                self._parts_done.pop(record.id, None)
            return self._recorded(record, done, self._clock.monotonic() - started, checksum)

    def _recorded(self, record: FileRecord, done: bool, seconds: float, checksum: str) -> Outcome:
        """The journal's answer to ``mark_uploaded`` as an outcome, logged (in the file's
        context): False means the row changed meanwhile and the file goes again."""
        if not done:
            log.info("changed_during_upload", size=record.size)
            return "changed"
        self._files_uploaded += 1
        log.info(
            "uploaded",
            size=record.size,
            seconds=round(seconds, 3),
            mb_per_s=round(record.size / 1e6 / seconds, 2) if seconds > 0 else None,
            checksum=checksum,
        )
        return "uploaded"

    async def _copy(
        self, store: Storage, record: FileRecord, source: ObjectFile, expected: files.FileStat
    ) -> tuple[str, str] | None:
        """An object of another bucket copied within S3: its ETag and the checksum S3
        computed for the copy. Below ``multipart_threshold`` one CopyObject; from it on
        part by part (UploadPartCopy, journaled and resumed like an upload's parts). None
        when it must be streamed instead: these keys may not read the source."""
        try:
            if record.size < self._s3.multipart_threshold and record.upload_id is None:
                async with self._limiter:
                    etag, checksum = await store.copy_object(
                        source.version, record.bucket, record.key
                    )
                if not checksum and ALGORITHMS[self._checksum].enabled:
                    remote = await store.head(record.bucket, record.key)
                    checksum = "" if remote is None else remote.checksums.get(self._checksum, "")
            else:
                etag, checksum = await self._copy_parts(store, record, source, expected)
        except SkipFileError as exc:  # AccessDenied and the like: the keys cannot read it
            source.refused(str(exc))
            await self.abort(store, record)  # streamed parts are cut otherwise
            return None
        self.bytes_copied += record.size
        log.debug("copied_within_s3", size=record.size)
        return etag, checksum

    async def _copy_parts(
        self, store: Storage, record: FileRecord, source: ObjectFile, expected: files.FileStat
    ) -> tuple[str, str]:
        """A multipart copy within S3: parts of ``COPY_PART_SIZE`` (none of their bytes
        pass through here), concurrently, each journaled as it is done; a copy that
        was interrupted goes on from the parts S3 holds and the journal knows."""
        part_size = choose_part_size(record.size, max(self._s3.part_size, COPY_PART_SIZE))
        sent: dict[int, _SentPart] = {}
        upload_id = record.upload_id
        same = (record.upload_size, record.upload_mtime_ns) == (record.size, record.mtime_ns)
        if upload_id is not None and same and record.part_size:
            part_size = record.part_size
            try:
                sent = await self._copied_before(store, record, upload_id)
            except UploadGoneError:
                await self._journal.forget_upload(record.id)
                upload_id = None
        elif upload_id is not None:
            await self.abort(store, record)
            upload_id = None
        if upload_id is None:
            upload_id = await self._create(store, record, part_size)
        errors: list[BaseException] = []

        async def copy(part: PartRange, upload_id: str) -> None:
            try:
                last = part.offset + part.length - 1
                async with self._limiter:
                    etag, checksum = await store.upload_part_copy(
                        source.version,
                        record.bucket,
                        record.key,
                        upload_id,
                        part.number,
                        (part.offset, last),
                    )
                if checksum or not ALGORITHMS[self._checksum].enabled:
                    digest = decode(checksum) if checksum else b""
                else:  # the server did not say: read the range to compute it (send nothing)
                    digest = await source.range_digest(part.offset, part.length, self._checksum)
                await self._journal.add_part(
                    record.id, upload_id, PartRecord(part.number, etag, encode(digest), part.length)
                )
                sent[part.number] = _SentPart(part.number, etag, digest, part.length)
            except CpgError as exc:
                errors.append(exc)
                tg.cancel_scope.cancel()

        with structlog.contextvars.bound_contextvars(upload_id=upload_id):
            async with anyio.create_task_group() as tg:
                for part in part_ranges(record.size, part_size):
                    if part.number not in sent:
                        tg.start_soon(copy, part, upload_id)
            if errors:
                raise _most_serious(errors)
            return await self._complete(store, record, upload_id, sent)

    async def _complete(
        self, store: Storage, record: FileRecord, upload_id: str, sent: dict[int, _SentPart]
    ) -> tuple[str, str]:
        """CompleteMultipartUpload with every part and the whole object's checksum (made
        of the parts'); the object's ETag and that checksum."""
        ordered = [sent[n] for n in sorted(sent)]
        algorithm = ALGORITHMS[self._checksum]
        checksum = algorithm.object_checksum(
            [PartDigest(p.digest, p.length) for p in ordered], multipart=True
        )
        etag = await store.complete_multipart_upload(
            record.bucket,
            record.key,
            upload_id,
            [(p.number, p.etag, encode(p.digest)) for p in ordered],
            checksum,
        )
        return etag, checksum

    async def _copied_before(
        self, store: Storage, record: FileRecord, upload_id: str
    ) -> dict[int, _SentPart]:
        """The parts of an interrupted copy that S3 holds and the journal knows (a part
        S3 holds but the journal missed is copied again: it costs no transfer here)."""
        journaled = {p.number: p for p in await self._journal.parts(record.id, upload_id)}
        sent: dict[int, _SentPart] = {}
        for part in await store.list_parts(record.bucket, record.key, upload_id):
            known = journaled.get(part.number)
            if known is not None and known.etag == part.etag and known.size == part.size:
                digest = decode(known.checksum) if known.checksum else b""
                sent[part.number] = _SentPart(part.number, part.etag, digest, part.size)
        if sent:
            log.info("copy_resumed", upload_id=upload_id, parts_done=len(sent))
        return sent

    def batchable(self, record: FileRecord) -> bool:
        """Whether the file may go in a group of small files (``upload_many``): one
        PutObject with no look at the server first and no multipart upload to finish."""
        return (
            record.size <= SMALL_FILE
            and record.size < self._s3.multipart_threshold
            and record.upload_id is None
            and not record.check_remote
        )

    async def upload_many(
        self,
        store: Storage,
        records: Sequence[FileRecord],
        paths: Sequence[Path],
        failed: Callable[[int, CpgError], Coroutine[Any, Any, None]],
    ) -> list[Outcome | None]:
        """Small files (``batchable``) as one group: for each file (by index), what
        ``upload`` would have returned, or None when it raised, in which case
        ``failed(index, error)`` was called with it as soon as it did.

        What a small file costs is mostly the trips around its one request: the group's
        memory is taken at once, its files are read in one trip to a thread, their
        PutObjects go concurrently (a slot of the limiter each) and the journal records
        them in one write. The requests are the same ones, as is the log line per file.
        """
        started = self._clock.monotonic()
        etags: list[tuple[str, bytes] | None] = [None] * len(records)
        cost = sum(memory_cost(store.data_plane, record.size) for record in records)
        held = await self._memory.acquire(cost)
        try:
            expected = [files.FileStat(r.size, r.mtime_ns) for r in records]
            bodies = await files.read_whole(list(zip(paths, expected, strict=True)), self._checksum)

            async def put(index: int, body: io.BytesIO, digest: bytes) -> None:
                record = records[index]
                try:
                    async with self._limiter:
                        etag = await store.put_object(
                            record.bucket, record.key, self.bandwidth.body(body), encode(digest)
                        )
                        self._sent(record.size)
                except CpgError as exc:
                    await failed(index, exc)
                else:
                    etags[index] = (etag, digest)

            async with anyio.create_task_group() as tg:
                for index, read in enumerate(bodies):
                    if isinstance(read, CpgError):
                        tg.start_soon(failed, index, read)
                    else:
                        tg.start_soon(put, index, *read)
            del bodies
        finally:
            self._memory.release(held)
        algorithm = ALGORITHMS[self._checksum]
        done = {
            index: Uploaded(
                records[index],
                sent[0],
                self._checksum,
                algorithm.object_checksum(
                    [PartDigest(sent[1], records[index].size)], multipart=False
                ),
            )
            for index, sent in enumerate(etags)
            if sent is not None
        }
        try:
            marked = await self._journal.mark_uploaded_many(list(done.values()))
            recorded = dict(zip(done, marked, strict=True))
        except CpgError as exc:
            for index in done:
                await failed(index, exc)
            return [None] * len(records)
        results: list[Outcome | None] = [None] * len(records)
        seconds = self._clock.monotonic() - started
        for index, uploaded in done.items():
            record = uploaded.record
            with structlog.contextvars.bound_contextvars(path=str(paths[index]), key=record.key):
                results[index] = self._recorded(record, recorded[index], seconds, uploaded.checksum)
        return results

    async def _single(
        self, store: Storage, record: FileRecord, source: SourceFile, expected: files.FileStat
    ) -> tuple[str, str]:
        etag, digest = await self._put(store, record.bucket, record.key, source, expected)
        algorithm = ALGORITHMS[self._checksum]
        return etag, algorithm.object_checksum([PartDigest(digest, record.size)], multipart=False)

    async def _put(
        self, store: Storage, bucket: str, key: str, source: SourceFile, expected: files.FileStat
    ) -> tuple[str, bytes]:
        """One PutObject of the whole file: its memory and a slot first, then one read
        that computes its checksum, sent with it. Returns the ETag and the raw checksum."""
        held = await self._memory.acquire(memory_cost(store.data_plane, expected.size))
        try:
            async with self._limiter:
                body, digest = await source.read(0, expected.size, expected, self._checksum)
                etag = await store.put_object(
                    bucket, key, self.bandwidth.body(body), encode(digest)
                )
                del body
                self._sent(expected.size)
        finally:
            self._memory.release(held)
        return etag, digest

    async def put_file(self, store: Storage, bucket: str, key: str, path: Path) -> str:
        """A file of the daemon's own (a batch's manifest) as one object, outside the
        journal: one PutObject with its checksum, within the memory budget, the
        concurrency limit and the bandwidth limit like any upload. Returns the ETag.

        A file larger than the budget goes alone, as any oversized body does (a
        manifest is about 280 bytes a file: 276 MB for a million files)."""
        expected = await files.stat(path)
        if expected.size > MAX_SINGLE_PUT:
            raise SkipFileError(f"{path} is {expected.size:,} bytes, more than one PutObject takes")
        etag, _ = await self._put(store, bucket, key, LocalFile(path), expected)
        return etag

    async def _multipart(
        self, store: Storage, record: FileRecord, source: SourceFile, expected: files.FileStat
    ) -> tuple[str, str]:
        sent: dict[int, _SentPart] = {}
        upload_id: str | None = None
        part_size = choose_part_size(record.size, self._s3.part_size)
        if record.upload_id is not None:
            same_file = (record.upload_size, record.upload_mtime_ns) == (
                record.size,
                record.mtime_ns,
            )
            if same_file and record.part_size:
                part_size = record.part_size
                try:
                    sent = await self._resume(store, record, source, expected, part_size)
                    upload_id = record.upload_id
                except UploadGoneError:
                    log.info("upload_gone", upload_id=record.upload_id)
                    finished = await self._completed_before(store, record, part_size)
                    await self._journal.forget_upload(record.id)
                    if finished is not None:
                        return finished
            else:
                await self.abort(store, record)
        if upload_id is None:
            upload_id = await self._create(store, record, part_size)
        with structlog.contextvars.bound_contextvars(upload_id=upload_id):
            ranges = [r for r in part_ranges(record.size, part_size) if r.number not in sent]
            if sent:
                log.info("multipart_resumed", parts_done=len(sent), parts_to_send=len(ranges))
            held = sum(p.length for p in sent.values())
            self._parts_done[record.id] = PartsDone(record.key, record.size, held)
            await self._send_parts(store, record, source, expected, upload_id, ranges, sent)
            await source.confirm(expected)
            return await self._complete(store, record, upload_id, sent)

    async def _create(self, store: Storage, record: FileRecord, part_size: int) -> str:
        with anyio.CancelScope(shield=True):
            # Shielded: once the upload exists it must reach the journal, or it
            # would be an orphan that nobody aborts.
            upload_id = await store.create_multipart_upload(record.bucket, record.key)
            await self._journal.start_upload(
                record.id, upload_id, part_size, record.size, record.mtime_ns
            )
        log.info("multipart_started", upload_id=upload_id, part_size=part_size)
        return upload_id

    async def _completed_before(
        self, store: Storage, record: FileRecord, part_size: int
    ) -> tuple[str, str] | None:
        """(etag, checksum) when a vanished upload had in fact been completed.

        A crash between CompleteMultipartUpload and the journal write leaves an
        upload id the server no longer knows, and a finished object: recognise
        it by its size and the checksum derived from the journaled parts.
        """
        assert record.upload_id is not None
        algorithm = ALGORITHMS[self._checksum]
        parts = await self._journal.parts(record.id, record.upload_id)
        if not algorithm.enabled or len(parts) != part_count(record.size, part_size):
            return None
        remote = await store.head(record.bucket, record.key)
        if remote is None or remote.size != record.size:
            return None
        checksum = algorithm.object_checksum(
            [PartDigest(decode(p.checksum), p.size) for p in parts], multipart=True
        )
        if remote.checksums.get(algorithm.name) != checksum:
            return None
        log.info("found_completed", upload_id=record.upload_id)
        return remote.etag, checksum

    async def _resume(
        self,
        store: Storage,
        record: FileRecord,
        source: SourceFile,
        expected: files.FileStat,
        part_size: int,
    ) -> dict[int, _SentPart]:
        """Parts of a journaled upload that the server holds and that need not be sent again.

        The server is the authority on which parts exist (ListParts); the
        journal supplies their checksums. A part the server has but the journal
        missed (a crash between the reply and the journal write) is re-read to
        recompute its checksum rather than sent again.
        """
        assert record.upload_id is not None
        upload_id = record.upload_id
        remote = await store.list_parts(record.bucket, record.key, upload_id)
        journaled = {p.number: p for p in await self._journal.parts(record.id, upload_id)}
        layout = {r.number: r for r in part_ranges(record.size, part_size)}
        sent: dict[int, _SentPart] = {}
        for part in remote:
            wanted = layout.get(part.number)
            if wanted is None or part.size != wanted.length:
                continue
            known = journaled.get(part.number)
            if known is not None and known.etag == part.etag:
                digest = decode(known.checksum) if known.checksum else b""
            else:
                held = await self._memory.acquire(wanted.length)
                try:
                    async with self._limiter:
                        _, digest = await source.read(
                            wanted.offset, wanted.length, expected, self._checksum
                        )
                finally:
                    self._memory.release(held)
                if part.checksum and decode(part.checksum) != digest:
                    continue
                await self._journal.add_part(
                    record.id,
                    upload_id,
                    PartRecord(part.number, part.etag, encode(digest), part.size),
                )
            sent[part.number] = _SentPart(part.number, part.etag, digest, part.size)
        return sent

    async def _send_parts(
        self,
        store: Storage,
        record: FileRecord,
        source: SourceFile,
        expected: files.FileStat,
        upload_id: str,
        ranges: list[PartRange],
        sent: dict[int, _SentPart],
    ) -> None:
        """Send parts concurrently under the shared limiter; the first error stops the rest."""
        errors: list[BaseException] = []

        async def send(part: PartRange, borrower: object, held: int) -> None:
            try:
                body, digest = await source.read(part.offset, part.length, expected, self._checksum)
                etag = await store.upload_part(
                    record.bucket,
                    record.key,
                    upload_id,
                    part.number,
                    self.bandwidth.body(body),
                    encode(digest),
                )
                del body  # the slot is released below: the body must be gone by then
                self._sent(part.length)
                await self._journal.add_part(
                    record.id, upload_id, PartRecord(part.number, etag, encode(digest), part.length)
                )
                sent[part.number] = _SentPart(part.number, etag, digest, part.length)
                before = self._parts_done[record.id]
                self._parts_done[record.id] = replace(before, done=before.done + part.length)
            except CpgError as exc:
                errors.append(exc)
                tg.cancel_scope.cancel()
            finally:
                self._limiter.release_on_behalf_of(borrower)
                self._memory.release(held)

        async with anyio.create_task_group() as tg:
            for part in ranges:
                if errors:
                    break
                # Memory and slot are taken before the part is read: memory stays bounded.
                held = await self._memory.acquire(part.length)
                borrower = object()
                try:
                    await self._limiter.acquire_on_behalf_of(borrower)
                except BaseException:
                    self._memory.release(held)
                    raise
                tg.start_soon(send, part, borrower, held)
        if errors:
            raise _most_serious(errors)

    async def abort(self, store: Storage, record: FileRecord) -> None:
        """Abort the file's open multipart upload, if it has one, and forget it (shielded).

        The journal, not ``record``, says which upload is open: the record may
        predate an upload created during this very attempt.
        """
        with anyio.CancelScope(shield=True):
            current = await self._journal.get_by_id(record.id)
            if current is None or current.upload_id is None:
                return
            upload_id = current.upload_id
            try:
                await store.abort_multipart_upload(current.bucket, current.key, upload_id)
            except RetryableError as exc:
                log.warning("abort_failed", upload_id=upload_id, error=str(exc))
                return
            await self._journal.forget_upload(record.id)
            log.info("multipart_aborted", upload_id=upload_id)


def whole_checksum(remote: RemoteObject) -> tuple[ChecksumName, str] | None:
    """An object's full-object checksum (algorithm, value) that a file alone reproduces,
    if it has one: a composite one (``...-N``) depends on the part layout of whoever
    uploaded it."""
    for name, value in remote.checksums.items():
        if "-" not in value and name in ALGORITHMS:
            return name, value
    return None


async def same_content(
    remote: RemoteObject, source: Path | SourceFile, expected: files.FileStat
) -> tuple[str, str] | None:
    """The (algorithm, checksum) proving an existing object holds this file (a path, or
    a ``SourceFile``), if any: the file is read to compute it (an S3 source may keep it)."""
    found = whole_checksum(remote) if remote.size == expected.size else None
    if found is None:
        return None
    name, value = found
    file = LocalFile(source) if isinstance(source, Path) else source
    local = await file.whole_checksum(name, expected)
    return (name, value) if local == value else None


def _most_serious(errors: list[BaseException]) -> BaseException:
    """The error that decides the file's fate: anything but a transient one wins."""
    for error in errors:
        if not isinstance(error, RetryableError):
            return error
    return errors[0]
