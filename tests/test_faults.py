"""Network and server faults between a real daemon and S3: nothing lost, no hot loops.

A real ``cpg-daemon run`` subprocess talks to the moto server through
:class:`faultproxy.FaultProxy`, which resets connections mid-body, stalls, answers S3's
error replies (InternalError, SlowDown, RequestTimeTooSkewed) and cuts replies short.
Both data planes go through it (the CRT for bodies up to 4 MiB, botocore for the rest),
and the tests check that faults reached both. What they hold the daemon to:

- a mixed workload with a quarter of all requests faulted at random ends with every
  file byte-identical on the server, every journal row uploaded, no upload left open;
- SlowDown for everything is ridden out (no file fails, status says why) and every
  file arrives after; the daemon slows down however many files wait (it pauses, then
  sends one file at a time until S3 takes them again);
- an error S3 repeats forever fails that file after ``file_attempts``, with the error
  in the journal and in ``status``, after a bounded number of requests, and nothing more;
- a few RequestTimeTooSkewed replies do not fail a file;
- replies cut short after the server acted (PutObject, UploadPart, Create/Complete
  multipart) still end with the right objects.

The random schedule's seed is ``$CPG_FAULT_SEED`` (default 8); the test that waits out
a request never answered (about 2 min) is marked slow.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemonproc import (
    Daemon,
    journal_rows,
    object_bytes,
    one_watch_config,
    status_json,
    wait_until,
)
from faultproxy import (
    INTERNAL_ERROR,
    SLOW_DOWN,
    TIME_TOO_SKEWED,
    Chaos,
    Fault,
    FaultProxy,
    Rule,
    S3Error,
    Seen,
)
from s3server import S3Server

MiB = 1024 * 1024
PREFIX = "cpg0001-faults/broad/images/2024_01_01_Batch1/images/"
SEED = int(os.environ.get("CPG_FAULT_SEED", "8"))
REQUEST_ATTEMPTS = 2
"""s3.request_attempts where a test counts requests: each one is retried once."""
FILE_ATTEMPTS = 2
"""daemon.file_attempts there: one more attempt at the file, 5 s later."""
BOTOCORE_PUT = 4 * MiB + 300_000
"""A file this size goes in one PutObject sent by botocore (the CRT takes up to 4 MiB)."""


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url) as proxy:
        yield proxy
    assert proxy.errors == [], f"the proxy itself failed: {proxy.errors}"


def _drop(watch: Path, files: dict[str, bytes]) -> None:
    """Write files as a finished copy would arrive: complete, mtime in the past (settled)."""
    past = time.time() - 3600
    for rel, data in files.items():
        path = watch / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (past, past))


def _start(
    tmp_path: Path,
    layout: dict[str, Path],
    proxy: FaultProxy,
    bucket: str,
    *,
    s3: dict[str, Any] | None = None,
    daemon: dict[str, Any] | None = None,
    name: str = "run",
) -> Daemon:
    config = one_watch_config(
        tmp_path / f"{name}.toml",
        state_dir=layout["state"],
        endpoint_url=proxy.endpoint_url,
        watch_path=layout["watch"],
        destination=f"s3://{bucket}/{PREFIX}",
        settle="0.5s",
        s3={"part_size": "5MiB", "multipart_threshold": "5MiB", **(s3 or {})},
        daemon={"log_level": "info", **(daemon or {})},
    )
    process = Daemon(config, tmp_path / f"{name}.log")
    try:
        process.wait_for_event("running", timeout=60)
    except AssertionError as exc:
        process.kill()
        recent = [(s.request.operation, s.fault, s.status) for s in proxy.seen()[-10:]]
        raise AssertionError(
            f"{exc}; {_report(proxy)}; last requests {recent}; log:\n{process.log_text()[-3000:]}"
        ) from None
    return process


def _wait_settled(state_dir: Path, count: int, timeout: float) -> list[dict[str, Any]]:
    """Every one of ``count`` files uploaded or failed; returns the journal rows."""
    return wait_until(  # type: ignore[no-any-return]
        lambda: (
            (rows := journal_rows(state_dir))
            and len(rows) == count
            and all(r["state"] in ("uploaded", "failed") for r in rows)
            and rows
        ),
        timeout,
        f"all {count} files uploaded or failed",
    )


def _upload_through(
    tmp_path: Path,
    layout: dict[str, Path],
    proxy: FaultProxy,
    bucket: str,
    files: dict[str, bytes],
    timeout: float,
) -> list[dict[str, Any]]:
    """Drop ``files``, run the daemon until each is settled, stop it; the journal rows."""
    _drop(layout["watch"], files)
    daemon = _start(tmp_path, layout, proxy, bucket)
    try:
        return _wait_settled(layout["state"], len(files), timeout)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-4000:]


def _lost(s3_client: Any, bucket: str, files: dict[str, bytes]) -> list[str]:
    return [
        rel for rel, data in files.items() if object_bytes(s3_client, bucket, PREFIX + rel) != data
    ]


def _not_uploaded(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["key"], r["last_error"]) for r in rows if r["state"] != "uploaded"]


def _open_uploads(s3_client: Any, bucket: str, proxy: FaultProxy) -> list[str]:
    """Multipart uploads left open that the daemon could have known about.

    When the reply to a CreateMultipartUpload is cut short, the upload exists but its
    id never reached the daemon (botocore asks again and gets another one); without
    ListMultipartUploads, which the gallery's keys may not call, nobody can find it.
    Such an upload holds no parts (nothing was ever sent to it): only as many empty
    uploads as there were cut CreateMultipartUpload replies are allowed here.
    """
    uploads = s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    cut = sum(
        1
        for s in proxy.seen()
        if s.fault == "truncate" and s.request.operation == "CreateMultipartUpload"
    )
    problems = [
        f"{u['Key']} {u['UploadId']} holds parts"
        for u in uploads
        if s3_client.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts")
    ]
    if len(uploads) > cut:
        problems.append(f"{len(uploads)} uploads open, {cut} CreateMultipartUpload replies cut")
    return problems


def _left_open(s3_client: Any, bucket: str) -> str:
    uploads = s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return f"multipart uploads left open: {len(uploads)}"


def _report(proxy: FaultProxy) -> str:
    seen = proxy.seen()
    ops = Counter(s.request.operation for s in seen)
    dropped = sum(1 for s in seen if not s.fault and s.status is None)
    return (
        f"faults injected {dict(sorted(proxy.faults.items()))}; requests {len(seen)} "
        f"{dict(sorted(ops.items()))}; unfaulted requests left without a reply {dropped}"
    )


def test_mixed_workload_under_random_faults_loses_nothing(
    tmp_path: Path,
    layout: dict[str, Path],
    proxy: FaultProxy,
    s3_client: Any,
    bucket: str,
) -> None:
    """A quarter of all requests reset, stalled, refused or cut short: every file arrives."""
    rng = random.Random(SEED)
    files = {
        f"Plate{i % 3}/r{i:03d}c01f01p01-ch{i % 5 + 1}.tiff": rng.randbytes(rng.randint(1, 200_000))
        for i in range(100)
    }
    files.update({f"Plate{i}/big{i}.tiff": rng.randbytes(BOTOCORE_PUT + i) for i in range(2)})
    files.update(
        {
            f"Plate{i}/Plate{i}.sqlite": rng.randbytes(rng.randint(16 * MiB, 19 * MiB))
            for i in range(3)
        }
    )
    kinds = [
        Fault("reset"),
        Fault("stall", seconds=1.5),
        Fault("error", error=INTERNAL_ERROR),
        Fault("error", error=SLOW_DOWN),
        Fault("truncate"),
    ]
    # Every kind of fault for sure, and resets mid-body for both clients (botocore
    # waits for 100 Continue before it sends a body) ...
    after_1mib = Fault("reset", after_bytes=MiB)
    proxy.set_rules(
        *(
            Rule(kind, frozenset({"PutObject"}), f"r{i:03d}c01", times=1)
            for i, kind in enumerate(kinds)
        ),
        Rule(after_1mib, frozenset({"PutObject"}), "big0.tiff", times=1),
        Rule(after_1mib, frozenset({"UploadPart"}), "Plate0", "partNumber=1", times=1),
    )
    # ... and a quarter of all requests faulted at random.
    proxy.set_chaos(Chaos(seed=SEED, rate=0.25, faults=[(1, kind) for kind in kinds]))
    _drop(layout["watch"], files)
    began = time.monotonic()
    daemon = _start(tmp_path, layout, proxy, bucket)
    try:
        rows = _wait_settled(layout["state"], len(files), 75)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-4000:]
    proxy.set_chaos(None)
    report = _report(proxy)
    print(
        f"\nmixed workload, seed {SEED}: {time.monotonic() - began:.1f} s; {report}; "
        f"{_left_open(s3_client, bucket)}"
    )
    assert _not_uploaded(rows) == [], f"{_not_uploaded(rows)}; {report}"
    lost = _lost(s3_client, bucket, files)
    assert lost == [], f"{len(lost)} files differ on the server: {lost[:5]}; {report}"
    assert _open_uploads(s3_client, bucket, proxy) == [], report
    assert [r["key"] for r in rows if r["upload_id"] is not None] == [], report
    # The schedule really hit every kind of fault, and both data planes.
    assert {"reset", "stall", "500 InternalError", "503 SlowDown", "truncate"} <= set(
        proxy.faults
    ), report
    faulted = {(s.fault, _plane(s)) for s in proxy.seen() if s.fault}
    assert {("reset", "crt"), ("reset", "botocore")} <= faulted, report
    operations = {(s.request.operation, _plane(s)) for s in proxy.seen() if s.fault}
    assert {("PutObject", "crt"), ("UploadPart", "botocore")} <= operations, report


def _plane(seen: Seen) -> str:
    """Which client sent a request: the CRT's native one or botocore."""
    return "crt" if "CRT" in seen.request.header("user-agent") else "botocore"


