"""Batch complete: a top-level folder of a watch whose files are all uploaded, and quiet.

A *batch* is a top-level folder below a watch's path (``Batch8/...``); files
directly in the watch's root belong to no batch. A batch is complete when every
journal row under it is ``uploaded`` (none queued, uploading or failed), the
watcher has finished its first walk and has no file under it still settling,
its ``ready_marker`` (when configured) exists, and none of its rows changed for
the watch's ``settle`` time. Then its manifest is written (and, with
``upload_manifest``, uploaded beside the data: a failure is logged, and never keeps
the batch from completing), the completion is recorded in the journal (so a restart
does not fire again), ``batch_complete`` is logged, and the watch's
``on_batch_complete`` command runs. A batch that changes after completing (a
file added or changed, then uploaded) completes again: a second event, with the
new totals.

What is examined is driven by events: the scheduler reports every file it is
done with (``touch``), and that file's batch is looked at once it has been quiet
for ``settle``. A look costs one range scan of the journal's (watch, rel_path)
index over the batch's rows. At start every batch is looked at once, which
catches one that finished just before a stop or a crash.

Hooks run through ``/bin/sh -c`` (as systemd's ``ExecStart=`` users expect) in a
process group of their own, one at a time per watch, with a JSON summary on
stdin, without the daemon's AWS_* variables, and with a timeout. Whatever a hook
does, uploads carry on: its outcome is only logged and shown in status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog
from anyio.abc import ByteReceiveStream, ByteSendStream, Process, TaskGroup, TaskStatus

from cpg_daemon.core.clock import SYSTEM_CLOCK, Clock
from cpg_daemon.core.config import WatchConfig
from cpg_daemon.core.errors import CpgError
from cpg_daemon.core.objectkeys import manifest_key, object_key, parse_s3_uri
from cpg_daemon.core.units import timestamp
from cpg_daemon.engine import manifest
from cpg_daemon.engine.pacing import wait_event
from cpg_daemon.journal import BatchProgress, BatchRecord, Journal, iter_uploads

log = structlog.get_logger(__name__)

SHELL = "/bin/sh"
HOOK_TIMEOUT = 300.0
"""Seconds an on_batch_complete command may run before its process group is killed."""
HOOK_TERM_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL to a hook's process group."""
HOOK_STOP_GRACE = 5.0
"""Seconds a running hook may go on after the daemon is asked to stop."""
HOOK_OUTPUT_LIMIT = 4000
"""Bytes of a hook's output (stdout and stderr together) kept for the log."""
OUTPUT_AFTER_EXIT = 1.0
"""Seconds to read output after the shell exited (a child it left may hold the pipe)."""
DETAIL_LIMIT = 300
"""Characters of a hook's outcome kept in the journal and shown in status."""
MIN_QUIET = 1.0
"""Seconds after a file of a batch finished before the batch is looked at (settle = 0)."""
RECHECK = 2.0
"""Seconds between looks at a batch while the watcher may still bring files to it."""
RECENT = 20
"""Completions kept for status."""
MANIFEST_UPLOAD_TIMEOUT = 300.0
"""Seconds a batch's completion waits for its manifest's upload (``upload_manifest``)."""
PRIVATE_ENVIRONMENT = frozenset(
    {"CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC"}
)
"""Variables of the daemon's environment a hook never gets (besides every AWS_*)."""


@dataclass(frozen=True)
class WrittenManifest:
    """A completion's manifest: the file, its SHA-256, and where it was uploaded."""

    path: str
    sha256: str
    uploaded_to: str | None = None
    """``s3://bucket/key`` of its copy beside the data (``upload_manifest``), or None."""


ManifestSender = Callable[[str, str, str, Path], Awaitable[str]]
"""``(watch, bucket, key, file)`` -> ETag: puts one of the daemon's own files with the
watch's keys (the engine's ``Engine.put_file``)."""


