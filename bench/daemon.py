"""Benchmark: the running daemon (`cpg-daemon run`): latency, restart over a large journal, RSS.

    .venv/bin/python bench/daemon.py                    # full size (issue targets), 3 runs
    .venv/bin/python bench/daemon.py --scale 0.01 --runs 1     # smoke run, about a minute
    .venv/bin/python bench/daemon.py --scenarios restart --journal-files 200000
    .venv/bin/python bench/daemon.py --scenarios latency --links loopback,rtt40,rtt100 \
        --idle-files 0 --burst-files 2000 --plate-files 200     # over simulated links

Everything is real: `cpg-daemon run -c CONFIG` from .venv as a subprocess with a TOML
configuration file written for each run (credentials from the environment, JSON logs at
level "debug", which adds only the daemon's one `scanned` event per walk), and
`rclone serve s3` (bench/.venv, as bench/compare.py uses it) on 127.0.0.1 over HTTP,
restarted on an empty folder for every run. No traffic leaves 127.0.0.1. The daemon gets
a NOTIFY_SOCKET (an AF_UNIX datagram socket this script binds under /tmp/daemonbench/),
so it behaves as under systemd (READY=1, STATUS= every 5 s). If this script is started
with another Python it re-runs itself with .venv/bin/python (it imports cpg_daemon to
build the journal and to talk to the control socket).

Scenarios (--scenarios, default all; sizes below are the defaults, --scale multiplies them):

latency  One daemon per link of --links (default loopback), settle = --settle (1 s), an
         empty watch. Over a link other than loopback (rtt40, rtt100, ...: see
         bench/relay.py) the daemon's endpoint_url is a delay relay on 127.0.0.1 in front
         of the server, started and stopped with it; this script's own checks go to the
         server directly.
         (a) idle: --idle-files (50; 0 for none) files of --idle-size (4 MiB) written one
             at a time; the next one only once the previous one is visible and --idle-gap
             (1 s) passed.
         (b) burst: --burst-files (10,000) files of --small-size (4 KiB) written into one
             new folder as fast as this script can, then the wait until all are visible;
             --runs (3) bursts, each into a folder of its own, 10 s apart.
         (c) plate burst: the same with --plate-files (200; 0 for none) files of
             --plate-size (2 MiB), --runs times. For every burst: drain time, files/s,
             MB/s, and the daemon's CPU seconds per file (from /proc, over the burst).
         For every file: settled -> visible. "Settled" is what watcher.py means: size and
         mtime unchanged for `settle`; for a file written once that is first true at its
         mtime (stat after the last write and close) + settle, so settled_at = st_mtime +
         settle. "Visible": rclone serve s3 writes each object to a temporary name and
         renames it to the key's path when the PutObject is complete. This script follows
         the served folder with inotify (IN_MOVED_TO / IN_CLOSE_WRITE; the directories are
         made beforehand, so no event can be missed) in a thread of its own and notes the
         time of each rename; a second thread then confirms each idle object, and
         --burst-heads (100) of each burst's, with a HeadObject (size must match) as it
         appears: visible_at is the rename time when that first HeadObject succeeds, else
         the time of the first one that does. The rest of a burst is confirmed by one
         ListObjectsV2 listing once all have appeared (keys and sizes). This costs the
         daemon nothing (no status polling, no listing while it works) and the server
         little; this script's own CPU is reported beside the daemon's. The daemon's
         journal, read after it stops, splits each latency into settled -> journaled
         (discovered_at: the settle tracker) and journaled -> uploaded (uploaded_at:
         queue + PutObject).
         The burst's drain time is first write -> last object visible.
restart  A watch holding --journal-files (1,000,000) files of --small-size in folders of
         --per-folder (10,000), and a journal that records every one as uploaded, then
         `cpg-daemon run` started --runs (3) times on a fresh copy of that journal and an
         empty bucket. The journal is written with SQL into the schema the journal module
         itself creates (Journal.open_sync), a row per file exactly as a single-part
         upload leaves it (state uploaded, check_remote 0, etag the quoted MD5 rclone
         returns, checksum_algorithm CRC32C and the base64 CRC32C computed with
         cpg_daemon.core.checksums, attempts 0, no upload_id), plus a `batches` row per folder
         as the batch tracker records a completed batch, so nothing is announced again.
         Every invocation first proves the rows right: the daemon uploads a small tree
         (2 folders x 20 files) for real, and its journal rows must equal the synthesized
         rows for the same files in every column but the id and the times (the "fixture
         check" below). Measured from spawn: READY=1, the first walk's end (the daemon's
         `scanned` log event), then `status` showing nothing queued or uploading (asked
         only once the walk ended, so polling costs nothing during it), and how many full
         walks the start made (one: the first walk waits for inotify; the daemon used to
         walk again once inotify was established). Peak RSS is VmHWM from
         /proc/PID/status 10 s (or two walk times) after the first walk, CPU from
         /proc/PID/stat; then
         the CPU the daemon uses over --idle-window (20) s of doing nothing. (os.wait4's
         ru_maxrss is not used: Python spawns with vfork + exec, and Linux carries the
         parent's high-water mark across the exec, so it reads at least this script's own
         peak RSS.) Then it checks that nothing was uploaded: no object on the server, no
         `uploaded` log event, every file still `uploaded` in status. The figure is for a
         warm page cache (the tree was walked before); a cold start after a reboot reads
         the folders from disk.
queued   --queued-files (100,000) files of --small-size in folders of --per-folder: the
         daemon is started on an empty watch, `cpg-daemon pause -s SOCKET` is run, then
         the folders are moved (rename) into the watch, as staff drop batches; `status`
         is asked once a second until files.queued is 100,000; then VmRSS and VmHWM are
         read, again 5 s later, and the daemon is stopped. The folders are moved back.

Datasets are made once under bench/out/daemon/data/ (reused when their parameters match;
about 5.5 GiB at full size, 1.1 million files). The restart and queued figures are
medians over --runs runs; the latency figures are percentiles over the files of a phase
(nearest rank), for the bursts the median of the bursts' percentiles. Each run's daemon
log is kept in bench/out/daemon/logs/. Results: a table on stdout, bench/out/daemon_*.json
(with a sha256 of every file of cpg_daemon/, at the start and the end), and a section
of bench/RESULTS.md between `<!-- begin daemon ... -->` and `<!-- end daemon ... -->`
markers keyed by the sizes (the same key replaces its section; other sections are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import hashlib
import json
import math
import os
import queue
import random
import re
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    BENCH_VENV,
    BUCKET,
    HERE,
    KEYS,
    MAIN_VENV,
    ROOT,
    RcloneServer,
    cpg_daemon_version,
    first_line,
    load,
    machine,
)
from relay import LinkSpec, RelayProcess

CPG = MAIN_VENV / "bin" / "cpg-daemon"
RCLONE = BENCH_VENV / "bin" / "rclone"
SCRATCH = Path("/tmp/daemonbench")
KiB = 1024
MiB = 1024 * KiB
PREFIX = "cpg0000-bench/broad/images/2024_01_01_Batch1/images/"  # follows the gallery rules
WATCH = "bench"
SCENARIOS = ("latency", "restart", "queued")
TARGETS = {"restart_s": 30.0, "restart_rss_mib": 500.0, "queued_rss_mib": 300.0}
JOURNAL_COLUMNS = (
    "watch",
    "rel_path",
    "bucket",
    "key",
    "size",
    "mtime_ns",
    "state",
    "check_remote",
    "upload_id",
    "upload_size",
    "upload_mtime_ns",
    "part_size",
    "checksum_algorithm",
    "checksum",
    "etag",
    "attempts",
    "last_error",
    "not_before",
)
"""Columns of `files` a real upload decides; the fixture check compares these."""
TIME_COLUMNS = ("discovered_at", "updated_at", "uploaded_at")
BATCH_COLUMNS = ("watch", "name", "destination", "files", "bytes", "hook_state", "hook_detail")


# ---------------------------------------------------------------- small helpers


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def well(i: int) -> str:
    """A Phenix-like image name; unique for i < 1920 x 99."""
    channel, w = i % 5 + 1, i // 5
    site, w = w // 384 + 1, w % 384
    return f"r{w // 24 + 1:02d}c{w % 24 + 1:02d}f{site:02d}p01-ch{channel}sk1fk1fl1.tiff"


def content(rel: str, size: int) -> bytes:
    """Deterministic small-file content, different for every path."""
    seed = hashlib.sha256(rel.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Tree:
    """Files in folders Plate0001/, Plate0002/ ... of ``per_folder`` files each."""

    root: Path
    files: int
    per_folder: int
    size: int

    @property
    def marker(self) -> Path:
        return self.root.parent / f"{self.root.name}.complete"  # outside the tree

    def params(self) -> dict[str, int]:
        return {"files": self.files, "per_folder": self.per_folder, "size": self.size}

    def folders(self) -> list[str]:
        return [f"Plate{n + 1:04d}" for n in range(math.ceil(self.files / self.per_folder))]

    def paths(self) -> Iterator[str]:
        for i in range(self.files):
            yield f"Plate{i // self.per_folder + 1:04d}/{well(i % self.per_folder)}"

    def ready(self) -> bool:
        return (
            self.marker.exists()
            and json.loads(self.marker.read_text()) == self.params()
            and all((self.root / name).is_dir() for name in self.folders())
        )

    def make(self) -> None:
        if self.ready():
            return
        if self.root.exists():
            shutil.rmtree(self.root)
        self.marker.unlink(missing_ok=True)
        started = time.monotonic()
        log(f"making {self.root.name}: {self.files:,} files of {self.size:,} B ...")
        for name in self.folders():
            (self.root / name).mkdir(parents=True)
        for n, rel in enumerate(self.paths(), 1):
            write_file(self.root / rel, content(rel, self.size))
            if n % 100_000 == 0:
                log(f"  {n:,} files")
        self.marker.write_text(json.dumps(self.params()))
        log(f"made {self.root.name} in {time.monotonic() - started:.0f} s")


def synthesized_rows(
    tree: Path, settle: float, batches: dict[str, list[Any]]
) -> Iterator[tuple[Any, ...]]:
    """The `files` rows a real daemon leaves after uploading ``tree``, one by one.

    Walks the tree with the daemon's own walk and filter, and computes every value the
    way the uploader does: key with keys.object_key, checksum with the CRC32C of
    checksums.py for a single-part object, and the ETag S3 gives a single PutObject (the
    quoted MD5 of the content). Columns: JOURNAL_COLUMNS + TIME_COLUMNS. ``batches``
    collects per top-level folder [files, bytes, first and last upload time] for
    ``batch_rows``.
    """
    from cpg_daemon.core.checksums import ALGORITHMS, PartDigest
    from cpg_daemon.core.config import DEFAULT_EXCLUDE
    from cpg_daemon.core.objectkeys import PathFilter, object_key
    from cpg_daemon.discovery.scan import walk

    crc = ALGORITHMS["CRC32C"]
    for seen in walk(tree, PathFilter(("**",), DEFAULT_EXCLUDE)):
        data = (tree / seen.rel_path).read_bytes()
        checksum = crc.object_checksum([PartDigest(crc.digest(data), len(data))], multipart=False)
        discovered = seen.mtime_ns / 1e9 + settle
        uploaded = discovered + 0.05
        yield (
            WATCH,
            os.fsencode(seen.rel_path),
            BUCKET,
            object_key(PREFIX, seen.rel_path),
            seen.size,
            seen.mtime_ns,
            "uploaded",
            0,
            None,
            None,
            None,
            None,
            "CRC32C",
            checksum,
            f'"{hashlib.md5(data).hexdigest()}"',
            0,
            None,
            0.0,
            discovered,
            uploaded,
            uploaded,
        )
        folder = seen.rel_path.partition("/")[0]
        stats = batches.setdefault(folder, [0, 0, uploaded, uploaded])
        stats[0] += 1
        stats[1] += seen.size
        stats[2] = min(stats[2], uploaded)
        stats[3] = max(stats[3], uploaded)


def batch_rows(batches: dict[str, list[Any]], settle: float) -> list[tuple[Any, ...]]:
    """The `batches` rows of the completed folders: BATCH_COLUMNS, then the four times."""
    from cpg_daemon.core.objectkeys import object_key

    return [
        (
            WATCH,
            name,
            f"s3://{BUCKET}/{object_key(PREFIX, name)}/",
            count,
            size,
            "none",
            None,
            first,
            last,
            last,  # last_change: the latest updated_at of its files
            last + settle + 1.0,  # completed_at
        )
        for name, (count, size, first, last) in sorted(batches.items())
    ]


def build_journal(tree: Tree, path: Path, settle: float) -> None:
    """A journal recording every file of ``tree`` as uploaded (reused when present)."""
    from cpg_daemon.journal import Journal

    sidecar = path.with_name(path.name + ".complete")
    params = {**tree.params(), "settle": settle, "tree_mtime": tree.marker.stat().st_mtime_ns}
    if path.exists() and sidecar.exists() and json.loads(sidecar.read_text()) == params:
        return
    started = time.monotonic()
    log(f"writing the journal {path.name} for {tree.files:,} files ...")
    tmp = path.with_name(path.name + ".tmp")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), path, sidecar):
        leftover.unlink(missing_ok=True)
    journal = Journal.open_sync(tmp)  # the schema as the journal module makes it
    import anyio

    anyio.run(journal.close)
    batches: dict[str, list[Any]] = {}
    files = synthesized_rows(tree.root, settle, batches)
    db = sqlite3.connect(tmp, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    columns = (*JOURNAL_COLUMNS, *TIME_COLUMNS)
    db.executemany(
        f"INSERT INTO files ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        files,
    )
    db.executemany(
        "INSERT INTO batches (watch, name, destination, files, bytes, hook_state, hook_detail, "
        "first_uploaded_at, last_uploaded_at, last_change, completed_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        batch_rows(batches, settle),
    )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    tmp.rename(path)
    sidecar.write_text(json.dumps(params))
    size = path.stat().st_size / MiB
    log(f"wrote {path.name} ({size:,.0f} MiB) in {time.monotonic() - started:.0f} s")


# ---------------------------------------------------------------- server


class Server(RcloneServer):
    """`rclone serve s3` over one folder on 127.0.0.1, started on an empty bucket."""

    def __init__(self, served: Path, log_path: Path) -> None:
        super().__init__(RCLONE, served, log_path)
        self.cpu_s: float | None = None

    def start(self) -> None:
        self.start_empty()

    def objects(self) -> int:
        """Objects in the bucket (files not named like rclone's temporaries)."""
        return sum(
            1
            for _, _, names in os.walk(self.served / BUCKET)
            for name in names
            if not name.startswith(".rclone")
        )

    def stop(self) -> float | None:
        """Stops the server; its CPU seconds (user + system)."""
        cpu = super().stop()
        if cpu is not None:
            self.cpu_s = cpu
        return cpu


# ---------------------------------------------------------------- visibility on the server

_IN_CLOSE_WRITE = 0x8
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_Q_OVERFLOW = 0x4000
_IN_ISDIR = 0x40000000


class ServedWatcher:
    """When each object appears under its key in the served folder, and proof it is served.

    One thread reads inotify (rclone renames its temporary file to the key's path when
    the PutObject is complete) and notes the time. Keys registered with ``head=True``
    are then confirmed by a second thread with a HeadObject each (size must match);
    the others (a burst's, but for a sample) by one ListObjectsV2 listing in ``settle``,
    so that confirming 10,000 objects does not take a core from the daemon.
    """

    def __init__(self, bucket_dir: Path, endpoint: str) -> None:
        import boto3
        from botocore.config import Config as BotoConfig

        self._root = bucket_dir
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._watches: dict[int, Path] = {}
        self._lock = threading.Lock()
        self.renamed: dict[str, float] = {}
        self.visible: dict[str, float] = {}
        """key -> visible_at: the rename time, or a later HeadObject's when the first failed."""
        self.headed: set[str] = set()
        """Keys confirmed by HeadObject (the others by the listing)."""
        self.head_retries = 0
        self.problems: list[str] = []
        self._expected: dict[str, tuple[int, bool]] = {}
        self._heads: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._client = boto3.session.Session(
            aws_access_key_id=KEYS, aws_secret_access_key=KEYS, region_name="us-east-1"
        ).client(
            "s3",
            endpoint_url=endpoint,
            config=BotoConfig(retries={"max_attempts": 1, "mode": "standard"}),
        )
        self._add_tree(bucket_dir)
        self._threads = [
            threading.Thread(target=self._read, name="inotify", daemon=True),
            threading.Thread(target=self._confirm, name="head", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _add_tree(self, folder: Path) -> None:
        mask = _IN_MOVED_TO | _IN_CLOSE_WRITE | _IN_CREATE
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(folder), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
        self._watches[wd] = folder
        for entry in os.scandir(folder):
            if entry.is_dir(follow_symlinks=False):
                self._add_tree(Path(entry.path))
            elif not entry.name.startswith(".rclone"):  # there before the watch: late
                self._arrived(Path(entry.path), time.time())

    def expect(self, key: str, size: int, head: bool = True) -> None:
        """Register a key before its file is written: its size, and how to confirm it."""
        with self._lock:
            self._expected[key] = (size, head)

    def _arrived(self, path: Path, at: float) -> None:
        key = path.relative_to(self._root).as_posix()
        with self._lock:
            if key in self.renamed:
                return
            self.renamed[key] = at
            head = self._expected.get(key, (0, True))[1]
        if head:
            self._heads.put(key)

    def _read(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.2)
            if not ready:
                continue
            at = time.time()
            try:
                buffer = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                continue
            offset = 0
            while offset < len(buffer):
                wd, mask, _, length = struct.unpack_from("iIII", buffer, offset)
                raw = buffer[offset + 16 : offset + 16 + length].rstrip(b"\0")
                offset += 16 + length
                if mask & _IN_Q_OVERFLOW:
                    self.problems.append("inotify queue overflow on the served folder")
                    continue
                folder = self._watches.get(wd)
                if folder is None or not raw:
                    continue
                path = folder / os.fsdecode(raw)
                if mask & _IN_ISDIR:
                    if mask & (_IN_CREATE | _IN_MOVED_TO):
                        self._add_tree(path)
                elif mask & (_IN_MOVED_TO | _IN_CLOSE_WRITE) and not path.name.startswith(
                    ".rclone"
                ):
                    self._arrived(path, at)

    def _confirm(self) -> None:
        while True:
            key = self._heads.get()
            if key is None:
                return
            for attempt in range(200):
                with self._lock:
                    size = self._expected.get(key, (None, True))[0]
                try:
                    reply = self._client.head_object(Bucket=BUCKET, Key=key)
                    length = int(reply["ContentLength"])
                except Exception:  # not there (yet): try again
                    length = -1
                if size is not None and length == size:
                    now = time.time()
                    with self._lock:
                        self.visible[key] = self.renamed[key] if attempt == 0 else now
                        self.headed.add(key)
                    break
                self.head_retries += 1
                time.sleep(0.05)
            else:
                self.problems.append(f"HeadObject never confirmed {key} (size {size})")

    def arrived(self, keys: Sequence[str]) -> bool:
        """Whether every key has appeared (and, if it is to be, been confirmed by HeadObject)."""
        with self._lock:
            return all(
                key in self.visible
                if self._expected.get(key, (0, True))[1]
                else key in self.renamed
                for key in keys
            )

    def confirm_by_listing(self, prefix: str, keys: Sequence[str]) -> None:
        """Confirms the keys not confirmed by HeadObject with one (paginated) listing."""
        listed: dict[str, int] = {}
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                listed[item["Key"]] = int(item["Size"])
        with self._lock:
            for key in keys:
                if key in self.visible:
                    continue
                if listed.get(key) == self._expected[key][0] and key in self.renamed:
                    self.visible[key] = self.renamed[key]
                else:
                    self.problems.append(f"{key}: listed with size {listed.get(key)}")

    def close(self) -> None:
        self._stop.set()
        self._heads.put(None)
        for thread in self._threads:
            thread.join(5)
        os.close(self._fd)


# ---------------------------------------------------------------- the daemon


@dataclass
class LogSummary:
    lines: int = 0
    events: Counter[str] = field(default_factory=Counter)
    levels: Counter[str] = field(default_factory=Counter)
    scanned: list[tuple[float, float]] = field(default_factory=list)
    """(log time, seconds the walk took) of every walk of the whole watch."""
    notable: list[str] = field(default_factory=list)
    """Warnings, errors and lines that are not JSON (the first few)."""


class Daemon:
    """`cpg-daemon run -c CONFIG` as a subprocess, with a NOTIFY_SOCKET of our own."""

    def __init__(
        self, name: str, run_dir: Path, watch_path: Path, endpoint: str, settle: float, logs: Path
    ) -> None:
        self.name = name
        self.state = run_dir / "state"
        self.config = run_dir / "config.toml"
        self.log_path = logs / f"{name}.log"
        scratch = SCRATCH / str(os.getpid())
        scratch.mkdir(parents=True, exist_ok=True)
        self.socket = scratch / f"{name}.sock"
        self.notify_path = scratch / f"{name}.notify"
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            "[daemon]\n"
            f'state_dir = "{self.state}"\n'
            f'socket = "{self.socket}"\n'
            'log_format = "json"\n'
            'log_level = "debug"\n\n'
            "[s3]\n"
            f'endpoint_url = "{endpoint}"\n'
            'region = "us-east-1"\n\n'
            "[credentials]\n"
            'source = "environment"\n\n'
            "[[watch]]\n"
            f'name = "{WATCH}"\n'
            f'path = "{watch_path}"\n'
            f'destination = "s3://{BUCKET}/{PREFIX}"\n'
            f"settle = {settle}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.spawned = 0.0
        self.ready_at: float | None = None
        self.notifications: list[tuple[float, str]] = []
        self.summary = LogSummary()
        self._log_offset = 0
        self._notify: socket.socket | None = None
        self._notify_thread: threading.Thread | None = None
        self.rusage: Any = None
        self.exit_code: int | None = None

    def argv(self) -> list[str]:
        return [str(CPG), "run", "-c", str(self.config)]

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "CPG_", "NOTIFY_", "WATCHDOG_"))
        }
        env.update(
            AWS_ACCESS_KEY_ID=KEYS,
            AWS_SECRET_ACCESS_KEY=KEYS,
            AWS_REGION="us-east-1",
            AWS_CONFIG_FILE=str(self.state.parent / "aws-config"),  # absent: nothing leaks in
            AWS_SHARED_CREDENTIALS_FILE=str(self.state.parent / "aws-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
            NOTIFY_SOCKET=str(self.notify_path),
        )
        return env

    def start(self) -> None:
        self.notify_path.unlink(missing_ok=True)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(self.notify_path))
        self._notify.settimeout(0.2)
        self._notify_thread = threading.Thread(target=self._listen, daemon=True)
        self._notify_thread.start()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = 0
        with self.log_path.open("wb") as out:
            self.spawned = time.time()
            self.process = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env()
            )

    def _listen(self) -> None:
        assert self._notify is not None
        while True:
            try:
                data = self._notify.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.time()
            text = data.decode(errors="replace")
            self.notifications.append((now, text))
            if self.ready_at is None and "READY=1" in text.split("\n"):
                self.ready_at = now

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"cpg-daemon exited early; last log lines: {tail}")

    def wait_ready(self, timeout: float) -> float:
        def ready() -> bool:
            self.check_alive()
            return self.ready_at is not None

        wait_until(ready, timeout, "READY=1")
        assert self.ready_at is not None
        return self.ready_at - self.spawned

    def read_log(self) -> LogSummary:
        """Takes in the log lines written since the last call."""
        with self.log_path.open("rb") as handle:
            handle.seek(self._log_offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n") + 1
        self._log_offset += end
        summary = self.summary
        for raw in chunk[:end].splitlines():
            summary.lines += 1
            try:
                event = json.loads(raw)
            except ValueError:
                if len(summary.notable) < 20:
                    summary.notable.append(raw.decode(errors="replace")[:300])
                continue
            name, level = str(event.get("event", "?")), str(event.get("level", "?"))
            summary.events[name] += 1
            summary.levels[level] += 1
            if name == "scanned" and "seconds" in event:
                at = datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
                summary.scanned.append((at.timestamp(), float(event["seconds"])))
            if level in ("warning", "error", "critical") and len(summary.notable) < 20:
                summary.notable.append(raw.decode(errors="replace")[:300])
        return summary

    def status(self, timeout: float = 120) -> dict[str, Any]:
        from cpg_daemon.ops import control

        result: dict[str, Any] = control.request(self.socket, "status", timeout=timeout)
        return result

    def memory_mib(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MiB."""
        assert self.process is not None
        values = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) / 1024
        return values["VmRSS"], values["VmHWM"]

    def cpu_s(self) -> float:
        assert self.process is not None
        return proc_cpu_s(self.process.pid)

    def stop(self, timeout: float = 120) -> None:
        if self.process is not None and self.exit_code is None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while True:
                pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
                if pid:
                    self.rusage = usage
                    self.exit_code = os.waitstatus_to_exitcode(status)
                    self.process.returncode = self.exit_code
                    break
                if time.monotonic() > deadline:
                    self.process.kill()
                    deadline = time.monotonic() + 30
                time.sleep(0.05)
        if self._notify is not None:
            self._notify.close()
            self._notify = None
            if self._notify_thread is not None:
                self._notify_thread.join(2)
        self.notify_path.unlink(missing_ok=True)
        self.read_log()

    def journal_rows(self, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(f"file:{self.state / 'journal.sqlite3'}?mode=ro", uri=True)
        try:
            return db.execute(f"SELECT {', '.join(columns)} FROM files ORDER BY id").fetchall()
        finally:
            db.close()


_RUNNING: list[Daemon | Server | RelayProcess] = []


def _cleanup() -> None:
    """Stops what this script started (by its own handles) when a run fails."""
    for item in reversed(_RUNNING):
        with contextlib.suppress(Exception):
            item.stop()
    _RUNNING.clear()


def stop_all(*items: Daemon | Server | RelayProcess) -> None:
    for item in items:
        item.stop()
        if item in _RUNNING:
            _RUNNING.remove(item)


def fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


# ---------------------------------------------------------------- fixture check


def fixture_check(out: Path, size: int, settle: float) -> dict[str, Any]:
    """The daemon uploads a small tree for real; its rows must equal the synthesized ones."""
    tree = Tree(out / "data" / "fixture", 40, 20, size)
    tree.make()
    run = fresh(out / "run" / "fixture")
    server = Server(run / "served", run / "server.log")
    server.start()
    _RUNNING.append(server)
    daemon = Daemon("fixture", run, tree.root, server.endpoint, settle, out / "logs")
    daemon.start()
    _RUNNING.append(daemon)
    daemon.wait_ready(120)

    def done() -> bool:
        status = daemon.status()
        return status["files"]["uploaded"] == tree.files and len(
            status["batches"]["completed"]
        ) == len(tree.folders())

    wait_until(done, 120, "the fixture to be uploaded and its batches completed", step=0.5)
    stop_all(daemon, server)
    real = daemon.journal_rows((*JOURNAL_COLUMNS, *TIME_COLUMNS))
    collected: dict[str, list[Any]] = {}
    synth = list(synthesized_rows(tree.root, settle, collected))
    synth_batches = batch_rows(collected, settle)
    n = len(JOURNAL_COLUMNS)
    by_path = {row[1]: row for row in real}
    mismatches = []
    for row in synth:
        other = by_path.get(row[1])
        if other is None:
            mismatches.append(f"{os.fsdecode(row[1])}: not in the daemon's journal")
            continue
        for name, mine, theirs in zip(JOURNAL_COLUMNS, row[:n], other[:n], strict=True):
            if mine != theirs:
                mismatches.append(f"{os.fsdecode(row[1])}: {name} {mine!r} != {theirs!r}")
        if any(value is None for value in other[n:]):
            mismatches.append(f"{os.fsdecode(row[1])}: a time column is NULL")
    db = sqlite3.connect(f"file:{daemon.state / 'journal.sqlite3'}?mode=ro", uri=True)
    real_batches = {
        row[1]: row
        for row in db.execute(f"SELECT {', '.join(BATCH_COLUMNS)}, last_change FROM batches")
    }
    changes = dict(
        db.execute(
            "SELECT substr(CAST(rel_path AS TEXT), 1, instr(CAST(rel_path AS TEXT), '/') - 1), "
            "MAX(updated_at) FROM files GROUP BY 1"
        ).fetchall()
    )
    db.close()
    for row in synth_batches:
        mine = tuple(row[: len(BATCH_COLUMNS)])
        theirs = real_batches.get(row[1])
        if theirs is None or tuple(theirs[:-1]) != mine:
            mismatches.append(f"batch {row[1]}: {mine!r} != {theirs!r}")
        elif theirs[-1] != changes.get(row[1]):
            mismatches.append(f"batch {row[1]}: last_change is not the latest updated_at")
    result = {
        "files": len(synth),
        "batches": len(synth_batches),
        "columns": list(JOURNAL_COLUMNS),
        "mismatches": mismatches[:20],
        "ok": not mismatches and len(real) == len(synth),
    }
    log(
        f"fixture check: {len(synth)} files, {len(synth_batches)} batches: "
        + ("rows identical to a real upload's" if result["ok"] else f"MISMATCH {mismatches[:3]}")
    )
    return result


# ---------------------------------------------------------------- scenario: latency


@dataclass
class Written:
    key: str
    size: int
    settled_at: float


def latencies(
    files: list[Written], watcher: ServedWatcher, journal: dict[str, tuple[float, float]]
) -> dict[str, Any]:
    visible = [watcher.visible[f.key] - f.settled_at for f in files]
    to_journal = [journal[f.key][0] - f.settled_at for f in files if f.key in journal]
    to_upload = [journal[f.key][1] - journal[f.key][0] for f in files if f.key in journal]
    head_lag = [
        watcher.visible[f.key] - watcher.renamed[f.key] for f in files if f.key in watcher.headed
    ]

    def spread(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        return {
            "p50": percentile(values, 50),
            "p95": percentile(values, 95),
            "max": max(values),
            "min": min(values),
        }

    return {
        "files": len(files),
        "settled_to_visible": spread(visible),
        "settled_to_journaled": spread(to_journal),
        "journaled_to_uploaded": spread(to_upload),
        "rename_to_head_confirmed": spread(head_lag),
        "confirmed_by_head": len(head_lag),
    }


def run_burst(
    name: str,
    size: int,
    count: int,
    args: argparse.Namespace,
    watch: Path,
    watcher: ServedWatcher,
    cpu: Callable[[], dict[str, float]],
) -> dict[str, Any]:
    """Writes `count` files of `size` bytes into a new folder at once; waits until all show."""
    rels = [f"{name}/{well(i)}" for i in range(count)]
    every = max(1, len(rels) // max(1, args.burst_heads))
    for i, rel in enumerate(rels):  # HeadObject for a sample, a listing for the rest
        watcher.expect(PREFIX + rel, size, head=i % every == 0)
    before = cpu()
    (watch / name).mkdir()
    started = time.time()
    for rel in rels:
        write_file(watch / rel, content(rel, size))
    written = time.time() - started
    files = [  # stat after all writes: the mtimes are what they are
        Written(PREFIX + rel, size, os.stat(watch / rel).st_mtime_ns / 1e9 + args.settle)
        for rel in rels
    ]
    keys = [w.key for w in files]
    wait_until(lambda: watcher.arrived(keys), args.burst_timeout, f"{name} to be visible", 0.5)
    after = cpu()
    spent = {k: after[k] - before[k] for k in before}
    watcher.confirm_by_listing(f"{PREFIX}{name}/", keys)
    last = max(watcher.renamed[k] for k in keys)
    log(f"latency: {name}: {len(files):,} files visible {last - started:.1f} s after")
    return {
        "name": name,
        "size": size,
        "files": files,
        "write_s": written,
        "drain_s": last - started,
        "after_last_settled_s": last - max(w.settled_at for w in files),
        "files_per_s": len(files) / (last - started),
        "mb_per_s": len(files) * size / 1e6 / (last - started),
        "cpu": spent,
        "load": load(),
    }


def scenario_latency(args: argparse.Namespace, out: Path, link: LinkSpec) -> dict[str, Any]:
    """One daemon: the idle files one at a time, then ``args.runs`` bursts of small files
    and as many of plate files, 10 s apart; over a link, through a relay to the server."""
    run = fresh(out / "run" / "latency")
    watch = fresh(run / "watch")
    server = Server(run / "served", run / "server.log")
    server.start()
    _RUNNING.append(server)
    burst_names = [f"Burst{n}" for n in range(1, args.runs + 1)]
    plate_names = [f"Plate{n}" for n in range(1, args.runs + 1)] if args.plate_files else []
    for folder in ("Idle", *burst_names, *plate_names):  # the watcher follows them from now
        (server.served / BUCKET / PREFIX / folder).mkdir(parents=True)
    watcher = ServedWatcher(server.served / BUCKET, server.endpoint)
    relay = None
    endpoint = server.endpoint
    if link.relayed:
        lifetime = args.burst_timeout * 2 * args.runs + args.idle_files * 150 + 600
        relay = RelayProcess(server.port, link, lifetime, out / "logs" / f"relay-{link.name}.log")
        _RUNNING.append(relay)
        endpoint = f"http://{relay.endpoint}"
    daemon = Daemon("latency", run, watch, endpoint, args.settle, out / "logs")
    daemon.start()
    _RUNNING.append(daemon)
    result: dict[str, Any] = {"link": link.name, "ready_s": daemon.wait_ready(120)}
    time.sleep(2.0)  # its two start-up walks of the empty watch are over
    assert server.process is not None
    server_pid = server.process.pid
    relay_pid = relay.process.pid if relay else None

    def cpu() -> dict[str, float]:
        return {
            "daemon": daemon.cpu_s(),
            "server": proc_cpu_s(server_pid),
            "relay": proc_cpu_s(relay_pid) if relay_pid else 0.0,
            "bench": time.process_time(),
        }

    bursts: list[dict[str, Any]] = []
    idle: list[Written] = []
    try:
        # (a) idle: one file at a time
        (watch / "Idle").mkdir()
        rng = random.Random(5)
        before = cpu()
        for i in range(args.idle_files):
            rel = f"Idle/{well(i)}"
            data = rng.randbytes(args.idle_size)
            key = PREFIX + rel
            watcher.expect(key, len(data))
            write_file(watch / rel, data)
            mtime = os.stat(watch / rel).st_mtime_ns / 1e9
            idle.append(Written(key, len(data), mtime + args.settle))
            wait_until(lambda key=key: watcher.arrived([key]), 120, f"{rel} to be visible")
            time.sleep(args.idle_gap)
        after = cpu()
        result["idle_cpu"] = {k: after[k] - before[k] for k in before}
        log(f"latency: {len(idle)} idle files visible")
        # (b) bursts: all at once into a new folder, small files, then plate files
        shapes = [(name, args.small_size, args.burst_files) for name in burst_names]
        shapes += [(name, args.plate_size, args.plate_files) for name in plate_names]
        for name, size, count in shapes:
            time.sleep(10.0)  # the batch tracker's look at the previous folder is over
            bursts.append(run_burst(name, size, count, args, watch, watcher, cpu))
        status = daemon.status()
        rss, hwm = daemon.memory_mib()
    finally:
        watcher.close()
        stop_all(daemon, *([relay] if relay else []), server)
    rows = daemon.journal_rows(("key", "discovered_at", "uploaded_at"))
    journal = {key: (disc, up) for key, disc, up in rows if up is not None}
    for burst in bursts:
        burst["latency"] = latencies(burst.pop("files"), watcher, journal)
    result.update(
        idle=latencies(idle, watcher, journal),
        bursts=bursts,
        rss_mib=rss,
        hwm_mib=hwm,
        status_files=status["files"],
        objects=len(watcher.visible),
        expected_objects=len(idle)
        + args.burst_files * len(burst_names)
        + args.plate_files * len(plate_names),
        head_retries=watcher.head_retries,
        watcher_problems=watcher.problems[:10],
        log=log_digest(daemon.summary),
        exit_code=daemon.exit_code,
        relay=relay.counters if relay else {},
    )
    return result


def log_digest(summary: LogSummary) -> dict[str, Any]:
    return {
        "lines": summary.lines,
        "levels": dict(summary.levels),
        "events": dict(summary.events.most_common(15)),
        "notable": summary.notable[:10],
    }


# ---------------------------------------------------------------- scenario: restart


def scenario_restart(
    args: argparse.Namespace, out: Path, tree: Tree, journal: Path, run_no: int
) -> dict[str, Any]:
    run = fresh(out / "run" / "restart")
    (run / "state").mkdir()
    shutil.copyfile(journal, run / "state" / "journal.sqlite3")
    server = Server(run / "served", run / "server.log")
    server.start()
    _RUNNING.append(server)
    daemon = Daemon(f"restart-{run_no}", run, tree.root, server.endpoint, args.settle, out / "logs")
    result: dict[str, Any] = {"run": run_no}
    try:
        daemon.start()
        _RUNNING.append(daemon)
        result["ready_s"] = daemon.wait_ready(args.start_timeout)
        result["hwm_at_ready_mib"] = daemon.memory_mib()[1]

        def walks(n: int) -> Callable[[], bool]:
            def check() -> bool:
                daemon.check_alive()
                return len(daemon.read_log().scanned) >= n

            return check

        wait_until(walks(1), args.start_timeout, "the first walk", step=0.1)
        first_at, first_seconds = daemon.summary.scanned[0]
        result["first_walk_done_s"] = first_at - daemon.spawned
        result["first_walk_s"] = first_seconds
        result["hwm_at_first_walk_mib"] = daemon.memory_mib()[1]
        status = daemon.status()
        result["status_idle_s"] = time.time() - daemon.spawned
        result["status_after_first_walk"] = status["files"]
        if status["files"]["queued"] or status["files"]["uploading"]:
            result["problem"] = f"files queued after the first walk: {status['files']}"

            def idle() -> bool:
                files = daemon.status()["files"]
                return not files["queued"] and not files["uploading"]

            wait_until(idle, args.start_timeout, "nothing queued", step=1.0)
            result["status_idle_s"] = time.time() - daemon.spawned
        # The first walk waits for inotify, so a start walks once; give a second walk
        # (the daemon before that change walked again once inotify was up) time to show.
        time.sleep(max(10.0, 2 * first_seconds))
        daemon.read_log()
        result["walks_at_start"] = len(daemon.summary.scanned)
        if result["walks_at_start"] >= 2:
            second_at, second_seconds = daemon.summary.scanned[1]
            result["second_walk_done_s"] = second_at - daemon.spawned
            result["second_walk_s"] = second_seconds
        result["rss_mib"], result["hwm_mib"] = daemon.memory_mib()
        result["cpu_s"] = daemon.cpu_s()
        time.sleep(args.idle_window)
        result["idle_cpu_pct"] = (daemon.cpu_s() - result["cpu_s"]) / args.idle_window * 100
        asked = time.monotonic()
        final = daemon.status()
        result["status_call_s"] = time.monotonic() - asked
        result["status_final"] = final["files"]
        result["batches_following"] = final["batches"]["following"]
    finally:
        stop_all(daemon, server)
    result["exit_code"] = daemon.exit_code
    result["objects_on_server"] = server.objects()
    result["uploaded_events"] = daemon.summary.events.get("uploaded", 0)
    result["batch_complete_events"] = daemon.summary.events.get("batch_complete", 0)
    result["walks"] = len(daemon.summary.scanned)
    result["log"] = log_digest(daemon.summary)
    final_files = result["status_final"]
    result["nothing_new"] = (
        result["objects_on_server"] == 0
        and result["uploaded_events"] == 0
        and final_files["uploaded"] == tree.files
        and final_files["queued"] == final_files["uploading"] == final_files["failed"] == 0
    )
    log(
        f"restart run {run_no}: ready {result['ready_s']:.2f} s, first walk done "
        f"{result['first_walk_done_s']:.2f} s, idle in status {result['status_idle_s']:.2f} s, "
        f"walks {result['walks_at_start']}, peak RSS "
        f"{result['hwm_mib']:.0f} MiB, CPU {result['cpu_s']:.1f} s, nothing new: "
        f"{result['nothing_new']}"
    )
    return result


# ---------------------------------------------------------------- scenario: queued


def restore(tree: Tree, watch: Path) -> None:
    """Moves the tree's folders back from the watch (after a run, or one that failed)."""
    for name in tree.folders():
        if (watch / name).is_dir() and not (tree.root / name).exists():
            tree.root.mkdir(parents=True, exist_ok=True)
            os.rename(watch / name, tree.root / name)


def scenario_queued(args: argparse.Namespace, out: Path, tree: Tree, run_no: int) -> dict[str, Any]:
    run = out / "run" / "queued"
    restore(tree, run / "watch")
    run = fresh(run)
    watch = fresh(run / "watch")
    server = Server(run / "served", run / "server.log")
    server.start()
    _RUNNING.append(server)
    daemon = Daemon(f"queued-{run_no}", run, watch, server.endpoint, args.settle, out / "logs")
    result: dict[str, Any] = {"run": run_no}
    try:
        daemon.start()
        _RUNNING.append(daemon)
        result["ready_s"] = daemon.wait_ready(args.start_timeout)
        pause = subprocess.run(
            [str(CPG), "pause", "-s", str(daemon.socket)],
            capture_output=True,
            text=True,
            env=daemon.env(),
            timeout=60,
        )
        if pause.returncode != 0:
            raise RuntimeError(f"cpg-daemon pause failed: {pause.stderr.strip()}")
        result["hwm_before_mib"] = daemon.memory_mib()[1]
        moved = time.time()
        for name in tree.folders():
            os.rename(tree.root / name, watch / name)

        def all_queued() -> bool:
            daemon.check_alive()
            return bool(daemon.status()["files"]["queued"] >= tree.files)

        wait_until(all_queued, args.start_timeout, "every file to be queued", step=1.0)
        result["queued_after_s"] = time.time() - moved
        result["rss_mib"], result["hwm_mib"] = daemon.memory_mib()
        time.sleep(5.0)
        result["rss_later_mib"], result["hwm_later_mib"] = daemon.memory_mib()
        result["cpu_s"] = daemon.cpu_s()
        status = daemon.status()
        result["status"] = status["files"]
        result["state"] = status["state"]
    finally:
        stop_all(daemon, server)
        restore(tree, watch)
    result["exit_code"] = daemon.exit_code
    result["objects_on_server"] = server.objects()
    result["log"] = log_digest(daemon.summary)
    log(
        f"queued run {run_no}: {result['status']['queued']:,} queued after "
        f"{result['queued_after_s']:.1f} s; RSS {result['rss_mib']:.0f} MiB, peak "
        f"{result['hwm_later_mib']:.0f} MiB"
    )
    return result


# ---------------------------------------------------------------- report


def versions() -> dict[str, str]:
    return {
        "cpg-daemon": cpg_daemon_version(
            ("cpg-daemon", "aioboto3", "aiobotocore", "botocore", "watchfiles", "anyio")
        ),
        "cpg-daemon Python": first_line([str(MAIN_VENV / "bin" / "python"), "-VV"]),
        "SQLite": sqlite3.sqlite_version,
        "rclone (server)": first_line([str(RCLONE), "version"]),
    }


def code_fingerprint() -> dict[str, str]:
    """sha256 of every file of the package: what `git f64f92a + changes` cannot pin down."""
    return {
        str(path.relative_to(ROOT)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((ROOT / "cpg_daemon").rglob("*.py"))
    }


def fingerprint_digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def machine_facts(out: Path) -> dict[str, str]:
    limits = ", ".join(
        f"{name}={Path(f'/proc/sys/fs/inotify/{name}').read_text().strip()}"
        for name in ("max_user_watches", "max_queued_events")
    )
    return {
        **machine(),
        "file system of bench/out": first_line(["stat", "-f", "-c", "%T", str(out)]),
        "inotify": limits,
    }


def _size_text(size: int) -> str:
    return f"{size / MiB:g} MiB" if size >= MiB else f"{size / KiB:g} KiB"


def _burst_kinds(lat: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The bursts of small files ("burst") and of plate files ("plate burst"), if any."""
    kinds = [
        ("burst", [b for b in lat["bursts"] if b["name"].startswith("Burst")]),
        ("plate burst", [b for b in lat["bursts"] if b["name"].startswith("Plate")]),
    ]
    return [(kind, bursts) for kind, bursts in kinds if bursts]


def render(report: dict[str, Any]) -> str:
    args = report["args"]
    lines = [
        f"## cpg-daemon run: {report['title']}",
        "",
        f"Started {report['started']}; {report['seconds'] / 60:.1f} min in all. "
        f"Command: `{report['argv']}`",
        "",
        f"Load average (1, 5, 15 min) at start: {report['load_start']}; at the end: "
        f"{report['load_end']}. The machine is shared and its 2 cores also run the server.",
        "",
        "| figure | value | target | met |",
        "| --- | ---: | ---: | --- |",
    ]

    def row(name: str, value: str, target: str = "", met: bool | None = None) -> None:
        mark = "" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {name} | {value} | {target} | {mark} |")

    def spread(figures: dict[str, float]) -> str:
        if not figures:
            return "-"
        return f"{figures['p50']:.3f} / {figures['p95']:.3f} / {figures['max']:.3f}"

    lats: list[dict[str, Any]] = report.get("latency") or []
    several = len(lats) > 1 or any(lat["link"] != "loopback" for lat in lats)
    for lat in lats:
        over = f" over {lat['link']}" if several else ""
        idle = lat["idle"]
        if idle["files"]:
            row(
                f"idle{over}: settled -> visible, p50 / p95 / max s ({idle['files']} x "
                f"{args['idle_size'] / MiB:g} MiB, one at a time)",
                spread(idle["settled_to_visible"]),
            )
        for kind, bursts in _burst_kinds(lat):
            of = f"median of {len(bursts)} bursts" if len(bursts) > 1 else "1 burst"
            first = bursts[0]
            shape = f"{first['latency']['files']:,} x {_size_text(first['size'])}"

            def burst_median(name: str, bursts: list[dict[str, Any]] = bursts) -> float | None:
                return median(b["latency"]["settled_to_visible"].get(name) for b in bursts)

            row(
                f"{kind}{over}: settled -> visible, p50 / p95 / max s ({shape} at once; {of})",
                f"{fmt(burst_median('p50'), 3)} / {fmt(burst_median('p95'), 3)} / "
                f"{fmt(burst_median('max'), 3)}",
            )
            per_file = median(b["cpu"]["daemon"] / b["latency"]["files"] * 1000 for b in bursts)
            row(
                f"{kind}{over}: drain, first write -> last object visible, s ({of}); "
                "files/s; MB/s; daemon CPU per file, ms",
                f"{fmt(median(b['drain_s'] for b in bursts), 1)}; "
                f"{fmt(median(b['files_per_s'] for b in bursts), 0)}; "
                f"{fmt(median(b['mb_per_s'] for b in bursts), 1)}; {fmt(per_file, 2)}",
            )
    restarts = report.get("restart") or []
    if restarts:
        n = report["journal_files"]
        runs = f"median of {len(restarts)}"
        ready = median(r["ready_s"] for r in restarts)
        idle_s = median(max(r["first_walk_done_s"], r["status_idle_s"]) for r in restarts)
        hwm = max(r["hwm_mib"] for r in restarts)
        row(f"restart over {n:,} uploaded: spawn -> READY=1, s ({runs})", fmt(ready))
        row(
            "restart: spawn -> first walk done and status shows nothing queued, s",
            fmt(idle_s),
            f"<= {TARGETS['restart_s']:g}",
            idle_s is not None and idle_s <= TARGETS["restart_s"],
        )
        row(
            "restart: full walks of the tree at start (the first waits for inotify)",
            ", ".join(str(r["walks_at_start"]) for r in restarts),
        )
        row(
            "restart: peak RSS (VmHWM, largest of the runs), MiB",
            f"{hwm:.0f}",
            f"<= {TARGETS['restart_rss_mib']:g}",
            hwm <= TARGETS["restart_rss_mib"],
        )
        row(
            "restart: daemon CPU until then, s",
            fmt(median(r["cpu_s"] for r in restarts), 1),
        )
        row(
            f"restart: idle CPU after start-up, % of a core, over {args['idle_window']:g} s; "
            "one `status` answer, s",
            f"{fmt(median(r['idle_cpu_pct'] for r in restarts), 1)}; "
            f"{fmt(median(r['status_call_s'] for r in restarts), 3)}",
        )
        row(
            "restart: uploaded nothing new (no object, no `uploaded` event, all still uploaded)",
            "yes" if all(r["nothing_new"] for r in restarts) else "**no**",
        )
    queued = report.get("queued") or []
    if queued:
        q = report["queued_files"]
        worst = max(max(r["hwm_mib"], r["hwm_later_mib"]) for r in queued)
        row(
            f"{q:,} queued (paused): VmRSS once all queued, MiB (median of {len(queued)})",
            fmt(median(r["rss_mib"] for r in queued), 0),
        )
        row(
            f"{q:,} queued: peak RSS (VmHWM, largest of the runs), MiB",
            f"{worst:.0f}",
            f"<= {TARGETS['queued_rss_mib']:g}",
            worst <= TARGETS["queued_rss_mib"],
        )
        row(
            "queued: folders moved in -> all queued in status, s",
            fmt(median(r["queued_after_s"] for r in queued), 1),
        )
    fixture = report.get("fixture")
    if fixture:
        lines += [
            "",
            f"Fixture check: the daemon uploaded {fixture['files']} files in "
            f"{fixture['batches']} folders for real; its journal rows "
            + (
                "equal the synthesized rows in every column but the id and the times "
                f"({', '.join(fixture['columns'])}), and its `batches` rows too."
                if fixture["ok"]
                else f"DIFFER from the synthesized ones: {fixture['mismatches'][:5]}"
            ),
        ]
    if several:
        lines += [
            "",
            "Links (bench/relay.py between the daemon and the server; see its docstring):",
        ]
        lines += ["", *[f"- {name}: {text}" for name, text in report["links"].items()]]
    for lat in lats:
        bursts = lat["bursts"]
        over = f" over {lat['link']}" if several else ""
        lines += [
            "",
            f"### Latency breakdown{over}",
            "",
            "Seconds, p50 / p95 / max. settled -> journaled: the daemon's settle tracker "
            "(journal `discovered_at`); journaled -> uploaded: queue and PutObject "
            "(`uploaded_at`); rename -> confirmed: this script's HeadObject after the "
            "object appeared, over the objects it checked (every idle one, a sample of each "
            "burst); 0 when the first HeadObject succeeded.",
            "",
            "| phase | settled -> visible | settled -> journaled | journaled -> uploaded "
            "| rename -> confirmed |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        phases = [("idle", lat["idle"])] if lat["idle"]["files"] else []
        phases += [(b["name"], b["latency"]) for b in bursts]
        for phase, d in phases:
            lines.append(
                f"| {phase} ({d['files']:,} files) | {spread(d['settled_to_visible'])} | "
                f"{spread(d['settled_to_journaled'])} | {spread(d['journaled_to_uploaded'])} | "
                f"{spread(d['rename_to_head_confirmed'])} |"
            )
        lines += [
            "",
            "| burst | files x size | written in s | drain s | last settled -> last visible s "
            "| files/s | MB/s | daemon CPU ms per file | CPU s: daemon | server | relay "
            "| this script | load average after |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| --- |",
        ]
        for b in bursts:
            files = b["latency"]["files"]
            lines.append(
                f"| {b['name']} | {files:,} x {_size_text(b['size'])} | {b['write_s']:.2f} | "
                f"{b['drain_s']:.1f} | {b['after_last_settled_s']:.1f} | "
                f"{b['files_per_s']:.0f} | {b['mb_per_s']:.1f} | "
                f"{b['cpu']['daemon'] / files * 1000:.2f} | "
                f"{b['cpu']['daemon']:.1f} | {b['cpu']['server']:.1f} | "
                f"{b['cpu']['relay']:.1f} | {b['cpu']['bench']:.1f} | {b['load']} |"
            )
        idle_cpu = lat["idle_cpu"]
        heads = lat["idle"]["confirmed_by_head"] + sum(
            b["latency"]["confirmed_by_head"] for b in bursts
        )
        counters = lat.get("relay") or {}
        relayed = (
            f" The relay counted {counters['connections']:,} connections and "
            f"{counters['replies']:,} requests answered."
            if counters
            else ""
        )
        lines += [
            "",
            f"Idle phase CPU seconds: daemon {idle_cpu['daemon']:.1f}, server "
            f"{idle_cpu['server']:.1f}, this script {idle_cpu['bench']:.1f}. Daemon: READY "
            f"{lat['ready_s']:.2f} s after spawn, RSS {lat['rss_mib']:.0f} MiB at the end, "
            f"peak {lat['hwm_mib']:.0f} MiB. Objects seen: {lat['objects']:,} of "
            f"{lat['expected_objects']:,}, confirmed by HeadObject: {heads:,} (every idle "
            f"one, a sample of each burst), the rest by ListObjectsV2; status at the end: "
            f"{lat['status_files']}.{relayed}",
            "",
        ]
    if restarts:
        lines += [
            "",
            f"### Restart over {report['journal_files']:,} uploaded files, per run",
            "",
            "Seconds from spawn; MiB. `idle` is when `status` (asked once the first walk "
            "ended) showed nothing queued or uploading.",
            "",
            "| run | READY | first walk done (walk s) | idle | walks at start "
            "| HWM at READY | HWM | CPU s | idle CPU % after | objects | `uploaded` events |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in restarts:
            lines.append(
                f"| {r['run']} | {r['ready_s']:.2f} | {r['first_walk_done_s']:.2f} "
                f"({r['first_walk_s']:.2f}) | {r['status_idle_s']:.2f} | "
                f"{r['walks_at_start']} | "
                f"{r['hwm_at_ready_mib']:.0f} | {r['hwm_mib']:.0f} | {r['cpu_s']:.1f} | "
                f"{r['idle_cpu_pct']:.1f} | {r['objects_on_server']} | {r['uploaded_events']} |"
            )
    if queued:
        lines += [
            "",
            f"### {report['queued_files']:,} files queued while paused, per run",
            "",
            "| run | moved in -> all queued s | RSS | HWM | RSS 5 s later | HWM 5 s later "
            "| CPU s | status |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in queued:
            lines.append(
                f"| {r['run']} | {r['queued_after_s']:.1f} | {r['rss_mib']:.0f} | "
                f"{r['hwm_mib']:.0f} | {r['rss_later_mib']:.0f} | {r['hwm_later_mib']:.0f} | "
                f"{r['cpu_s']:.1f} | {r['state']} "
                f"{r['status']} |"
            )
    notes = report.get("notes") or []
    if notes:
        lines += ["", "### Notes", "", *[f"- {note}" for note in notes]]
    lines += ["", "### Machine", ""]
    lines += [f"- {k}: {v}" for k, v in report["machine"].items()]
    lines += ["", "### Versions", ""]
    lines += [f"- {k}: {v}" for k, v in report["versions"].items()]
    lines += [
        "",
        "### Commands",
        "",
        "Server, restarted on an empty folder for every run: `bench/.venv/bin/rclone serve "
        "s3 DIR --addr 127.0.0.1:PORT --auth-key bench,bench --config /dev/null` (with "
        "DIR/bench made first). Daemon, with AWS_ACCESS_KEY_ID=AWS_SECRET_ACCESS_KEY=bench, "
        "AWS_REGION=us-east-1 and NOTIFY_SOCKET set: `.venv/bin/cpg-daemon run -c "
        "bench/out/daemon/run/SCENARIO/config.toml`, whose configuration is:",
        "",
        "```toml",
        report["config_example"].strip(),
        "```",
        "",
        *(
            [
                "Over a link other than loopback the configuration's endpoint_url is a relay's "
                "port: `python3 bench/relay.py serve --upstream 127.0.0.1:PORT --link LINK "
                "--lifetime SECONDS`, in front of the server, started before the daemon and "
                "stopped after it.",
                "",
            ]
            if report.get("links") and list(report["links"]) != ["loopback"]
            else []
        ),
        "Pausing for the queued scenario: `.venv/bin/cpg-daemon pause -s SOCKET`; status "
        "through the control socket (cpg_daemon.ops.control.request, what `cpg-daemon status "
        "--json` sends).",
    ]
    return "\n".join(lines)


HEADER = """# Benchmark results

Written by the scripts in bench/; each section is one invocation, keyed by its parameters.
"""


def write_results(path: Path, key: str, section: str) -> None:
    """Replaces this key's section of RESULTS.md (or appends it); other sections are kept."""
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    block = f"{begin}\n{section}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), flags=re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def notes_for(report: dict[str, Any]) -> list[str]:
    """Anything odd the runs showed: log warnings and errors, failures, missing objects."""
    notes = []
    start, end = report["code_start"], report["code_end"]
    changed = sorted(name for name in {*start, *end} if start.get(name) != end.get(name))
    if changed:
        notes.append(
            f"cpg_daemon/ changed while this ran ({', '.join(changed)}; content sha256 "
            f"{fingerprint_digest(start)} at the start, {fingerprint_digest(end)} at the end): "
            "daemons started at different times may have run different code"
        )
    digests = []
    for lat in report.get("latency") or []:
        name = f"latency over {lat['link']}"
        digests.append((name, lat["log"]))
        if lat["objects"] != lat["expected_objects"]:
            notes.append(f"{name}: {lat['objects']} of {lat['expected_objects']} objects seen")
        if lat["status_files"].get("failed"):
            notes.append(f"{name}: failed files in status: {lat['status_files']}")
        notes += [f"{name} (served folder): {p}" for p in lat["watcher_problems"]]
        if lat["head_retries"]:
            notes.append(f"{name}: {lat['head_retries']} HeadObject retries")
    for r in report.get("restart") or []:
        digests.append((f"restart run {r['run']}", r["log"]))
        if r.get("problem"):
            notes.append(f"restart run {r['run']}: {r['problem']}")
        if not r["nothing_new"]:
            notes.append(
                f"restart run {r['run']}: something new: {r['objects_on_server']} objects, "
                f"{r['uploaded_events']} uploaded events, status {r['status_final']}"
            )
        if r["batch_complete_events"]:
            notes.append(
                f"restart run {r['run']}: {r['batch_complete_events']} batch_complete events"
            )
        if r["walks"] != 2:
            notes.append(f"restart run {r['run']}: {r['walks']} walks of the watch")
    for r in report.get("queued") or []:
        digests.append((f"queued run {r['run']}", r["log"]))
        if r["objects_on_server"]:
            notes.append(f"queued run {r['run']}: {r['objects_on_server']} objects while paused")
    for name, digest in digests:
        bad = {k: v for k, v in digest["levels"].items() if k in ("warning", "error", "critical")}
        if bad or digest["notable"]:
            notes.append(f"{name}: log levels {bad}; first: {digest['notable'][:3]}")
    return notes


# ---------------------------------------------------------------- main


def scaled(value: int, scale: float, least: int) -> int:
    return max(least, round(value * scale))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every file count")
    parser.add_argument("--journal-files", type=int, default=1_000_000)
    parser.add_argument("--queued-files", type=int, default=100_000)
    parser.add_argument("--burst-files", type=int, default=10_000)
    parser.add_argument(
        "--plate-files",
        type=int,
        default=200,
        help="files of --plate-size in each plate burst (0: no plate bursts)",
    )
    parser.add_argument(
        "--plate-size", type=int, default=2 * MiB, help="bytes of a plate file (default 2 MiB)"
    )
    parser.add_argument(
        "--links",
        default="loopback",
        help="comma-separated links the latency scenario runs over, one daemon each: "
        "loopback, rtt<ms>[+think<ms>][+<n>mbit] (bench/relay.py; e.g. loopback,rtt40,rtt100)",
    )
    parser.add_argument("--idle-files", type=int, default=50, help="0: no idle phase")
    parser.add_argument("--idle-size", type=int, default=4 * MiB, help="bytes (default 4 MiB)")
    parser.add_argument("--idle-gap", type=float, default=1.0, help="seconds between idle files")
    parser.add_argument(
        "--small-size", type=int, default=4 * KiB, help="bytes of the many small files"
    )
    parser.add_argument("--per-folder", type=int, default=10_000, help="files per folder")
    parser.add_argument(
        "--burst-heads",
        type=int,
        default=100,
        help="burst objects confirmed by HeadObject as they appear (a listing confirms the rest)",
    )
    parser.add_argument("--settle", type=float, default=1.0, help="the watch's settle, seconds")
    parser.add_argument("--runs", type=int, default=3, help="runs of restart and queued")
    parser.add_argument(
        "--idle-window",
        type=float,
        default=20.0,
        help="seconds of idle CPU measured after a restart's second walk",
    )
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--burst-timeout", type=float, default=1800.0)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not scenarios or any(s not in SCENARIOS for s in scenarios):
        parser.error(f"--scenarios: choose from {', '.join(SCENARIOS)}")
    if args.settle <= 0:
        parser.error("--settle must be above 0 (settled_at = mtime + settle)")
    args.journal_files = scaled(args.journal_files, args.scale, 100)
    args.queued_files = scaled(args.queued_files, args.scale, 100)
    args.burst_files = scaled(args.burst_files, args.scale, 10)
    args.idle_files = scaled(args.idle_files, args.scale, 5) if args.idle_files else 0
    args.plate_files = scaled(args.plate_files, args.scale, 5) if args.plate_files else 0
    try:
        links = [LinkSpec.parse(name) for name in args.links.split(",") if name.strip()]
    except ValueError as exc:
        parser.error(f"--links: {exc}")
    if not links:
        parser.error("--links: name at least one")
    for path in (CPG, RCLONE):
        if not path.exists():
            raise SystemExit(f"{path} is missing (see README: .venv, and bench/compare.py)")

    started = time.monotonic()
    out = args.out.resolve() / "daemon"
    out.mkdir(parents=True, exist_ok=True)
    shown_argv = sys.argv[1:] if argv is None else list(argv)
    report: dict[str, Any] = {
        "title": ", ".join(scenarios),
        "started": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "argv": shlex.join([".venv/bin/python", "bench/daemon.py", *shown_argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_start": load(),
        "machine": machine_facts(out),
        "versions": versions(),
        "code_start": code_fingerprint(),
        "journal_files": args.journal_files,
        "queued_files": args.queued_files,
    }
    try:
        if "latency" in scenarios:
            report["latency"] = []
            for link in links:
                log(
                    f"latency over {link.name}: {args.idle_files} idle files, then bursts of "
                    f"{args.burst_files:,} and of {args.plate_files:,}"
                )
                report["latency"].append(scenario_latency(args, out, link))
            report["links"] = {link.name: link.describe() for link in links}
        if "restart" in scenarios:
            tree = Tree(
                out / "data" / f"journal-{args.journal_files}",
                args.journal_files,
                args.per_folder,
                args.small_size,
            )
            tree.make()
            journal = tree.root.with_name(tree.root.name + ".sqlite3")
            build_journal(tree, journal, args.settle)
            report["fixture"] = fixture_check(out, args.small_size, args.settle)
            report["restart"] = [
                scenario_restart(args, out, tree, journal, n) for n in range(1, args.runs + 1)
            ]
        if "queued" in scenarios:
            tree = Tree(
                out / "data" / f"queued-{args.queued_files}",
                args.queued_files,
                args.per_folder,
                args.small_size,
            )
            restore(tree, out / "run" / "queued" / "watch")
            tree.make()
            report["queued"] = [
                scenario_queued(args, out, tree, n) for n in range(1, args.runs + 1)
            ]
    finally:
        _cleanup()
        shutil.rmtree(SCRATCH / str(os.getpid()), ignore_errors=True)
    report["load_end"] = load()
    report["seconds"] = time.monotonic() - started
    report["code_end"] = code_fingerprint()
    report["versions"]["cpg_daemon/ content"] = (
        f"sha256 {fingerprint_digest(report['code_start'])} (of the sha256 of each .py file, "
        "per file in bench/out/daemon_*.json)"
    )
    report["notes"] = notes_for(report)
    example = out / "run" / ("latency" if "latency" in scenarios else scenarios[0])
    config = next(example.glob("config.toml"), None) or next(out.glob("run/*/config.toml"))
    report["config_example"] = config.read_text().replace(str(ROOT) + "/", "")
    report["config_example"] = re.sub(
        r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", report["config_example"]
    )
    key = (
        f"daemon scenarios={','.join(scenarios)} journal={args.journal_files} "
        f"queued={args.queued_files} burst={args.burst_files} idle={args.idle_files} "
        f"runs={args.runs}"
    )
    if "latency" in scenarios and args.plate_files:
        key += f" plate={args.plate_files}x{args.plate_size}"
    if "latency" in scenarios and args.links != "loopback":
        key += f" links={','.join(link.name for link in links)}"
    report["key"] = key
    section = render(report)
    safe = re.sub(r"[^A-Za-z0-9=.,-]+", "_", key)
    (out.parent / f"{safe}.json").write_text(json.dumps(report, indent=2, default=str))
    if not args.no_results:
        write_results(args.results, key, section)
    print()
    print(section)
    return 0


if __name__ == "__main__":
    try:
        import cpg_daemon  # noqa: F401
    except ImportError:
        python = MAIN_VENV / "bin" / "python"
        if Path(sys.executable).resolve() == python.resolve():
            raise
        os.execv(str(python), [str(python), __file__, *sys.argv[1:]])
    raise SystemExit(main())
