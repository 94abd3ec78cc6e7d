"""Bad files under a watch, end to end: a real daemon subprocess, real files, a real S3 server.

tests/test_daemon.py already covers a key over 1024 bytes, links and a FIFO found by the
first walk; test_uploader.py, files deleted or changed mid-multipart inside one process;
test_control.py, ``retry`` after a missing bucket. This file adds, with the daemon as a
process: a file it may not read (the daemon runs as user nobody when the tests run as
root), files deleted while settling, queued or mid-multipart, files truncated or grown
mid-multipart, a burst of 10,000 files, names that could lose their exact key on the way
to S3 or that S3 cannot take, and links, FIFOs, sockets and devices, including ones that
replace a file after it was queued.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonproc import (
    ConfigMaker,
    Daemon,
    journal_rows,
    object_bytes,
    one_watch_config,
    run_cli,
    status_json,
    wait_object,
    wait_until,
    write_file,
)
from s3server import S3Server

PREFIX = "cpg0001-test/broad/images/"
MiB = 1024 * 1024


def _rows_by_path(state_dir: Path) -> dict[bytes, dict[str, Any]]:
    return {row["rel_path"]: row for row in journal_rows(state_dir)}


def _make_device(path: Path) -> None:
    """A character device like /dev/null at ``path``; nothing where that is not allowed."""
    with contextlib.suppress(PermissionError):
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))


def _parts_sent(s3_server: S3Server, bucket: str, key: str, since: int) -> set[int]:
    """Numbers of the parts of ``key`` the server took since the mark."""
    requests = s3_server.upload_part_requests(bucket, key, since=since)
    return {int(r.query["partNumber"]) for r in requests if r.status == 200}


def _event(daemon: Daemon, name: str) -> dict[str, Any] | None:
    return next((e for e in daemon.events() if e.get("event") == name), None)


def _states(state_dir: Path) -> dict[str, int]:
    """How many journal rows are in each state (one query: cheap to poll)."""
    path = state_dir / "journal.sqlite3"
    if not path.exists():
        return {}
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            rows = db.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return {}
            raise
    return dict(rows)


def _all_objects(s3_client: Any, bucket: str) -> dict[str, dict[str, Any]]:
    """Every object in the bucket: key -> its listing entry."""
    out: dict[str, dict[str, Any]] = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for entry in page.get("Contents", []):
            out[entry["Key"]] = entry
    return out


# -- a burst of small files ---------------------------------------------------------------


BURST = int(os.environ.get("CPG_BURST_FILES", "2000"))
"""Files written at once: 2,000 in CI, 10,000 in the long form (CPG_BURST_FILES=10000)."""


@pytest.mark.timeout(420)  # the wait below may take 300 s on a loaded machine
def test_a_burst_of_small_files_at_once_is_all_uploaded_once(
    tmp_path: Path,
    layout: dict[str, Path],
    s3_server: S3Server,
    make_config: ConfigMaker,
    s3_client: Any,
    bucket: str,
) -> None:
    count = BURST
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="1s")
    daemon = Daemon.started(config, tmp_path / "burst.log")
    mark = s3_server.mark()
    try:
        began = time.monotonic()
        contents: dict[str, bytes] = {}
        for folder in range(10):
            (layout["watch"] / f"plate{folder}").mkdir()
        for i in range(count):
            rel = f"plate{i % 10}/f{i:05d}.csv"
            data = f"{i}\n".encode()
            with open(layout["watch"] / rel, "wb") as handle:
                handle.write(data)
            contents[rel] = data
        written = time.monotonic() - began
        behind = count - _states(layout["state"]).get("uploaded", 0)
        wait_until(
            lambda: _states(layout["state"]).get("uploaded") == count,
            300,  # how long a loaded machine may take, not what is asserted
            f"{count} uploaded rows",
        )
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    # A burst is measured against the daemon, which a loaded machine slows as much as the
    # writer (0.5 s alone, 16 s beside two other test runs): most files must still have
    # been waiting when the last one was written.
    assert behind > count // 2, f"{behind} of {count} waiting after {written:.1f} s: no burst"
    assert _states(layout["state"]) == {"uploaded": count}
    objects = _all_objects(s3_client, bucket)
    assert set(objects) == {PREFIX + rel for rel in contents}
    for rel, data in contents.items():
        entry = objects[PREFIX + rel]
        assert entry["Size"] == len(data)
        assert entry["ETag"].strip('"') == hashlib.md5(data).hexdigest(), rel
    puts = [r for r in s3_server.requests(since=mark) if r.method == "PUT" and r.bucket == bucket]
    assert len(puts) == count, "a file was sent more than once"
    uploaded = [e["key"] for e in daemon.events() if e.get("event") == "uploaded"]
    assert len(uploaded) == len(set(uploaded)) == count
    assert not [e for e in daemon.events() if e.get("level") in ("error", "critical")]


# -- an unreadable file -------------------------------------------------------------------

NOBODY = 65534


@pytest.fixture
def open_layout() -> Iterator[dict[str, Path]]:
    """A watch and a state dir another user can use (pytest's tmp_path is 0700 root)."""
    top = Path(tempfile.mkdtemp(prefix="cpg-bad-files-"))
    top.chmod(0o755)
    paths = {"top": top, "watch": top / "outbox", "state": top / "state"}
    paths["watch"].mkdir(mode=0o755)
    paths["state"].mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(paths["state"], NOBODY, NOBODY)
    try:
        yield paths
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_unreadable_file_fails_with_its_reason_others_go_on_and_retry_sends_it(
    tmp_path: Path,
    open_layout: dict[str, Path],
    s3_server: S3Server,
    s3_client: Any,
    bucket: str,
) -> None:
    """As root a chmod 000 file can still be read, so the daemon runs as user nobody."""
    wrapper: tuple[str, ...] = ()
    if os.geteuid() == 0:
        wrapper = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot run the daemon as another user")
    watch = open_layout["watch"]
    config = one_watch_config(
        open_layout["top"] / "run.toml",
        state_dir=open_layout["state"],
        endpoint_url=s3_server.endpoint_url,
        watch_path=watch,
        destination=f"s3://{bucket}/{PREFIX}",
        settle="0.5s",
    )
    config.chmod(0o644)
    readable = write_file(watch / "plate" / "ok.csv", b"ok\n", age=3600)
    locked_data = write_file(watch / "plate" / "locked.csv", b"locked,data\n", age=3600)
    (watch / "plate").chmod(0o755)
    locked = watch / "plate" / "locked.csv"
    locked.chmod(0)
    if not wrapper and os.access(locked, os.R_OK):
        pytest.skip("this user can read a chmod 000 file and is not root: nothing to test")
    daemon = Daemon(config, tmp_path / "unreadable.log", wrapper=wrapper)
    try:
        daemon.wait_for_event("running")
        if wrapper:  # not dumpable: no core dump of its keys, /proc/PID/environ root's only
            assert os.stat(f"/proc/{daemon.process.pid}/environ").st_uid == 0
        wait_object(s3_client, bucket, PREFIX + "plate/ok.csv", readable)
        [row] = wait_until(
            lambda: [r for r in journal_rows(open_layout["state"]) if r["state"] == "failed"],
            30,
            "the unreadable file to be marked failed",
        )
        assert row["rel_path"] == b"plate/locked.csv"
        assert "permission denied" in row["last_error"].lower(), row
        status = status_json(config)
        assert status["files"]["failed"] == 1, status
        [error] = status["recent_errors"]
        assert error["path"] == str(locked) and error["key"] == PREFIX + "plate/locked.csv"
        assert "permission denied" in error["error"].lower(), error
        assert object_bytes(s3_client, bucket, PREFIX + "plate/locked.csv") is None
        # Files that come later still go.
        later = write_file(watch / "plate" / "later.csv", b"later\n", age=3600)
        wait_object(s3_client, bucket, PREFIX + "plate/later.csv", later)

        locked.chmod(0o644)
        retried = run_cli("retry", "-c", str(config))
        assert retried.returncode == 0, retried
        assert retried.stdout.strip() == "1 failed files queued again (plates)"
        wait_object(s3_client, bucket, PREFIX + "plate/locked.csv", locked_data)
        status = status_json(config)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    assert status["files"]["failed"] == 0, status
    assert {r["rel_path"]: r["state"] for r in journal_rows(open_layout["state"])} == {
        b"plate/ok.csv": "uploaded",
        b"plate/locked.csv": "uploaded",
        b"plate/later.csv": "uploaded",
    }
    if wrapper:  # it really ran as nobody
        assert (open_layout["state"] / "journal.sqlite3").stat().st_uid == NOBODY


# -- files that vanish ---------------------------------------------------------------------


def test_files_deleted_while_settling_queued_or_mid_multipart_are_forgotten(
    tmp_path: Path,
    layout: dict[str, Path],
    s3_server: S3Server,
    make_config: ConfigMaker,
    s3_client: Any,
    bucket: str,
) -> None:
    s3 = {
        "part_size": "5MiB",
        "multipart_threshold": "5MiB",
        "max_concurrency": 2,
        "max_bandwidth": "5MB",  # 30 MiB take about 6 s: the delete lands mid-upload
    }
    watch = layout["watch"]
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="1s", s3=s3)
    mark = s3_server.mark()
    daemon = Daemon.started(config, tmp_path / "vanish.log")
    try:
        # 1. Deleted while it settles: never journaled.
        (watch / "settling.csv").write_bytes(b"written, then deleted\n")
        time.sleep(0.3)
        (watch / "settling.csv").unlink()

        # 2. Deleted while queued (uploads paused, so it waits in the journal).
        assert run_cli("pause", "-c", str(config)).returncode == 0
        write_file(watch / "queued.csv", b"queued, then deleted\n", age=3600)
        wait_until(
            lambda: _rows_by_path(layout["state"]).get(b"queued.csv", {}).get("state") == "queued",
            20,
            "queued.csv to be queued",
        )
        (watch / "queued.csv").unlink()
        assert run_cli("resume", "-c", str(config)).returncode == 0
        wait_until(
            lambda: b"queued.csv" not in _rows_by_path(layout["state"]),
            20,
            "queued.csv to be forgotten",
        )

        # 3. Deleted while its multipart upload is under way.
        big = watch / "big" / "plate.sqlite"
        write_file(big, os.urandom(30 * MiB), age=3600)
        key = PREFIX + "big/plate.sqlite"
        wait_until(lambda: _parts_sent(s3_server, bucket, key, mark), 30, "a first part")
        big.unlink()
        wait_until(
            lambda: b"big/plate.sqlite" not in _rows_by_path(layout["state"]),
            30,
            "the deleted big file to be forgotten",
        )
        wait_until(
            lambda: not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads"),
            20,
            "its multipart upload to be aborted",
        )
        # A file written afterwards goes: the daemon carries on.
        after = write_file(watch / "after.csv", b"after\n", age=3600)
        wait_object(s3_client, bucket, PREFIX + "after.csv", after)
        time.sleep(1.5)  # a settle period more, for anything left to show up
        status = status_json(config)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    assert len(_parts_sent(s3_server, bucket, key, mark)) < 6, "the upload finished first"
    assert {r["rel_path"]: r["state"] for r in journal_rows(layout["state"])} == {
        b"after.csv": "uploaded"
    }
    assert set(_all_objects(s3_client, bucket)) == {PREFIX + "after.csv"}
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert status["files"]["failed"] == 0 and status["recent_errors"] == [], status
    events = daemon.events()
    vanished = {e["key"] for e in events if e.get("event") == "vanished"}
    assert vanished == {PREFIX + "queued.csv", key}, vanished
    assert any(e.get("event") == "multipart_aborted" for e in events)
    assert not [e for e in events if e.get("event") == "upload_failed"]


