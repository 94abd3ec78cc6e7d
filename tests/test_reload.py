"""Reload (SIGHUP or ``cpg-daemon reload``) on a running daemon subprocess.

Watches are added, removed and changed without losing the queue or restarting
uploads in flight; a broken configuration changes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from daemonproc import Daemon, journal_rows, object_bytes, run_cli, wait_until, write_config
from s3server import S3Server

MiB = 1024 * 1024


class Setup:
    """Two candidate watch folders, one config file rewritten by each test."""

    def __init__(self, tmp_path: Path, s3_server: S3Server, bucket: str) -> None:
        self.tmp = tmp_path
        self.server = s3_server
        self.bucket = bucket
        self.state = tmp_path / "state"
        self.config = tmp_path / "config.toml"
        self.socket = str(self.state / "control.sock")
        self.folders = {name: tmp_path / name for name in ("images", "workspace")}
        for folder in self.folders.values():
            folder.mkdir()

    def watch(self, name: str, prefix: str | None = None, **keys: Any) -> dict[str, Any]:
        prefix = prefix or f"cpg0001-test/broad/{name}/"
        return {
            "name": name,
            "path": str(self.folders[name]),
            "destination": f"s3://{self.bucket}/{prefix}",
            "settle": "1s",
            **keys,
        }

    def write(self, *watches: dict[str, Any], s3: dict[str, Any] | None = None) -> None:
        write_config(
            self.config,
            state_dir=self.state,
            endpoint_url=self.server.endpoint_url,
            watches=list(watches),
            s3=s3,
        )

    def start(self) -> Daemon:
        daemon = Daemon(self.config, self.tmp / "daemon.log")
        daemon.wait_for_event("running")
        return daemon

    def status(self) -> dict[str, Any]:
        result = run_cli("status", "--json", "-s", self.socket)
        assert result.returncode == 0, result.stderr
        reply: dict[str, Any] = json.loads(result.stdout)
        return reply

    def put(self, watch: str, rel: str, data: bytes) -> None:
        path = self.folders[watch] / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (time.time() - 3600, time.time() - 3600))  # settled already

    def wait_object(self, key: str, data: bytes, timeout: float = 30) -> None:
        wait_until(
            lambda: object_bytes(self.s3, self.bucket, key) == data,
            timeout,
            f"s3://{self.bucket}/{key}",
        )

    s3: Any = None


@pytest.fixture
def setup(tmp_path: Path, s3_server: S3Server, s3_client: Any, bucket: str) -> Setup:
    result = Setup(tmp_path, s3_server, bucket)
    result.s3 = s3_client
    return result


def _reloads(daemon: Daemon) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") in ("reloaded", "reload_failed")]


def test_sighup_adds_a_watch_whose_files_upload(setup: Setup) -> None:
    setup.write(setup.watch("images"))
    setup.put("workspace", "backend/Batch1/P1/P1.sqlite", b"profiles" * 1000)
    daemon = setup.start()
    try:
        setup.put("images", "Batch1/a.tiff", b"a" * 2000)
        setup.wait_object("cpg0001-test/broad/images/Batch1/a.tiff", b"a" * 2000)
        # Not watched yet: nothing of the workspace folder reaches S3.
        assert [w["name"] for w in setup.status()["watches"]] == ["images"]
        setup.write(setup.watch("images"), setup.watch("workspace"))
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: _reloads(daemon), 30, "the reload")
        assert _reloads(daemon)[0]["added"] == ["workspace"]
        setup.wait_object(
            "cpg0001-test/broad/workspace/backend/Batch1/P1/P1.sqlite", b"profiles" * 1000
        )
        # And the new watch is watched, not only walked once.
        setup.put("workspace", "backend/Batch1/P2/P2.sqlite", b"more" * 1000)
        setup.wait_object(
            "cpg0001-test/broad/workspace/backend/Batch1/P2/P2.sqlite", b"more" * 1000
        )
        status = setup.status()
        assert [w["name"] for w in status["watches"]] == ["images", "workspace"]
        assert status["config"]["reload_error"] is None
    finally:
        assert daemon.terminate() == 0, daemon.log_text()


def test_broken_config_on_reload_keeps_the_old_one_running(setup: Setup) -> None:
    setup.write(setup.watch("images"))
    daemon = setup.start()
    try:
        setup.config.write_text(setup.config.read_text() + "[s3\nbroken = \n", encoding="utf-8")
        daemon.process.send_signal(signal.SIGHUP)
        failed = wait_until(lambda: _reloads(daemon), 30, "the failed reload")
        assert failed[0]["event"] == "reload_failed"
        assert str(setup.config) in failed[0]["error"]
        assert daemon.process.poll() is None, "a bad config stopped the daemon"
        # The old configuration keeps uploading.
        setup.put("images", "Batch1/b.tiff", b"b" * 3000)
        setup.wait_object("cpg0001-test/broad/images/Batch1/b.tiff", b"b" * 3000)
        status = setup.status()
        assert "not valid TOML" in status["config"]["reload_error"]
        human = run_cli("status", "-s", setup.socket)
        assert "the last reload failed" in human.stdout
        # `cpg-daemon reload` (the unit's ExecReload) says so and exits 1.
        result = run_cli("reload", "-s", setup.socket)
        assert result.returncode == 1
        assert "previous one keeps running" in result.stderr
        assert str(setup.config) in result.stderr
        # `reload -c` with a file that is TOML but not a valid config still reaches the
        # daemon (found through daemon.socket), which refuses it and says why.
        setup.write(setup.watch("images"), s3={"part_sise": "8MiB"})
        result = run_cli("reload", "-c", str(setup.config))
        assert result.returncode == 1, result.stderr
        assert "part_sise" in result.stderr
        assert "part_sise" in setup.status()["config"]["reload_error"]
        # A config that parses but leaves a watch without credentials is refused too.
        setup.write(setup.watch("images"))
        text = setup.config.read_text().replace(
            '[credentials]\nsource = "environment"',
            '[credentials]\nsource = "environment"\ntarget = "s3://another-bucket/*"',
        )
        setup.config.write_text(text, encoding="utf-8")
        result = run_cli("reload", "-s", setup.socket)
        assert result.returncode == 1
        assert "no [credentials] target covers" in result.stderr
        # Fixed: the reload goes through and the error is gone from status.
        setup.write(setup.watch("images"))
        result = run_cli("reload", "-s", setup.socket)
        assert result.returncode == 0, result.stderr
        assert "configuration reloaded" in result.stdout
        assert setup.status()["config"]["reload_error"] is None
        # For scripts: the daemon's answer as one JSON document (nothing changed since).
        result = run_cli("reload", "--json", "-s", setup.socket)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {
            "added": [],
            "removed": [],
            "changed": [],
            "restart_needed": [],
        }
    finally:
        assert daemon.terminate() == 0, daemon.log_text()


def test_removed_watch_keeps_its_queue_until_it_comes_back(setup: Setup) -> None:
    setup.write(setup.watch("images"), setup.watch("workspace"))
    daemon = setup.start()
    try:
        setup.write(setup.watch("images"))
        result = run_cli("reload", "-s", setup.socket)
        assert result.returncode == 0, result.stderr
        assert "removed workspace" in result.stdout
        setup.put("workspace", "backend/B/P/P.sqlite", b"w" * 5000)
        setup.put("images", "Batch1/c.tiff", b"c" * 5000)
        setup.wait_object("cpg0001-test/broad/images/Batch1/c.tiff", b"c" * 5000)
        time.sleep(2)  # longer than the settle time
        key = "cpg0001-test/broad/workspace/backend/B/P/P.sqlite"
        assert object_bytes(setup.s3, setup.bucket, key) is None
        setup.write(setup.watch("images"), setup.watch("workspace"))
        assert run_cli("reload", "-s", setup.socket).returncode == 0
        setup.wait_object(key, b"w" * 5000)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()


def test_changed_destination_uploads_to_the_new_prefix(setup: Setup) -> None:
    setup.write(setup.watch("images", prefix="cpg0001-test/broad/images/typo/"))
    daemon = setup.start()
    try:
        setup.put("images", "Batch1/d.tiff", b"d" * 4000)
        setup.wait_object("cpg0001-test/broad/images/typo/Batch1/d.tiff", b"d" * 4000)
        setup.write(setup.watch("images", prefix="cpg0001-test/broad/images/"))
        result = run_cli("reload", "-s", setup.socket)
        assert result.returncode == 0, result.stderr
        assert "changed images" in result.stdout
        setup.wait_object("cpg0001-test/broad/images/Batch1/d.tiff", b"d" * 4000)
        wait_until(
            lambda: [r["state"] for r in journal_rows(setup.state)] == ["uploaded"],
            30,
            "the journal to record the upload to the new prefix",
        )
        assert journal_rows(setup.state)[0]["key"] == "cpg0001-test/broad/images/Batch1/d.tiff"
    finally:
        assert daemon.terminate() == 0, daemon.log_text()


def test_reload_leaves_an_upload_in_flight_alone_and_names_restart_only_settings(
    setup: Setup,
) -> None:
    s3 = {
        "part_size": "5MiB",
        "multipart_threshold": "5MiB",
        "max_concurrency": 2,
        # 40 MiB: about 10 s, so the reload lands mid-upload even on a loaded machine
        "max_bandwidth": "4MB",
    }
    setup.write(setup.watch("images"), s3=s3)
    daemon = setup.start()
    data = os.urandom(40 * MiB)
    key = "cpg0001-test/broad/images/Batch1/big.sqlite"
    mark = setup.server.mark()
    try:
        setup.put("images", "Batch1/big.sqlite", data)
        wait_until(
            lambda: len(setup.server.upload_part_requests(setup.bucket, key, since=mark)) >= 1,
            30,
            "the first part",
        )
        # Another watch, and a part size that only applies after a restart.
        setup.write(setup.watch("images"), setup.watch("workspace"), s3={**s3, "part_size": "8MiB"})
        result = run_cli("reload", "-s", setup.socket)
        assert result.returncode == 0, result.stderr
        assert "s3.part_size" in result.stderr
        assert setup.status()["config"]["restart_needed"] == ["s3.part_size"]
        assert journal_rows(setup.state)[0]["state"] == "uploading", "finished too soon"
        setup.wait_object(key, data, timeout=60)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()
    parts = setup.server.upload_part_requests(setup.bucket, key, since=mark)
    assert len({r.query["uploadId"] for r in parts}) == 1, "the upload was restarted"
    numbers = [int(r.query["partNumber"]) for r in parts]
    assert sorted(numbers) == list(range(1, 9)), "parts were sent again or at another size"


def test_a_reload_puts_a_new_max_bandwidth_in_force(setup: Setup) -> None:
    """s3.max_bandwidth is the one [s3] setting a reload applies: in status at once,
    logged once, and no restart asked for."""
    setup.write(setup.watch("images"))
    daemon = setup.start()
    try:
        assert setup.status()["bandwidth"] == {"limit_bytes_per_s": 0, "schedule": ""}
        timetable = "00:00,1MB 12:00,1MB"  # a timetable, whatever the time of the test
        setup.write(setup.watch("images"), s3={"max_bandwidth": timetable})
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: _reloads(daemon), 30, "the reload")
        status = setup.status()
        assert status["bandwidth"] == {"limit_bytes_per_s": 10**6, "schedule": timetable}
        assert status["config"]["restart_needed"] == []
        changes = [e for e in daemon.events() if e.get("event") == "bandwidth_limit_changed"]
        assert [c["limit_bytes_per_s"] for c in changes] == [10**6]
        human = run_cli("status", "-s", setup.socket).stdout
        assert f"bandwidth: 976.6 KiB/s now (s3.max_bandwidth = '{timetable}')" in human
        setup.put("images", "Batch1/a.tiff", b"a" * 2000)  # and uploads go on
        setup.wait_object("cpg0001-test/broad/images/Batch1/a.tiff", b"a" * 2000)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()