@dataclass(frozen=True)
class BatchStatistics:
    completed: tuple[BatchRecord, ...]
    """The latest completions, latest first (at most ``RECENT``)."""
    following: int
    """Batches with recent activity, to be looked at."""
    hooks_queued: int
    hooks_running: int
    manifests: Mapping[tuple[str, str, float], WrittenManifest] = dataclasses.field(
        default_factory=dict
    )
    """(watch, batch, completed_at) -> its manifest, as written since start."""


@dataclass(frozen=True)
class HookResult:
    ok: bool
    detail: str
    """``exit status 0``, ``exit status 3``, ``killed by SIGKILL``, ``timed out ...``."""
    output: str
    seconds: float


def summary(
    record: BatchRecord, watch: WatchConfig, manifest: WrittenManifest | None = None
) -> dict[str, Any]:
    """The JSON object an on_batch_complete command reads on stdin (``manifest``: the
    batch's manifest, when it was written)."""
    return {
        "event": "batch_complete",
        "watch": record.watch,
        "batch": record.name,
        "path": str(watch.path / record.name),
        "destination": record.destination,
        "files": record.files,
        "bytes": record.bytes,
        "first_uploaded_at": timestamp(record.first_uploaded_at),
        "last_uploaded_at": timestamp(record.last_uploaded_at),
        "completed_at": timestamp(record.completed_at),
        **manifest_fields(manifest),
    }


def manifest_fields(manifest: WrittenManifest | None) -> dict[str, str | None]:
    """How the batch_complete event, status and a hook's JSON name a completion's manifest."""
    return {
        "manifest": manifest.path if manifest else None,
        "manifest_sha256": manifest.sha256 if manifest else None,
        "manifest_uploaded_to": manifest.uploaded_to if manifest else None,
    }


def hook_environment(base: Mapping[str, str], data: Mapping[str, Any]) -> dict[str, str]:
    """The daemon's environment without secrets, plus ``CPG_*`` variables for the batch.

    Every ``AWS_*`` variable is left out (keys, session tokens, profiles), and so
    are systemd's ``CREDENTIALS_DIRECTORY`` (the long-term keys) and its
    notification variables.
    """
    env = {
        name: value
        for name, value in base.items()
        if not name.upper().startswith("AWS_") and name not in PRIVATE_ENVIRONMENT
    }
    env.update(
        CPG_EVENT=str(data["event"]),
        CPG_WATCH=str(data["watch"]),
        CPG_BATCH=str(data["batch"]),
        CPG_PATH=str(data["path"]),
        CPG_DESTINATION=str(data["destination"]),
        CPG_FILES=str(data["files"]),
        CPG_BYTES=str(data["bytes"]),
    )
    return env


class _Output:
    """A hook's output, read to the end so that it never blocks, the first bytes kept."""

    def __init__(self, limit: int) -> None:
        self.kept = bytearray()
        self.dropped = 0
        self.done = anyio.Event()
        self._limit = limit

    async def read(self, stream: ByteReceiveStream) -> None:
        try:
            async for chunk in stream:
                room = self._limit - len(self.kept)
                self.kept += chunk[:room]
                self.dropped += max(0, len(chunk) - room)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            self.done.set()

    def text(self) -> str:
        text = self.kept.decode("utf-8", "replace").strip()
        if self.dropped:
            text += f" ... ({self.dropped} more bytes)"
        return text


async def _feed(stream: ByteSendStream, data: bytes) -> None:
    """Write the summary; a hook that exits without reading it is fine."""
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await stream.send(data)
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await stream.aclose()


