"""The engine's timing on a ManualClock: batch quiet time, clock jumps, the SlowDown pause.

A real journal (SQLite in tmp_path) and the real Scheduler and BatchTracker, with
time moved by the test: what would take seconds or a libfaketime run takes
milliseconds. The journal's own work runs in its thread, so the tests wait (briefly,
for real) until the component is asleep on the clock again before looking.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from pipeline import assert_counts_agree, configs_of, table_of, until
from structlog.testing import capture_logs

from cpg_daemon.core.clock import ManualClock
from cpg_daemon.core.config import S3Config, WatchConfig
from cpg_daemon.core.errors import ThrottledError
from cpg_daemon.core.objectkeys import S3Location
from cpg_daemon.engine.batches import BatchTracker
from cpg_daemon.engine.scheduler import Scheduler
from cpg_daemon.engine.uploader import Outcome, Uploader
from cpg_daemon.journal import Discovered, FileRecord, Journal
from cpg_daemon.s3.store import ObjectStore

pytestmark = pytest.mark.anyio


@pytest.fixture
async def journal(tmp_path: Path, anyio_backend: str) -> AsyncIterator[Journal]:
    j = await Journal.open(tmp_path / "state" / "journal.sqlite3")
    try:
        yield j
    finally:
        await j.close()
    assert_counts_agree(tmp_path / "state" / "journal.sqlite3")


def _watch(path: Path, settle: float) -> WatchConfig:
    return WatchConfig(name="w", path=path, destination=S3Location("bkt", "p/"), settle=settle)


async def _queue(journal: Journal, *rels: str) -> list[FileRecord]:
    await journal.record_discovered("w", [Discovered(r, "bkt", f"p/{r}", 10, 1) for r in rels])
    return await journal.claim(len(rels), ["w"])


async def _uploaded(journal: Journal, record: FileRecord) -> None:
    assert await journal.mark_uploaded(record, etag="e", checksum_algorithm="CRC32C", checksum="c")


async def _asleep(clock: ManualClock, sleepers: int = 1) -> None:
    """Wait until ``sleepers`` tasks sleep on ``clock``: the component has done its work."""

    async def check() -> bool:
        return clock.sleepers == sleepers

    await until(check)


# -- batch quiet time -----------------------------------------------------------------------


def _completions(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "batch_complete"]


async def _batch_done_at(
    journal: Journal, tmp_path: Path, settle: float, *, jump_at: float = 0.0, jump: float = 0.0
) -> float:
    """The monotonic second batch B1 (uploaded at 0 s) completes at, with a wall-clock jump."""
    (record,) = await _queue(journal, "B1/a")
    await _uploaded(journal, record)
    progress = await journal.batch_progress("w", "B1")
    assert progress.last_change is not None
    clock = ManualClock(start=progress.last_change)  # the wall clock read at the upload
    tracker = BatchTracker(
        journal, configs_of(_watch(tmp_path, settle)), lambda w, f: False, clock=clock
    )
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(tracker.run)
            tracker.touch("w", "B1/a")
            await clock.settle()
            await _asleep(clock)
            while not _completions(logs):
                clock.advance(0.25)
                if clock.monotonic() == jump_at:
                    clock.jump(jump)
                await _asleep(clock)
                assert clock.monotonic() < 3600, "the batch never completed"
            tg.cancel_scope.cancel()
    (done,) = _completions(logs)
    assert (done["batch"], done["files"]) == ("B1", 1)
    return clock.monotonic()


@pytest.mark.parametrize(("settle", "done_at"), [(0.0, 1.0), (0.5, 1.0), (4.0, 4.0), (30, 30)])
async def test_a_batch_completes_once_quiet_for_its_settle_time_and_at_least_a_second(
    journal: Journal, tmp_path: Path, settle: float, done_at: float
) -> None:
    assert await _batch_done_at(journal, tmp_path, settle) == done_at


@pytest.mark.parametrize(
    ("jump", "done_at"),
    [
        (-3600.0, 20.0),  # set back in the quiet time: quiet counted from when it was seen
        (-1.0, 11.0),  # a small step back costs at most that step
        (3600.0, 10.0),  # set forward: not before the quiet time on the monotonic clock
    ],
)
async def test_a_wall_clock_jump_in_the_quiet_time_does_not_hold_a_batch_back(
    journal: Journal, tmp_path: Path, jump: float, done_at: float
) -> None:
    assert await _batch_done_at(journal, tmp_path, 10.0, jump_at=5.0, jump=jump) == done_at


# -- the scheduler and the clock ------------------------------------------------------------


class _Uploads(Uploader):
    """An uploader that sends nothing: S3 throttles the first ``throttled`` uploads."""

    def __init__(self, journal: Journal, clock: ManualClock, throttled: int) -> None:
        super().__init__(journal, S3Config(), anyio.CapacityLimiter(4), clock=clock)
        self.clock = clock
        self.throttled = throttled
        self.calls: list[tuple[str, float]] = []
        self.journal = journal

    async def upload(self, store: ObjectStore, record: FileRecord, path: Path) -> Outcome:
        self.calls.append((record.rel_path, self.clock.monotonic()))
        if len(self.calls) <= self.throttled:
            raise ThrottledError("SlowDown: Please reduce your request rate.")
        await _uploaded(self.journal, record)
        return "uploaded"


def _scheduler(journal: Journal, tmp_path: Path, uploader: _Uploads, workers: int) -> Scheduler:
    return Scheduler(
        journal,
        uploader,
        # The store is never used: _Uploads sends nothing.
        table_of({"w": _watch(tmp_path, 0.0)}, {"w": cast(ObjectStore, object())}),
        workers=workers,
        file_attempts=3,
        clock=uploader.clock,
    )


@pytest.mark.parametrize(("jump", "moved"), [(-3600.0, True), (3600.0, True), (4.0, False)])
async def test_a_clock_jump_moves_retry_times_with_it(
    journal: Journal, tmp_path: Path, jump: float, moved: bool
) -> None:
    (record,) = await _queue(journal, "a")
    clock = ManualClock(start=time.time())
    due = clock.time() + 7200.0  # far enough that the journal's own clock never reaches it
    await journal.mark_retry(record.id, "boom", due)
    scheduler = _scheduler(journal, tmp_path, _Uploads(journal, clock, 0), workers=2)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            await _asleep(clock)  # the feeder waits: nothing is due
            clock.jump(jump)
            clock.advance(5.0)  # the feeder's next look at the queue
            await _asleep(clock)
            tg.cancel_scope.cancel()
    assert await journal.next_due(["w"]) == pytest.approx(due + jump if moved else due)
    jumps = [e for e in logs if e["event"] == "clock_jumped"]
    if moved:
        assert [(e["seconds"], e["files_rescheduled"]) for e in jumps] == [(jump, 1)]
    else:
        assert jumps == []


async def test_a_throttled_file_keeps_its_attempts_and_waits_out_the_pause(
    journal: Journal, tmp_path: Path
) -> None:
    await _queue(journal, "a")
    await journal.reset_in_flight()
    clock = ManualClock()
    uploads = _Uploads(journal, clock, throttled=1)
    scheduler = _scheduler(journal, tmp_path, uploads, workers=4)

    async def put_back() -> bool:
        row = await journal.get_by_id(1)
        return row is not None and row.state == "queued"

    async def uploaded() -> bool:
        row = await journal.get_by_id(1)
        return row is not None and row.state == "uploaded"

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            await until(put_back)
            stats = scheduler.statistics()
            assert (stats.throttled, stats.concurrency, stats.put_back) == (True, 1, 1)
            assert 0.8 <= stats.pause_left <= 1.2
            assert stats.throttle_error == "SlowDown: Please reduce your request rate."
            scheduler.wake()  # new work: the feeder still waits out the pause
            await clock.settle()
            await _asleep(clock)
            pause = clock.next_deadline()
            assert pause is not None and 0.8 <= pause <= 1.2
            assert [name for name, _ in uploads.calls] == ["a"]
            clock.advance(pause)
            await until(uploaded)
            await clock.settle()
            stats = scheduler.statistics()
            assert (stats.throttled, stats.concurrency, stats.pause_left) == (True, 2, 0.0)
            tg.cancel_scope.cancel()
    assert uploads.calls == [("a", 0.0), ("a", pause)]
    row = await journal.get_by_id(1)
    assert row is not None and row.attempts == 0  # S3's load is not the file's fault
    (throttled,) = [e for e in logs if e["event"] == "throttled"]
    assert 0.8 <= throttled["pause"] <= 1.2
