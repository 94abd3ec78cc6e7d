"""From the journal's queue to the uploader: workers, backoff, pause/resume, drain.

The journal is the queue. A feeder claims due files (oldest first, skipping
paused watches) only as workers become free, so memory does not grow with
the backlog; each worker uploads one file at a time while the uploader's
shared limiter bounds the requests in flight across all of them. What
happens after a failure is decided here, by the error's class.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus

from cpg_daemon.core import files
from cpg_daemon.core.clock import SYSTEM_CLOCK, Clock
from cpg_daemon.core.config import WatchConfig
from cpg_daemon.core.errors import (
    CpgError,
    CredentialsError,
    FileChangedError,
    RetryableError,
    SkipFileError,
    ThrottledError,
    VanishedError,
)
from cpg_daemon.engine.pacing import SlowDownPacer, backoff, wait_event
from cpg_daemon.engine.sources import LocalFile, ObjectSource, SourceFile
from cpg_daemon.engine.tally import Tally
from cpg_daemon.engine.uploader import GROUP_FILES, Outcome, Uploader
from cpg_daemon.engine.watches import ActiveWatch, WatchTable
from cpg_daemon.journal import Failure, FileRecord, Journal
from cpg_daemon.s3.store import Storage

log = structlog.get_logger(__name__)

RECENT_ERRORS = 20
CREDENTIALS_PREFIX = "credentials:"
"""Begins the text of a refusal of the keys (the journal marks it with failure="keys")."""
IDLE_POLL = 5.0
"""Seconds the feeder sleeps at most when nothing is due (a wake-up cuts it short)."""
CLOCK_JUMP = 5.0
"""Seconds by which the wall clock must move against the monotonic clock to count as a jump."""


@dataclass(frozen=True)
class RecentError:
    path: str
    key: str
    error: str
    at: str


@dataclass(frozen=True)
class SchedulerStatistics:
    workers: int
    busy: int
    paused: tuple[str, ...]
    paused_all: bool
    draining: bool
    recent_errors: tuple[RecentError, ...]
    throttled: bool = False
    """S3 asked for fewer requests: fewer files at once (``concurrency``), maybe a pause."""
    concurrency: int = 0
    pause_left: float = 0.0
    put_back: int = 0
    throttle_error: str | None = None


class Scheduler:
    """Feeds queued files to upload workers."""

    def __init__(
        self,
        journal: Journal,
        uploader: Uploader,
        watches: Callable[[], WatchTable],
        workers: int,
        file_attempts: int,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """``watches()``: the current watch table (the engine swaps it on a reload)."""
        self._journal = journal
        self._uploader = uploader
        self._table = watches
        self._workers = workers
        self.file_attempts = file_attempts
        """Attempts a file gets before it is failed (a reload may change it)."""
        self._busy = 0
        self._paused: set[str] = set()
        self._paused_all = False
        self._draining = False
        self._wake_event = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._recent: deque[RecentError] = deque(maxlen=RECENT_ERRORS)
        self._finished: list[Callable[[FileRecord], None]] = []
        self.tally = Tally()
        """Uploads, failures, retries and throttled requests since the start (metrics)."""
        self._clock = clock
        self._slowdown = SlowDownPacer(workers)
        self._in_hand = 0
        """Files handed to workers and not yet finished with."""
        self._room = anyio.Event()
        """Set when a worker finishes a file (the feeder may wait for one while throttled)."""
        self._clock_offset = clock.time() - clock.monotonic()
        """Wall minus monotonic time: when it moves, the system clock was set."""
        self._objects: dict[str, ObjectSource] = {}
        """Watches whose files are objects of another bucket (``read_objects``)."""

    def read_objects(self, watch: str, source: ObjectSource) -> None:
        """``watch``'s files are ``source``'s objects, not files below its folder
        (``cpg-daemon upload s3://...``)."""
        self._objects[watch] = source

    def _file(self, active: ActiveWatch, record: FileRecord) -> SourceFile:
        source = self._objects.get(active.name)
        if source is not None:
            return source.file(record.rel_path)
        return LocalFile(active.config.path / record.rel_path)

    # -- control -------------------------------------------------------------------------

    def wake(self) -> None:
        """New work may be due: look at the queue now."""
        self._wake_event.set()

    def on_finished(self, callback: Callable[[FileRecord], None]) -> None:
        """Call ``callback(record)`` (quick, no I/O) whenever a worker is done with a file.

        Done means uploaded, failed, re-queued or forgotten: the file's row may
        have changed (the batch tracker looks at its folder later).
        """
        self._finished.append(callback)

    def pause(self, watch: str | None = None) -> None:
        if watch is None:
            self._paused_all = True
        else:
            self._paused.add(watch)

    def resume(self, watch: str | None = None) -> None:
        if watch is None:
            self._paused_all = False
            self._paused.clear()
        elif self._paused_all:  # everything was paused: all but this one stay paused
            self._paused_all = False
            self._paused = set(self._table()) - {watch}
        else:
            self._paused.discard(watch)
        self.wake()

    def watches_changed(self) -> None:
        """The watch table was swapped (a reload): files in flight finish as they began."""
        self._paused &= set(self._table())
        self.wake()

    def drain(self) -> None:
        """Stop starting files; those in flight carry on."""
        self._draining = True
        self.wake()

    async def wait_idle(self) -> None:
        """Return once no file is in flight."""
        await self._idle.wait()

    def statistics(self) -> SchedulerStatistics:
        now = self._clock.monotonic()
        return SchedulerStatistics(
            workers=self._workers,
            busy=self._busy,
            paused=tuple(sorted(self._paused)),
            paused_all=self._paused_all,
            draining=self._draining,
            recent_errors=tuple(self._recent),
            throttled=self._slowdown.active(now),
            concurrency=self._slowdown.allowed,
            pause_left=round(self._slowdown.pause_left(now), 1),
            put_back=self._slowdown.put_back,
            throttle_error=self._slowdown.last_error,
        )

    # -- running -------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        send, receive = anyio.create_memory_object_stream[list[FileRecord]](0)
        async with anyio.create_task_group() as tg, send, receive:
            for _ in range(self._workers):
                tg.start_soon(self._worker, receive.clone())
            task_status.started()
            await self._feed(send)

    async def _feed(self, send: anyio.abc.ObjectSendStream[list[FileRecord]]) -> None:
        while True:
            self._wake_event = anyio.Event()
            if self._draining:
                await anyio.sleep_forever()
            await self._follow_clock()
            pause = self._slowdown.pause_left(self._clock.monotonic())
            if pause > 0:  # S3 asked for fewer requests
                await self._clock.sleep(pause)
                continue
            idle = self._slowdown.claim_limit(self._in_hand, self._busy)
            idle = min(idle, self._uploader.files_at_once(self._workers) - self._in_hand)
            if idle <= 0:
                self._room = anyio.Event()
                await self._room.wait()  # a probe finished
                continue
            # Only configured watches: rows of a watch removed from the configuration
            # stay in the journal untouched until it comes back.
            table = self._table()
            # A watch whose keys are not usable is not fed.
            active = [] if self._paused_all else sorted(set(table) - self._paused)
            active = [w for w in active if table[w].grant.usable]
            records = await self._journal.claim(idle, active)
            if records:
                self._in_hand += len(records)
                for group in self._groups(records):
                    await send.send(group)
                continue
            due = await self._journal.next_due(active)
            now = self._clock.time()
            timeout = IDLE_POLL if due is None else min(IDLE_POLL, max(0.0, due - now))
            await wait_event(self._wake_event, timeout, self._clock)

    def _groups(self, records: list[FileRecord]) -> list[list[FileRecord]]:
        """The claimed files as a worker takes them: small files of one watch in groups of
        up to GROUP_FILES (``Uploader.upload_many``), every other file alone."""
        groups: list[list[FileRecord]] = []
        small: dict[str, list[FileRecord]] = {}
        for record in records:
            if record.watch in self._objects or not self._uploader.batchable(record):
                groups.append([record])
                continue
            group = small.setdefault(record.watch, [])
            group.append(record)
            if len(group) == GROUP_FILES:
                groups.append(small.pop(record.watch))
        groups.extend(small.values())
        return groups

    async def _follow_clock(self) -> None:
        """Keep retry and settle delays when the system clock is set (NTP stepping it, say).

        The journal keeps due times as wall-clock times. Without this, setting the
        clock back an hour would hold every file waiting for a retry an hour longer,
        and setting it forward would retry them all at once.
        """
        offset = self._clock.time() - self._clock.monotonic()
        jump = offset - self._clock_offset
        if abs(jump) < CLOCK_JUMP:
            return
        self._clock_offset = offset
        moved = await self._journal.shift_due(jump)
        log.warning(
            "clock_jumped",
            seconds=round(jump, 1),
            files_rescheduled=moved,
            hint="the system clock was set; retry times moved with it. Keep NTP on: "
            "S3 refuses requests from a clock more than 15 minutes off",
        )

    async def _worker(self, receive: anyio.abc.ObjectReceiveStream[list[FileRecord]]) -> None:
        async with receive:
            async for group in receive:
                try:
                    await self._work_on(group)
                finally:
                    self._in_hand -= len(group)
                    self._room.set()

    async def _work_on(self, group: list[FileRecord]) -> None:
        """One file, or a group of small files of one watch (``_groups``)."""
        watch = self._table().get(group[0].watch)
        if self._draining or watch is None:
            # Claimed before a drain began or its watch was removed by a
            # reload: leave them queued for next time.
            for record in group:
                await self._journal.requeue(record.id)
            return
        if self._busy == 0:
            self._idle = anyio.Event()  # set again when the last file finishes
        self._busy += len(group)
        try:
            with watch.grant.lease():  # a grant dropped by a reload stays open until then
                if len(group) == 1:
                    await self._process(group[0], watch)
                else:
                    await self._process_group(group, watch)
        finally:
            for record in group:
                for callback in self._finished:
                    callback(record)
            self._busy -= len(group)
            if self._busy == 0:
                self._idle.set()

    async def _process(self, record: FileRecord, active: ActiveWatch | None = None) -> None:
        active = active or self._table()[record.watch]
        file = self._file(active, record)
        with (
            structlog.contextvars.bound_contextvars(watch=record.watch, path=file.name),
            files.confined_to(active.config.path),  # a folder swapped for a symlink is not followed
        ):
            started = self._clock.monotonic()
            try:
                outcome = await self._uploader.upload(active.grant.store, record, file)
            except CpgError as exc:
                await self._failed(active, record, file, exc)
            else:
                await self._succeeded(record, outcome, started)

    async def _process_group(self, group: list[FileRecord], active: ActiveWatch) -> None:
        """Small files sent together; each file's outcome handled as ``_process`` would,
        an error as soon as it happens."""
        paths = [active.config.path / record.rel_path for record in group]

        async def failed(index: int, exc: CpgError) -> None:
            with structlog.contextvars.bound_contextvars(path=str(paths[index])):
                await self._failed(active, group[index], LocalFile(paths[index]), exc)

        with (
            structlog.contextvars.bound_contextvars(watch=active.config.name),
            files.confined_to(active.config.path),
        ):
            started = self._clock.monotonic()
            results = await self._uploader.upload_many(active.grant.store, group, paths, failed)
            for record, result in zip(group, results, strict=True):
                if result is not None:
                    await self._succeeded(record, result, started)

    async def _succeeded(self, record: FileRecord, outcome: Outcome, started: float) -> None:
        self._slowdown.succeeded()
        if outcome == "changed":
            await self._journal.requeue(record.id)
            self.wake()
        elif outcome == "uploaded":  # not "already-present": nothing was sent
            seconds = self._clock.monotonic() - started
            self.tally.uploaded(record.watch, record.size, seconds, self._clock.time())

    async def _failed(
        self, active: ActiveWatch, record: FileRecord, file: SourceFile, exc: CpgError
    ) -> None:
        """What becomes of a file after an error, by the error's class."""
        path = file.name
        store = active.grant.store
        if isinstance(exc, VanishedError):
            log.info("vanished", key=record.key)
            await self._uploader.abort(store, record)
            await self._journal.forget(record.id)
        elif isinstance(exc, FileChangedError):
            await self._changed(store, record, file, active.config)
        elif isinstance(exc, CredentialsError):
            await self._credentials_refused(active, record, path, exc)
        elif isinstance(exc, ThrottledError):
            await self._throttled(record, path, str(exc))
        elif isinstance(exc, SkipFileError):
            await self._uploader.abort(store, record)
            await self._fail(record, path, str(exc))
        elif isinstance(exc, RetryableError):  # a timeout, a 5xx, a connection lost
            self._uploader.congested()
            await self._retry_or_fail(store, record, path, str(exc))
        else:
            await self._fail(record, path, str(exc))

    async def _throttled(self, record: FileRecord, path: str, error: str) -> None:
        """S3 throttled this file's requests: put it back, hold back the others."""
        self.tally.throttled(record.watch)
        self._uploader.congested()
        pause = self._slowdown.throttled(self._clock.monotonic(), error)
        if pause is not None:
            log.warning(
                "throttled",
                error=error,
                pause=round(pause, 1),
                hint="S3 asked for fewer requests: pausing, then one file at a time until "
                "it accepts them again; files are put back without using their attempts",
            )
            self.remember(path, record.key, error)
        await self._journal.requeue(record.id, error)

    async def _credentials_refused(
        self, watch: ActiveWatch, record: FileRecord, path: str, exc: CredentialsError
    ) -> None:
        """The keys were refused or could not be had: never a reason for a file to fail.

        The keys are renewed (or read again) at once and the file retried with them,
        without counting an attempt; while there are no usable keys its watch is not
        fed at all. Keys a person must replace (environment, profile, handed over)
        that S3 refuses stop their watches until other keys arrive: files wait,
        visibly, and none fails. Keys the daemon renews itself (Access Grants, a
        role) count an attempt only when freshly renewed keys are refused again, so
        a grant that can never work still ends in a visible failure.
        """
        grant = watch.grant
        error = f"{CREDENTIALS_PREFIX} {exc}"
        renewed = await grant.renew_now()
        renews_itself = grant.provider.renews_itself
        if not renewed and not renews_itself:
            grant.provider.refuse(str(exc))
        if not grant.usable or not renews_itself or (renewed and not record.keys_refused):
            log.warning("credentials_refused", error=str(exc), renewed=renewed)
            await self._journal.requeue(record.id, error, failure="keys")
            self.wake()
            return
        await self._retry_or_fail(grant.store, record, path, error, "keys")

    async def _retry_or_fail(
        self,
        store: Storage,
        record: FileRecord,
        path: str,
        error: str,
        failure: Failure = "error",
    ) -> None:
        if record.attempts + 1 >= self.file_attempts:
            await self._uploader.abort(store, record)
            attempts = record.attempts + 1
            await self._fail(record, path, f"{error} (after {attempts} attempts)", failure)
            return
        delay = backoff(record.attempts)
        self.tally.retried(record.watch)
        log.warning("retry_later", error=error, seconds=round(delay, 1))
        self.remember(path, record.key, error)
        await self._follow_clock()  # before a due time on the wall clock is written
        await self._journal.mark_retry(
            record.id, error, self._clock.time() + delay, failure=failure
        )
        self.wake()

    async def _changed(
        self, store: Storage, record: FileRecord, file: SourceFile, watch: WatchConfig
    ) -> None:
        try:
            now = await file.stat()
        except VanishedError:
            await self._uploader.abort(store, record)
            await self._journal.forget(record.id)
            return
        if (now.size, now.mtime_ns) == (record.size, record.mtime_ns):
            # A change its size and time do not show (an object replaced within the
            # second its LastModified counts): no part sent before may be used again.
            await self._uploader.abort(store, record)
        log.info("changed_while_uploading", key=record.key)
        await self._follow_clock()
        await self._journal.requeue_changed(
            record.id, now.size, now.mtime_ns, self._clock.time() + watch.settle
        )
        self.wake()  # the feeder recomputes when the next file is due

    async def _fail(
        self, record: FileRecord, path: str, error: str, failure: Failure = "error"
    ) -> None:
        self.tally.failed(record.watch)
        log.error("upload_failed", key=record.key, error=error)
        self.remember(path, record.key, error)
        await self._journal.mark_failed(record.id, error, failure=failure)

    def remember(self, path: str | Path, key: str, error: str) -> None:
        """List a failure among the recent errors ``status`` shows."""
        at = datetime.fromtimestamp(self._clock.time(), timezone.utc).isoformat(timespec="seconds")
        self._recent.append(RecentError(str(path), key, error, at))
