"""A bad environment: the state directory full, a corrupt journal, the inotify watch
limit reached, the system clock jumping. The daemon runs as a real subprocess
against the local S3 server; the disk is a real (small) tmpfs, the watch limit a
real kernel limit (in a user namespace of the daemon's own).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
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
    wait_until,
    write_file,
)
from s3server import S3Server

from cpg_daemon.cli.localserver import free_port

PREFIX = "cpg0001-env/broad/images/2024_01_01_Batch1/images/"


def _all_uploaded(
    state: Path, s3_client: Any, bucket: str, expected: dict[str, bytes]
) -> bool:
    rows = journal_rows(state)
    if len(rows) != len(expected) or any(r["state"] != "uploaded" for r in rows):
        return False
    return all(object_bytes(s3_client, bucket, PREFIX + k) == v for k, v in expected.items())


def _drop(watch: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        write_file(watch / rel, data)


def _integrity(journal: Path) -> str:
    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


# -- the state directory full -------------------------------------------------------------


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def small_state_dir(layout: dict[str, Path]) -> Iterator[Path]:
    """The state directory on an 8 MiB tmpfs of its own (the journal's write-ahead log alone
    may grow to 4 MiB before SQLite checkpoints it: with less, a loaded machine filled it
    before the test did)."""
    state = layout["state"]
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(state)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def _fill(folder: Path) -> Path:
    """Write a file until the filesystem holding ``folder`` has no space left."""
    filler = folder / "filler"
    chunk = b"\0" * 65536
    # Unbuffered: a buffered file keeps what the last write could not place and raises
    # ENOSPC again when it is closed.
    with open(filler, "wb", buffering=0) as out:
        try:
            while out.write(chunk):
                pass
        except OSError:
            pass
    return filler


@pytest.mark.skipif(not _can_mount(), reason="mounting a small tmpfs needs root")
def test_state_dir_full_stops_new_work_and_recovers_without_corruption(
    tmp_path: Path,
    layout: dict[str, Path],
    small_state_dir: Path,
    make_config: ConfigMaker,
    s3_client: Any,
    bucket: str,
) -> None:
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.3s", daemon={"log_level": "info"})
    expected = {f"before/f{i:03d}.tiff": os.urandom(100) for i in range(20)}
    _drop(layout["watch"], expected)
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        wait_until(
            lambda: _all_uploaded(small_state_dir, s3_client, bucket, expected),
            30,
            "the first files uploaded",
        )
        filler = _fill(small_state_dir)
        # New files arrive while nothing more fits on the journal's disk: each
        # wave of them needs journal writes, which fail, until the daemon says so.
        wave = 0
        while not any(e.get("event") == "journal_unwritable" for e in daemon.events()):
            assert wave < 20, "no journal_unwritable event: " + daemon.log_text()[-3000:]
            for i in range(100):
                rel = f"during/w{wave:02d}/f{i:03d}.tiff"
                expected[rel] = os.urandom(100) + rel.encode()
                write_file(layout["watch"] / rel, expected[rel])
            wave += 1
            time.sleep(1.0)
        event = daemon.wait_for_event("journal_unwritable")
        assert str(small_state_dir) in event["hint"]
        status = status_json(config)
        assert status["journal"]["writable"] is False
        assert "full" in status["journal"]["error"]
        assert daemon.process.poll() is None, "the daemon must not exit while the disk is full"

        filler.unlink()  # an administrator frees space
        daemon.wait_for_event("journal_writable")
        wait_until(
            lambda: _all_uploaded(small_state_dir, s3_client, bucket, expected),
            90,
            f"all {len(expected)} files uploaded once space returned",
        )
        assert status_json(config)["journal"]["writable"] is True
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    assert _integrity(small_state_dir / "journal.sqlite3") == "ok"
    listed = s3_client.list_objects_v2(Bucket=bucket, MaxKeys=1000).get("Contents", [])
    assert sorted(o["Key"] for o in listed) == sorted(PREFIX + k for k in expected)


# -- a corrupt journal ----------------------------------------------------------------------


def _scribble_over_a_page(journal: Path) -> None:
    """Overwrite one page in the middle of the file, keeping the header: real damage."""
    with open(journal, "r+b") as out:
        size = out.seek(0, os.SEEK_END)
        page = 4096
        assert size >= 4 * page, f"journal too small to damage: {size} bytes"
        out.seek((size // page // 2) * page)
        out.write(b"\xa5" * page)


@pytest.mark.parametrize("damage", ["garbage", "page"])
def test_corrupt_journal_refuses_to_start_and_recover_journal_gets_it_going(
    tmp_path: Path,
    layout: dict[str, Path],
    s3_server: S3Server,
    make_config: ConfigMaker,
    s3_client: Any,
    bucket: str,
    damage: str,
) -> None:
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.3s", daemon={"log_level": "info"})
    expected = {f"Plate1/f{i:03d}.tiff": os.urandom(2000) for i in range(150)}
    _drop(layout["watch"], expected)
    daemon = Daemon(config, tmp_path / "first.log")
    try:
        wait_until(
            lambda: _all_uploaded(layout["state"], s3_client, bucket, expected),
            60,
            "the first files uploaded",
        )
    finally:
        assert daemon.terminate() == 0
    journal = layout["state"] / "journal.sqlite3"
    if damage == "garbage":
        journal.write_bytes(os.urandom(8192))
    else:
        _scribble_over_a_page(journal)

    refused = subprocess.run(
        [sys.executable, "-m", "cpg_daemon", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1, refused.stderr
    assert "damaged" in refused.stderr and "cpg-daemon recover-journal" in refused.stderr
    assert "Traceback" not in refused.stderr
    damaged_bytes = journal.read_bytes()  # refusing to start changed nothing

    recovered = run_cli("recover-journal", "-c", str(config))
    assert recovered.returncode == 0, recovered.stderr
    aside = sorted(layout["state"].glob("journal.sqlite3.damaged-*"))
    assert [p for p in aside if not p.name.endswith(("-wal", "-shm"))], recovered.stdout
    assert aside[0].read_bytes() == damaged_bytes, "the damaged journal is kept for a person"
    assert str(aside[0]) in recovered.stdout
    again = run_cli("recover-journal", "-c", str(config))
    assert again.returncode == 0 and "nothing to recover" in again.stdout

    # The next start sends nothing already on S3 again, and takes new files.
    expected["Plate2/new.tiff"] = b"arrived after the recovery"
    write_file(layout["watch"] / "Plate2/new.tiff", expected["Plate2/new.tiff"])
    mark = s3_server.mark()
    daemon = Daemon(config, tmp_path / "after.log")
    try:
        wait_until(
            lambda: _all_uploaded(layout["state"], s3_client, bucket, expected),
            60,
            "every file recorded uploaded after the recovery",
        )
    finally:
        assert daemon.terminate() == 0
    puts = [r for r in s3_server.requests(since=mark) if r.bucket == bucket and r.method == "PUT"]
    assert [r.key for r in puts] == [PREFIX + "Plate2/new.tiff"]
    assert _integrity(journal) == "ok"


def test_recover_journal_refuses_while_the_daemon_runs_and_leaves_a_sound_journal(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, bucket: str
) -> None:
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.3s", daemon={"log_level": "info"})
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        daemon.wait_for_event("running")
        busy = run_cli("recover-journal", "-c", str(config))
        assert busy.returncode == 1
        assert "already running" in busy.stderr
    finally:
        assert daemon.terminate() == 0
    intact = run_cli("recover-journal", "-c", str(config))
    assert intact.returncode == 0 and "intact" in intact.stdout
    assert (layout["state"] / "journal.sqlite3").exists()
    assert not list(layout["state"].glob("*.damaged-*"))


# -- the inotify watch limit ----------------------------------------------------------------


def _low_watch_limit(limit: int) -> list[str]:
    """A command prefix: run in a user namespace of its own whose inotify limit is ``limit``.

    ``/proc/sys/user/max_inotify_watches`` belongs to the user namespace, so this lowers
    the real kernel limit for the daemon alone, not for the machine.
    """
    script = f'echo {limit} > /proc/sys/user/max_inotify_watches && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh"]


def _user_namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*_low_watch_limit(3), "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _user_namespaces_work(), reason="needs unprivileged user namespaces")
def test_inotify_watch_limit_falls_back_to_polling_with_a_warning(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.3s", daemon={"log_level": "info"})
    expected = {f"Plate{i}/Images/f.tiff": f"plate {i}".encode() for i in range(6)}
    _drop(layout["watch"], expected)  # 13 folders, more than the 4 watches allowed
    daemon = Daemon(config, tmp_path / "daemon.log", wrapper=_low_watch_limit(4))
    try:
        warning = daemon.wait_for_event("events_unavailable_polling")
        assert "max_user_watches" in warning["hint"] and warning["level"] == "warning"
        wait_until(
            lambda: _all_uploaded(layout["state"], s3_client, bucket, expected),
            60,
            "the files there at start uploaded",
        )
        # Files that arrive later are found by polling (the periodic walk is 10 minutes away).
        for i in range(3):
            rel = f"Plate9/Images/late{i}.tiff"
            expected[rel] = f"late {i}".encode()
            write_file(layout["watch"] / rel, expected[rel])
        wait_until(
            lambda: _all_uploaded(layout["state"], s3_client, bucket, expected),
            30,
            "files created after the fallback uploaded",
        )
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]


# -- the system clock jumping -------------------------------------------------------------


def _libfaketime() -> str | None:
    """The libfaketime the ``libfaketime`` package ships (it sets a process's clock)."""
    try:
        import libfaketime
    except ImportError:
        return None
    library = Path(libfaketime.__file__).parent / "vendor/libfaketime/src/libfaketime.so.1"
    return str(library) if library.is_file() else None


def _settable_clock(offset: Path) -> list[str]:
    """A command prefix giving the daemon a wall clock ``offset``'s content sets ("-3600")."""
    offset.write_text("+0\n")
    return [
        "env",
        f"LD_PRELOAD={_libfaketime()}",
        f"FAKETIME_TIMESTAMP_FILE={offset}",
        "FAKETIME_NO_CACHE=1",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",  # only the wall clock is set, as NTP or date -s do
    ]


class _LateRelay:
    """A TCP relay to the S3 server on a port chosen now, listening only from ``open()``."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self.port = free_port()
        self._listener: socket.socket | None = None

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()

    def _accept(self) -> None:
        assert self._listener is not None
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self._upstream)) as upstream:
            back = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
            back.start()
            self._pipe(client, upstream)
            back.join()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.mark.skipif(_libfaketime() is None, reason="needs the libfaketime package")
def test_clock_set_back_an_hour_does_not_hold_retries_back_and_loses_nothing(
    tmp_path: Path, layout: dict[str, Path], s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    mark = s3_server.mark()
    relay = _LateRelay(s3_server.port)
    config = one_watch_config(
        tmp_path / "clock.toml",
        state_dir=layout["state"],
        endpoint_url=f"http://127.0.0.1:{relay.port}",
        watch_path=layout["watch"],
        destination=f"s3://{bucket}/{PREFIX}",
        settle="1s",
        daemon={"log_level": "info"},
    )
    offset = tmp_path / "clock-offset"
    clock = _settable_clock(offset)
    expected = {"Plate1/a.tiff": b"before the jump"}
    write_file(layout["watch"] / "Plate1/a.tiff", expected["Plate1/a.tiff"])
    daemon = Daemon(config, tmp_path / "daemon.log", wrapper=clock)
    try:
        # S3 cannot be reached yet: the file waits for a retry a few seconds away.
        retry = daemon.wait_for_event("retry_later", timeout=60)
        assert retry["seconds"] < 60
        offset.write_text("-3600\n")  # the clock is set back an hour
        relay.open()  # and S3 can be reached again
        jumped = daemon.wait_for_event("clock_jumped", timeout=30)
        assert -3700 < jumped["seconds"] < -3500 and jumped["files_rescheduled"] == 1
        wait_until(
            lambda: _all_uploaded(layout["state"], s3_client, bucket, expected),
            40,
            "the retry, not an hour later",
        )
        offset.write_text("+7200\n")  # then forward, past where it was
        expected["Plate1/b.tiff"] = b"after the jumps"
        write_file(layout["watch"] / "Plate1/b.tiff", expected["Plate1/b.tiff"])
        wait_until(
            lambda: _all_uploaded(layout["state"], s3_client, bucket, expected),
            40,
            "a new file after the clock went forward",
        )
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
        relay.close()
    puts = [r for r in s3_server.requests(since=mark) if r.bucket == bucket and r.method == "PUT"]
    assert sorted(r.key for r in puts) == sorted(PREFIX + k for k in expected)


@pytest.mark.skipif(_libfaketime() is None, reason="needs the libfaketime package")
def test_clock_set_back_does_not_hold_a_batch_complete_back(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, bucket: str
) -> None:
    """A batch is complete once its files are uploaded and quiet for ``settle``: the clock
    set back an hour in that quiet time must not make it an hour longer."""
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="4s", daemon={"log_level": "info"})
    offset = tmp_path / "clock-offset"
    daemon = Daemon(config, tmp_path / "daemon.log", wrapper=_settable_clock(offset))
    try:
        daemon.wait_for_event("running")
        write_file(layout["watch"] / "Plate1/a.tiff", b"the batch's only file")
        daemon.wait_for_event("uploaded")
        offset.write_text("-3600\n")  # within the batch's 4 s of quiet
        assert not any(e.get("event") == "batch_complete" for e in daemon.events()), (
            "the batch completed before the clock was set: the test proves nothing"
        )
        complete = daemon.wait_for_event("batch_complete", timeout=30)
        assert complete["batch"] == "Plate1"
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
