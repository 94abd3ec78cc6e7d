"""Manifests: what was uploaded, for someone who does not have the local files.

A manifest lists the objects of one batch (or of a watch, or a folder of it) as
uploaded: key, size, the whole-object checksum S3 holds, the ETag, the file's
mtime and the upload time, after a header naming the destination, the tool and the
totals. A maintainer checks staging (or the gallery bucket after the transfer)
against it with read access alone (``verify_manifest``), and its SHA-256 can be
quoted in an email or a GitHub discussion to name exactly that list.

The format (JSON lines, UTF-8; ``jq`` reads it, and so does any language):

- line 1, the header: ``{"format": "cpg-daemon-manifest/1", "destination":
  "s3://bucket/prefix/", "watch": ..., "batch": ..., "source": "host:/path",
  "tool": "cpg-daemon 0.1.0", "created_at": "...Z", "files": N, "bytes": B}``
- then one line per object, in key order: ``{"key": ..., "size": ...,
  "checksum_algorithm": "CRC32C", "checksum": "base64", "etag": "hex",
  "mtime": "...Z", "uploaded_at": "...Z"}`` (``checksum`` is S3's form: a
  composite one ends in ``-N``)

Keys are full object keys; ``destination`` is the folder they were uploaded
under. Beside each manifest, ``NAME.sha256`` holds its digest in ``sha256sum``'s
form (``sha256sum -c`` checks it). Manifests are never changed: a batch that
completes again gets a new one. With a watch's ``upload_manifest``, each batch's
manifest and its ``.sha256`` also go beside the data, to
``objectkeys.manifest_key`` (``<project>/<source>/workspace/qc/upload_manifests/``);
``verify`` does not count them as ``extra`` (``objectkeys.is_manifest_key``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import anyio

from cpg_daemon import __version__
from cpg_daemon.core.errors import CpgError
from cpg_daemon.core.objectkeys import S3Location, is_manifest_key, parse_s3_uri
from cpg_daemon.engine.verify import Result, Row
from cpg_daemon.journal import Upload
from cpg_daemon.s3.store import RemoteObject, Storage

FORMAT = "cpg-daemon-manifest/1"
FOLDER = "manifests"
"""Below the state directory: ``manifests/<watch>/<batch>-<time>.jsonl``."""
DUMP_LINES = 4096
"""Lines hashed and written at once (about 1 MB), and between looks at ``stopped()``."""
HEAD_AT_ONCE = 16
"""HeadObject requests in flight when objects must be asked for their checksum."""


class ManifestError(CpgError):
    """A file that is not a manifest this version reads (the message says where)."""


@dataclass(frozen=True)
class Header:
    destination: str
    watch: str
    batch: str
    source: str
    tool: str
    created_at: str
    files: int
    bytes: int
    format: str = FORMAT


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    checksum_algorithm: str
    checksum: str
    etag: str
    mtime: str
    uploaded_at: str


@dataclass(frozen=True)
class Manifest:
    header: Header
    entries: tuple[Entry, ...]

    @property
    def destination(self) -> S3Location:
        return parse_s3_uri(self.header.destination)


def _time(seconds: float | None) -> str:
    if seconds is None:
        return ""
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def entry_of(upload: Upload) -> Entry:
    return Entry(
        key=upload.key,
        size=upload.size,
        checksum_algorithm=upload.checksum_algorithm,
        checksum=upload.checksum,
        etag=upload.etag.strip('"'),
        mtime=_time(upload.mtime_ns / 1e9),
        uploaded_at=_time(upload.uploaded_at),
    )


def header_of(
    destination: S3Location, watch: str, batch: str, root: Path, files: int, size: int
) -> Header:
    return Header(
        destination=str(destination),
        watch=watch,
        batch=batch,
        source=f"{socket.gethostname()}:{root}",
        tool=f"cpg-daemon {__version__}",
        created_at=_time(time.time()),
        files=files,
        bytes=size,
    )


def build(
    uploads: Iterable[Upload], destination: S3Location, watch: str, batch: str, root: Path
) -> Manifest:
    """A manifest of these uploads (from the journal), in key order."""
    entries = tuple(sorted((entry_of(u) for u in uploads), key=lambda entry: entry.key))
    size = sum(entry.size for entry in entries)
    return Manifest(header_of(destination, watch, batch, root, len(entries), size), entries)


def _line(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8") + b"\n"


def _header_line(header: Header) -> bytes:
    fields = {"format": header.format}
    fields.update((k, v) for k, v in dataclasses.asdict(header).items() if k != "format")
    return _line(fields)


def write(manifest: Manifest, path: Path) -> str:
    """Write the manifest (and ``PATH.sha256``) atomically; returns its SHA-256. Blocking."""
    return write_stream(manifest.header, manifest.entries, path)


def write_stream(
    header: Header,
    entries: Iterable[Entry],
    path: Path,
    stopped: Callable[[], bool] = lambda: False,
) -> str:
    """Write a manifest entry by entry (memory stays flat for a million objects), then
    ``PATH.sha256``; atomically (a new file renamed in place); returns its SHA-256.
    Blocking. ``entries`` must be in key order and as many as the header says;
    ``stopped()`` turning true gives up (ManifestError), leaving no file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with open(temporary, "wb") as out:
            hexdigest = dump(header, entries, out, str(path), stopped)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    _write_atomically(path.with_name(path.name + ".sha256"), f"{hexdigest}  {path.name}\n".encode())
    return hexdigest