@dataclass
class Throttled:
    """What happened while S3 answered SlowDown to everything."""

    daemon: Daemon
    files: dict[str, bytes]
    normal_rate: float
    """PutObject requests per second while nothing was in the way."""
    seen: list[Seen]
    """The requests that arrived while throttled."""
    seconds: float
    status: dict[str, Any]
    """``cpg-daemon status --json`` at the end of it."""

    @property
    def rate(self) -> float:
        return len(self.seen) / self.seconds


def _throttle(
    tmp_path: Path,
    layout: dict[str, Path],
    proxy: FaultProxy,
    bucket: str,
    *,
    backlog: int,
    seconds: float,
) -> Throttled:
    """Upload 150 files unhindered, then answer SlowDown to everything for ``seconds``
    while ``backlog`` more files wait. The daemon is left running."""
    rng = random.Random(SEED)
    first = {f"A/r{i:04d}.tiff": rng.randbytes(rng.randint(1000, 30_000)) for i in range(150)}
    second = {f"B/r{i:04d}.tiff": rng.randbytes(rng.randint(1000, 30_000)) for i in range(backlog)}
    # At most 16 requests at once (the number it starts with): the files in flight when S3
    # begins to throttle are then at most 20, whatever the loopback let it climb to.
    daemon = _start(tmp_path, layout, proxy, bucket, s3={"max_concurrency": 16})
    try:
        mark = proxy.mark()
        _drop(layout["watch"], first)
        _wait_settled(layout["state"], len(first), 60)
        normal = [s for s in proxy.seen(mark) if s.request.operation == "PutObject"]
        normal_rate = len(normal) / max(normal[-1].at - normal[0].at, 0.1)
        proxy.set_rules(Rule(Fault("error", error=SLOW_DOWN)))
        mark = proxy.mark()
        _drop(layout["watch"], second)
        wait_until(lambda: proxy.faults.get("503 SlowDown"), 30, "the first SlowDown reply")
        start = time.monotonic()
        time.sleep(seconds)
        status = status_json(daemon.config)
        proxy.set_rules()
        end = time.monotonic()
    except BaseException:
        daemon.kill()
        raise
    seen = [s for s in proxy.seen(mark) if start <= s.at < end]
    return Throttled(daemon, {**first, **second}, normal_rate, seen, end - start, status)


