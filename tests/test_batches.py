"""Batch complete: once per batch, with the right counts; hooks that fail change nothing else."""

from __future__ import annotations

import json
import os
import shlex
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from daemonproc import (
    ConfigMaker,
    Daemon,
    journal_rows,
    object_bytes,
    run_cli,
    status_json,
    wait_until,
    write_file,
)
from pipeline import assert_counts_agree, configs_of, until
from structlog.testing import capture_logs

from cpg_daemon.core.clock import ManualClock
from cpg_daemon.core.config import WatchConfig
from cpg_daemon.core.errors import CredentialsError
from cpg_daemon.core.objectkeys import S3Location
from cpg_daemon.engine import batches
from cpg_daemon.engine.batches import BatchTracker, hook_environment, run_hook
from cpg_daemon.journal import Discovered, Journal

PREFIX = "cpg0001-test/broad/images/"


# -- the journal's view of a batch ----------------------------------------------------------


@pytest.fixture
async def journal(tmp_path: Path, anyio_backend: str) -> AsyncIterator[Journal]:
    j = await Journal.open(tmp_path / "state" / "journal.sqlite3")
    try:
        yield j
    finally:
        await j.close()
    assert_counts_agree(tmp_path / "state" / "journal.sqlite3")


async def _upload(journal: Journal, watch: str, *rels: str, size: int = 100) -> None:
    """Files recorded, claimed and marked uploaded, as the scheduler would."""
    await journal.record_discovered(
        watch, [Discovered(rel, "bkt", f"p/{rel}", size, 1) for rel in rels]
    )
    for record in await journal.claim(len(rels) + 10, [watch]):
        assert await journal.mark_uploaded(
            record, etag="e", checksum_algorithm="CRC32C", checksum="c"
        )


@pytest.mark.anyio
async def test_batch_names_and_progress_keep_to_one_top_level_folder(journal: Journal) -> None:
    await _upload(journal, "w", "B1/a", "B1/sub/b", "B10/c", "B1-x/d", "B1.csv", "root.txt")
    await _upload(journal, "other", "B1/z")
    await journal.record_discovered("w", [Discovered("B1/queued", "bkt", "p/B1/queued", 7, 1)])
    assert await journal.batch_names("w") == ["B1-x", "B1", "B10"]
    assert await journal.batch_names("nothing") == []
    progress = await journal.batch_progress("w", "B1")
    assert (progress.files, progress.uploaded, progress.bytes) == (3, 2, 207)
    assert progress.recorded is None
    ten = await journal.batch_progress("w", "B10")
    assert (ten.files, ten.uploaded, ten.bytes) == (1, 1, 100)


def _watch(path: Path, **settings: Any) -> WatchConfig:
    return WatchConfig(
        name="w", path=path, destination=S3Location("bkt", "p/"), settle=0.0, **settings
    )


def _completions(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "batch_complete"]