def dump(
    header: Header,
    entries: Iterable[Entry],
    out: IO[bytes],
    name: str,
    stopped: Callable[[], bool] = lambda: False,
) -> str:
    """Write a manifest to ``out`` entry by entry, its SHA-256 computed as it goes;
    returns that. Blocking. ``name`` is what messages call it. A ManifestError when
    ``stopped()`` turned true, or when the entries are not as many as the header says
    (what was written is then not a manifest)."""
    digest = hashlib.sha256()
    count = 0
    lines = itertools.chain(
        (_header_line(header),), (_line(dataclasses.asdict(e)) for e in entries)
    )
    while chunk := b"".join(itertools.islice(lines, DUMP_LINES)):
        digest.update(chunk)
        out.write(chunk)
        count += chunk.count(b"\n")
        if stopped():
            raise ManifestError(f"{name}: not written, the daemon is stopping")
    if count - 1 != header.files:
        raise ManifestError(
            f"{name}: {count - 1:,} objects written but the header says {header.files:,} "
            "(the journal changed meanwhile)"
        )
    return digest.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with open(temporary, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def batch_path(state_dir: Path, watch: str, batch: str, completed_at: float) -> Path:
    """Where a batch completion's manifest is kept (a name safe in any file system)."""
    stamp = datetime.fromtimestamp(completed_at, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return state_dir / FOLDER / _safe(watch) / f"{_safe(batch)}-{stamp}.jsonl"


def _safe(name: str) -> str:
    text = "".join(c if c.isalnum() or c in "-_.+=" else "_" for c in name)
    return text.lstrip(".") or "_"


def read(path: Path) -> Manifest:
    """A manifest from a file; ManifestError naming the line that is wrong. Blocking."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read the manifest {path}: {exc}") from None
    lines = text.splitlines()
    if not lines:
        raise ManifestError(f"{path} is empty, not a manifest")
    header = _object(lines[0], path, 1)
    if header.get("format") != FORMAT:
        raise ManifestError(
            f"{path} is not a cpg-daemon manifest (its first line has no "
            f'"format": "{FORMAT}")'
        )
    try:
        head = Header(**{f.name: header[f.name] for f in dataclasses.fields(Header)})
        parse_s3_uri(head.destination)
        entries = tuple(
            Entry(**{f.name: item[f.name] for f in dataclasses.fields(Entry)})
            for item in (_object(line, path, n) for n, line in enumerate(lines[1:], 2) if line)
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: a header or entry lacks a field or is wrong: {exc}") from None
    if len(entries) != head.files:
        raise ManifestError(
            f"{path} lists {len(entries):,} objects but its header says {head.files:,} "
            "(cut short?)"
        )
    return Manifest(head, entries)


def _object(line: str, path: Path, number: int) -> Mapping[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        raise ManifestError(f"{path}, line {number}: not JSON") from None
    if not isinstance(value, dict):
        raise ManifestError(f"{path}, line {number}: not a JSON object")
    return value


# -- checking staging against a manifest --------------------------------------------------


async def verify_manifest(
    manifest: Manifest, store: Storage, destination: S3Location | None = None
) -> Result:
    """Staging (or ``destination``, where the objects went since) against a manifest.

    One listing of the destination; an object whose size and ETag are the
    manifest's is that upload. Any other is asked for its checksum (HeadObject),
    compared with the manifest's. Objects under the destination that the manifest
    does not list are ``extra`` (but for uploaded manifests). Needs read access only.
    """
    started = time.monotonic()
    origin = manifest.destination
    where = destination or origin
    listed: dict[str, RemoteObject] = {}
    async for item in store.list_objects(where.bucket, where.prefix):
        listed[item.key] = item
    rows: list[Row] = []
    to_head: list[tuple[Entry, str]] = []
    for entry in manifest.entries:
        rel = entry.key[len(origin.prefix) :] if entry.key.startswith(origin.prefix) else entry.key
        key = where.prefix + rel
        found = listed.pop(key, None)
        if found is None:
            rows.append(_row(rel, key, entry, None, "", "missing"))
        elif found.size != entry.size:
            rows.append(_row(rel, key, entry, found.size, "", "size_mismatch"))
        elif entry.etag and found.etag.strip('"') == entry.etag:
            rows.append(_row(rel, key, entry, found.size, entry.checksum, "match"))
        else:
            to_head.append((entry, rel))
    limit = anyio.Semaphore(HEAD_AT_ONCE)

    async def ask(entry: Entry, rel: str) -> None:
        async with limit:
            head = await store.head(where.bucket, where.prefix + rel)
        rows.append(_compared(rel, where.prefix + rel, entry, head))

    async with anyio.create_task_group() as tg:
        for entry, rel in to_head:
            tg.start_soon(ask, entry, rel)
    for key, item in listed.items():
        if is_manifest_key(key):
            continue  # an uploaded manifest (upload_manifest): the daemon's own
        rel = key[len(where.prefix) :]
        rows.append(Row(rel, key, None, item.size, "", "", "", "extra"))
    rows.sort(key=lambda row: row.key)
    return Result(rows, time.monotonic() - started)


def _row(rel: str, key: str, entry: Entry, size: int | None, remote: str, status: str) -> Row:
    return Row(
        rel, key, entry.size, size, entry.checksum_algorithm, entry.checksum, remote, status
    )


def _compared(rel: str, key: str, entry: Entry, head: RemoteObject | None) -> Row:
    if head is None:  # deleted between the listing and now
        return _row(rel, key, entry, None, "", "missing")
    if head.size != entry.size:
        return _row(rel, key, entry, head.size, "", "size_mismatch")
    remote = head.checksums.get(entry.checksum_algorithm, "")
    if remote and entry.checksum:
        status = "match" if remote == entry.checksum else "checksum_mismatch"
        return _row(rel, key, entry, head.size, remote, status)
    etag = head.etag.strip('"')
    if etag and entry.etag:  # no checksum to compare: the ETag is all there is
        status = "match" if etag == entry.etag else "checksum_mismatch"
        return Row(rel, key, entry.size, head.size, "ETag", entry.etag, etag, status)
    return _row(rel, key, entry, head.size, "", "unverified")
