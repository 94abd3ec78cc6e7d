"""The watcher on a manual clock: settle and rescan times pass in milliseconds.

Filesystem events are switched off (``stop`` before ``run``), so what is tested is
the walks and the settle loop alone, driven by the clock; real inotify is the
daemon tests' part.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from pipeline import until

from cpg_daemon.core.clock import ManualClock
from cpg_daemon.core.config import WatchConfig
from cpg_daemon.core.objectkeys import parse_s3_uri
from cpg_daemon.discovery.watcher import EVENTS_FIRST, Watcher
from cpg_daemon.journal import Journal

pytestmark = pytest.mark.anyio

DESTINATION = parse_s3_uri("s3://bucket/lab/")
RESCAN = 600.0


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    journal = await Journal.open(tmp_path / "journal.sqlite3")
    try:
        yield journal
    finally:
        await journal.close()


async def advance(clock: ManualClock, seconds: float) -> None:
    """Let the tasks that just ran go to sleep on the clock, then let ``seconds`` pass."""
    await clock.settle()
    clock.advance(seconds)
    await clock.settle()


def in_journal_is(journal: Journal, rel_paths: list[str]) -> Callable[[], Awaitable[bool]]:
    async def holds() -> bool:
        return sorted(r.rel_path for r in await journal.records()) == rel_paths

    return holds


def write(root: Path, rel: str, data: bytes = b"data") -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


async def test_files_settle_on_the_clock_and_one_deleted_while_settling_is_forgotten(
    tmp_path: Path, journal: Journal
) -> None:
    root = tmp_path / "outbox"
    for name in ("a", "b", "c"):
        write(root, f"P1/{name}.tiff")
    clock = ManualClock(start=time.time())
    queued: list[int] = []
    watch = WatchConfig("w", root, DESTINATION, settle=30.0)
    watcher = Watcher(watch, journal, lambda: queued.append(1), RESCAN, clock=clock)
    watcher.stop()  # no filesystem events: walks and the settle loop only

    async def in_journal() -> list[str]:
        return sorted(r.rel_path for r in await journal.records())

    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        assert watcher.settling_under("P1")  # before the first walk: it may not have looked
        await advance(clock, EVENTS_FIRST)  # events never came: the first walk begins anyway
        await until(lambda: watcher.statistics().scans == 1)
        assert watcher.statistics().settling == 3
        assert watcher.settling_under("P1") and not watcher.settling_under("P2")
        # Set the wall clock back: the mtimes look young; the monotonic clock decides.
        clock.jump(-3600)
        (root / "P1/b.tiff").unlink()
        write(root, "P1/c.tiff", b"still being written")
        await advance(clock, watch.settle - 1)
        assert await in_journal() == []
        await advance(clock, 1)
        await until(lambda: queued == [1])
        assert await in_journal() == ["P1/a.tiff"]
        assert watcher.statistics().settling == 1  # c changed, b is gone
        await advance(clock, watch.settle)
        await until(lambda: len(queued) == 2)
        assert await in_journal() == ["P1/a.tiff", "P1/c.tiff"]
        assert not watcher.settling_under("P1")
        assert watcher.statistics().settling == 0
        tg.cancel_scope.cancel()


async def test_a_rescan_follows_the_rescan_interval_on_the_clock(
    tmp_path: Path, journal: Journal
) -> None:
    root = tmp_path / "outbox"
    root.mkdir()
    clock = ManualClock(start=time.time())
    watch = WatchConfig("w", root, DESTINATION, settle=0.0)
    watcher = Watcher(watch, journal, lambda: None, RESCAN, clock=clock)
    watcher.stop()
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        await advance(clock, EVENTS_FIRST)
        await until(lambda: watcher.statistics().scans == 1)
        write(root, "late.tiff")
        await advance(clock, RESCAN - 1)
        assert watcher.statistics().scans == 1
        await advance(clock, 1)
        await until(lambda: watcher.statistics().scans == 2)
        assert [r.rel_path for r in await journal.records()] == ["late.tiff"]
        watcher.request_rescan()  # as `cpg-daemon rescan` asks: at once
        await until(lambda: watcher.statistics().scans == 3)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("error", "walks_in_a_minute", "warnings"),
    [
        (PermissionError(13, "Permission denied"), 1, 1),  # stays: the next rescan looks
        (OSError(24, "Too many open files"), 7, 7),  # passes: walked again every 10 s
    ],
)
async def test_a_folder_that_cannot_be_read_is_walked_again_only_if_that_may_pass(
    tmp_path: Path,
    journal: Journal,
    monkeypatch: pytest.MonkeyPatch,
    error: OSError,
    walks_in_a_minute: int,
    warnings: int,
) -> None:
    """One unreadable folder used to cost a walk of the whole tree and a warning every
    10 s, forever. (As root nothing is unreadable: the walk's read of it fails here.)"""
    from structlog.testing import capture_logs

    from cpg_daemon.discovery import watcher as module

    root = tmp_path / "outbox"
    write(root, "open/a.tiff")
    write(root, "locked/b.tiff")
    locked = [True]
    original = module.scan_folder

    def scan(root_: Path, folder: str, *args: object) -> object:
        if folder == "locked" and locked[0]:
            raise error
        return original(root_, folder, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "scan_folder", scan)
    clock = ManualClock(start=time.time())
    watcher = Watcher(
        WatchConfig("w", root, DESTINATION, settle=0.0), journal, lambda: None, RESCAN, clock=clock
    )
    watcher.stop()
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(watcher.run)
            await advance(clock, EVENTS_FIRST)
            await until(lambda: watcher.statistics().scans == 1)
            for minute in range(6):  # each walk (in a thread) done before time moves on
                await advance(clock, 10.0)
                walks = min(2 + minute, walks_in_a_minute)
                await until(lambda walks=walks: watcher.statistics().scans == walks)
            assert watcher.statistics().scans == walks_in_a_minute
            assert await in_journal_is(journal, ["open/a.tiff"])()
            locked[0] = False  # chmod: an event, or the periodic rescan, walks it again
            watcher.request_rescan()
            await until(in_journal_is(journal, ["locked/b.tiff", "open/a.tiff"]))
            tg.cancel_scope.cancel()
    said = [e["event"] for e in logs if e["event"] in ("folder_not_walked", "folder_walked")]
    assert said.count("folder_not_walked") == warnings
    assert said[-1] == "folder_walked" or not isinstance(error, PermissionError)


@pytest.mark.parametrize("listed", [{"lab/there.tiff": 4}, None])
async def test_only_the_first_walk_checks_files_at_the_destination(
    tmp_path: Path, journal: Journal, listed: dict[str, int] | None
) -> None:
    """With the listing, files of a listed size; without it (None), every file."""
    root = tmp_path / "outbox"
    write(root, "there.tiff", b"same")
    write(root, "new.tiff", b"other")
    clock = ManualClock(start=time.time())
    watch = WatchConfig("w", root, DESTINATION, settle=0.0)
    watcher = Watcher(watch, journal, lambda: None, RESCAN, clock=clock)
    watcher.expect_remote(listed)
    watcher.stop()
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        await advance(clock, EVENTS_FIRST)
        await until(lambda: watcher.statistics().scans == 1)
        write(root, "later.tiff", b"same")  # after the first walk: uploaded as new
        await advance(clock, RESCAN)
        await until(lambda: watcher.statistics().scans == 2)
        tg.cancel_scope.cancel()
    checked = {r.rel_path: r.check_remote for r in await journal.records()}
    assert checked == {"there.tiff": True, "new.tiff": listed is None, "later.tiff": False}


async def test_events_bring_in_new_files_and_a_ready_marker_brings_in_its_folder(
    tmp_path: Path, journal: Journal
) -> None:
    """Real inotify events, and no rescan (its time never comes on this clock)."""
    root = tmp_path / "outbox"
    write(root, "P1/early.tiff")
    clock = ManualClock(start=time.time())
    watch = WatchConfig("w", root, DESTINATION, settle=0.0, ready_marker="READY")
    watcher = Watcher(watch, journal, lambda: None, RESCAN, clock=clock)

    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        await until(lambda: watcher.statistics().scans == 1)  # once events are live
        write(root, "loose.tiff")
        write(root, "P1/late.tiff")
        await until(in_journal_is(journal, ["loose.tiff"]))
        write(root, "P1/READY", b"")  # P1 is complete: its files go in
        await until(in_journal_is(journal, ["P1/early.tiff", "P1/late.tiff", "loose.tiff"]))
        assert watcher.statistics().scans == 1
        watcher.stop()
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "watchfiles"])
async def test_running_out_of_descriptors_for_inotify_polls_instead_of_dying(
    tmp_path: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch, inotify: bool
) -> None:
    """No descriptor for an inotify instance (an OSError from our own, watchfiles' own
    error from watchfiles): the watch polls, with a warning."""
    from structlog.testing import capture_logs

    from cpg_daemon.discovery import watcher as watcher_module

    def no_descriptor(self: object) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(watcher_module, "INOTIFY", inotify)
    monkeypatch.setattr(watcher_module.FolderEvents, "open", no_descriptor)
    asked: list[bool | None] = []
    polling = anyio.Event()

    async def awatch(
        *paths: Path, force_polling: bool | None = None, **_: object
    ) -> AsyncIterator[set[tuple[object, str]]]:
        asked.append(force_polling)
        if not force_polling:
            raise RuntimeError(
                "Error creating recommended watcher: Too many open files (os error 24)"
            )
        polling.set()
        yield set()
        await anyio.sleep_forever()

    monkeypatch.setattr(watcher_module.watchfiles, "awatch", awatch)
    (tmp_path / "w").mkdir()
    watch = WatchConfig("w", tmp_path / "w", DESTINATION, settle=0.0)
    watcher = Watcher(watch, journal, lambda: None, RESCAN)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(watcher.run)
            with anyio.fail_after(10):
                await polling.wait()
            tg.cancel_scope.cancel()
    assert asked == ([True] if inotify else [None, True])
    warnings = [e for e in logs if e["event"] == "events_unavailable_polling"]
    assert len(warnings) == 1 and "LimitNOFILE" in warnings[0]["hint"]