def test_slowdown_is_ridden_out_and_every_file_arrives(
    tmp_path: Path,
    layout: dict[str, Path],
    proxy: FaultProxy,
    s3_client: Any,
    bucket: str,
) -> None:
    """S3 answers SlowDown to everything for a while: nothing fails, each file is asked
    about a bounded number of times, status says why, and everything arrives after."""
    run = _throttle(tmp_path, layout, proxy, bucket, backlog=300, seconds=4)
    try:
        rows = _wait_settled(layout["state"], len(run.files), 90)
    finally:
        assert run.daemon.terminate() == 0, run.daemon.log_text()[-4000:]
    per_file = Counter(s.request.key for s in run.seen)
    report = (
        f"normal {run.normal_rate:.0f} requests/s; throttled {run.rate:.0f} requests/s, "
        f"at most {max(per_file.values())} for one file; {_report(proxy)}"
    )
    print(f"\nSlowDown, 300 files waiting: {report}")
    # Two file attempts at most in the window (the second 5 s later), 5 requests each.
    assert max(per_file.values()) <= 2 * 5, report
    assert run.status["files"]["failed"] == 0, run.status
    assert any("SlowDown" in e["error"] for e in run.status["recent_errors"]), run.status
    assert _not_uploaded(rows) == [], report
    assert _lost(s3_client, bucket, run.files) == [], report


