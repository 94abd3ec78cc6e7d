"""``cpg-daemon upload SRC DEST``: the daemon's engine, run once over one folder or file.

It keeps a journal of its own (one per source and destination, under the
user's state folder), so an interrupted upload of terabytes resumes where it
stopped, multipart uploads part by part, when the same command is run again.
Objects already present with the same size and checksum are not sent again.
The journal is locked while the command runs: a second ``upload`` of the same
source to the same destination is refused until the first ends.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from cpg_daemon.core.config import Config, CredentialsConfig, DaemonConfig, S3Config, WatchConfig
from cpg_daemon.core.objectkeys import S3Location, object_key, parse_s3_uri
from cpg_daemon.engine.runtime import Engine
from cpg_daemon.engine.sources import ObjectSource
from cpg_daemon.engine.uploader import PartsDone, Uploader
from cpg_daemon.journal import Journal, JournalStatistics, hold_lock
from cpg_daemon.s3.store import Storage

log = structlog.get_logger(__name__)

WATCH_NAME = "upload"


@dataclass(frozen=True)
class UploadSummary:
    files: int
    uploaded: int
    already_present: int
    failed: int
    bytes: int
    seconds: float
    failures: tuple[tuple[str, str], ...]
    bytes_copied: int = 0
    """Of objects copied within S3 (server-side copy): not sent by this machine."""


@dataclass(frozen=True)
class UploadProgress:
    """Where an upload stands, for a progress display (``upload(progress=...)``)."""

    files: int
    """Files found to upload (all of them once the walk is done: it comes first)."""
    files_done: int
    """Uploaded, or found already there."""
    files_failed: int
    bytes: int
    bytes_done: int
    """Of the files done, and of the parts of large files S3 holds already."""
    bytes_sent: int
    """Sent by this run so far (what a rate is computed from)."""
    multipart: tuple[PartsDone, ...]
    """Large files in progress, part by part."""


PROGRESS_EVERY = 0.25
"""Seconds between two progress snapshots."""


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/cpg-daemon/upload`` (``~/.local/state`` without it); on Windows,
    ``%LOCALAPPDATA%\\cpg-daemon\\upload``."""
    base = os.environ.get("XDG_STATE_HOME")
    if not base and sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
    return Path(base or Path.home() / ".local" / "state") / "cpg-daemon" / "upload"


def journal_path(state_dir: Path, source: Path | str, destination: S3Location) -> Path:
    digest = hashlib.sha256(f"{source}\0{destination}".encode()).hexdigest()[:16]
    return state_dir / f"{digest}.sqlite3"


def _split(location: S3Location) -> tuple[S3Location, str]:
    """``s3://b/a/b/name`` as its folder ``s3://b/a/b/`` and ``name``."""
    folder, _, name = location.prefix.rstrip("/").rpartition("/")
    return S3Location(location.bucket, f"{folder}/" if folder else ""), name


def _below(destination: S3Location, object_name: str) -> S3Location:
    """Where a folder goes when DEST named an object: into a folder of that name
    (``aws s3 cp --recursive``, ``aws s3 sync``)."""
    if not object_name:
        return destination
    return S3Location(destination.bucket, object_key(destination.prefix, object_name) + "/")


def _source_name(watch: WatchConfig, objects: ObjectSource | None) -> Path | str:
    """What the upload of ``watch`` reads: the folder (or file), or the S3 SRC."""
    if objects is None:
        return watch.path / watch.include[0]
    return objects.name(objects.single or watch.include[0])


def journal_for(state_dir: Path, watch: WatchConfig, objects: ObjectSource | None) -> Path:
    """The journal of the upload of ``watch`` (from ``objects``, for an S3 SRC)."""
    return journal_path(state_dir, _source_name(watch, objects), watch.destination)


def parse_destination(uri: str) -> tuple[S3Location, str]:
    """DEST as ``aws s3 cp`` reads it for one file: the folder, and the object's name
    when DEST names one (no trailing ``/``), else "". A folder SRC goes below DEST
    either way. ValueError: not an ``s3://bucket/...`` URI."""
    location = parse_s3_uri(uri)
    if uri.endswith("/") or not location.prefix:
        return location, ""
    return _split(location)


def source_watch(source: Path, destination: S3Location, object_name: str = "") -> WatchConfig:
    """The watch that covers SRC: the folder itself, or a file's folder limited to that
    file (sent to ``object_name`` below ``destination``, when given)."""
    source = source.absolute()
    if source.is_dir():
        return WatchConfig(WATCH_NAME, source, _below(destination, object_name), settle=0.0)
    if source.is_file():
        return _one_file(source.parent, destination, source.name, object_name)
    raise FileNotFoundError(f"{source} is not a file or folder")


def _one_file(root: Path, destination: S3Location, name: str, object_name: str) -> WatchConfig:
    """A watch of the one file (or object) ``name`` directly below ``root``: chosen by
    its name, which no character of makes a pattern."""
    return WatchConfig(
        WATCH_NAME,
        root,
        destination,
        settle=0.0,
        include=(glob.escape(name),),
        exclude=(),
        object_name=object_name,
    )


OBJECTS_ROOT = Path(os.devnull)
"""The ``path`` of a watch whose files are objects of another bucket: never walked
(the watch is fed by ``ObjectSource.walk``), and no folder to read from by mistake."""