async def _eventually(check: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        await anyio.sleep(0.02)
    raise AssertionError(f"not true within {seconds} s")


@pytest.mark.anyio
async def test_tracker_fires_once_and_again_only_after_a_change(
    journal: Journal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batches, "MIN_QUIET", 0.05)
    monkeypatch.setattr(batches, "RECHECK", 0.05)
    settling = {"B1": True}
    tracker = BatchTracker(
        journal, configs_of(_watch(tmp_path)), lambda w, f: settling.get(f, False)
    )
    await _upload(journal, "w", "B1/a", size=10)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(tracker.run)
            tracker.touch("w", "B1/a")
            tracker.touch("w", "loose.csv")  # in the root: no batch
            await anyio.sleep(0.4)
            assert _completions(logs) == []  # a file still settling in the watcher
            await journal.record_discovered("w", [Discovered("B1/b", "bkt", "p/B1/b", 20, 1)])
            settling["B1"] = False
            await anyio.sleep(0.4)
            assert _completions(logs) == []  # one file still queued
            await _upload(journal, "w", "B1/b", size=20)
            tracker.touch("w", "B1/b")
            await _eventually(lambda: len(_completions(logs)) == 1)
            tracker.touch("w", "B1/b")  # no change: no second event
            await anyio.sleep(0.4)
            assert len(_completions(logs)) == 1
            await _upload(journal, "w", "B1/c", size=30)
            tracker.touch("w", "B1/c")
            await _eventually(lambda: len(_completions(logs)) == 2)
            tg.cancel_scope.cancel()
    first, second = _completions(logs)
    assert (first["batch"], first["files"], first["bytes"], first["again"]) == ("B1", 2, 30, False)
    assert first["destination"] == "s3://bkt/p/B1/"
    assert first["path"] == str(tmp_path / "B1")
    assert (second["files"], second["bytes"], second["again"]) == (3, 60, True)
    assert [(b.name, b.files, b.hook_state) for b in tracker.statistics().completed] == [
        ("B1", 3, "none")
    ]
    # A restart looks at every batch once and finds nothing new.
    again = BatchTracker(journal, configs_of(_watch(tmp_path)), lambda w, f: False)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(again.run)
            await anyio.sleep(0.4)
            assert again.statistics().following == 0
            tg.cancel_scope.cancel()
    assert _completions(logs) == []
    assert [b.files for b in again.statistics().completed] == [3]


@pytest.mark.anyio
async def test_a_failed_file_or_a_missing_ready_marker_keeps_a_batch_open(
    journal: Journal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batches, "MIN_QUIET", 0.05)
    await _upload(journal, "w", "Failing/a", "Marked/a")
    await journal.record_rejected("w", "Failing/bad", "p/Failing/bad", "a name S3 cannot take")
    tracker = BatchTracker(
        journal, configs_of(_watch(tmp_path, ready_marker="READY")), lambda w, f: False
    )
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(tracker.run)
            await anyio.sleep(0.4)
            assert _completions(logs) == []
            (tmp_path / "Marked").mkdir()
            (tmp_path / "Marked" / "READY").touch()
            (tmp_path / "Failing").mkdir()
            (tmp_path / "Failing" / "READY").touch()
            tracker.touch("w", "Marked/a")
            tracker.touch("w", "Failing/a")
            await _eventually(lambda: len(_completions(logs)) == 1)
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()
    assert [e["batch"] for e in _completions(logs)] == ["Marked"]


# -- the manifest, uploaded beside the data (upload_manifest) --------------------------------


@pytest.mark.anyio
async def test_a_batchs_manifest_is_uploaded_and_a_failed_upload_only_logged(
    journal: Journal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With upload_manifest the manifest and its .sha256 go to the watch's store (the key
    in the event and status); when that fails the batch completes all the same."""
    monkeypatch.setattr(batches, "MIN_QUIET", 0.05)
    sent: list[tuple[str, str, str, Path]] = []
    refuse = {"Refused"}

    async def send(watch: str, bucket: str, key: str, path: Path) -> str:
        if key.split("/")[5] in refuse:
            raise CredentialsError(f"PutObject s3://{bucket}/{key}: AccessDenied: Access Denied")
        sent.append((watch, bucket, key, path))
        return '"etag"'

    watch = WatchConfig(
        "w", tmp_path, S3Location("bkt", "cpg0001-x/broad/images/"), settle=0.0,
        upload_manifest=True,
    )  # fmt: skip
    tracker = BatchTracker(journal, configs_of(watch), lambda w, f: False, send=send)
    await _upload(journal, "w", "Sent/a", "Refused/a")
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(tracker.run)
            await _eventually(lambda: len(_completions(logs)) == 2)
            tg.cancel_scope.cancel()
    done = {e["batch"]: e for e in _completions(logs)}
    folder = "cpg0001-x/broad/workspace/qc/upload_manifests/"
    path = Path(done["Sent"]["manifest"])
    key = f"{folder}Sent/{path.name}"
    assert sent == [
        ("w", "bkt", key, path),
        ("w", "bkt", key + ".sha256", path.with_name(path.name + ".sha256")),
    ]
    assert done["Sent"]["manifest_uploaded_to"] == f"s3://bkt/{key}"
    (uploaded,) = [e for e in logs if e["event"] == "manifest_uploaded"]
    assert (uploaded["batch"], uploaded["key"]) == ("Sent", key)
    # Refused: logged with S3's answer, and the batch complete with its local manifest.
    (refused,) = [e for e in logs if e["event"] == "manifest_not_uploaded"]
    assert refused["log_level"] == "warning" and refused["batch"] == "Refused"
    assert "AccessDenied" in refused["error"] and refused["key"].startswith(f"{folder}Refused/")
    assert done["Refused"]["manifest_uploaded_to"] is None
    assert await anyio.Path(done["Refused"]["manifest"]).is_file()
    shown = {b.name: b for b in tracker.statistics().completed}
    manifests = tracker.statistics().manifests
    assert manifests[("w", "Sent", shown["Sent"].completed_at)].uploaded_to == f"s3://bkt/{key}"
    assert manifests[("w", "Refused", shown["Refused"].completed_at)].uploaded_to is None


# -- hooks ----------------------------------------------------------------------------------


def test_hook_environment_has_no_secrets() -> None:
    base = {
        "PATH": "/usr/bin",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SESSION_TOKEN": "t",
        "aws_profile": "p",
        "CREDENTIALS_DIRECTORY": "/run/credentials/cpg-daemon.service",
        "NOTIFY_SOCKET": "/run/systemd/notify",
    }
    data = {
        "event": "batch_complete",
        "watch": "w",
        "batch": "B1",
        "path": "/data/B1",
        "destination": "s3://b/p/B1/",
        "files": 2,
        "bytes": 30,
    }
    assert hook_environment(base, data) == {
        "PATH": "/usr/bin",
        "CPG_EVENT": "batch_complete",
        "CPG_WATCH": "w",
        "CPG_BATCH": "B1",
        "CPG_PATH": "/data/B1",
        "CPG_DESTINATION": "s3://b/p/B1/",
        "CPG_FILES": "2",
        "CPG_BYTES": "30",
    }


@pytest.mark.anyio
async def test_hook_gets_stdin_and_its_failure_and_output_are_reported(tmp_path: Path) -> None:
    out = tmp_path / "stdin.json"
    ok = await run_hook(f"cat > {shlex.quote(str(out))}", b'{"a": 1}\n', {"PATH": os.defpath})
    assert (ok.ok, ok.detail) == (True, "exit status 0")
    assert out.read_bytes() == b'{"a": 1}\n'
    failed = await run_hook("echo to stdout; echo no mail server >&2; exit 3", b"", {})
    assert (failed.ok, failed.detail) == (False, "exit status 3")
    assert failed.output == "to stdout\nno mail server"
    # A hook that never reads its input, and one that talks a lot.
    quiet = await run_hook("exit 0", b"x" * 200_000, {})
    assert quiet.ok
    loud = await run_hook(
        "i=0; while [ $i -lt 2000 ]; do echo 0123456789; i=$((i+1)); done", b"", {}
    )
    assert loud.ok
    assert len(loud.output) < batches.HOOK_OUTPUT_LIMIT + 50
    assert loud.output.endswith("(18000 more bytes)")


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (a container's PID 1 may not reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


@pytest.mark.anyio
async def test_hook_past_its_time_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    command = f"sleep 600 & echo $! > {shlex.quote(str(pids))}; echo $$ >> {pids}; sleep 600"
    started = time.monotonic()
    result = await run_hook(command, b"", {"PATH": os.defpath}, kill_after=0.5)
    assert time.monotonic() - started < 5
    assert not result.ok
    assert result.detail.startswith("timed out after 0.5 s")
    for pid in map(int, pids.read_text().split()):
        wait_until(lambda pid=pid: _gone(pid), 5, f"process {pid} to be gone")


@pytest.mark.anyio
async def test_a_hooks_time_limit_is_kept_on_the_engines_clock(tmp_path: Path) -> None:
    """The limit is read on the clock the engine runs on: 300 s pass on a manual clock
    in no real time, and the hook is killed then, not before."""
    clock = ManualClock()
    pid_file = tmp_path / "pid"
    results: list[batches.HookResult] = []

    async def hook() -> None:
        command = f"echo $$ > {shlex.quote(str(pid_file))}; exec sleep 600"
        results.append(await run_hook(command, b"", {"PATH": os.defpath}, 300, clock))

    async with anyio.create_task_group() as tg:
        tg.start_soon(hook)
        # Started, and its time limit asleep on the clock.
        await until(lambda: clock.sleepers > 0 and pid_file.exists() and bool(pid_file.read_text()))
        clock.advance(299)
        await clock.settle()
        await anyio.sleep(0.1)
        assert results == [], "killed before its time on the clock"
        clock.advance(1)
        await until(lambda: bool(results))  # SIGTERM, then a real grace if it stays
    assert results[0].detail.startswith("timed out after 300 s")
    assert results[0].seconds == 300.0
    pid = int(pid_file.read_text())
    wait_until(lambda: _gone(pid), 5, "the hook to be gone")


@pytest.mark.anyio
async def test_a_cancelled_hook_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    with anyio.move_on_after(0.5):
        await run_hook(f"echo $$ > {shlex.quote(str(pid_file))}; exec sleep 600", b"", {})
    assert time.monotonic() - started < 5
    pid = int(pid_file.read_text())
    wait_until(lambda: _gone(pid), 5, "the hook to be gone")


# -- the daemon -----------------------------------------------------------------------------


def _events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") == name]


def _hook_states(config: Path) -> dict[str, str]:
    return {b["batch"]: b["hook"] for b in status_json(config)["batches"]["completed"]}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_each_batch_completes_once_and_its_hook_gets_the_summary(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    out = shlex.quote(str(layout["hooks"]))
    hook = f'env > {out}/"$CPG_BATCH.env"; cat > {out}/"$CPG_BATCH.json"'
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.5s", on_batch_complete=hook)
    staging = layout["staging"]
    sizes = {
        "Batch1/plate/a.tiff": 1000,
        "Batch1/plate/b.tiff": 2000,
        "Batch1/illum/Plate_IllumDNA.npy": 300,
        "Batch2/c.csv": 50,
        "Batch2/d.csv": 60,
    }
    for rel, size in sizes.items():
        write_file(staging / rel, os.urandom(size))
    daemon = Daemon(config, tmp_path / "first.log")
    try:
        daemon.wait_for_event("running")
        os.rename(staging / "Batch1", layout["watch"] / "Batch1")
        os.rename(staging / "Batch2", layout["watch"] / "Batch2")
        write_file(layout["watch"] / "loose.csv", b"in the root: part of no batch")
        wait_until(lambda: len(_events(daemon, "batch_complete")) == 2, 30, "two batches")
        wait_until(
            lambda: _hook_states(config) == {"Batch1": "ok", "Batch2": "ok"}, 30, "both hooks"
        )
        status = status_json(config)
        human = run_cli("status", "-c", str(config)).stdout
        time.sleep(1.5)  # a few more settle periods: nothing fires twice
    finally:
        assert daemon.terminate() == 0, daemon.log_text()
    events = {e["batch"]: e for e in _events(daemon, "batch_complete")}
    assert sorted(events) == ["Batch1", "Batch2"]
    assert (events["Batch1"]["files"], events["Batch1"]["bytes"]) == (3, 3300)
    assert (events["Batch2"]["files"], events["Batch2"]["bytes"]) == (2, 110)
    assert events["Batch1"]["destination"] == f"s3://{bucket}/{PREFIX}Batch1/"
    assert {"first_uploaded_at", "last_uploaded_at", "duration_s", "path"} <= set(events["Batch1"])
    uploads = {e["key"] for e in _events(daemon, "uploaded")}
    assert uploads == {PREFIX + rel for rel in sizes} | {PREFIX + "loose.csv"}

    summary = _read_json(layout["hooks"] / "Batch1.json")
    assert summary["event"] == "batch_complete"
    assert (summary["watch"], summary["batch"]) == ("plates", "Batch1")
    assert summary["path"] == str(layout["watch"] / "Batch1")
    assert summary["destination"] == f"s3://{bucket}/{PREFIX}Batch1/"
    assert (summary["files"], summary["bytes"]) == (3, 3300)
    assert summary["first_uploaded_at"] <= summary["last_uploaded_at"] <= summary["completed_at"]
    env = (layout["hooks"] / "Batch1.env").read_text()
    assert "testing-secret" not in env  # the aws_env fixture's AWS_SECRET_ACCESS_KEY
    assert "AWS_" not in env
    assert "CPG_BATCH=Batch1\n" in env and "CPG_WATCH=plates\n" in env
    assert f"CPG_DESTINATION=s3://{bucket}/{PREFIX}Batch1/\n" in env

    shown = status["batches"]["completed"]
    assert [(b["batch"], b["files"], b["bytes"]) for b in shown] in (
        [("Batch1", 3, 3300), ("Batch2", 2, 110)],
        [("Batch2", 2, 110), ("Batch1", 3, 3300)],
    )
    assert status["files"]["failed"] == 0
    assert "batches complete" in human and "plates/Batch1: 3 files" in human

    # A restart does not fire again; a file added later completes the batch again.
    daemon = Daemon(config, tmp_path / "second.log")
    try:
        daemon.wait_for_event("running")
        wait_until(
            lambda: status_json(config)["batches"]["following"] == 0, 30, "every batch looked at"
        )
        assert _events(daemon, "batch_complete") == []
        assert [b["batch"] for b in status_json(config)["batches"]["completed"]] != []
        write_file(layout["watch"] / "Batch1/plate/e.tiff", os.urandom(400))
        again = daemon.wait_for_event("batch_complete")
        wait_until(
            lambda: (_read_json(layout["hooks"] / "Batch1.json") or {}).get("files") == 4,
            30,
            "the hook to run again",
        )
        time.sleep(1.5)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()
    assert (again["batch"], again["files"], again["bytes"], again["again"]) == (
        "Batch1",
        4,
        3700,
        True,
    )
    assert len(_events(daemon, "batch_complete")) == 1


def test_a_batch_with_a_file_still_being_written_completes_once_it_is_uploaded(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="1.5s", on_batch_complete="")
    done = write_file(layout["watch"] / "Batch3/done.tiff", os.urandom(5000))
    old = time.time() - 3600
    os.utime(layout["watch"] / "Batch3/done.tiff", (old, old))  # settled at once
    chunks = [os.urandom(32 * 1024) for _ in range(10)]
    daemon = Daemon(config, tmp_path / "growing.log")
    try:
        daemon.wait_for_event("running")

        def writer() -> None:
            with open(layout["watch"] / "Batch3/growing.sqlite", "ab") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                    handle.flush()
                    time.sleep(0.4)  # inside the settle time: never settles while written

        thread = threading.Thread(target=writer)
        thread.start()
        while thread.is_alive():
            assert _events(daemon, "batch_complete") == [], "completed while a file was written"
            time.sleep(0.1)
        thread.join()
        assert object_bytes(s3_client, bucket, PREFIX + "Batch3/done.tiff") == done
        event = daemon.wait_for_event("batch_complete")
        time.sleep(2.0)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()
    assert (event["files"], event["bytes"]) == (2, 5000 + 10 * 32 * 1024)
    names = [
        (e["event"], e.get("key"))
        for e in daemon.events()
        if e.get("event") in ("uploaded", "batch_complete")
    ]
    assert names.index(("uploaded", PREFIX + "Batch3/growing.sqlite")) < names.index(
        ("batch_complete", None)
    )
    assert len(_events(daemon, "batch_complete")) == 1


def test_failing_and_hanging_hooks_change_nothing_else(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    out = shlex.quote(str(layout["hooks"]))
    hook = (
        'case "$CPG_BATCH" in '
        "Fail*) echo no mail server >&2; exit 3;; "
        f"Hang*) echo $$ > {out}/hang.pid; exec sleep 600;; "
        "esac; "
        f'cat > {out}/"$CPG_BATCH.json"'
    )
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.5s", on_batch_complete=hook)
    data = {
        "FailBatch/a.tiff": os.urandom(100),
        "FailBatch/b.tiff": os.urandom(200),
        "HangBatch/a.tiff": os.urandom(300),
        "LaterBatch/plate/a.tiff": os.urandom(400),
        "LaterBatch/plate/b.tiff": os.urandom(500),
    }
    for rel, content in data.items():
        write_file(layout["staging"] / rel, content)
    daemon = Daemon(config, tmp_path / "hooks.log")
    try:
        daemon.wait_for_event("running")
        os.rename(layout["staging"] / "FailBatch", layout["watch"] / "FailBatch")
        failed = daemon.wait_for_event("batch_hook_failed")
        os.rename(layout["staging"] / "HangBatch", layout["watch"] / "HangBatch")
        pid = int(wait_until(lambda: _read_text(layout["hooks"] / "hang.pid"), 30, "the hang"))
        # With one hook hanging, uploads and batch completions go on.
        os.rename(layout["staging"] / "LaterBatch", layout["watch"] / "LaterBatch")
        wait_until(lambda: len(_events(daemon, "batch_complete")) == 3, 30, "the third batch")
        for rel, content in data.items():
            assert object_bytes(s3_client, bucket, PREFIX + rel) == content
        status = status_json(config)
        assert not (layout["hooks"] / "LaterBatch.json").exists()  # one hook at a time
        stop_at = time.monotonic()
    finally:
        assert daemon.terminate() == 0, daemon.log_text()
    assert time.monotonic() - stop_at < batches.HOOK_STOP_GRACE + 5
    wait_until(lambda: _gone(pid), 5, "the hanging hook to be killed")
    assert (failed["batch"], failed["error"]) == ("FailBatch", "exit status 3")
    assert failed["output"] == "no mail server"
    shown = {b["batch"]: b for b in status["batches"]["completed"]}
    assert shown["FailBatch"]["hook"] == "failed"
    assert shown["FailBatch"]["hook_detail"] == "exit status 3: no mail server"
    assert shown["HangBatch"]["hook"] == "running"
    assert shown["LaterBatch"]["hook"] == "queued"
    assert status["batches"]["hooks_running"] == 1 and status["batches"]["hooks_queued"] == 1
    assert status["files"] == {
        "queued": 0,
        "uploading": 0,
        "uploaded": 5,
        "failed": 0,
        "settling": 0,
    }
    assert status["recent_errors"] == []
    assert {r["state"] for r in journal_rows(layout["state"])} == {"uploaded"}
    assert [e["batch"] for e in _events(daemon, "batch_hook_failed")] == [
        "FailBatch",
        "HangBatch",
    ]

    # Next start: the queued hook runs; those that failed or were killed do not run again.
    (layout["hooks"] / "hang.pid").unlink()
    daemon = Daemon(config, tmp_path / "after.log")
    try:
        summary = wait_until(
            lambda: _read_json(layout["hooks"] / "LaterBatch.json"), 30, "the queued hook"
        )
        wait_until(
            lambda: (
                _hook_states(config)
                == {"FailBatch": "failed", "HangBatch": "failed", "LaterBatch": "ok"}
            ),
            30,
            "the hooks' outcomes",
        )
        time.sleep(1.0)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()
    assert (summary["batch"], summary["files"], summary["bytes"]) == ("LaterBatch", 2, 900)
    assert not (layout["hooks"] / "hang.pid").exists()
    assert _events(daemon, "batch_complete") == []
    assert _events(daemon, "batch_hook_failed") == []


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def test_sigterm_while_a_hook_runs_kills_it_after_a_grace(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, bucket: str
) -> None:
    pid_file = layout["hooks"] / "pid"
    hook = f"echo $$ > {shlex.quote(str(pid_file))}; trap '' TERM; exec sleep 600"
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.5s", on_batch_complete=hook)
    write_file(layout["watch"] / "Batch/a.tiff", b"a")
    daemon = Daemon(config, tmp_path / "stop.log")
    try:
        pid = int(wait_until(lambda: _read_text(pid_file), 30, "the hook to start"))
        daemon.process.send_signal(signal.SIGTERM)
        stop_at = time.monotonic()
        assert daemon.wait(30) == 0, daemon.log_text()
    finally:
        daemon.terminate()
    assert time.monotonic() - stop_at > batches.HOOK_STOP_GRACE - 0.5
    assert time.monotonic() - stop_at < batches.HOOK_STOP_GRACE + 5
    wait_until(lambda: _gone(pid), 5, "the hook to be killed")