# -- files that change mid-upload -----------------------------------------------------------


def test_file_truncated_and_file_grown_mid_multipart_end_as_their_final_bytes(
    tmp_path: Path,
    layout: dict[str, Path],
    s3_server: S3Server,
    make_config: ConfigMaker,
    s3_client: Any,
    bucket: str,
) -> None:
    s3 = {
        "part_size": "5MiB",
        "multipart_threshold": "5MiB",
        "max_concurrency": 2,
        "max_bandwidth": "8MB",  # 40 MiB take about 5 s: the changes land mid-upload
    }
    watch = layout["watch"]
    shrinking, growing = watch / "plate" / "shrinks.sqlite", watch / "plate" / "grows.sqlite"
    versions = {
        PREFIX + "plate/shrinks.sqlite": [write_file(shrinking, os.urandom(20 * MiB), age=3600)],
        PREFIX + "plate/grows.sqlite": [write_file(growing, os.urandom(20 * MiB), age=3600)],
    }
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="1s", s3=s3)
    mark = s3_server.mark()
    daemon = Daemon.started(config, tmp_path / "change.log")
    seen: dict[str, dict[str, bytes]] = {key: {} for key in versions}

    def look() -> bool:
        """Record each version of each object; True once both hold their final bytes."""
        done = True
        for key, datas in versions.items():
            try:
                etag = s3_client.head_object(Bucket=bucket, Key=key)["ETag"]
            except s3_client.exceptions.ClientError:
                done = False
                continue
            if etag not in seen[key]:
                body = object_bytes(s3_client, bucket, key)
                assert body is not None
                seen[key][etag] = body
            done = done and seen[key][etag] == datas[-1]
        return done

    try:
        for key in versions:
            wait_until(
                lambda key=key: _parts_sent(s3_server, bucket, key, mark), 30, f"a part of {key}"
            )
        os.truncate(shrinking, 3 * MiB)  # below the threshold: one PutObject from now on
        versions[PREFIX + "plate/shrinks.sqlite"].append(shrinking.read_bytes())
        with open(growing, "ab") as handle:
            handle.write(os.urandom(3 * MiB))
        versions[PREFIX + "plate/grows.sqlite"].append(growing.read_bytes())
        wait_until(look, 60, "both objects to hold the files' final bytes")
        time.sleep(1.5)  # settle periods more: nothing older may land on top
        assert look()
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    for key, datas in versions.items():
        mixed = [len(body) for body in seen[key].values() if body not in datas]
        assert mixed == [], f"{key}: an object mixing two versions ({mixed} bytes)"
        assert object_bytes(s3_client, bucket, key) == datas[-1]
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    changed = {e["key"] for e in daemon.events() if e.get("event") == "changed_while_uploading"}
    assert changed == set(versions), "a change did not land mid-upload: the test proves less"
    assert {r["state"] for r in journal_rows(layout["state"])} == {"uploaded"}