def same_access(
    reader: tuple[S3Config, CredentialsConfig | None], writer: tuple[S3Config, CredentialsConfig]
) -> bool:
    """Whether the destination's keys can read the source too, so objects may be copied
    within S3: the same endpoint, region and keys, and not keys scoped to the destination
    (Access Grants, handed over from a grant)."""
    (source, keys), (destination, own) = reader, writer
    return (
        keys == own
        and own.source not in ("access-grants", "handed-over")
        and (source.endpoint_url, source.region) == (destination.endpoint_url, destination.region)
    )


async def object_watch(
    store: Storage,
    uri: str,
    destination: S3Location,
    object_name: str = "",
    *,
    server_side: bool = False,
) -> tuple[WatchConfig, ObjectSource]:
    """The watch that covers an S3 SRC, and the source its files are read from: one
    object when SRC names one that exists (sent to ``object_name`` when given), else
    every object under SRC as a folder (``server_side``: see ``ObjectSource``).
    ValueError: not an ``s3://`` URI."""
    location = parse_s3_uri(uri)
    key = location.prefix.rstrip("/")
    if key and not uri.endswith("/") and await store.head(location.bucket, key) is not None:
        folder, name = _split(location)
        watch = _one_file(OBJECTS_ROOT, destination, name, object_name)
        return watch, ObjectSource(store, folder, name, server_side)
    watch = WatchConfig(WATCH_NAME, OBJECTS_ROOT, _below(destination, object_name), settle=0.0)
    return watch, ObjectSource(store, location, server_side=server_side)


async def upload(
    watch: WatchConfig,
    s3: S3Config,
    credentials: CredentialsConfig,
    state_dir: Path,
    file_attempts: int = 3,
    progress: Callable[[UploadProgress], None] | None = None,
    journal: Path | None = None,
    objects: ObjectSource | None = None,
) -> UploadSummary:
    """Upload what ``source_watch`` selected below its destination, or ``objects`` (an
    S3 source, from ``object_watch``); returns what happened.

    ``progress`` is called with a snapshot every ``PROGRESS_EVERY`` s while files are
    sent. ``journal``: the resumable journal to keep (default: ``journal_for`` the
    watch's source and destination, in ``state_dir``); it is locked while the upload runs.
    """
    started = time.monotonic()
    config = Config(
        path=None,
        daemon=DaemonConfig(file_attempts=file_attempts),
        s3=s3,
        credentials=(credentials,),
        watches=(watch,),
    )
    path = journal or journal_for(state_dir, watch, objects)
    source = _source_name(watch, objects)
    lock = await anyio.to_thread.run_sync(_lock_journal, path, source, watch.destination)
    try:
        return await _upload(config, path, objects, progress, started)
    finally:
        os.close(lock)


def _lock_journal(path: Path, source: Path | str, destination: S3Location) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return hold_lock(
        path.with_suffix(".lock"),
        f"another cpg-daemon upload of {source} to {destination} is running (its journal "
        f"{path} is locked); wait until it ends, or stop it and run this again: it resumes "
        "where that one stopped",
    )


async def _upload(
    config: Config,
    path: Path,
    objects: ObjectSource | None,
    progress: Callable[[UploadProgress], None] | None,
    started: float,
) -> UploadSummary:
    async with Engine.open(config, path) as engine:
        async with anyio.create_task_group() as tg:
            await engine.grants.start_renewals(tg)
            await engine.grants.first_keys()
            if objects is None:
                await engine.walk_once(WATCH_NAME)
            else:
                await engine.walk_objects(WATCH_NAME, objects)
            await tg.start(engine.scheduler.run)
            await _wait_until_done(engine.journal, engine.uploader, progress)
            tg.cancel_scope.cancel()
        records = await engine.journal.records(WATCH_NAME)
        stats = engine.uploader.statistics()
        copied = engine.uploader.bytes_copied
    failures = tuple((r.rel_path, r.last_error or "") for r in records if r.state == "failed")
    return UploadSummary(
        files=len(records),
        uploaded=stats.files_uploaded,
        already_present=len(records) - len(failures) - stats.files_uploaded,
        failed=len(failures),
        bytes=stats.bytes_sent,
        seconds=time.monotonic() - started,
        failures=failures,
        bytes_copied=copied,
    )


async def _wait_until_done(
    journal: Journal, uploader: Uploader, progress: Callable[[UploadProgress], None] | None
) -> None:
    while True:
        stats = await journal.statistics()
        pending = stats.total("queued").files + stats.total("uploading").files
        if progress is not None:
            progress(_snapshot(stats, uploader))
        if pending == 0:
            return
        await anyio.sleep(PROGRESS_EVERY if progress is not None else 0.2)


def _snapshot(stats: JournalStatistics, uploader: Uploader) -> UploadProgress:
    done, failed = stats.total("uploaded"), stats.total("failed")
    sent = uploader.statistics()
    everything = [stats.total(state) for state in ("queued", "uploading", "uploaded", "failed")]
    return UploadProgress(
        files=sum(counts.files for counts in everything),
        files_done=done.files,
        files_failed=failed.files,
        bytes=sum(counts.bytes for counts in everything),
        bytes_done=done.bytes + sum(parts.done for parts in sent.multipart),
        bytes_sent=sent.bytes_sent,
        multipart=sent.multipart,
    )
