"""``cpg-daemon run`` end to end: a real daemon subprocess, real files, a real S3 server."""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from daemonproc import (
    ConfigMaker,
    Daemon,
    journal_rows,
    object_bytes,
    wait_object,
    wait_until,
    write_file,
)
from s3server import S3Server

from cpg_daemon.cli.localserver import free_port

MiB = 1024 * 1024


def _start(
    tmp_path: Path,
    make_config: ConfigMaker,
    bucket: str,
    *,
    settle: str = "1s",
    s3: dict[str, Any] | None = None,
    daemon: dict[str, Any] | None = None,
    name: str = "run",
) -> Daemon:
    destination = f"s3://{bucket}/cpg0001-test/broad/images/"
    config = make_config(destination, name=name, s3=s3, daemon=daemon, settle=settle)
    return Daemon.started(config, tmp_path / f"{name}.log")


PREFIX = "cpg0001-test/broad/images/"


def test_batch_moved_into_watch_is_uploaded_and_sigterm_exits_0(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    rng = random.Random(1)
    batch = layout["staging"] / "2024_04_01_Batch1"
    files = {
        "plate A/r01c01f01p01-ch1.tiff": write_file(
            batch / "plate A/r01c01f01p01-ch1.tiff", rng.randbytes(300_000)
        ),
        "plate A/r01c01f01p01-ch2.tiff": write_file(
            batch / "plate A/r01c01f01p01-ch2.tiff", rng.randbytes(200_000)
        ),
        "illum/Plate_IllumDNA.npy": write_file(
            batch / "illum/Plate_IllumDNA.npy", rng.randbytes(1000)
        ),
        "naïve 日本.csv": write_file(batch / "naïve 日本.csv", b"a,b\n1,2\n"),
        ".hidden": write_file(batch / ".hidden", b"never uploaded"),
    }
    daemon = _start(tmp_path, make_config, bucket)
    try:
        os.rename(batch, layout["watch"] / batch.name)  # `mv` on the same filesystem
        for rel, data in files.items():
            key = f"{PREFIX}2024_04_01_Batch1/{rel}"
            if rel == ".hidden":
                continue
            wait_object(s3_client, bucket, key, data)
        listed = s3_client.list_objects_v2(Bucket=bucket, Prefix=PREFIX).get("Contents", [])
        assert sorted(o["Key"] for o in listed) == sorted(
            f"{PREFIX}2024_04_01_Batch1/{rel}" for rel in files if rel != ".hidden"
        )
    finally:
        status = daemon.terminate()
    assert status == 0, daemon.log_text()
    assert any(e.get("event") == "stopped" for e in daemon.events())
    uploaded = [e for e in daemon.events() if e.get("event") == "uploaded"]
    assert {e["key"] for e in uploaded} == {o["Key"] for o in listed}
    assert all({"size", "seconds", "path", "key"} <= e.keys() for e in uploaded)


def test_file_still_being_written_is_uploaded_only_once_settled(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    daemon = _start(tmp_path, make_config, bucket, settle="1.5s")
    path = layout["watch"] / "growing.sqlite"
    key = f"{PREFIX}growing.sqlite"
    chunks = [os.urandom(64 * 1024) for _ in range(12)]
    seen_early: list[bytes] = []
    try:

        def writer() -> None:
            with open(path, "ab") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                    handle.flush()
                    time.sleep(0.4)  # well inside the settle time: never settles while writing

        thread = threading.Thread(target=writer)
        thread.start()
        while thread.is_alive():
            early = object_bytes(s3_client, bucket, key)
            if early is not None:
                seen_early.append(early)
            time.sleep(0.2)
        thread.join()
        finished = time.monotonic()
        wait_object(s3_client, bucket, key, b"".join(chunks))
        became_visible = time.monotonic() - finished
    finally:
        assert daemon.terminate() == 0
    assert seen_early == [], "an unfinished file was uploaded"
    assert became_visible < 15
    assert [e["key"] for e in daemon.events() if e.get("event") == "uploaded"] == [key]


def test_kill_9_during_multipart_resumes_without_resending_parts(
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
        # Slow enough that the kill lands mid-upload: 12 parts at ~5 parts/s.
        "max_bandwidth": "25MB",
    }
    data = os.urandom(60 * MiB)
    key = f"{PREFIX}big/plate.sqlite"
    start_mark = s3_server.mark()
    first = _start(tmp_path, make_config, bucket, s3=s3, name="first")
    write_file(layout["watch"] / "big/plate.sqlite", data)
    # Backdate the file so it is settled at once (as a file copied with its mtime is).
    os.utime(layout["watch"] / "big/plate.sqlite", (time.time() - 3600, time.time() - 3600))
    wait_until(
        lambda: len(s3_server.upload_part_requests(bucket, key, since=start_mark)) >= 3,
        30,
        "three parts to reach the server",
    )
    first.kill()
    before = s3_server.upload_part_requests(bucket, key, since=start_mark)
    assert len(before) < 12, "the whole file went up before the kill; the test proves nothing"
    upload_ids = {r.query["uploadId"] for r in before}
    assert len(upload_ids) == 1
    done_before = {int(r.query["partNumber"]) for r in before if r.status == 200}
    rows = journal_rows(layout["state"])
    assert [r["state"] for r in rows] == ["uploading"]
    assert rows[0]["upload_id"] in upload_ids

    resume_mark = s3_server.mark()
    second = _start(tmp_path, make_config, bucket, s3=s3, name="second")
    try:
        wait_object(s3_client, bucket, key, data, timeout=60)
    finally:
        assert second.terminate() == 0
    after = s3_server.upload_part_requests(bucket, key, since=resume_mark)
    assert {r.query["uploadId"] for r in after} <= upload_ids, "the upload was restarted"
    resent = done_before & {int(r.query["partNumber"]) for r in after}
    assert resent == set(), f"parts {sorted(resent)} were sent again"
    assert done_before | {int(r.query["partNumber"]) for r in after if r.status == 200} == set(
        range(1, 13)
    )
    assert any(e.get("event") == "multipart_resumed" for e in second.events())
    head = s3_client.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data)
    assert journal_rows(layout["state"])[0]["state"] == "uploaded"
    # Nothing is left open on the server.
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_sigterm_mid_multipart_exits_0_by_the_deadline_and_the_next_start_completes(
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
        "max_bandwidth": "5MB",  # 40 MiB take about 8 s: neither stop below can wait for it
    }
    data = os.urandom(40 * MiB)
    key = f"{PREFIX}big/plate.sqlite"
    write_file(layout["watch"] / "big/plate.sqlite", data)
    os.utime(layout["watch"] / "big/plate.sqlite", (time.time() - 3600, time.time() - 3600))
    mark = s3_server.mark()

    def parts_sent() -> set[int]:
        requests = s3_server.upload_part_requests(bucket, key, since=mark)
        return {int(r.query["partNumber"]) for r in requests if r.status == 200}

    # 1. SIGTERM: in-flight parts get daemon.drain_timeout, then the daemon exits 0.
    graceful = _start(
        tmp_path, make_config, bucket, s3=s3, daemon={"drain_timeout": "2s"}, name="term"
    )
    wait_until(lambda: parts_sent(), 30, "a first part")
    stop_at = time.monotonic()
    assert graceful.terminate() == 0, graceful.log_text()
    assert time.monotonic() - stop_at < 2 + 5
    assert any(e.get("event") == "drain_timeout" for e in graceful.events())
    after_first = parts_sent()
    assert len(after_first) < 8, "the upload finished; the test proves nothing"
    assert journal_rows(layout["state"])[0]["upload_id"] is not None

    # 2. A second signal does not wait for the (long) deadline.
    forced = _start(
        tmp_path, make_config, bucket, s3=s3, daemon={"drain_timeout": "60s"}, name="force"
    )
    wait_until(lambda: len(parts_sent()) > len(after_first), 30, "another part")
    forced.process.send_signal(signal.SIGTERM)
    forced.wait_for_event("stopping")
    stop_at = time.monotonic()
    assert forced.terminate() == 0, forced.log_text()
    assert time.monotonic() - stop_at < 10
    assert any(e.get("event") == "stopping_now" for e in forced.events())
    after_second = parts_sent()
    assert len(after_second) < 8, "the upload finished; the test proves nothing"

    # 3. The next start finishes the same multipart upload, no part sent twice.
    final = _start(tmp_path, make_config, bucket, s3=s3, name="final")
    try:
        wait_object(s3_client, bucket, key, data, timeout=60)
    finally:
        assert final.terminate() == 0
    requests = s3_server.upload_part_requests(bucket, key, since=mark)
    assert len({r.query["uploadId"] for r in requests}) == 1, "the upload was restarted"
    succeeded = [int(r.query["partNumber"]) for r in requests if r.status == 200]
    assert sorted(succeeded) == list(range(1, 9)), "a part was sent twice or not at all"
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_restart_and_lost_journal_do_not_upload_again(
    tmp_path: Path,
    layout: dict[str, Path],
    s3_server: S3Server,
    make_config: ConfigMaker,
    s3_client: Any,
    bucket: str,
) -> None:
    s3 = {"part_size": "5MiB", "multipart_threshold": "5MiB"}
    rng = random.Random(2)
    files = {f"plate/{i:03d}.tiff": rng.randbytes(50_000) for i in range(20)}
    files["plate/big.sqlite"] = rng.randbytes(6 * MiB)  # multipart
    for rel, data in files.items():
        write_file(layout["watch"] / rel, data)
    daemon = _start(tmp_path, make_config, bucket, s3=s3, name="first")
    try:
        for rel, data in files.items():
            wait_object(s3_client, bucket, PREFIX + rel, data)
    finally:
        assert daemon.terminate() == 0

    def all_uploaded() -> bool:
        rows = journal_rows(layout["state"])
        return len(rows) == len(files) and all(r["state"] == "uploaded" for r in rows)

    # A plain restart: the journal knows everything is done.
    mark = s3_server.mark()
    daemon = _start(tmp_path, make_config, bucket, s3=s3, name="restart")
    try:
        wait_until(all_uploaded, 30, "the journal to list every file as uploaded")
        daemon.wait_for_event("scanned")
        time.sleep(2.0)  # time for a second walk, were there one
    finally:
        assert daemon.terminate() == 0
    writes = [r for r in s3_server.requests(since=mark) if r.method in ("PUT", "POST")]
    assert writes == []
    # One walk: it waited for inotify to be live, so nothing calls for another one
    # (on 1,000,000 files a second walk doubled the CPU of a start, bench/daemon.py).
    walks = [e for e in daemon.events() if e.get("event") == "scanned"]
    assert len(walks) == 1, walks

    # The journal is lost: the files are recognised on the server by size and checksum.
    shutil.rmtree(layout["state"])
    layout["state"].mkdir()
    mark = s3_server.mark()
    daemon = _start(tmp_path, make_config, bucket, s3=s3, name="lost")
    try:
        wait_until(all_uploaded, 30, "the new journal to list every file as uploaded")
    finally:
        assert daemon.terminate() == 0
    writes = [r for r in s3_server.requests(since=mark) if r.method in ("PUT", "POST")]
    assert writes == [], f"{len(writes)} write requests after the journal was lost"
    present = [e for e in daemon.events() if e.get("event") == "already_present"]
    assert len(present) == len(files)


def test_changed_file_is_uploaded_again(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    path = layout["watch"] / "profiles.csv"
    write_file(path, b"version 1\n")
    daemon = _start(tmp_path, make_config, bucket, settle="0.5s")
    try:
        wait_object(s3_client, bucket, PREFIX + "profiles.csv", b"version 1\n")
        write_file(path, b"version 2 (longer)\n")
        wait_object(s3_client, bucket, PREFIX + "profiles.csv", b"version 2 (longer)\n")
    finally:
        assert daemon.terminate() == 0


def test_name_s3_cannot_take_is_failed_visibly_and_others_continue(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    long_name = "/".join(["d" * 200] * 5) + "/image.tiff"  # a legal path, a 1000+ byte key
    write_file(layout["watch"] / long_name, b"data")
    write_file(layout["watch"] / "fine.tiff", b"fine")
    daemon = _start(tmp_path, make_config, bucket)
    try:
        wait_object(s3_client, bucket, PREFIX + "fine.tiff", b"fine")
        rows = wait_until(
            lambda: [r for r in journal_rows(layout["state"]) if r["state"] == "failed"],
            10,
            "the long name to be marked failed",
        )
    finally:
        assert daemon.terminate() == 0
    assert len(rows) == 1
    assert "1024" in rows[0]["last_error"]


def test_symlinks_and_special_files_are_never_uploaded(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    secret = tmp_path / "outside" / "passwd"
    write_file(secret, b"root:x:0:0::/root:/bin/bash\n")
    (layout["watch"] / "plate").mkdir()
    os.symlink(secret, layout["watch"] / "plate" / "passwd")  # a file link out of the watch
    os.symlink(secret.parent, layout["watch"] / "outside-dir")  # a folder link out of it
    os.mkfifo(layout["watch"] / "plate" / "pipe")
    write_file(layout["watch"] / "plate" / "real.tiff", b"image")
    daemon = _start(tmp_path, make_config, bucket)
    try:
        wait_object(s3_client, bucket, PREFIX + "plate/real.tiff", b"image")
        time.sleep(1.5)  # one more settle period for anything else to show up
    finally:
        assert daemon.terminate() == 0
    listed = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [o["Key"] for o in listed] == [PREFIX + "plate/real.tiff"]
    assert [r["rel_path"] for r in journal_rows(layout["state"])] == [b"plate/real.tiff"]


def test_restart_gives_failed_files_another_round(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    write_file(layout["watch"] / "a.tiff", b"a")
    # Files for a bucket that does not exist fail with a clear reason ...
    config = make_config(f"s3://{bucket}-missing/x/")
    daemon = Daemon(config, tmp_path / "missing.log")
    try:
        rows = wait_until(
            lambda: [r for r in journal_rows(layout["state"]) if r["state"] == "failed"],
            30,
            "the file to fail",
        )
    finally:
        assert daemon.terminate() == 0
    assert "bucket does not exist" in rows[0]["last_error"]
    # ... and once the bucket exists, a restart uploads them without touching the files.
    s3_client.create_bucket(Bucket=f"{bucket}-missing")
    daemon = Daemon(config, tmp_path / "again.log")
    try:
        wait_object(s3_client, f"{bucket}-missing", "x/a.tiff", b"a")
    finally:
        assert daemon.terminate() == 0
    starting = next(e for e in daemon.events() if e.get("event") == "starting")
    assert starting["retried_failed_files"] == 1


def test_ready_marker_holds_a_folder_back_until_it_appears(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.5s", ready_marker="UPLOAD_READY")
    write_file(layout["watch"] / "Batch1" / "plate" / "a.tiff", b"a")
    write_file(layout["watch"] / "top-level.csv", b"t")
    daemon = Daemon(config, tmp_path / "marker.log")
    try:
        daemon.wait_for_event("running")
        wait_object(s3_client, bucket, PREFIX + "top-level.csv", b"t")
        time.sleep(2.0)  # several settle periods: the folder without its marker must wait
        assert object_bytes(s3_client, bucket, PREFIX + "Batch1/plate/a.tiff") is None
        write_file(layout["watch"] / "Batch1" / "UPLOAD_READY", b"")
        wait_object(s3_client, bucket, PREFIX + "Batch1/plate/a.tiff", b"a")
    finally:
        assert daemon.terminate() == 0
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert sorted(keys) == [PREFIX + "Batch1/plate/a.tiff", PREFIX + "top-level.csv"]


def test_watch_folder_created_after_start_is_picked_up(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    layout["watch"].rmdir()  # e.g. a network mount that is not there yet
    daemon = _start(tmp_path, make_config, bucket)
    try:
        daemon.wait_for_event("watch_path_missing")
        staged = layout["staging"] / "outbox"
        write_file(staged / "plate" / "a.tiff", b"a")
        os.rename(staged, layout["watch"])
        # Well before the 10-minute rescan: the daemon notices the folder itself.
        wait_object(s3_client, bucket, PREFIX + "plate/a.tiff", b"a", timeout=15)
    finally:
        assert daemon.terminate() == 0


def test_metrics_endpoint_reports_what_was_uploaded(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    import urllib.request

    port = free_port()
    config = make_config(
        f"s3://{bucket}/{PREFIX}", settle="0.5s", daemon={"metrics_listen": f"127.0.0.1:{port}"}
    )
    for i in range(3):
        write_file(layout["watch"] / f"{i}.tiff", b"x" * (100 + i))
    daemon = Daemon(config, tmp_path / "metrics.log")
    try:
        for i in range(3):
            wait_object(s3_client, bucket, f"{PREFIX}{i}.tiff", b"x" * (100 + i))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        assert daemon.terminate() == 0
    assert 'cpg_daemon_files_uploaded_total{watch="plates"} 3.0' in text
    assert 'cpg_daemon_bytes_uploaded_total{watch="plates"} 303.0' in text
    assert 'cpg_daemon_files_queued{watch="plates"} 0.0' in text
    assert 'cpg_daemon_credentials_valid{target="(environment)"} 1.0' in text


def test_metrics_counters_only_go_up_and_the_exposition_parses(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    """A file rewritten smaller: the journal's uploaded bytes go down, but a counter that
    went down would read as a restart to Prometheus; bytes sent only ever add up."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    config = make_config(
        f"s3://{bucket}/{PREFIX}", settle="0.5s", daemon={"metrics_listen": f"127.0.0.1:{port}"}
    )

    def scrape() -> dict[str, float]:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        values = {}
        for family in text_string_to_metric_families(text):  # the client's own parser
            for sample in family.samples:
                values[sample.name] = sample.value
        return values

    big = write_file(layout["watch"] / "Batch1" / "table.csv", b"x" * 1000)
    daemon = Daemon(config, tmp_path / "metrics.log")
    try:
        wait_object(s3_client, bucket, f"{PREFIX}Batch1/table.csv", big)
        first = scrape()
        small = write_file(layout["watch"] / "Batch1" / "table.csv", b"y" * 10)
        wait_object(s3_client, bucket, f"{PREFIX}Batch1/table.csv", small)
        wait_until(lambda: scrape()["cpg_daemon_files_uploaded_total"] == 2, 20, "2 uploads")
        second = scrape()
    finally:
        assert daemon.terminate() == 0
    assert first["cpg_daemon_bytes_uploaded_total"] == 1000
    assert second["cpg_daemon_bytes_uploaded_total"] == 1010  # not 10, as in the journal
    assert second["cpg_daemon_upload_duration_seconds_count"] == 2
    assert second["cpg_daemon_last_upload_timestamp_seconds"] >= first[
        "cpg_daemon_last_upload_timestamp_seconds"
    ]
    assert second["cpg_daemon_build_info"] == 1
    assert second["process_resident_memory_bytes"] > 0  # the standard process metrics
    assert second["cpg_daemon_upload_failures_total"] == 0

