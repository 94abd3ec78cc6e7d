"""``cpg-daemon upload SRC DEST``: the daemon's engine, run once over one folder or file.

It keeps a journal of its own (one per source and destination, under the
user's state folder), so an interrupted upload of terabytes resumes where it
stopped, multipart uploads part by part, when the same command is run again.
Objects already present with the same size and checksum are not sent again.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from cpg_daemon.core.config import Config, CredentialsConfig, DaemonConfig, S3Config, WatchConfig
from cpg_daemon.core.objectkeys import S3Location
from cpg_daemon.core.units import format_size
from cpg_daemon.engine.runtime import Engine
from cpg_daemon.journal import Journal

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
    progress: bool = False,
) -> UploadSummary:
    """Upload what ``source_watch`` selected below its destination; returns what happened."""
    started = time.monotonic()
    config = Config(
        path=None,
        daemon=DaemonConfig(file_attempts=file_attempts),
        s3=s3,
        credentials=(credentials,),
        watches=(watch,),
    )
    path = journal_path(state_dir, watch.path / watch.include[0], watch.destination)
    async with Engine.open(config, path) as engine:
        async with anyio.create_task_group() as tg:
            await engine.grants.start_renewals(tg)
            await engine.grants.first_keys()
            await engine.walk_once(WATCH_NAME)
            await tg.start(engine.scheduler.run)
            await _wait_until_done(engine.journal, progress, started)
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


async def _wait_until_done(journal: Journal, progress: bool, started: float) -> None:
    while True:
        stats = await journal.statistics()
        pending = stats.total("queued").files + stats.total("uploading").files
        if progress:
            done = stats.total("uploaded")
            elapsed = max(time.monotonic() - started, 1e-9)
            sys.stderr.write(
                f"\r{done.files} files uploaded ({format_size(done.bytes)}), {pending} to go, "
                f"{stats.total('failed').files} failed, "
                f"{format_size(done.bytes / elapsed)}/s   "
            )
            sys.stderr.flush()
        if pending == 0:
            if progress:
                sys.stderr.write("\n")
            return
        await anyio.sleep(0.5 if progress else 0.2)
