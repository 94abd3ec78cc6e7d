"""The engine in-process: one pipeline from folder to a real S3 server, and a reload.

What the daemon subprocess tests show end to end, without a process: fast enough to
run for every change, and the place to test the runtime's assembly itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from memory_s3 import MemoryStore
from s3server import S3Server

from cpg_daemon.core.clock import ManualClock
from cpg_daemon.core.config import Config, DaemonConfig, S3Config, WatchConfig
from cpg_daemon.core.errors import ConfigError, RetryableError, ThrottledError
from cpg_daemon.core.objectkeys import S3Location
from cpg_daemon.engine.grants import Connect
from cpg_daemon.engine.runtime import Engine
from cpg_daemon.journal import FileRecord
from cpg_daemon.s3.credentials import CredentialProvider
from cpg_daemon.s3.store import Storage

pytestmark = pytest.mark.anyio


def _config(tmp_path: Path, server: S3Server, bucket: str, *names: str) -> Config:
    watches = tuple(
        WatchConfig(name, tmp_path / name, S3Location(bucket, f"cpg0001-test/{name}/"), settle=0.0)
        for name in names
    )
    return Config(
        path=tmp_path / "config.toml",
        daemon=DaemonConfig(state_dir=tmp_path / "state", rescan_interval=3600.0),
        s3=S3Config(endpoint_url=server.endpoint_url, max_concurrency=4),
        watches=watches,
    )


async def _until_uploaded(engine: Engine, watch: str, count: int) -> list[FileRecord]:
    with anyio.fail_after(60):
        while True:
            rows = await engine.journal.records(watch)
            if len(rows) == count and all(r.state == "uploaded" for r in rows):
                return rows
            await anyio.sleep(0.05)


async def test_files_go_from_folder_to_s3_and_a_reload_adds_a_watch(
    tmp_path: Path, s3_server: S3Server, bucket: str, s3_client: Any
) -> None:
    for name in ("images", "workspace"):
        (tmp_path / name / "Batch1").mkdir(parents=True)
    (tmp_path / "images" / "Batch1" / "a.tiff").write_bytes(b"a" * 1000)
    (tmp_path / "images" / "Batch1" / "b.tiff").write_bytes(b"b" * 2000)
    (tmp_path / "workspace" / "Batch1" / "c.csv").write_bytes(b"c" * 10)
    config = _config(tmp_path, s3_server, bucket, "images")
    (tmp_path / "state").mkdir()

    journal = tmp_path / "state" / "journal.sqlite3"
    async with Engine.open(config, journal) as engine, anyio.create_task_group() as tg:
        await tg.start(engine.run)
        await engine.start_watches()
        rows = await _until_uploaded(engine, "images", 2)
        assert {r.key for r in rows} == {
            "cpg0001-test/images/Batch1/a.tiff",
            "cpg0001-test/images/Batch1/b.tiff",
        }
        images_grant = engine.table["images"].grant

        plan = await engine.reload(_config(tmp_path, s3_server, bucket, "images", "workspace"))
        assert (plan.added, plan.removed, plan.changed) == (("workspace",), (), ())
        # One [credentials] entry: the new watch shares the running grant and client.
        assert engine.table["workspace"].grant is images_grant
        await _until_uploaded(engine, "workspace", 1)

        # A reload that cannot work changes nothing.
        broken = dataclasses.replace(
            config,
            credentials=(dataclasses.replace(config.credentials[0], target="s3://other/*"),),
        )
        with pytest.raises(ConfigError, match="no \\[credentials\\] target covers"):
            await engine.reload(broken)
        assert list(engine.table) == ["images", "workspace"]
        assert engine.table["images"].grant is images_grant

        engine.stop_watching()
        await engine.drain(5.0)
        tg.cancel_scope.cancel()

    body = s3_client.get_object(Bucket=bucket, Key="cpg0001-test/workspace/Batch1/c.csv")["Body"]
    assert body.read() == b"c" * 10
    assert images_grant.closed


def _memory(store: MemoryStore) -> Connect:
    @asynccontextmanager
    async def connect(provider: CredentialProvider, s3: S3Config) -> AsyncIterator[Storage]:
        yield store

    return connect


async def test_the_pipeline_on_an_in_memory_store_rides_out_slowdown_and_errors(
    tmp_path: Path,
) -> None:
    """Every file arrives once, whole, although S3 throttles and fails requests."""
    store = MemoryStore(buckets=("bkt",))
    store.fail("PutObject", ThrottledError("SlowDown: Please reduce your request rate"), times=2)
    store.fail("PutObject", RetryableError("InternalError"), times=1, key="p/w/B/f3")
    folder = tmp_path / "w" / "B"
    folder.mkdir(parents=True)
    contents = {f"f{i}": os.urandom(100 + i) for i in range(6)}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    config = Config(
        path=None,
        daemon=DaemonConfig(rescan_interval=3600.0),
        s3=S3Config(max_concurrency=3),
        watches=(WatchConfig("w", tmp_path / "w", S3Location("bkt", "p/w/"), settle=0.0),),
    )
    journal = tmp_path / "journal.sqlite3"
    clock = ManualClock()  # the SlowDown pause and the retry's back-off pass in a blink
    async with (
        Engine.open(config, journal, connect=_memory(store), clock=clock) as engine,
        anyio.create_task_group() as tg,
    ):
        await tg.start(engine.run)
        await engine.start_watches()

        async def time_passes() -> None:
            while True:
                clock.advance(0.5)
                await anyio.sleep(0.005)

        tg.start_soon(time_passes)
        rows = await _until_uploaded(engine, "w", len(contents))
        tg.cancel_scope.cancel()
    # The error cost its file an attempt; being throttled costs none.
    assert {r.rel_path: r.attempts for r in rows} == {
        f"B/{name}": int(name == "f3") for name in contents
    }
    assert {name: store.object_bytes("bkt", f"p/w/B/{name}") for name in contents} == contents
    puts = [c.key for c in store.calls if c.operation == "PutObject"]
    assert len(puts) == len(contents) + 3  # two throttled, one failed, then each once
    # What the metrics endpoint counts (engine/tally.py): only ever up.
    tally = engine.scheduler.tally.watches["w"]
    counts = (tally.files_uploaded, tally.throttled, tally.retries, tally.files_failed)
    assert counts == (6, 2, 1, 0)
    assert tally.bytes_uploaded == sum(len(data) for data in contents.values())
    assert sum(tally.duration_counts) + tally.duration_over == 6