# -- names -----------------------------------------------------------------------------------

BAD_NAMES = {
    b"plate 1/new\nline.tiff": "control characters",
    b"plate 1/tab\there.tiff": "control characters",
    b"plate 1/latin-1 caf\xe9.tiff": "not valid UTF-8",
}
"""Names S3 cannot take (README), as bytes below the watch, and a word of each reason."""


def _write_raw(watch: Path, rel: bytes, data: bytes) -> None:
    write_file(Path(os.fsdecode(os.fsencode(watch) + b"/" + rel)), data, age=3600)


def test_odd_names_keep_their_exact_keys_and_names_s3_cannot_take_fail_with_a_reason(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    """test_daemon.py covers one key over 1024 bytes; this adds the others README names
    (control characters, not UTF-8), the 1024-byte edge, and names that URL-encoding or
    Unicode normalisation could change on their way to S3."""
    watch = layout["watch"]
    room = 1024 - len(PREFIX.encode())
    deep = "/".join(["d" * 200] * 4)  # 803 bytes of folders
    edge = f"{deep}/{'e' * (room - len(deep) - 1)}"  # a key of exactly 1024 bytes
    over = f"{deep}/{'o' * (room - len(deep))}"  # 1025 bytes
    good = {
        "plate 1/well A01 field 1.tiff": b"spaces",
        "plate 1/a+b %2F c?d#e&f=g'h(1)[2]{3}~!@$;,=.tiff": b"reserved in URLs",
        "plate 1/cafe\u0301 (NFD).tiff": b"decomposed accent",
        "plate 1/caf\u00e9 (NFC).tiff": b"composed accent",
        "plate 1/日本語 ✓.tiff": b"not Latin",
        edge: b"1024-byte key",
    }
    bad = {**BAD_NAMES, over.encode(): "1025 bytes long"}
    for rel, data in good.items():
        write_file(watch / rel, data, age=3600)
    for raw in bad:
        _write_raw(watch, raw, b"never uploaded")
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.5s")
    daemon = Daemon.started(config, tmp_path / "names.log")
    try:
        for rel, data in good.items():
            wait_object(s3_client, bucket, PREFIX + rel, data)
        wait_until(
            lambda: _states(layout["state"]).get("failed") == len(bad), 20, "the failed files"
        )
        status = status_json(config)
        human = run_cli("status", "-c", str(config))
        later = write_file(watch / "later.tiff", b"later", age=3600)  # the daemon carries on
        wait_object(s3_client, bucket, PREFIX + "later.tiff", later)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    assert set(_all_objects(s3_client, bucket)) == {
        PREFIX + rel for rel in [*good, "later.tiff"]
    }, "an object under a key other than the file's own path"
    rows = _rows_by_path(layout["state"])
    for raw, reason in bad.items():
        assert rows[raw]["state"] == "failed", rows[raw]
        assert reason in rows[raw]["last_error"], rows[raw]
    for rel in good:
        assert rows[rel.encode()]["state"] == "uploaded"
    assert status["files"]["failed"] == len(bad), status
    assert human.returncode == 0, human
    assert f"{len(bad)} failed" in human.stdout, human.stdout
    logged = [
        str(e.get("error")) for e in daemon.events() if e.get("level") in ("warning", "error")
    ]
    for reason in bad.values():
        assert any(reason in error for error in logged), (reason, logged)


def test_names_s3_cannot_take_are_listed_with_their_reason_in_status(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    for raw in BAD_NAMES:
        _write_raw(layout["watch"], raw, b"never uploaded")
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.5s")
    daemon = Daemon.started(config, tmp_path / "listed.log")
    try:
        wait_until(
            lambda: _states(layout["state"]).get("failed") == len(BAD_NAMES), 20, "failed files"
        )
        status = status_json(config)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    assert status["files"]["failed"] == len(BAD_NAMES)
    errors = status["recent_errors"]
    assert len(errors) == len(BAD_NAMES), errors
    for reason in BAD_NAMES.values():
        assert any(reason in e["error"] for e in errors), errors


@pytest.mark.parametrize("when", ["folder before start", "file while running"])
def test_a_name_that_is_not_utf8_does_not_stop_the_daemon(
    when: str,
    tmp_path: Path,
    layout: dict[str, Path],
    make_config: ConfigMaker,
    s3_client: Any,
    bucket: str,
) -> None:
    """README: such names are marked failed with the reason; everything else carries on.
    (A file of that name found by the first walk is in the test above.)"""
    watch = layout["watch"]
    raw = b"latin-1 folder \xff/inside.tiff" if when == "folder before start" else b"caf\xe9.tiff"
    if when == "folder before start":
        _write_raw(watch, raw, b"never uploaded")
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.5s")
    daemon = Daemon.started(config, tmp_path / "utf8.log")

    def alive(check: Any) -> Any:
        """``check()``, failing at once should the daemon have exited."""
        assert daemon.process.poll() is None, daemon.log_text()[-3000:]
        return check()

    try:
        if when == "file while running":
            # The first walk begins once filesystem events are live: the file is
            # found by its event.
            wait_until(lambda: alive(lambda: _event(daemon, "scanned")), 20, "the first walk")
            _write_raw(watch, raw, b"never uploaded")
        wait_until(
            lambda: alive(lambda: _states(layout["state"]).get("failed")), 20, "the file to fail"
        )
        time.sleep(1.0)  # the file's events, and more
        later = write_file(watch / "later.tiff", b"later", age=3600)
        wait_until(
            lambda: alive(lambda: object_bytes(s3_client, bucket, PREFIX + "later.tiff") == later),
            20,
            "a later file to be uploaded",
        )
    finally:
        code = daemon.terminate()
    assert code == 0, daemon.log_text()[-3000:]
    [row] = [r for r in journal_rows(layout["state"]) if r["state"] == "failed"]
    assert row["rel_path"] == raw and "not valid UTF-8" in row["last_error"], row
    assert set(_all_objects(s3_client, bucket)) == {PREFIX + "later.tiff"}


# -- links and special files -----------------------------------------------------------------


def _passwd_in_no_object(s3_client: Any, bucket: str) -> dict[str, dict[str, Any]]:
    objects = _all_objects(s3_client, bucket)
    secret = Path("/etc/passwd").read_bytes()
    first_line = secret.splitlines()[0]
    for key in objects:
        body = object_bytes(s3_client, bucket, key)
        assert body is not None
        assert secret not in body and first_line not in body, f"/etc/passwd is in {key}"
    return objects


def test_links_out_fifos_sockets_and_devices_are_never_read(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    """test_daemon.py covers links to a file of its own, a FIFO found by the first walk;
    this adds the real /etc/passwd, /etc itself, a device node, a socket, and special
    files created while the daemon runs (found by events, not the walk)."""
    watch = layout["watch"]
    (watch / "plate").mkdir()
    os.symlink("/etc/passwd", watch / "plate" / "passwd.tiff")
    os.symlink("/etc", watch / "etc")
    os.mkfifo(watch / "plate" / "pipe.tiff")
    _make_device(watch / "plate" / "null.tiff")
    first = write_file(watch / "plate" / "first.tiff", b"first", age=3600)
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.5s")
    daemon = Daemon.started(config, tmp_path / "special.log")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        wait_object(s3_client, bucket, PREFIX + "plate/first.tiff", first)
        # The same kinds again, made while the daemon watches.
        os.symlink("/etc/passwd", watch / "plate" / "passwd-later.tiff")
        os.symlink("/etc", watch / "plate" / "etc-later")
        os.mkfifo(watch / "plate" / "pipe-later.tiff")
        _make_device(watch / "plate" / "null-later.tiff")
        listener.bind(str(watch / "plate" / "socket.tiff"))
        second = write_file(watch / "plate" / "second.tiff", b"second", age=3600)
        wait_object(s3_client, bucket, PREFIX + "plate/second.tiff", second)
        assert run_cli("rescan", "-c", str(config)).returncode == 0
        time.sleep(2.0)  # a walk and several settle periods for anything else to show up
        status = status_json(config)
    finally:
        listener.close()
        stopped_at = time.monotonic()
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    assert time.monotonic() - stopped_at < 15, "the daemon hung on its way out"
    objects = _passwd_in_no_object(s3_client, bucket)
    assert set(objects) == {PREFIX + "plate/first.tiff", PREFIX + "plate/second.tiff"}
    assert sorted(r["rel_path"] for r in journal_rows(layout["state"])) == [
        b"plate/first.tiff",
        b"plate/second.tiff",
    ]
    assert status["files"]["failed"] == 0, status


SWAPS = {
    "link to /etc/passwd": lambda path: os.symlink("/etc/passwd", path),
    "fifo": lambda path: os.mkfifo(path),
    "device": _make_device,
}


@pytest.mark.parametrize(
    "swap", ["link to /etc/passwd", "folder link to /etc", "fifo", "device"]
)
def test_queued_file_swapped_for_a_link_fifo_or_device_is_never_read_through_it(
    swap: str,
    tmp_path: Path,
    layout: dict[str, Path],
    make_config: ConfigMaker,
    s3_client: Any,
    bucket: str,
) -> None:
    """A file settles and is queued (uploads paused), then, before its upload begins, it
    is replaced by a link out of the watch, a FIFO or a device node, or its folder by a
    link to /etc. Nothing may be read through a link, hang the daemon or become an object:
    README says links are never followed and FIFOs and devices are skipped."""
    if swap == "device" and os.geteuid() != 0:
        pytest.skip("only root can make a device node")
    watch = layout["watch"]
    rel = "conf/passwd" if swap == "folder link to /etc" else "plate/swapped.tiff"
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.5s", daemon={"drain_timeout": "1s"})
    (watch / "plate").mkdir()
    daemon = Daemon.started(config, tmp_path / "swap.log")
    try:
        assert run_cli("pause", "-c", str(config)).returncode == 0
        write_file(watch / rel, b"a regular file at first\n", age=3600)
        wait_until(
            lambda: _rows_by_path(layout["state"]).get(rel.encode(), {}).get("state") == "queued",
            20,
            "the file to be queued",
        )
        if swap == "folder link to /etc":
            os.rename(watch / "conf", layout["staging"] / "conf")
            os.symlink("/etc", watch / "conf")
        else:
            (watch / rel).unlink()
            SWAPS[swap](watch / rel)
            if not os.path.lexists(watch / rel):
                pytest.skip(f"cannot make a {swap} here")
        assert run_cli("resume", "-c", str(config)).returncode == 0
        control = write_file(watch / "plate" / "control.tiff", b"control", age=3600)
        wait_object(s3_client, bucket, PREFIX + "plate/control.tiff", control)
        # Done with the file: forgotten (or failed); a second attempt comes a settle later.
        with contextlib.suppress(AssertionError):
            wait_until(
                lambda: (
                    _rows_by_path(layout["state"]).get(rel.encode(), {}).get("state")
                    in (None, "failed")
                ),
                3,
                "the swapped file to be done with",
            )
        row = _rows_by_path(layout["state"]).get(rel.encode())
    finally:
        stopped_at = time.monotonic()
        try:
            code = daemon.terminate(timeout=1 + 4)
        except subprocess.TimeoutExpired:
            daemon.kill()
            code = None
    assert code == 0, f"exit status {code} (None: hung after SIGTERM): {daemon.log_text()[-2000:]}"
    assert time.monotonic() - stopped_at < 1 + 4
    objects = _passwd_in_no_object(s3_client, bucket)
    assert set(objects) == {PREFIX + "plate/control.tiff"}, objects
    assert row is None or row["state"] == "failed", row