def test_slowdown_slows_the_daemon_down_however_many_files_wait(
    tmp_path: Path,
    layout: dict[str, Path],
    proxy: FaultProxy,
    bucket: str,
) -> None:
    """Throttled by S3, the daemon holds back instead of trying file after file."""
    run = _throttle(tmp_path, layout, proxy, bucket, backlog=1200, seconds=8)
    stopped = run.daemon.terminate()
    tried = {s.request.key for s in run.seen}
    per_second = Counter(int(s.at - run.seen[0].at) for s in run.seen)
    report = (
        f"{len(tried)} of 1200 waiting files tried in 8 s of SlowDown, {len(run.seen)} "
        f"requests, each second {[per_second[i] for i in range(8)]}; normal "
        f"{run.normal_rate:.0f} requests/s; {_report(proxy)}"
    )
    print(f"\nSlowDown, 1200 files waiting: {report}")
    # The files in flight when S3 began to throttle (max_concurrency, 16), each backing
    # off, and a few more: not hundreds. (Rates alone would not tell: on a busy machine
    # the daemon's own CPU caps both; the number of files it moves on to does.)
    assert len(tried) <= 2 * 16, report
    assert stopped == 0, run.daemon.log_text()[-4000:]
    throttle = run.status["throttle"]
    assert throttle["active"] is True and throttle["concurrency"] < throttle["of"], throttle
    assert run.status["files"]["failed"] == 0, run.status


def test_a_long_round_trip_gets_more_requests_in_flight(
    tmp_path: Path, layout: dict[str, Path], proxy: FaultProxy, s3_client: Any, bucket: str
) -> None:
    """Every PutObject answered 0.5 s late (a far link, a slow first byte): 16 requests
    at once fill it far below what the machine can do (32 files/s; even a machine busy
    with the rest of the suite does more), so the daemon allows more."""
    proxy.set_rules(Rule(Fault("stall", seconds=0.5), frozenset({"PutObject"})))
    rng = random.Random(SEED)
    files = {f"A/r{i:04d}.tiff": rng.randbytes(2000) for i in range(500)}
    daemon = _start(tmp_path, layout, proxy, bucket, daemon={"log_level": "debug"})
    try:
        _drop(layout["watch"], files)
        _wait_settled(layout["state"], len(files), 90)
        status = status_json(daemon.config)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-4000:]
    steps = [e["allowed"] for e in daemon.events() if e.get("event") == "requests_allowed"]
    puts = [s for s in proxy.seen() if s.request.operation == "PutObject"]
    spread = max(s.at for s in puts) - min(s.at for s in puts)
    report = f"allowed over time {steps}; {len(puts)} PUTs in {spread:.1f} s; {_report(proxy)}"
    print(f"\nPutObject 0.5 s late: {report}")
    assert steps and max(steps) > 16, report
    assert 16 < status["requests_allowed"] <= 64, (status["requests_allowed"], report)
    assert _lost(s3_client, bucket, files) == [], report


