"""``cpg-daemon upload SRC DEST``: the daemon's engine, run once over one folder or file.

It keeps a journal of its own (one per source and destination, under the
user's state folder), so an interrupted upload of terabytes resumes where it
stopped, multipart uploads part by part, when the same command is run again.
Objects already present with the same size and checksum are not sent again.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from cpg_daemon.core.config import Config, CredentialsConfig, DaemonConfig, S3Config, WatchConfig
from cpg_daemon.core.objectkeys import S3Location
from cpg_daemon.engine.runtime import Engine
from cpg_daemon.engine.uploader import PartsDone, Uploader
from cpg_daemon.journal import Journal, JournalStatistics

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
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cpg-daemon" / "upload"


def journal_path(state_dir: Path, source: Path, destination: S3Location) -> Path:
    digest = hashlib.sha256(f"{source}\0{destination}".encode()).hexdigest()[:16]
    return state_dir / f"{digest}.sqlite3"


def source_watch(source: Path, destination: S3Location) -> WatchConfig:
    """The watch that covers SRC: the folder itself, or a file's folder limited to that file."""
    source = source.absolute()
    if source.is_dir():
        return WatchConfig(WATCH_NAME, source, destination, settle=0.0)
    if source.is_file():
        return WatchConfig(
            WATCH_NAME, source.parent, destination, settle=0.0, include=(source.name,), exclude=()
        )
    raise FileNotFoundError(f"{source} is not a file or folder")


async def upload(
    watch: WatchConfig,
    s3: S3Config,
    credentials: CredentialsConfig,
    state_dir: Path,
    file_attempts: int = 3,
    progress: Callable[[UploadProgress], None] | None = None,
    journal: Path | None = None,
) -> UploadSummary:
    """Upload what ``source_watch`` selected below its destination; returns what happened.

    ``progress`` is called with a snapshot every ``PROGRESS_EVERY`` s while files are
    sent. ``journal``: the resumable journal to keep (default: ``journal_path`` of the
    watch's source and destination, in ``state_dir``).
    """
    started = time.monotonic()
    config = Config(
        path=None,
        daemon=DaemonConfig(file_attempts=file_attempts),
        s3=s3,
        credentials=(credentials,),
        watches=(watch,),
    )
    path = journal or journal_path(state_dir, watch.path / watch.include[0], watch.destination)
    async with Engine.open(config, path) as engine:
        async with anyio.create_task_group() as tg:
            await engine.grants.start_renewals(tg)
            await engine.grants.first_keys()
            await engine.walk_once(WATCH_NAME)
            await tg.start(engine.scheduler.run)
            await _wait_until_done(engine.journal, engine.uploader, progress)
            tg.cancel_scope.cancel()
        records = await engine.journal.records(WATCH_NAME)
        stats = engine.uploader.statistics()
    failures = tuple((r.rel_path, r.last_error or "") for r in records if r.state == "failed")
    return UploadSummary(
        files=len(records),
        uploaded=stats.files_uploaded,
        already_present=len(records) - len(failures) - stats.files_uploaded,
        failed=len(failures),
        bytes=stats.bytes_sent,
        seconds=time.monotonic() - started,
        failures=failures,
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
