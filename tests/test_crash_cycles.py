"""Crash cycles: ``kill -9`` the daemon at random moments, restart it, lose nothing.

A daemon subprocess works through a mixed workload (hundreds of small files and a few
multipart files, slowed with ``s3.max_bandwidth`` so kills land mid-upload). The
workload arrives in portions, one before each start, so every cycle has work in
flight when it is killed. After the last kill a clean run finishes the work, then:

- every file is byte-identical on the server;
- no part that got a 200 for an upload id is ever sent again for that upload id;
- no object is written again (PutObject, UploadPart, Create/CompleteMultipartUpload)
  once the journal recorded it uploaded;
- no multipart upload holding parts is left open on the server (an empty one, from a
  kill between S3's reply to CreateMultipartUpload and the journal write, is counted);
- the journal is consistent: every row uploaded, no upload id, no parts rows.

The number of cycles is ``$CPG_CRASH_CYCLES`` (default 5, the CI form; 50 for the
README's figure), the seed ``$CPG_CRASH_SEED``::

    CPG_CRASH_CYCLES=50 .venv/bin/python -m pytest tests/test_crash_cycles.py -s
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import time
from collections import Counter, defaultdict
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from daemonproc import (
    ConfigMaker,
    Daemon,
    journal_rows,
    object_bytes,
    wait_until,
)
from s3server import Request, S3Server

CYCLES = int(os.environ.get("CPG_CRASH_CYCLES", "5"))
SEED = int(os.environ.get("CPG_CRASH_SEED", "8"))
MiB = 1024 * 1024
SMALL_FILES = max(300, 12 * CYCLES)
MULTIPART_FILES = max(4, CYCLES // 4)
BANDWIDTH = "6MB"
"""Slow enough that a multipart file takes a couple of seconds, so kills land mid-upload."""
PREFIX = "cpg0001-crash/broad/images/2024_01_01_Batch1/images/"

pytestmark = pytest.mark.timeout(120 + 12 * CYCLES)


def _workload(rng: random.Random) -> list[tuple[str, bytes]]:
    """(relative path, bytes) for every file, in a seeded random order."""
    files = [
        (
            f"Plate{i % 7}/r{i:04d}c01f01p01-ch{i % 5 + 1}.tiff",
            rng.randbytes(rng.randint(1, 48_000)),
        )
        for i in range(SMALL_FILES)
    ]
    files += [
        (f"Plate{i}/Plate{i}.sqlite", rng.randbytes(rng.randint(12 * MiB, 20 * MiB)))
        for i in range(MULTIPART_FILES)
    ]
    rng.shuffle(files)
    return files


def _portions(files: list[tuple[str, bytes]], count: int) -> list[list[tuple[str, bytes]]]:
    """Split the workload into ``count`` portions, the multipart files spread over them."""
    portions: list[list[tuple[str, bytes]]] = [[] for _ in range(count)]
    big = [f for f in files if len(f[1]) > 5 * MiB]
    small = [f for f in files if len(f[1]) <= 5 * MiB]
    for i, item in enumerate(big):
        portions[i * count // len(big)].append(item)
    for i, item in enumerate(small):
        portions[i % count].append(item)
    return portions


def _drop(watch: Path, portion: list[tuple[str, bytes]]) -> None:
    """Write files as a finished copy would arrive: complete, mtime in the past (settled)."""
    past = time.time() - 3600
    for rel, data in portion:
        path = watch / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (past, past))


def _parts_rows(state_dir: Path) -> int:
    with closing(sqlite3.connect(f"file:{state_dir / 'journal.sqlite3'}?mode=ro", uri=True)) as db:
        (count,) = db.execute("SELECT count(*) FROM parts").fetchone()
        return int(count)


def _uploading(state_dir: Path) -> bool:
    return any(r["state"] == "uploading" for r in journal_rows(state_dir))


def _writes(request: Request) -> bool:
    """A request that writes the object: PutObject, UploadPart, Create/Complete multipart."""
    if request.method == "PUT":
        return True
    return request.method == "POST" and ("uploads" in request.query or "uploadId" in request.query)


def _is_completion(request: Request) -> bool:
    ok = request.status == 200
    put = request.method == "PUT" and "partNumber" not in request.query
    complete = request.method == "POST" and "uploadId" in request.query
    return ok and (put or complete)


def test_kill_9_cycles_lose_nothing_and_send_nothing_twice(
    tmp_path: Path,
    layout: dict[str, Path],
    s3_server: S3Server,
    make_config: ConfigMaker,
    s3_client: Any,
    bucket: str,
) -> None:
    rng = random.Random(SEED)
    files = _workload(rng)
    portions = _portions(files, CYCLES)
    config = make_config(
        f"s3://{bucket}/{PREFIX}",
        settle="0.5s",
        s3={
            "part_size": "5MiB",
            "multipart_threshold": "5MiB",
            "max_concurrency": 4,
            "max_bandwidth": BANDWIDTH,
        },
        daemon={"log_level": "info"},
    )
    start_mark = s3_server.mark()
    uploaded_at_mark: dict[str, int] = {}
    """Key -> the request-log position by which the journal had recorded it uploaded."""
    at_kill: list[tuple[int, int]] = []
    """(files uploaded, files uploading) as each kill landed."""
    multipart_at_kill = 0
    """Kills that landed with a multipart upload open."""
    began = time.monotonic()

    def note_uploaded() -> None:
        mark = s3_server.mark()
        for row in journal_rows(layout["state"]):
            if row["state"] == "uploaded":
                uploaded_at_mark.setdefault(row["key"], mark)

    for cycle, portion in enumerate(portions):
        _drop(layout["watch"], portion)
        daemon = Daemon(config, tmp_path / f"cycle-{cycle:03d}.log")
        try:
            if rng.random() < 0.15:
                time.sleep(rng.uniform(0.1, 1.5))  # sometimes while it is starting up
            else:
                daemon.wait_for_event("running", timeout=60)
                # Mostly while files are being uploaded (if there are any left to do).
                with contextlib.suppress(AssertionError):
                    wait_until(lambda: _uploading(layout["state"]), 5, "an upload")
                time.sleep(rng.uniform(0.0, 1.0))
        finally:
            daemon.kill()
        rows = journal_rows(layout["state"])
        states = Counter(r["state"] for r in rows)
        at_kill.append((states["uploaded"], states["uploading"]))
        multipart_at_kill += any(r["upload_id"] is not None for r in rows)
        note_uploaded()

    final_mark = s3_server.mark()
    daemon = Daemon(config, tmp_path / "final.log")
    try:
        daemon.wait_for_event("running", timeout=60)
        wait_until(
            lambda: (
                (rows := journal_rows(layout["state"]))
                and len(rows) == len(files)
                and all(r["state"] == "uploaded" for r in rows)
            ),
            60 + sum(len(d) for _, d in files) / 5e6,
            "every file uploaded by the final run",
        )
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-4000:]
    seconds = time.monotonic() - began
    final_requests = len(s3_server.requests(since=final_mark))

    # Every file byte-identical on the server, and nothing else there.
    lost = [rel for rel, data in files if object_bytes(s3_client, bucket, PREFIX + rel) != data]
    assert lost == [], f"{len(lost)} files differ on the server: {lost[:5]}"
    listed = s3_client.list_objects_v2(Bucket=bucket, MaxKeys=10_000).get("Contents", [])
    assert sorted(o["Key"] for o in listed) == sorted(PREFIX + rel for rel, _ in files)

    # No completed part sent again for its upload id.
    log = [r for r in s3_server.requests(since=start_mark) if r.bucket == bucket]
    done_parts: set[tuple[str, str]] = set()
    resent: list[tuple[str, str, str]] = []
    for r in log:
        if not r.is_upload_part:
            continue
        part = (r.query["uploadId"], r.query["partNumber"])
        if part in done_parts:
            resent.append((r.key, *part))
        if r.status == 200:
            done_parts.add(part)
    assert resent == [], f"completed parts sent again: {resent[:10]}"

    # Nothing written to a key once the journal had recorded it uploaded.
    positions = s3_server.requests(since=start_mark)
    late = [
        (r.method, r.key, dict(r.query))
        for index, r in enumerate(positions)
        if r.bucket == bucket
        and _writes(r)
        and r.key in uploaded_at_mark
        and index + start_mark >= uploaded_at_mark[r.key]
    ]
    assert late == [], f"objects written again after they were journaled uploaded: {late[:10]}"

    # No multipart upload holding parts left open. A kill between S3's reply to
    # CreateMultipartUpload and the journal write leaves an empty one the daemon never
    # learned the id of (and the gallery's keys cannot list uploads): counted, not lost.
    open_uploads = s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    holding = [
        (u["Key"], u["UploadId"])
        for u in open_uploads
        if s3_client.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts")
        or any(r.is_upload_part and r.query["uploadId"] == u["UploadId"] for r in log)
    ]
    assert holding == [], f"multipart uploads with parts left open: {holding}"

    # The journal consistent.
    rows = journal_rows(layout["state"])
    assert len(rows) == len(files)
    assert {r["state"] for r in rows} == {"uploaded"}
    assert [r["key"] for r in rows if r["upload_id"] is not None] == []
    assert _parts_rows(layout["state"]) == 0

    completions = Counter(r.key for r in log if _is_completion(r))
    twice = {k: n for k, n in completions.items() if n > 1}
    uploads_per_key: defaultdict[str, set[str]] = defaultdict(set)
    for r in log:
        if r.is_upload_part:
            uploads_per_key[r.key].add(r.query["uploadId"])
    print(
        f"\ncrash cycles: {CYCLES} kill -9 cycles survived (seed {SEED}), "
        f"{len(files)} files, {sum(len(d) for _, d in files)} bytes, "
        f"{MULTIPART_FILES} multipart; kills with files uploading "
        f"{sum(1 for _, busy in at_kill if busy)}, with a multipart upload open "
        f"{multipart_at_kill}; (uploaded, uploading) at each kill: {at_kill}; "
        f"part requests {sum(r.is_upload_part for r in log)} "
        f"(parts {sum(-(-len(d) // (5 * MiB)) for _, d in files if len(d) > 5 * MiB)}), "
        f"upload ids per multipart file {sorted(len(v) for v in uploads_per_key.values())}; "
        f"objects completed more than once (identical content, a kill between the "
        f"request and the journal write): {len(twice)} {sorted(twice.items())[:5]}; "
        f"requests by the final run {final_requests}; empty multipart uploads left open "
        f"(a kill between S3's reply to CreateMultipartUpload and the journal write): "
        f"{len(open_uploads)}; "
        f"lost: {len(lost)}; {seconds:.0f} s"
    )
