"""From the journal's queue to the uploader: workers, backoff, pause/resume, drain.

The journal is the queue. A feeder claims due files (oldest first, skipping
paused watches) only as workers become free, so memory does not grow with
the backlog; each worker uploads one file at a time while the uploader's
shared limiter bounds the requests in flight across all of them. What
happens after a failure is decided here, by the error's class.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
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
from cpg_daemon.engine.uploader import Uploader
from cpg_daemon.journal import FileRecord, Journal
from cpg_daemon.s3.credentials import CredentialProvider
from cpg_daemon.s3.store import ObjectStore

log = structlog.get_logger("cpg_daemon.engine.scheduler")

RECENT_ERRORS = 20
CREDENTIALS_PREFIX = "credentials:"
"""Marks a last error as a refusal of the keys (see Scheduler._credentials_refused)."""
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
        watches: Mapping[str, WatchConfig],
        stores: Mapping[str, ObjectStore],
        workers: int,
        file_attempts: int,
        providers: Mapping[str, CredentialProvider] | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._journal = journal
        self._uploader = uploader
        self._watches = dict(watches)
        self._stores = dict(stores)
        self._workers = workers
        self._file_attempts = file_attempts
        self._providers = dict(providers or {})
        """Each watch's credentials: a watch whose keys are not usable is not fed."""
        self._busy = 0
        self._paused: set[str] = set()
        self._paused_all = False
        self._draining = False
        self._wake_event = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._recent: deque[RecentError] = deque(maxlen=RECENT_ERRORS)
        self._finished: list[Callable[[FileRecord], None]] = []
        self._clock = clock
        self._slowdown = SlowDownPacer(workers)
        self._in_hand = 0
        """Files handed to workers and not yet finished with."""
        self._room = anyio.Event()
        """Set when a worker finishes a file (the feeder may wait for one while throttled)."""
        self._clock_offset = clock.time() - clock.monotonic()
        """Wall minus monotonic time: when it moves, the system clock was set."""

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
            self._paused = set(self._watches) - {watch}
        else:
            self._paused.discard(watch)
        self.wake()

    def reconfigure(
        self,
        watches: Mapping[str, WatchConfig],
        stores: Mapping[str, ObjectStore],
        providers: Mapping[str, CredentialProvider],
        *,
        file_attempts: int,
    ) -> None:
        """A reload: feed these watches from now on. Files in flight finish as they began."""
        self._file_attempts = file_attempts
        self._watches = dict(watches)
        self._stores = dict(stores)
        self._providers = dict(providers)
        self._paused &= set(watches)
        self.wake()

    def store(self, watch: str) -> ObjectStore:
        """The S3 client a watch's uploads use."""
        return self._stores[watch]

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
        send, receive = anyio.create_memory_object_stream[FileRecord](0)
        async with anyio.create_task_group() as tg, send, receive:
            for _ in range(self._workers):
                tg.start_soon(self._worker, receive.clone())
            task_status.started()
            await self._feed(send)

    async def _feed(self, send: anyio.abc.ObjectSendStream[FileRecord]) -> None:
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
            if idle == 0:
                self._room = anyio.Event()
                await self._room.wait()  # a probe finished
                continue
            # Only configured watches: rows of a watch removed from the configuration
            # stay in the journal untouched until it comes back.
            active = [] if self._paused_all else sorted(set(self._watches) - self._paused)
            active = [w for w in active if w not in self._providers or self._providers[w].usable]
            records = await self._journal.claim(idle, active)
            if records:
                for record in records:
                    self._in_hand += 1
                    await send.send(record)
                continue
            due = await self._journal.next_due(active)
            now = self._clock.time()
            timeout = IDLE_POLL if due is None else min(IDLE_POLL, max(0.0, due - now))
            await wait_event(self._wake_event, timeout, self._clock)

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

    async def _worker(self, receive: anyio.abc.ObjectReceiveStream[FileRecord]) -> None:
        async with receive:
            async for record in receive:
                try:
                    await self._work_on(record)
                finally:
                    self._in_hand -= 1
                    self._room.set()

    async def _work_on(self, record: FileRecord) -> None:
        if self._draining or record.watch not in self._watches:
            # Claimed before a drain began or its watch was removed by a
            # reload: leave it queued for next time.
            await self._journal.requeue(record.id)
            return
        if self._busy == 0:
            self._idle = anyio.Event()  # set again when the last file finishes
        self._busy += 1
        try:
            await self._process(record)
        finally:
            for callback in self._finished:
                callback(record)
            self._busy -= 1
            if self._busy == 0:
                self._idle.set()

    async def _process(self, record: FileRecord) -> None:
        watch = self._watches[record.watch]
        store = self._stores[record.watch]
        path = watch.path / record.rel_path
        with (
            structlog.contextvars.bound_contextvars(watch=record.watch, path=str(path)),
            files.confined_to(watch.path),  # a folder swapped for a symlink is not followed
        ):
            try:
                outcome = await self._uploader.upload(store, record, path)
            except VanishedError:
                log.info("vanished", key=record.key)
                await self._uploader.abort(store, record)
                await self._journal.forget(record.id)
            except FileChangedError:
                await self._changed(store, record, path, watch)
            except CredentialsError as exc:
                await self._credentials_refused(store, record, path, exc)
            except ThrottledError as exc:
                await self._throttled(record, path, str(exc))
            except SkipFileError as exc:
                await self._uploader.abort(store, record)
                await self._fail(record, path, str(exc))
            except RetryableError as exc:
                await self._retry_or_fail(store, record, path, str(exc))
            except CpgError as exc:
                await self._fail(record, path, str(exc))
            else:
                self._slowdown.succeeded()
                if outcome == "changed":
                    await self._journal.requeue(record.id)
                    self.wake()

    async def _throttled(self, record: FileRecord, path: Path, error: str) -> None:
        """S3 throttled this file's requests: put it back, hold back the others."""
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
        self, store: ObjectStore, record: FileRecord, path: Path, exc: CredentialsError
    ) -> None:
        """The keys were refused or could not be had: never a reason for a file to fail.

        The keys are renewed at once and the file retried with them, without
        counting an attempt; while there are no usable keys its watch is not
        fed at all. Only when freshly renewed keys are refused again does the
        retry count, so a key that can never work still ends in a visible failure.
        """
        provider = self._providers.get(record.watch)
        error = f"{CREDENTIALS_PREFIX} {exc}"
        renewed = provider is not None and await provider.renew_now()
        refused_before = (record.last_error or "").startswith(CREDENTIALS_PREFIX)
        if provider is not None and (not provider.usable or (renewed and not refused_before)):
            log.warning("credentials_refused", error=str(exc), renewed=renewed)
            await self._journal.requeue(record.id, error)
            self.wake()
            return
        await self._retry_or_fail(store, record, path, error)

    async def _retry_or_fail(
        self, store: ObjectStore, record: FileRecord, path: Path, error: str
    ) -> None:
        if record.attempts + 1 >= self._file_attempts:
            await self._uploader.abort(store, record)
            await self._fail(record, path, f"{error} (after {record.attempts + 1} attempts)")
            return
        delay = backoff(record.attempts)
        log.warning("retry_later", error=error, seconds=round(delay, 1))
        self.remember(path, record.key, error)
        await self._follow_clock()  # before a due time on the wall clock is written
        await self._journal.mark_retry(record.id, error, self._clock.time() + delay)
        self.wake()

    async def _changed(
        self, store: ObjectStore, record: FileRecord, path: Path, watch: WatchConfig
    ) -> None:
        try:
            now = await files.stat(path)
        except VanishedError:
            await self._uploader.abort(store, record)
            await self._journal.forget(record.id)
            return
        log.info("changed_while_uploading", key=record.key)
        await self._follow_clock()
        await self._journal.requeue_changed(
            record.id, now.size, now.mtime_ns, self._clock.time() + watch.settle
        )
        self.wake()  # the feeder recomputes when the next file is due

    async def _fail(self, record: FileRecord, path: Path, error: str) -> None:
        log.error("upload_failed", key=record.key, error=error)
        self.remember(path, record.key, error)
        await self._journal.mark_failed(record.id, error)

    def remember(self, path: Path, key: str, error: str) -> None:
        """List a failure among the recent errors ``status`` shows."""
        at = datetime.fromtimestamp(self._clock.time(), timezone.utc).isoformat(timespec="seconds")
        self._recent.append(RecentError(str(path), key, error, at))
