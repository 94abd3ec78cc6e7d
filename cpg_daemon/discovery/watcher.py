"""Discovery of one watch: which files under it are finished, and so ready to upload.

Three sources feed one settle tracker (``settle.py``): a walk at start-up,
filesystem events (on Linux from inotify, every real folder and no symlinked one,
``inotify.py``; elsewhere, or when inotify cannot be had, from watchfiles; a batch
folder moved in arrives as one event for the folder, which is then walked), and a
periodic walk as a safety net for missed events and network mounts (an inotify queue
overflow asks for a walk at once). Settled files pass the
watch's admission policy (``admission.py``) on their way to the journal, which
queues what is new or changed. The walking and stat calls (``scan.py``) run in
worker threads; the tracker and the policy are changed on the event loop only.

Settle and rescan timing reads the injected ``Clock``; watchfiles keeps its own.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import structlog
import watchfiles
from anyio.abc import TaskStatus

from cpg_daemon.core.clock import SYSTEM_CLOCK, Clock
from cpg_daemon.core.config import WatchConfig
from cpg_daemon.core.objectkeys import PathFilter, relative_key_path
from cpg_daemon.core.structure import Finding
from cpg_daemon.discovery.admission import Admission, Rejection
from cpg_daemon.discovery.inotify import FolderEvents
from cpg_daemon.discovery.scan import Seen, look_at, restat, scan_folder, undecodable_name
from cpg_daemon.discovery.settle import Instant, SettleTracker
from cpg_daemon.journal import Discovered, Journal

log = structlog.get_logger(__name__)

MISSING_ROOT_POLL = 2.0
"""Seconds between looks for a watched folder that does not exist (yet)."""
WALK_RETRY = 10.0
"""Seconds before walking again after a folder could not be read (EMFILE, EACCES...)."""
EVENTS_FIRST = 5.0
"""Seconds the first walk waits for filesystem events to be live (inotify set up), so a
file created during the walk cannot slip past both; after that it walks regardless,
and walks again once they are."""
UNDECODABLE_BACKOFF = 60.0
"""Most seconds between restarts of a poll that a name which is not UTF-8 stopped."""
POLL_DELAY_MS = 2000
"""When a watch has to poll (no inotify watches left), how often it looks at every file."""
BATCH = 500
"""Settled files handed to the journal in one transaction."""
LOOK_AT_ONCE = 1000
"""Changed paths looked at in one worker-thread call (the event loop runs in between)."""
GATHER = 0.1
"""Seconds inotify events are let gather before they are read (a file written in many
writes is then one change, not hundreds)."""
INOTIFY = sys.platform == "linux"
"""Events from inotify directly (``inotify.py``), not from watchfiles."""


@dataclass(frozen=True)
class WatcherStatistics:
    name: str
    settling: int
    scans: int
    last_scan_seconds: float | None
    watching: bool
    error: str | None
    structure_findings: int = 0
    """Distinct (folder, rule) structure findings seen since the watch started."""
    structure_examples: tuple[Finding, ...] = ()
    """The first ``STRUCTURE_EXAMPLES`` of them."""
    structure_rejected: int = 0
    """Files kept out by ``structure = "reject"``."""


class Watcher:
    """Finds settled files under one watch and records them in the journal."""

    def __init__(
        self,
        watch: WatchConfig,
        journal: Journal,
        on_queued: Callable[[], None],
        rescan_interval: float,
        remote_sizes: Mapping[str, int] | None = None,
        on_rejected: Callable[[Path, str, str], None] | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.watch = watch
        self._journal = journal
        self._on_queued = on_queued
        self._on_rejected = on_rejected
        """Told (path, key, reason) of each file kept out: a name S3 cannot take, say."""
        self._rescan_interval = rescan_interval
        self._clock = clock
        self._filter = PathFilter(watch.include, watch.exclude)
        self._root = watch.path
        self._settle = SettleTracker(watch.settle)
        self._admission = Admission(watch, journal)
        if remote_sizes is not None:
            self._admission.expect_remote(remote_sizes)
        self._scans = 0
        self._last_scan_seconds: float | None = None
        self._watching = False
        self._events_live = anyio.Event()
        self._first_walk_begun = False
        self._error: str | None = None
        self._rescan_now = anyio.Event()
        self._stop = anyio.Event()
        self._walk_incomplete = False
        """A folder could not be read during the last walk: walk again after WALK_RETRY."""
        self._unreadable: set[str] = set()
        """Folders the daemon's user may not read, reported once (until they are read)."""
        self._events: FolderEvents | None = None
        """The inotify watches, while events come from them."""

    def expect_remote(self, sizes: Mapping[str, int] | None) -> None:
        """Before ``run``: what the destination holds, for the first walk of a new watch.

        ``sizes`` maps keys to the sizes of objects already there: a file of the
        listed size is checked on the server rather than sent again. None means the
        destination could not be listed: every file of the first walk is checked.
        """
        self._admission.expect_remote(sizes)

    def stop(self) -> None:
        """Stop following events promptly (the event thread checks this every 50 ms)."""
        self._stop.set()

    def statistics(self) -> WatcherStatistics:
        structure = self._admission.statistics()
        return WatcherStatistics(
            self.watch.name,
            len(self._settle),
            self._scans,
            self._last_scan_seconds,
            self._watching,
            self._error,
            structure_findings=structure.findings,
            structure_examples=structure.examples,
            structure_rejected=structure.rejected,
        )

    def request_rescan(self) -> None:
        self._rescan_now.set()

    def settling_under(self, folder: str) -> bool:
        """Whether a file under this top-level folder may not have reached the journal yet.

        True until the first walk has finished (it may not have seen the folder
        yet), and while a file under it is seen but not settled.
        """
        return self._scans == 0 or self._settle.pending_under(folder)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled. Ready at once; the first walk begins when events are live."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow_events)
            tg.start_soon(self._settle_loop)
            task_status.started()
            await self._wait(self._events_live, EVENTS_FIRST)
            while True:
                self._first_walk_begun = True
                await self.scan()
                # Only the first walk after a lost journal looks at the destination.
                self._admission.first_walk_done()
                wait = WALK_RETRY if self._walk_incomplete else self._rescan_interval
                self._walk_incomplete = False
                await self._wait(self._rescan_now, wait)
                self._rescan_now = anyio.Event()

    async def _wait(self, event: anyio.Event, seconds: float) -> None:
        """Until ``event`` is set or ``seconds`` have passed on the clock."""
        async with anyio.create_task_group() as tg:

            async def time_out() -> None:
                await self._clock.sleep(seconds)
                tg.cancel_scope.cancel()

            tg.start_soon(time_out)
            await event.wait()
            tg.cancel_scope.cancel()

    # -- walking -----------------------------------------------------------------------

    async def scan(self, rel_dir: str = "") -> int:
        """Walk the watch (or one folder of it); returns how many files were queued."""
        started = self._clock.monotonic()
        if not rel_dir and not await anyio.to_thread.run_sync(self._root.is_dir):
            if self._error is None:
                log.error("watch_path_missing", watch=self.watch.name, path=str(self._root))
            self._error = f"{self._root} does not exist or is not a folder"
            return 0
        if not rel_dir and self._error is not None:
            log.info("watch_path_back", watch=self.watch.name, path=str(self._root))
            self._error = None
        queued = 0
        walked: list[str] = []
        stack = [rel_dir]
        while stack:
            folder = stack.pop()
            try:
                found, folders = await anyio.to_thread.run_sync(
                    scan_folder, self._root, folder, self._filter
                )
            except OSError as exc:
                # Never a reason to stop watching. No descriptor left (EMFILE) passes:
                # the folder is walked again soon. A folder the daemon may not read
                # stays so until someone changes its permissions, which the next walk
                # (an event for the change, or the periodic rescan) notices: it is
                # reported once, not walked again and again.
                denied = isinstance(exc, PermissionError)
                if not denied or folder not in self._unreadable:
                    log.warning(
                        "folder_not_walked",
                        watch=self.watch.name,
                        path=str(self._root / folder),
                        error=exc.strerror or str(exc),
                        retry_in=self._rescan_interval if denied else WALK_RETRY,
                    )
                if denied:
                    self._unreadable.add(folder)
                else:
                    self._walk_incomplete = True
                continue
            if folder in self._unreadable:
                self._unreadable.discard(folder)
                log.info("folder_walked", watch=self.watch.name, path=str(self._root / folder))
            stack.extend(folders)
            walked.extend(folders)
            queued += await self._observe(found)
        events = self._events
        if events is not None and walked:
            # A folder that could not be watched when it appeared (unreadable then, or
            # made while the watches were being set up) is watched from now on.
            await anyio.to_thread.run_sync(events.watch_folders, walked)
        if not rel_dir:
            self._scans += 1
            self._last_scan_seconds = self._clock.monotonic() - started
            log.debug("scanned", watch=self.watch.name, seconds=round(self._last_scan_seconds, 3))
        return queued

    async def _observe(self, found: list[Seen]) -> int:
        """Looks at files; hands on those settled. Returns how many the journal queued."""
        ready = self._settle.observe_many(found, Instant.of(self._clock))
        if not ready:
            return 0
        marker = self._admission.marker
        folders = marker.folders(ready)
        marked = (
            await anyio.to_thread.run_sync(marker.present, self._root, folders)
            if folders
            else frozenset()
        )
        queued = 0
        batch: list[Discovered] = []
        for seen in ready:
            verdict = await self._admission.admit(seen, marked)
            if isinstance(verdict, Rejection):
                await self._reject(verdict)
            elif verdict is not None:
                batch.append(verdict)
                if len(batch) >= BATCH:
                    queued += await self._record(batch)
                    batch = []
        if batch:
            queued += await self._record(batch)
        return queued

    async def _reject(self, rejection: Rejection) -> None:
        await self._journal.record_rejected(
            self.watch.name,
            rejection.rel_path,
            rejection.key,
            rejection.reason,
            rejection.failure,
        )
        if self._on_rejected is not None:
            shown = os.fsencode(rejection.rel_path).decode("utf-8", "backslashreplace")
            self._on_rejected(self._root / shown, rejection.key, rejection.reason)

    async def _record(self, batch: list[Discovered]) -> int:
        queued = await self._journal.record_discovered(self.watch.name, batch)
        if queued:
            self._on_queued()  # uploads start while a long walk goes on
        return queued

    # -- following changes ---------------------------------------------------------------

    async def _settle_loop(self) -> None:
        """Looks again at files seen unchanged for ``settle``; hands on those still unchanged."""
        tick = min(max(self.watch.settle / 5, 0.05), 1.0)
        while True:
            await self._clock.sleep(tick)
            asked = self._clock.monotonic()
            due = self._settle.due(asked)
            if not due:
                continue
            found, gone = await anyio.to_thread.run_sync(restat, self._root, due)
            for rel in gone:  # vanished while settling: forget it (unless seen again since)
                self._settle.forget(rel, seen_before=asked)
            await self._observe(found)

    async def _follow_events(self) -> None:
        """Turn filesystem events into observations; falls back to polling if events fail.

        On Linux the events come from inotify (``_follow_inotify``). Out of
        descriptors or of inotify watches, the watch polls with watchfiles (which
        also serves other systems). With watchfiles, unreadable folders are not
        ignored at first: its option for that ignores every error, the inotify watch
        limit included, and would leave the rest of the tree silently unwatched. A
        first permission error is reported and only then ignored (with the periodic
        rescan as the safety net).
        """
        force_polling: bool | None = None
        ignore_denied = False
        undecodable = 0
        while True:
            if not await anyio.to_thread.run_sync(self._root.is_dir):
                await self._clock.sleep(MISSING_ROOT_POLL)
                if await anyio.to_thread.run_sync(self._root.is_dir):
                    self.request_rescan()  # it is back (a mount, say): walk it now
                continue
            inotify = INOTIFY and not force_polling
            try:
                self._watching = True
                if inotify:
                    await self._follow_inotify()
                else:
                    await self._follow_watchfiles(force_polling, ignore_denied)
            except Exception as exc:
                self._watching = False
                if isinstance(exc, PermissionError) and not ignore_denied:
                    log.warning(
                        "folder_unreadable",
                        watch=self.watch.name,
                        error=str(exc),
                        hint="files in a folder cpg-daemon cannot read are not uploaded; "
                        "give the daemon's user read access. Watching the rest",
                    )
                    ignore_denied = True
                    continue
                if (
                    inotify
                    and isinstance(exc, OSError)
                    and exc.errno not in (errno.ENOSPC, errno.EMFILE, errno.ENFILE)
                ):
                    # The root is unreadable (reported above), or went away between two looks.
                    await self._clock.sleep(WALK_RETRY)
                    continue
                hint = _why_no_events(exc)
                if hint is not None and not force_polling:
                    log.warning(
                        "events_unavailable_polling",
                        watch=self.watch.name,
                        error=str(exc),
                        hint=hint,
                    )
                    force_polling = True
                elif isinstance(exc, OSError):
                    raise
                else:
                    name = undecodable_name(exc)
                    if name is None:
                        raise
                    # watchfiles cannot report a name that is not UTF-8: with inotify not
                    # even one already in the tree, and a poll stops at its first change.
                    # Poll, and walk after each such stop (the walk handles those names).
                    undecodable += 1
                    if undecodable == 1:
                        log.warning(
                            "events_unavailable_name",
                            watch=self.watch.name,
                            error=name,
                            hint="a file or folder name that is not UTF-8 stops filesystem "
                            "events; rename it. Polling this watch meanwhile",
                        )
                    force_polling = True
                    self.request_rescan()
                    await self._clock.sleep(min(2.0**undecodable, UNDECODABLE_BACKOFF))
                    continue
            self._watching = False
            if self._stop.is_set():
                await anyio.sleep_forever()  # stopped: wait for the cancellation that follows
            await self._clock.sleep(1.0)  # the root went away; wait for it to come back

    def _events_established(self) -> None:
        """The kernel reports events now. If a walk began before that, a file created
        after it passed its folder had no event: walk again, not at the periodic rescan."""
        if self._first_walk_begun:
            self.request_rescan()
        self._events_live.set()

    async def _follow_inotify(self) -> None:
        """Events from inotify until the root goes away or ``stop()``. Raises ``OSError``
        when inotify cannot be had (no descriptor, no watches left, the root unreadable)."""
        if self._stop.is_set():
            return
        source = FolderEvents(self._root, self._filter.excludes_dir)
        await anyio.to_thread.run_sync(source.open)
        try:
            self._events = source
            self._events_established()
            async with anyio.create_task_group() as tg:

                async def on_stop() -> None:
                    await self._stop.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(on_stop)
                while True:
                    await anyio.wait_readable(source.fileno())
                    await anyio.sleep(GATHER)
                    events = await anyio.to_thread.run_sync(source.read)
                    if events.overflowed:
                        log.warning(
                            "events_overflowed",
                            watch=self.watch.name,
                            hint="the kernel dropped filesystem events (raise "
                            "fs.inotify.max_queued_events); walking the watch again",
                        )
                        self.request_rescan()
                    if events.changes:
                        await self._on_changes(events.changes)
                    if events.root_gone:
                        break
                tg.cancel_scope.cancel()
        finally:
            self._events = None
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(source.close)

    async def _follow_watchfiles(self, force_polling: bool | None, ignore_denied: bool) -> None:
        """Events (or polling) from watchfiles until the root goes away or ``stop()``."""
        established = False
        async for changes in watchfiles.awatch(
            self._root,
            watch_filter=None,
            recursive=True,
            force_polling=force_polling,
            poll_delay_ms=POLL_DELAY_MS,
            debounce=200,
            step=50,
            ignore_permission_denied=ignore_denied,
            stop_event=self._stop,
            rust_timeout=1000,
            yield_on_timeout=True,
        ):
            if not established:
                established = True
                self._events_established()
            if changes:
                await self._on_changes(changes)

    async def _on_changes(self, changes: set[tuple[watchfiles.Change, str]]) -> None:
        changed: list[str] = []
        for change, raw in changes:
            try:
                rel = relative_key_path(self._root, Path(raw))
            except ValueError:  # the root itself, or outside it
                continue
            if change == watchfiles.Change.deleted:
                self._settle.forget(rel)
            else:
                changed.append(rel)
        folders: list[str] = []
        for start in range(0, len(changed), LOOK_AT_ONCE):
            files, dirs = await anyio.to_thread.run_sync(
                look_at, self._root, changed[start : start + LOOK_AT_ONCE]
            )
            folders += [rel for rel in dirs if not self._filter.excludes_dir(rel)]
            found: list[Seen] = []
            for seen in files:
                if self._filter.accepts(seen.rel_path):
                    found.append(seen)
                marked = self._admission.marker.marks(seen.rel_path)
                if marked is not None:
                    folders.append(marked)  # its files were held back: walk it now
            await self._observe(found)
        for folder in folders:
            await self.scan(folder)


def _why_no_events(exc: BaseException) -> str | None:
    """The hint for a watch that must poll because watchfiles failed, or None.

    Out of file descriptors (EMFILE, ENFILE: watchfiles reports it from creating its
    inotify instance as its own error, not an OSError), or any other OSError (the
    inotify watch limit, mostly).
    """
    if isinstance(exc, OSError):
        descriptors = exc.errno in (errno.EMFILE, errno.ENFILE)
    else:
        text = str(exc)
        descriptors = f"os error {errno.EMFILE})" in text or f"os error {errno.ENFILE})" in text
    if descriptors:
        return (
            "the daemon ran out of file descriptors: raise LimitNOFILE "
            "(or find what holds them); polling this watch until a restart"
        )
    if isinstance(exc, OSError):
        return "raise fs.inotify.max_user_watches; polling this watch meanwhile"
    return None