def _signal_group(process: Process, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


async def _end(process: Process, grace: float) -> None:
    """SIGTERM to the hook's process group, SIGKILL after ``grace``; wait for the shell."""
    _signal_group(process, signal.SIGTERM)
    with anyio.move_on_after(grace):
        await process.wait()
    _signal_group(process, signal.SIGKILL)  # also what the shell left behind
    await process.wait()


async def _reap(process: Process, exited: anyio.Event) -> None:
    await process.wait()
    exited.set()


async def run_hook(
    command: str,
    stdin: bytes,
    env: Mapping[str, str],
    kill_after: float = HOOK_TIMEOUT,
    clock: Clock = SYSTEM_CLOCK,
) -> HookResult:
    """Run ``/bin/sh -c COMMAND`` in its own process group, ``stdin`` on its standard input.

    Its process group is killed after ``kill_after`` seconds on ``clock``, and at once
    (SIGTERM, then SIGKILL a second later) when the caller is cancelled.
    """
    started = clock.monotonic()
    try:
        process = await anyio.open_process(
            [SHELL, "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        return HookResult(False, f"could not start {SHELL}: {exc}", "", 0.0)
    output = _Output(HOOK_OUTPUT_LIMIT)
    timed_out = False
    try:
        async with anyio.create_task_group() as tg:
            assert process.stdin is not None and process.stdout is not None
            tg.start_soon(_feed, process.stdin, stdin)
            tg.start_soon(output.read, process.stdout)
            exited = anyio.Event()
            tg.start_soon(_reap, process, exited)
            await wait_event(exited, kill_after, clock)
            if not exited.is_set():
                timed_out = True
                await _end(process, HOOK_TERM_GRACE)
            with anyio.move_on_after(OUTPUT_AFTER_EXIT):
                await output.done.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:  # cancelled: the daemon is stopping
                await _end(process, 1.0)
            with contextlib.suppress(OSError, anyio.BrokenResourceError):
                await process.aclose()
    returncode = process.returncode
    assert returncode is not None
    if timed_out:
        detail = f"timed out after {kill_after:g} s; its process group was killed"
    elif returncode < 0:
        detail = f"killed by {signal.Signals(-returncode).name}"
    else:
        detail = f"exit status {returncode}"
    return HookResult(
        not timed_out and returncode == 0,
        detail,
        output.text(),
        round(clock.monotonic() - started, 3),
    )


class BatchTracker:
    """Notices completed batches, logs and records them, and runs their hooks."""

    def __init__(
        self,
        journal: Journal,
        watches: Callable[[], Mapping[str, WatchConfig]],
        settling: Callable[[str, str], bool],
        *,
        hook_timeout: float = HOOK_TIMEOUT,
        clock: Clock = SYSTEM_CLOCK,
        send: ManifestSender | None = None,
    ) -> None:
        """``watches()``: the current watches by name (a reload swaps them);
        ``settling(watch, folder)``: may files under the folder still reach the journal?
        ``send``: how manifests are uploaded (``upload_manifest``)."""
        self._journal = journal
        self._send = send
        self._configs = watches
        self._settling = settling
        self._hook_timeout = hook_timeout
        self._clock = clock
        self._due: dict[tuple[str, str], float] = {}
        """(watch, batch) -> monotonic time at which to look at it."""
        self._ahead: dict[tuple[str, str], tuple[float, float]] = {}
        """(watch, batch) -> (its last change, monotonic time first seen), for a last change
        later than the wall clock (which was set back since)."""
        self._wake = anyio.Event()
        self._recent: deque[BatchRecord] = deque(maxlen=RECENT)
        self._hooks: dict[str, deque[BatchRecord]] = {}
        """Per watch, completions whose hook has not started."""
        self._hook_queued: dict[str, anyio.Event] = {}
        self._running_hooks = 0
        self._hooks_idle = anyio.Event()
        self._hooks_idle.set()
        self._stop_at: float | None = None
        self._task_group: TaskGroup | None = None
        self._manifests: dict[tuple[str, str, float], WrittenManifest] = {}

    # -- for the other components --------------------------------------------------------

    def touch(self, watch: str, rel_path: str) -> None:
        """A file of ``watch`` changed state: look at its batch once that has been quiet."""
        folder, sep, _ = rel_path.partition("/")
        if not sep:
            return  # in the watch's root: no batch
        key = (watch, folder)
        new = key not in self._due
        self._due[key] = self._clock.monotonic() + self._quiet(watch)
        if new:  # a later time for a batch already followed needs no wake-up
            self._wake.set()

    def stop(self) -> None:
        """The daemon is stopping: start no more hooks (queued ones run at the next start)."""
        self._stop_at = self._clock.monotonic()
        for event in self._hook_queued.values():
            event.set()

    async def wait_hooks(self) -> None:
        """After ``stop``: return once no hook runs, or ``HOOK_STOP_GRACE`` after ``stop``."""
        now = self._clock.monotonic()
        stop_at = now if self._stop_at is None else self._stop_at
        await wait_event(self._hooks_idle, stop_at + HOOK_STOP_GRACE - now, self._clock)

    def statistics(self) -> BatchStatistics:
        return BatchStatistics(
            completed=tuple(self._recent),
            following=len(self._due),
            hooks_queued=sum(len(queue) for queue in self._hooks.values()),
            hooks_running=self._running_hooks,
            manifests=dict(self._manifests),
        )

    # -- running -------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow batches until cancelled; ready once the journal has been read."""
        for record in await self._journal.completed_batches(hook_state="running"):
            detail = "interrupted: the daemon stopped while it ran; it is not run again"
            await self._journal.set_batch_hook(record, "failed", detail)
            log.warning("batch_hook_failed", watch=record.watch, batch=record.name, error=detail)
        self._recent.extend(await self._journal.completed_batches(limit=RECENT))
        queued = await self._journal.completed_batches(hook_state="queued")
        now = self._clock.monotonic()
        for watch in list(self._configs()):
            for name in await self._journal.batch_names(watch):
                self._due.setdefault((watch, name), now + self._quiet(watch))
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            for record in reversed(queued):  # oldest first
                self._queue_hook(record)
            task_status.started()
            await self._follow()

    def _quiet(self, watch: str) -> float:
        config = self._configs().get(watch)
        return max(config.settle if config else 0.0, MIN_QUIET)

    async def _follow(self) -> None:
        while True:
            self._wake = anyio.Event()
            now = self._clock.monotonic()
            for key in [key for key, at in self._due.items() if at <= now]:
                del self._due[key]
                try:
                    await self._look(*key)
                except Exception:  # a bug here must never stop the uploads
                    log.exception("batch_check_failed", watch=key[0], batch=key[1])
            timeout = min(self._due.values(), default=now + 3600.0) - self._clock.monotonic()
            await wait_event(self._wake, max(0.0, timeout), self._clock)

    async def _look(self, watch: str, name: str) -> None:
        """Record and announce this batch's completion, if it is complete and that is news."""
        config = self._configs().get(watch)
        if config is None:
            return  # removed by a reload
        key = (watch, name)
        if self._settling(watch, name):
            self._due[key] = self._clock.monotonic() + max(RECHECK, config.settle / 2)
            return
        if config.ready_marker:
            marker = config.path / name / config.ready_marker
            if not await anyio.to_thread.run_sync(marker.is_file):
                return
        progress = await self._journal.batch_progress(watch, name)
        if progress.files == 0 or progress.uploaded < progress.files:
            return  # the scheduler touches it again when those files are done
        assert progress.last_change is not None
        now = self._clock.time()
        monotonic = self._clock.monotonic()
        if progress.last_change > now:
            # The clock was set back since: count the quiet time from when this change
            # was first seen here, not from a wall-clock time that is still to come.
            seen = self._ahead.get(key)
            if seen is None or seen[0] != progress.last_change:
                seen = self._ahead[key] = (progress.last_change, monotonic)
            wait = seen[1] + config.settle - monotonic
        else:
            self._ahead.pop(key, None)
            wait = progress.last_change + config.settle - now
        if wait > 0:
            self._due[key] = monotonic + wait
            return
        recorded = progress.recorded
        if recorded is not None and (recorded.files, recorded.bytes, recorded.last_change) == (
            progress.files,
            progress.bytes,
            progress.last_change,
        ):
            return  # announced before, and nothing changed since
        await self._complete(config, name, progress, again=recorded is not None)

    async def _complete(
        self, config: WatchConfig, name: str, progress: BatchProgress, *, again: bool
    ) -> None:
        assert progress.first_uploaded_at is not None and progress.last_uploaded_at is not None
        assert progress.last_change is not None
        record = BatchRecord(
            watch=config.name,
            name=name,
            destination=f"s3://{config.destination.bucket}/"
            f"{object_key(config.destination.prefix, name)}/",
            files=progress.files,
            bytes=progress.bytes,
            first_uploaded_at=progress.first_uploaded_at,
            last_uploaded_at=progress.last_uploaded_at,
            last_change=progress.last_change,
            completed_at=self._clock.time(),
            hook_state="queued" if config.on_batch_complete else "none",
        )
        # The manifest first: a stop while it is written leaves the batch to complete
        # again at the next start (with its manifest), not recorded without one.
        written = await self._write_manifest(config, record)
        if written is not None and config.upload_manifest:
            written = await self._upload_manifest(config, record, written)
        if written is not None:
            self._manifests[(record.watch, record.name, record.completed_at)] = written
        # Recorded next: a crash right after it leaves the hook queued, not a second event.
        await self._journal.record_batch(record)
        log.info(
            "batch_complete",
            watch=record.watch,
            batch=name,
            path=str(config.path / name),
            destination=record.destination,
            files=record.files,
            bytes=record.bytes,
            first_uploaded_at=timestamp(record.first_uploaded_at),
            last_uploaded_at=timestamp(record.last_uploaded_at),
            duration_s=round(record.last_uploaded_at - record.first_uploaded_at, 3),
            again=again,
            **manifest_fields(written),
        )
        self._remember(record)
        if config.on_batch_complete:
            self._queue_hook(record)

    async def _write_manifest(
        self, config: WatchConfig, record: BatchRecord
    ) -> WrittenManifest | None:
        """Write the batch's manifest (its journal rows streamed to the file, in a thread);
        returns it, or None when it could not be written (logged).

        A stop does not wait for it (a batch of a million files takes seconds): the
        file is written whole or not at all, and the batch completes again at the next
        start.
        """
        path = manifest.batch_path(
            self._journal.path.parent, record.watch, record.name, record.completed_at
        )
        header = manifest.header_of(
            parse_s3_uri(record.destination),
            record.watch,
            record.name,
            config.path,
            record.files,
            record.bytes,
        )

        stopping = threading.Event()

        def work() -> str:
            uploads = iter_uploads(self._journal.path, record.watch, record.name)
            entries = map(manifest.entry_of, uploads)
            return manifest.write_stream(header, entries, path, stopping.is_set)

        fields = {"watch": record.watch, "batch": record.name, "path": str(path)}
        try:
            digest = await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except (OSError, sqlite3.Error, manifest.ManifestError) as exc:
            log.warning("manifest_not_written", error=str(exc), **fields)
            return None
        except anyio.get_cancelled_exc_class():
            stopping.set()  # the thread gives up within a few thousand lines
            log.info("manifest_not_written", error="the daemon stopped first", **fields)
            raise
        return WrittenManifest(str(path), digest)

    async def _upload_manifest(
        self, config: WatchConfig, record: BatchRecord, written: WrittenManifest
    ) -> WrittenManifest:
        """Upload the manifest, then its ``.sha256``, beside the data with the watch's keys;
        returns it with where it went, or as it was when that failed (logged as
        ``manifest_not_uploaded``): the batch completes either way, after
        ``MANIFEST_UPLOAD_TIMEOUT`` at most.
        """
        path = Path(written.path)
        bucket = config.destination.bucket
        fields = {"watch": record.watch, "batch": record.name, "bucket": bucket}
        try:
            key = manifest_key(config.destination, record.name, path.name)
            fields["key"] = key
            if self._send is None:
                raise ValueError("no S3 client to upload it with")
            with anyio.fail_after(MANIFEST_UPLOAD_TIMEOUT):
                for name in (path.name, path.name + ".sha256"):
                    where = manifest_key(config.destination, record.name, name)
                    await self._send(record.watch, bucket, where, path.with_name(name))
        except TimeoutError:
            error = f"not sent within {MANIFEST_UPLOAD_TIMEOUT:g} s"
            log.warning("manifest_not_uploaded", error=error, **fields)
            return written
        except (CpgError, OSError, ValueError) as exc:
            log.warning("manifest_not_uploaded", error=str(exc), **fields)
            return written
        except anyio.get_cancelled_exc_class():
            log.info("manifest_not_uploaded", error="the daemon stopped first", **fields)
            raise
        except Exception:  # a bug here must never keep the batch from completing
            log.exception("manifest_not_uploaded", **fields)
            return written
        log.info("manifest_uploaded", **fields)
        return replace(written, uploaded_to=f"s3://{bucket}/{key}")

    def _remember(self, record: BatchRecord) -> None:
        """Put this completion at the top of the status list (replacing an older one)."""
        for old in [r for r in self._recent if (r.watch, r.name) == (record.watch, record.name)]:
            self._recent.remove(old)
        self._recent.appendleft(record)

    # -- hooks ---------------------------------------------------------------------------

    def _queue_hook(self, record: BatchRecord) -> None:
        queue = self._hooks.get(record.watch)
        if queue is None:
            queue = self._hooks[record.watch] = deque()
            self._hook_queued[record.watch] = anyio.Event()
            assert self._task_group is not None
            self._task_group.start_soon(self._run_hooks, record.watch, queue)
        queue.append(record)
        self._hook_queued[record.watch].set()

    async def _run_hooks(self, watch: str, queue: deque[BatchRecord]) -> None:
        """One watch's hooks, one at a time, in the order their batches completed."""
        while True:
            queued = self._hook_queued[watch] = anyio.Event()
            while queue and self._stop_at is None:
                record = queue.popleft()
                try:
                    await self._hook(record)
                except Exception:  # a bug here must never stop the uploads
                    log.exception("batch_hook_failed", watch=watch, batch=record.name)
            await queued.wait()

    async def _hook(self, record: BatchRecord) -> None:
        config = self._configs().get(record.watch)
        command = config.on_batch_complete if config else ""
        if config is None or not command:
            await self._set_hook(record, "none", "on_batch_complete was removed before it ran")
            return
        if not await self._set_hook(record, "running", None):
            return  # the batch completed again meanwhile: that completion's hook runs
        written = self._manifests.get((record.watch, record.name, record.completed_at))
        data = summary(record, config, written)
        if self._running_hooks == 0:
            self._hooks_idle = anyio.Event()
        self._running_hooks += 1
        try:
            result = await run_hook(
                command,
                json.dumps(data).encode() + b"\n",
                hook_environment(os.environ, data),
                self._hook_timeout,
                self._clock,
            )
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                error = "the daemon stopped while it ran; it was killed and is not run again"
                await self._set_hook(record, "failed", error)
                log.warning("batch_hook_failed", watch=record.watch, batch=record.name, error=error)
            raise
        finally:
            self._running_hooks -= 1
            if self._running_hooks == 0:
                self._hooks_idle.set()
        detail = result.detail
        if result.output:
            detail += ": " + result.output
        if len(detail) > DETAIL_LIMIT:
            detail = detail[: DETAIL_LIMIT - 3] + "..."
        await self._set_hook(record, "ok" if result.ok else "failed", detail)
        fields = {
            "watch": record.watch,
            "batch": record.name,
            "seconds": result.seconds,
            "output": result.output,
        }
        if result.ok:
            log.info("batch_hook_done", **fields)
        else:
            log.warning(
                "batch_hook_failed",
                error=result.detail,
                consequence="uploads carry on; the hook is not run again for this completion",
                **fields,
            )

    async def _set_hook(self, record: BatchRecord, state: str, detail: str | None) -> bool:
        current = await self._journal.set_batch_hook(record, state, detail)
        for i, shown in enumerate(self._recent):
            if (shown.watch, shown.name, shown.completed_at) == (
                record.watch,
                record.name,
                record.completed_at,
            ):
                self._recent[i] = replace(shown, hook_state=state, hook_detail=detail)
        return current
