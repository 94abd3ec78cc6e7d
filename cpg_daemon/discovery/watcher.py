"""Discovery: which files under a watch are finished, and so ready to upload.

Three sources feed one settle tracker: a walk at start-up, filesystem events
(watchfiles, recursive; a batch folder moved in arrives as one event for the
folder, which is then walked), and a periodic walk as a safety net for missed
events, inotify overflows and network mounts. A file is *settled* once its
size and mtime have not changed for the watch's ``settle`` time: either its
mtime is already that old, or it was seen unchanged for that long. Settled
files go to the journal, which queues what is new or changed.

Only regular files are considered. Symlinks are never followed (so nothing
outside the watch root is ever read); FIFOs, sockets and devices are skipped.
"""

from __future__ import annotations

import os
import stat as stat_module
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import structlog
import watchfiles
from anyio.abc import TaskStatus

from cpg_daemon.core.config import WatchConfig
from cpg_daemon.core.objectkeys import PathFilter, key_problem, object_key
from cpg_daemon.core.structure import Finding, blocking, check_key
from cpg_daemon.journal import Discovered, Journal

log = structlog.get_logger("cpg_daemon.discovery.watcher")

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
STRUCTURE_EXAMPLES = 20
"""Structure findings kept for status (the log has every one, once per folder and rule)."""


@dataclass(frozen=True)
class Seen:
    rel_path: str
    size: int
    mtime_ns: int


def _undecodable_name(exc: BaseException) -> str | None:
    """watchfiles' message if ``exc`` (or one inside it) says a name is not UTF-8."""
    for inner in getattr(exc, "exceptions", ()):
        found = _undecodable_name(inner)
        if found is not None:
            return found
    if isinstance(exc, RuntimeError) and "Unable to decode path" in str(exc):
        return str(exc)
    return None


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


def scan_folder(root: Path, rel_dir: str, path_filter: PathFilter) -> tuple[list[Seen], list[str]]:
    """Regular files and sub-folders of one folder (relative to ``root``), filtered.

    Runs in a worker thread. Symlinks and special files are left out.
    """
    files: list[Seen] = []
    folders: list[str] = []
    folder = root / rel_dir if rel_dir else root
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return files, folders
    for entry in entries:
        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        mode = info.st_mode
        if stat_module.S_ISDIR(mode):
            if not path_filter.excludes_dir(rel):
                folders.append(rel)
        elif stat_module.S_ISREG(mode):
            if path_filter.accepts(rel):
                files.append(Seen(rel, info.st_size, info.st_mtime_ns))
        elif stat_module.S_ISLNK(mode):
            log.debug("symlink_skipped", path=str(folder / entry.name))
    return files, folders


def walk(root: Path, path_filter: PathFilter) -> Iterator[Seen]:
    """Every file below ``root`` that the filter accepts, folders and files in name order.

    Blocking (runs ``scan_folder`` folder by folder): consume it in a worker thread.
    """
    stack = [""]
    while stack:
        files, folders = scan_folder(root, stack.pop(), path_filter)
        stack.extend(sorted(folders, reverse=True))
        yield from sorted(files, key=lambda seen: seen.rel_path)


