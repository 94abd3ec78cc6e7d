"""``cpg-daemon verify``: proof that staging holds exactly what the disk holds.

For each watch the destination is listed (ListObjectsV2) and the watched folder
walked with the watch's own filter; each local file is then matched with its
object by key, size and content checksum:

- An object whose ETag is the one the journal recorded when this daemon
  uploaded it is that upload, byte for byte, so its checksum is the one S3
  reported then (one listing proves 100,000 objects; no request per object).
  The local side is the checksum computed while reading the file for that
  upload, while the file's size and mtime are unchanged; otherwise it is
  computed from the disk again.
- Any other object (uploaded by hand, by another machine, overwritten since)
  is asked for its own checksum (HeadObject, checksum mode) and the file is
  read to compute the same: whole-object CRCs directly, composite checksums
  and multipart ETags from the part layout S3 reports for part 1. An object
  with neither a checksum nor a usable ETag is ``unverified``.

Statuses: match, missing, size_mismatch, checksum_mismatch, extra (an object
with no local file; batch manifests the daemon uploaded are its own, not extra),
unverified.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO, cast

import anyio
import anyio.to_thread
import structlog

from cpg_daemon.core import files
from cpg_daemon.core.checksums import ALGORITHMS, ChecksumName, encode
from cpg_daemon.core.config import WatchConfig
from cpg_daemon.core.errors import CpgError
from cpg_daemon.core.objectkeys import PathFilter, is_manifest_key
from cpg_daemon.core.units import format_size
from cpg_daemon.discovery.scan import Seen, walk
from cpg_daemon.engine.sources import ObjectSource
from cpg_daemon.journal import read_uploads
from cpg_daemon.s3.store import RemoteObject, Storage

log = structlog.get_logger(__name__)

STATUSES = (
    "match",
    "missing",
    "size_mismatch",
    "checksum_mismatch",
    "extra",
    "unverified",
)
REPORT_HEADER = (
    "path",
    "key",
    "local_size",
    "remote_size",
    "checksum_algorithm",
    "local_checksum",
    "remote_checksum",
    "status",
)
DISK_READERS = 4
"""Files read at once to compute checksums (the disk, not the network, is the limit)."""


@dataclass(frozen=True)
class Row:
    """One line of the report."""

    path: str
    key: str
    local_size: int | None
    remote_size: int | None
    checksum_algorithm: str
    local_checksum: str
    remote_checksum: str
    status: str


@dataclass(frozen=True)
class Uploaded:
    """What the journal recorded when the file was uploaded."""

    key: str
    size: int
    mtime_ns: int
    etag: str
    algorithm: str
    checksum: str


@dataclass
class Result:
    rows: list[Row]
    seconds: float

    @property
    def counts(self) -> Counter[str]:
        return Counter(row.status for row in self.rows)

    @property
    def ok(self) -> bool:
        return all(row.status == "match" for row in self.rows)

    def summary(self) -> str:
        counts = self.counts
        local = [row for row in self.rows if row.status != "extra"]
        size = sum(row.local_size or 0 for row in local)
        return (
            "verify: "
            + ", ".join(f"{counts[status]:,} {status}" for status in STATUSES)
            + f"; {len(local):,} local files ({format_size(size)}) in {self.seconds:.1f} s"
        )


def journal_uploads(journal: Path, watch: str) -> dict[str, Uploaded] | None:
    """The uploads the journal recorded for a watch, read-only; None when unreadable.

    Read with a separate read-only connection, so a running daemon (the
    journal's owner) is not disturbed.
    """
    uploads = read_uploads(journal, watch)
    if uploads is None:
        return None
    return {
        rel: Uploaded(u.key, u.size, u.mtime_ns, u.etag, u.checksum_algorithm, u.checksum)
        for rel, u in uploads.items()
    }


def local_files(root: Path, path_filter: PathFilter) -> dict[str, Seen]:
    """Every file under a watch that the watch would upload, by path (runs in a thread)."""
    return {seen.rel_path: seen for seen in walk(root, path_filter)}


def _etag(value: str) -> str:
    return value.strip('"')


class Source(Protocol):
    """What is compared with the destination: a watch's folder, or an S3 source."""

    async def listing(self) -> dict[str, Seen]:
        """Every file (object) the watch would upload, by its path below the root."""
        ...

    def name(self, rel_path: str) -> str:
        """The report's ``path``."""
        ...

    async def digests(
        self, rel_path: str, name: str, expected: files.FileStat, part_size: int = 0
    ) -> tuple[bytes, list[bytes]]:
        """One read: the digest ``name`` of the whole, and of each part (``files.Digests``)."""
        ...

    async def kept_checksum(self, rel_path: str, name: str) -> str | None:
        """A checksum the source itself keeps in the form ``name``, if any (no read)."""
        ...


class Folder:
    """A watch's local folder, walked with its filter; files read a few at a time."""

    def __init__(self, watch: WatchConfig) -> None:
        self._root = watch.path
        self._filter = PathFilter(watch.include, watch.exclude)
        self._disk = anyio.CapacityLimiter(DISK_READERS)

    async def listing(self) -> dict[str, Seen]:
        return await anyio.to_thread.run_sync(local_files, self._root, self._filter)

    def name(self, rel_path: str) -> str:
        return str(self._root / rel_path)

    async def digests(
        self, rel_path: str, name: str, expected: files.FileStat, part_size: int = 0
    ) -> tuple[bytes, list[bytes]]:
        async with self._disk:
            return await anyio.to_thread.run_sync(
                files.file_digests, self._root / rel_path, name, expected, part_size
            )

    async def kept_checksum(self, rel_path: str, name: str) -> str | None:
        return None


class Objects:
    """An S3 source (``upload s3://...``): its objects, read through when needed."""

    def __init__(self, watch: WatchConfig, source: ObjectSource) -> None:
        self._watch = watch
        self._source = source

    async def listing(self) -> dict[str, Seen]:
        return {seen.rel_path: seen async for seen in self._source.objects(self._watch)}

    def name(self, rel_path: str) -> str:
        return self._source.name(rel_path)

    async def digests(
        self, rel_path: str, name: str, expected: files.FileStat, part_size: int = 0
    ) -> tuple[bytes, list[bytes]]:
        return await self._source.digests(rel_path, name, expected, part_size)

    async def kept_checksum(self, rel_path: str, name: str) -> str | None:
        return await self._source.kept_checksum(rel_path, name)


class Verifier:
    """Compares one watch's files with its destination."""

    def __init__(
        self,
        watch: WatchConfig,
        store: Storage,
        journal: Path | None,
        *,
        quick: bool = False,
        concurrency: int = 16,
        source: Source | None = None,
    ) -> None:
        """``source``: what to compare with the destination (default: the watch's folder)."""
        self.watch = watch
        self._store = store
        self._journal = journal
        self._quick = quick
        self._concurrency = concurrency
        self._source = source or Folder(watch)

    async def run(self) -> list[Row]:
        watch = self.watch
        bucket, prefix = watch.destination.bucket, watch.destination.prefix
        local = await self._source.listing()
        remote = {obj.key: obj async for obj in self._store.list_objects(bucket, prefix)}
        recorded: dict[str, Uploaded] | None = None
        if self._journal is not None and not self._quick:
            recorded = await anyio.to_thread.run_sync(journal_uploads, self._journal, watch.name)
        uploads = recorded or {}
        rows: list[Row] = []
        to_check: list[tuple[str, str, Seen, RemoteObject]] = []
        for rel, seen in local.items():
            key = watch.key_for(rel)
            path = self._source.name(rel)
            obj = remote.pop(key, None)
            if obj is None:
                rows.append(Row(path, key, seen.size, None, "", "", "", "missing"))
            elif obj.size != seen.size:
                rows.append(Row(path, key, seen.size, obj.size, "", "", "", "size_mismatch"))
            elif self._quick:
                rows.append(Row(path, key, seen.size, obj.size, "", "", "", "match"))
            elif (row := self._known(rel, key, seen, obj, uploads.get(rel))) is not None:
                rows.append(row)
            else:
                to_check.append((rel, key, seen, obj))
        pending = iter(to_check)

        async def checker() -> None:
            for rel, key, seen, obj in pending:
                rows.append(await self._check(rel, key, seen, obj))

        async with anyio.create_task_group() as tg:
            for _ in range(min(self._concurrency, len(to_check))):
                tg.start_soon(checker)
        rows += [
            Row("", key, None, obj.size, "", "", "", "extra")
            for key, obj in remote.items()
            if not is_manifest_key(key)  # the daemon's own (upload_manifest)
        ]
        rows.sort(key=lambda row: row.key)
        return rows

    def _known(
        self, rel: str, key: str, seen: Seen, obj: RemoteObject, uploaded: Uploaded | None
    ) -> Row | None:
        """The row, when the journal proves both sides without reading anything."""
        if (
            uploaded is None
            or uploaded.key != key
            or not uploaded.checksum
            or not uploaded.etag
            or _etag(uploaded.etag) != _etag(obj.etag)
            or (uploaded.size, uploaded.mtime_ns) != (seen.size, seen.mtime_ns)
        ):
            return None
        return Row(
            self._source.name(rel),
            key,
            seen.size,
            obj.size,
            uploaded.algorithm,
            uploaded.checksum,
            uploaded.checksum,
            "match",
        )

    async def _check(self, rel: str, key: str, seen: Seen, listed: RemoteObject) -> Row:
        bucket = self.watch.destination.bucket
        base = Row(self._source.name(rel), key, seen.size, listed.size, "", "", "", "unverified")
        try:
            head = await self._store.head(bucket, key)
            if head is None:
                return dataclasses.replace(base, remote_size=None, status="missing")
            expected = files.FileStat(seen.size, seen.mtime_ns)
            for name, value in head.checksums.items():
                if await self._source.kept_checksum(rel, name) == value:
                    return _with(base, head.size, name, value, value, "match")
                local = await self._local_checksum(rel, expected, name, value, head)
                if local is not None:
                    status = "match" if local == value else "checksum_mismatch"
                    return _with(base, head.size, name, local, value, status)
            etag = _etag(head.etag)
            local = await self._local_checksum(rel, expected, "MD5", etag, head)
            if local is not None:
                status = "match" if local == etag else "checksum_mismatch"
                return _with(base, head.size, "ETag-MD5", local, etag, status)
        except CpgError as exc:  # a file that vanished or cannot be read: say so, go on
            log.warning("verify_file_failed", key=key, error=str(exc))
        return base

    async def _local_checksum(
        self, rel: str, expected: files.FileStat, name: str, value: str, head: RemoteObject
    ) -> str | None:
        """The file's checksum in the form the object reports ``value``; None if unknowable."""
        multipart = "-" in _etag(head.etag)
        if name != "MD5" and name not in ALGORITHMS:
            return None
        crc = name != "MD5" and ALGORITHMS[cast("ChecksumName", name)].crc is not None
        composite = multipart and ("-" in value or head.checksum_type == "COMPOSITE" or not crc)
        if multipart and head.checksum_type is None and crc and "-" not in value:
            # Not said which: try the whole-object form first, then the composite one.
            whole = await self._digest(rel, expected, name)
            if whole == value:
                return whole
            composite = True
        if not composite:
            if name == "MD5" and multipart:
                return None
            return await self._digest(rel, expected, name)
        layout = await self._store.first_part_size(self.watch.destination.bucket, head.key)
        if layout is None:
            return None
        part_size, count = layout
        if count < 1 or not (count - 1) * part_size < expected.size <= count * part_size:
            return None
        _, parts = await self._source.digests(rel, name, expected, part_size)
        joined = b"".join(parts)
        if name == "MD5":
            return f"{hashlib.md5(joined).hexdigest()}-{len(parts)}"
        digest = encode(ALGORITHMS[cast("ChecksumName", name)].digest(joined))
        return f"{digest}-{len(parts)}" if "-" in value else digest

    async def _digest(self, rel: str, expected: files.FileStat, name: str) -> str:
        whole, _ = await self._source.digests(rel, name, expected)
        return whole.hex() if name == "MD5" else encode(whole)


def _with(base: Row, size: int, algorithm: str, local: str, remote: str, status: str) -> Row:
    return Row(base.path, base.key, base.local_size, size, algorithm, local, remote, status)


async def verify(
    watches: Iterable[tuple[WatchConfig, Storage]],
    journal: Path | None,
    *,
    quick: bool = False,
    concurrency: int = 16,
) -> Result:
    """Verify watches one after another (each one's requests run concurrently)."""
    started = time.monotonic()
    rows: list[Row] = []
    for watch, store in watches:
        verifier = Verifier(watch, store, journal, quick=quick, concurrency=concurrency)
        rows += await verifier.run()
    return Result(rows, time.monotonic() - started)


def write_report(rows: Iterable[Row], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(REPORT_HEADER)
    for row in rows:
        writer.writerow(["" if value is None else value for value in asdict(row).values()])


def row_dicts(rows: Iterable[Row]) -> Iterator[dict[str, Any]]:
    return (asdict(row) for row in rows)