PERSISTENT: dict[str, tuple[S3Error, int, str]] = {
    # file: (the error S3 answers its bytes with forever, its size, what the reason must say)
    "Plate1/crt-500.tiff": (INTERNAL_ERROR, 100_000, r"InternalError|HTTP 5xx"),
    "Plate1/crt-skewed.tiff": (TIME_TOO_SKEWED, 100_001, r"RequestTimeTooSkewed"),
    "Plate1/botocore-skewed.tiff": (TIME_TOO_SKEWED, BOTOCORE_PUT, r"RequestTimeTooSkewed"),
    "Plate1/multipart-500.sqlite": (INTERNAL_ERROR, 12 * MiB, r"InternalError|HTTP 5xx"),
}
"""The CRT keeps no status or body of a 5xx reply: its reason can only say "HTTP 5xx"."""


def test_persistent_errors_fail_files_visibly_without_a_hot_loop(
    tmp_path: Path,
    layout: dict[str, Path],
    proxy: FaultProxy,
    s3_client: Any,
    bucket: str,
) -> None:
    """S3 refuses some files' bytes forever: each ends failed, saying why, after a bounded
    number of requests, and the file beside them is uploaded."""
    rng = random.Random(SEED)
    files = {rel: rng.randbytes(size) for rel, (_, size, _) in PERSISTENT.items()}
    files["Plate1/good.csv"] = b"a,b\n1,2\n"
    proxy.set_rules(
        *(
            Rule(Fault("error", error=error), frozenset({"PutObject", "UploadPart"}), rel)
            for rel, (error, _, _) in PERSISTENT.items()
        )
    )
    _drop(layout["watch"], files)
    daemon = _start(
        tmp_path,
        layout,
        proxy,
        bucket,
        s3={"request_attempts": REQUEST_ATTEMPTS},
        daemon={"file_attempts": FILE_ATTEMPTS},
    )
    try:
        rows = _wait_settled(layout["state"], len(files), 60)
        requests_at_failure = proxy.mark()
        time.sleep(1)  # long enough for a hot loop to show
        status = status_json(daemon.config)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-4000:]
    report = _report(proxy)
    print(f"\npersistent errors: {report}")
    by_key = {r["key"]: r for r in rows}
    assert by_key[PREFIX + "Plate1/good.csv"]["state"] == "uploaded", report
    assert object_bytes(s3_client, bucket, PREFIX + "Plate1/good.csv") == files["Plate1/good.csv"]
    refused = Counter(s.request.key for s in proxy.seen() if s.fault)
    shown = {e["key"]: e["error"] for e in status["recent_errors"]}
    problems = []
    for rel, (error, size, reason) in PERSISTENT.items():
        row, key = by_key[PREFIX + rel], PREFIX + rel
        # Bounded: request_attempts requests per part and file attempt.
        parts = 1 if size < 5 * MiB else -(-size // (5 * MiB))
        if not 0 < refused[key] <= FILE_ATTEMPTS * REQUEST_ATTEMPTS * parts:
            problems.append(f"{rel}: {refused[key]} requests refused with {error.code}")
        if row["state"] != "failed" or not re.search(reason, row["last_error"] or ""):
            problems.append(f"{rel}: {row['state']} with {row['last_error']!r}")
        elif f"after {FILE_ATTEMPTS} attempts" not in row["last_error"]:
            problems.append(f"{rel}: failed before file_attempts: {row['last_error']!r}")
        if not re.search(reason, shown.get(key, "")):
            problems.append(f"{rel}: status shows {shown.get(key)!r}")
        if object_bytes(s3_client, bucket, key) is not None:
            problems.append(f"{rel}: an object exists")
    assert problems == [], report
    assert status["files"]["failed"] == len(PERSISTENT), status
    assert proxy.mark() == requests_at_failure, f"requests after the failures: {report}"
    # A multipart upload given up on is aborted, not left open (and billed).
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_few_request_time_too_skewed_replies_do_not_fail_a_file(
    tmp_path: Path,
    layout: dict[str, Path],
    proxy: FaultProxy,
    s3_client: Any,
    bucket: str,
) -> None:
    """RequestTimeTooSkewed now and then (a clock stepped by NTP) is not the file's end,
    whichever client sent the request."""
    rng = random.Random(SEED)
    files = {
        "Plate1/crt.tiff": rng.randbytes(50_000),
        "Plate1/botocore.tiff": rng.randbytes(BOTOCORE_PUT),
        "Plate1/part1.sqlite": rng.randbytes(6 * MiB),  # part 1 (5 MiB) goes by botocore
        "Plate1/part2.sqlite": rng.randbytes(6 * MiB),  # part 2 (1 MiB) by the CRT
    }
    skewed = Fault("error", error=TIME_TOO_SKEWED)
    proxy.set_rules(
        Rule(skewed, frozenset({"PutObject"}), "crt.tiff", times=1),
        Rule(skewed, frozenset({"PutObject"}), "botocore.tiff", times=1),
        Rule(skewed, frozenset({"UploadPart"}), "part1.sqlite", "partNumber=1", times=1),
        Rule(skewed, frozenset({"UploadPart"}), "part2.sqlite", "partNumber=2", times=1),
    )
    rows = _upload_through(tmp_path, layout, proxy, bucket, files, 60)
    report = _report(proxy)
    assert proxy.faults == {"403 RequestTimeTooSkewed": 4}, report
    faulted = Counter(_plane(s) for s in proxy.seen() if s.fault)
    assert faulted == {"crt": 2, "botocore": 2}, report
    assert _not_uploaded(rows) == [], report
    assert _lost(s3_client, bucket, files) == [], report


def test_replies_cut_short_after_the_server_acted_still_end_correct(
    tmp_path: Path,
    layout: dict[str, Path],
    proxy: FaultProxy,
    s3_client: Any,
    bucket: str,
) -> None:
    """The server stored the object, part or whole upload, but the reply was cut short:
    every file still ends right, and no upload holding parts is left open."""
    rng = random.Random(SEED)
    files = {
        "Plate1/crt.tiff": rng.randbytes(300_000),
        "Plate1/botocore.tiff": rng.randbytes(BOTOCORE_PUT),
        "Plate1/parts.sqlite": rng.randbytes(12 * MiB),
        "Plate1/created.sqlite": rng.randbytes(6 * MiB),
    }
    cut = Fault("truncate")
    proxy.set_rules(
        Rule(cut, frozenset({"PutObject"}), "crt.tiff", times=1),
        Rule(cut, frozenset({"PutObject"}), "botocore.tiff", times=1),
        Rule(cut, frozenset({"UploadPart"}), "parts.sqlite", times=2),
        Rule(cut, frozenset({"CompleteMultipartUpload"}), "parts.sqlite", times=1),
        Rule(cut, frozenset({"CreateMultipartUpload"}), "created.sqlite", times=1),
    )
    rows = _upload_through(tmp_path, layout, proxy, bucket, files, 60)
    report = _report(proxy)
    print(f"\nreplies cut short: {report}; {_left_open(s3_client, bucket)}")
    assert proxy.faults == {"truncate": 6}, report
    assert {_plane(s) for s in proxy.seen() if s.fault} == {"crt", "botocore"}, report
    assert _not_uploaded(rows) == [], report
    assert _lost(s3_client, bucket, files) == [], report
    assert _open_uploads(s3_client, bucket, proxy) == [], report


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_request_that_is_never_answered_is_cancelled_and_retried(
    tmp_path: Path,
    layout: dict[str, Path],
    proxy: FaultProxy,
    s3_client: Any,
    bucket: str,
) -> None:
    """A request the server takes and never answers (a stalled path) does not hold its
    file forever: it is given up (the CRT's own timeout, about 30 s; botocore's
    read_timeout, 120 s) and sent again. Slow by design: about 2 min."""
    rng = random.Random(SEED)
    files = {
        "Plate1/crt.tiff": rng.randbytes(300_000),
        "Plate1/botocore.tiff": rng.randbytes(BOTOCORE_PUT),
    }
    hang = Fault("stall")
    proxy.set_rules(
        Rule(hang, frozenset({"PutObject"}), "crt.tiff", times=1),
        Rule(hang, frozenset({"PutObject"}), "botocore.tiff", times=1),
    )
    rows = _upload_through(tmp_path, layout, proxy, bucket, files, 240)
    report = _report(proxy)
    assert proxy.faults == {"hang": 2}, report
    assert {_plane(s) for s in proxy.seen() if s.fault} == {"crt", "botocore"}, report
    assert _not_uploaded(rows) == [], report
    assert _lost(s3_client, bucket, files) == [], report