def stat_file(path: Path) -> Seen | None:
    try:
        info = os.stat(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat_module.S_ISREG(info.st_mode):
        return None
    return Seen("", info.st_size, info.st_mtime_ns)


class Watcher:
    """Finds settled files under one watch and records them in the journal."""

    def __init__(
        self,
        watch: WatchConfig,
        journal: Journal,
        on_queued: Callable[[], None],
        rescan_interval: float,
        remote_sizes: dict[str, int] | None = None,
        on_rejected: Callable[[Path, str, str], None] | None = None,
    ) -> None:
        self.watch = watch
        self._journal = journal
        self._on_queued = on_queued
        self._on_rejected = on_rejected
        """Told (path, key, reason) of each file kept out: a name S3 cannot take, say."""
        self._rescan_interval = rescan_interval
        self._filter = PathFilter(watch.include, watch.exclude)
        self._root = watch.path
        # Files seen but not yet settled: rel_path -> (size, mtime_ns, monotonic first seen).
        self._pending: dict[str, tuple[int, int, float]] = {}
        self.remote_sizes = remote_sizes
        """Sizes of objects already at the destination, for the first walk only."""
        self.check_all_first_walk = False
        """Check every file of the first walk on the server (when the listing failed)."""
        self._scans = 0
        self._last_scan_seconds: float | None = None
        self._watching = False
        self._events_live = anyio.Event()
        self._first_walk_begun = False
        self._error: str | None = None
        self._rescan_now = anyio.Event()
        self._stop = anyio.Event()
        self._rejected: set[str] = set()
        self._walk_incomplete = False
        """A folder could not be read during the last walk: walk again after WALK_RETRY."""
        self._structure_seen: set[tuple[str, str]] = set()
        self._structure_examples: list[Finding] = []
        self._structure_rejected = 0
        self._kept_out: dict[str, tuple[int, int, bool]] = {}
        """rel_path -> (size, mtime_ns, recorded as failed) of files ``reject`` kept out."""

    def stop(self) -> None:
        """Stop following events promptly (the event thread checks this every 50 ms)."""
        self._stop.set()

    def statistics(self) -> WatcherStatistics:
        return WatcherStatistics(
            self.watch.name,
            len(self._pending),
            self._scans,
            self._last_scan_seconds,
            self._watching,
            self._error,
            structure_findings=len(self._structure_seen),
            structure_examples=tuple(self._structure_examples),
            structure_rejected=self._structure_rejected,
        )

    def expect_remote(self, sizes: dict[str, int] | None) -> None:
        """Before the first walk: the destination's object sizes (files uploaded before are
        checked on the server, not sent again); ``None``: it could not be listed, so every
        file of the first walk is looked up on the server."""
        if sizes is None:
            self.check_all_first_walk = True
        else:
            self.remote_sizes = sizes

    def request_rescan(self) -> None:
        self._rescan_now.set()

    def settling_under(self, folder: str) -> bool:
        """Whether a file under this top-level folder may not have reached the journal yet.

        True until the first walk has finished (it may not have seen the folder
        yet), and while a file under it is seen but not settled. One pass over
        the files settling, as each tick of ``_settle_loop`` makes; ``list``
        copies the keys in one step, safe from ``_restat`` in its thread.
        """
        if self._scans == 0:
            return True
        prefix = folder + "/"
        return any(rel.startswith(prefix) for rel in list(self._pending))

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled. Ready at once; the first walk begins when events are live."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow_events)
            tg.start_soon(self._settle_loop)
            task_status.started()
            with anyio.move_on_after(EVENTS_FIRST):
                await self._events_live.wait()
            while True:
                self._first_walk_begun = True
                await self.scan()
                # Only the first walk after a lost journal needs these.
                self.remote_sizes = None
                self.check_all_first_walk = False
                wait = WALK_RETRY if self._walk_incomplete else self._rescan_interval
                self._walk_incomplete = False
                with anyio.move_on_after(wait):
                    await self._rescan_now.wait()
                self._rescan_now = anyio.Event()

    # -- walking -----------------------------------------------------------------------

    async def scan(self, rel_dir: str = "") -> int:
        """Walk the watch (or one folder of it); returns how many files were queued."""
        started = time.monotonic()
        if not rel_dir and not await anyio.to_thread.run_sync(self._root.is_dir):
            if self._error is None:
                log.error("watch_path_missing", watch=self.watch.name, path=str(self._root))
            self._error = f"{self._root} does not exist or is not a folder"
            return 0
        if not rel_dir and self._error is not None:
            log.info("watch_path_back", watch=self.watch.name, path=str(self._root))
            self._error = None
        queued = 0
        stack = [rel_dir]
        while stack:
            folder = stack.pop()
            try:
                found, folders = await anyio.to_thread.run_sync(
                    scan_folder, self._root, folder, self._filter
                )
            except OSError as exc:
                # Unreadable, or no descriptor left (EMFILE): never a reason to stop
                # watching. The folder is walked again soon, not at the next rescan.
                log.warning(
                    "folder_not_walked",
                    watch=self.watch.name,
                    path=str(self._root / folder),
                    error=exc.strerror or str(exc),
                    retry_in=WALK_RETRY,
                )
                self._walk_incomplete = True
                continue
            stack.extend(folders)
            queued += await self._observe_many(found)
        if not rel_dir:
            self._scans += 1
            self._last_scan_seconds = time.monotonic() - started
            log.debug("scanned", watch=self.watch.name, seconds=round(self._last_scan_seconds, 3))
        return queued

    async def _observe_many(self, found: list[Seen]) -> int:
        ready: list[Seen] = []
        now = time.monotonic()
        wall_ns = time.time_ns()
        settle_ns = int(self.watch.settle * 1e9)
        for seen in found:
            previous = self._pending.get(seen.rel_path)
            # With no settle time every file is ready, even one whose mtime lies in the
            # future (a fast clock on the acquisition PC that wrote it).
            old_enough = settle_ns <= 0 or wall_ns - seen.mtime_ns >= settle_ns
            if previous is not None and previous[:2] == (seen.size, seen.mtime_ns):
                if old_enough or now - previous[2] >= self.watch.settle:
                    del self._pending[seen.rel_path]
                    ready.append(seen)
            elif old_enough:
                self._pending.pop(seen.rel_path, None)
                ready.append(seen)
            else:
                self._pending[seen.rel_path] = (seen.size, seen.mtime_ns, now)
        return await self._settled(ready)

    async def _settled(self, ready: list[Seen]) -> int:
        """Hand settled files to the journal, holding back folders without a ready marker."""
        queued = 0
        batch: list[Discovered] = []
        marker = self.watch.ready_marker
        marked: dict[str, bool] = {}
        for seen in ready:
            if marker:
                top, sep, rest = seen.rel_path.partition("/")
                if (sep and rest == marker) or (not sep and top == marker):
                    continue  # the marker itself is a signal, not data
                if sep:
                    if top not in marked:
                        marked[top] = await anyio.to_thread.run_sync(
                            (self._root / top / marker).is_file
                        )
                    if not marked[top]:
                        continue
            key = object_key(self.watch.destination.prefix, seen.rel_path)
            problem = key_problem(key)
            if problem is not None:
                if seen.rel_path not in self._rejected:  # once, not at every rescan
                    self._rejected.add(seen.rel_path)
                    shown = key.encode("utf-8", "backslashreplace").decode("utf-8")
                    log.warning("bad_name", path=shown, error=problem)
                    await self._reject(seen.rel_path, shown, problem)
                continue
            if self.watch.structure != "off" and await self._keep_out(seen, key):
                continue
            check = self.check_all_first_walk or (
                self.remote_sizes is not None and self.remote_sizes.get(key) == seen.size
            )
            batch.append(
                Discovered(
                    seen.rel_path,
                    self.watch.destination.bucket,
                    key,
                    seen.size,
                    seen.mtime_ns,
                    check_remote=check,
                )
            )
            if len(batch) >= BATCH:
                queued += await self._record(batch)
                batch = []
        if batch:
            queued += await self._record(batch)
        return queued

    async def _keep_out(self, seen: Seen, key: str) -> bool:
        """Applies the gallery's folder rules to a key; True when ``reject`` keeps it out.

        Each (folder, rule) is logged once; a file kept out is recorded as failed
        with the rule's message, once per version of the file (not at every
        rescan). A file uploaded before the policy became ``reject`` stays
        uploaded until it changes.
        """
        findings = check_key(key)
        if not findings:
            return False
        reject = blocking(findings) if self.watch.structure == "reject" else None
        for finding in findings:
            if (finding.folder, finding.rule) in self._structure_seen:
                continue
            self._structure_seen.add((finding.folder, finding.rule))
            if len(self._structure_examples) < STRUCTURE_EXAMPLES:
                self._structure_examples.append(finding)
            log.warning(
                "structure_rejected" if reject and finding.required else "structure_warning",
                watch=self.watch.name,
                rule=finding.rule,
                folder=finding.folder,
                message=finding.message,
                pointer=finding.pointer,
                path=str(self._root / seen.rel_path),
            )
        if reject is None:
            return False
        version = (seen.size, seen.mtime_ns)
        before = self._kept_out.get(seen.rel_path)
        if before is not None and before[:2] == version:
            return True  # handled at an earlier walk
        # Claimed before the journal is asked: a walk running meanwhile (a rescan
        # beside the first walk) returns above instead of counting the file twice.
        self._kept_out[seen.rel_path] = (*version, before is not None and before[2])
        row = await self._journal.get(self.watch.name, seen.rel_path)
        if row is not None and (row.state, row.key, row.size, row.mtime_ns) == (
            "uploaded",
            key,
            *version,
        ):
            self._kept_out[seen.rel_path] = (*version, False)
            return True
        if row is not None and row.state == "uploading":
            # Queued before the policy said reject; decided at the next walk.
            if before is None:
                del self._kept_out[seen.rel_path]
            else:
                self._kept_out[seen.rel_path] = before
            return True
        if before is None or not before[2]:
            self._structure_rejected += 1
        self._kept_out[seen.rel_path] = (*version, True)
        await self._reject(seen.rel_path, key, f'kept out by structure = "reject": {reject}')
        return True

    async def _reject(self, rel_path: str, key: str, reason: str) -> None:
        await self._journal.record_rejected(self.watch.name, rel_path, key, reason)
        if self._on_rejected is not None:
            shown = os.fsencode(rel_path).decode("utf-8", "backslashreplace")
            self._on_rejected(self._root / shown, key, reason)

    async def _record(self, batch: list[Discovered]) -> int:
        queued = await self._journal.record_discovered(self.watch.name, batch)
        if queued:
            self._on_queued()  # uploads start while a long walk goes on
        return queued

    # -- following changes ---------------------------------------------------------------

    async def _settle_loop(self) -> None:
        """Re-check pending files; those unchanged for ``settle`` are handed on."""
        tick = min(max(self.watch.settle / 5, 0.05), 1.0)
        while True:
            await anyio.sleep(tick)
            now = time.monotonic()
            due = [
                rel
                for rel, (_, _, since) in self._pending.items()
                if now - since >= self.watch.settle
            ]
            if not due:
                continue
            found = await anyio.to_thread.run_sync(self._restat, due)
            await self._observe_many(found)

    def _restat(self, rel_paths: list[str]) -> list[Seen]:
        found = []
        for rel in rel_paths:
            seen = stat_file(self._root / rel)
            if seen is None:
                self._pending.pop(rel, None)  # vanished while settling: forget it
            else:
                found.append(Seen(rel, seen.size, seen.mtime_ns))
        return found

    async def _follow_events(self) -> None:
        """Turn filesystem events into observations; falls back to polling if inotify fails.

        Unreadable folders are not ignored at first: watchfiles' option for that
        ignores every error, the inotify watch limit included, and would leave the
        rest of the tree silently unwatched. A first permission error is reported
        and only then ignored (with the periodic rescan as the safety net); the
        watch limit switches this watch to polling.
        """
        force_polling: bool | None = None
        ignore_denied = False
        undecodable = 0
        while True:
            if not await anyio.to_thread.run_sync(self._root.is_dir):
                await anyio.sleep(MISSING_ROOT_POLL)
                if await anyio.to_thread.run_sync(self._root.is_dir):
                    self.request_rescan()  # it is back (a mount, say): walk it now
                continue
            try:
                self._watching = True
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
                        # The first yield means the kernel now reports events. If a
                        # walk began before that, a file created after it passed its
                        # folder had no event: walk again, not at the periodic rescan.
                        established = True
                        if self._first_walk_begun:
                            self.request_rescan()
                        self._events_live.set()
                    if changes:
                        await self._on_changes(changes)
            except OSError as exc:
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
                if force_polling:
                    raise
                log.warning(
                    "events_unavailable_polling",
                    watch=self.watch.name,
                    error=str(exc),
                    hint="raise fs.inotify.max_user_watches; polling this watch meanwhile",
                )
                force_polling = True
            except Exception as exc:
                self._watching = False
                name = _undecodable_name(exc)
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
                await anyio.sleep(min(2.0**undecodable, UNDECODABLE_BACKOFF))
                continue
            self._watching = False
            if self._stop.is_set():
                await anyio.sleep_forever()  # stopped: wait for the cancellation that follows
            await anyio.sleep(1.0)  # the root went away; wait for it to come back

    async def _on_changes(self, changes: set[tuple[watchfiles.Change, str]]) -> None:
        folders: list[str] = []
        files: list[str] = []
        root = str(self._root)
        for change, raw in changes:
            if not raw.startswith(root + os.sep):
                continue
            rel = raw[len(root) + 1 :].replace(os.sep, "/")
            if change == watchfiles.Change.deleted:
                self._pending.pop(rel, None)
                continue
            files.append(rel)
        found: list[Seen] = []
        for rel in files:
            kind = await anyio.to_thread.run_sync(_kind, self._root / rel)
            if kind == "dir":
                if not self._filter.excludes_dir(rel):
                    folders.append(rel)
            elif kind == "file":
                if self._filter.accepts(rel):
                    seen = await anyio.to_thread.run_sync(stat_file, self._root / rel)
                    if seen is not None:
                        found.append(Seen(rel, seen.size, seen.mtime_ns))
                marker = self.watch.ready_marker
                if marker and rel.endswith("/" + marker) and rel.count("/") == 1:
                    folders.append(rel.split("/", 1)[0])
        await self._observe_many(found)
        for folder in folders:
            await self.scan(folder)


def _kind(path: Path) -> str:
    try:
        mode = os.stat(path, follow_symlinks=False).st_mode
    except OSError:
        return "gone"
    if stat_module.S_ISDIR(mode):
        return "dir"
    if stat_module.S_ISREG(mode):
        return "file"
    return "other"
