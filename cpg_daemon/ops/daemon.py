"""The supervisor: opens the journal, starts every component in one task group, stops cleanly.

Start order: journal (crash leftovers re-queued) -> S3 clients -> scheduler ->
watchers. Stop (SIGTERM, SIGINT or ``request_stop``): stop watching and stop
starting files, let in-flight requests finish until ``daemon.drain_timeout``,
then cancel what is left; the journal already holds every finished part, so
the next start resumes from there. A second signal skips the wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from cpg_daemon import __version__
from cpg_daemon.core.config import Config, WatchConfig, load_config
from cpg_daemon.core.errors import ConfigError, CpgError
from cpg_daemon.core.units import format_size
from cpg_daemon.discovery.watcher import Watcher
from cpg_daemon.engine import verify
from cpg_daemon.engine.batches import BatchTracker
from cpg_daemon.engine.scheduler import Scheduler
from cpg_daemon.engine.uploader import Uploader
from cpg_daemon.journal import JOURNAL_NAME, Journal, JournalStatistics, lock_state_dir
from cpg_daemon.ops import logs
from cpg_daemon.ops.control import (
    CommandError,
    ControlServer,
    Handler,
    Registry,
    prepare_socket_path,
)
from cpg_daemon.ops.metrics import MetricsServer
from cpg_daemon.ops.status import gather
from cpg_daemon.ops.systemd import Notifier
from cpg_daemon.s3.credentials import CredentialProvider, build_providers, provider_for
from cpg_daemon.s3.store import ObjectStore

log = structlog.get_logger("cpg_daemon.ops.daemon")

STATUS_INTERVAL = 5.0
"""Seconds between refreshes of the STATUS= line systemd shows."""
START_EXTENSION = 90.0
"""While starting, systemd is told every 30 s to wait this much longer (EXTEND_TIMEOUT_USEC)."""
STOP_MARGIN = 10.0
"""Seconds asked for on stopping beyond daemon.drain_timeout, to close the journal."""
PR_SET_DUMPABLE = 4


async def remote_sizes(store: ObjectStore, bucket: str, prefix: str) -> dict[str, int]:
    """Sizes of the objects already under a destination (to spot files uploaded before)."""
    return {obj.key: obj.size async for obj in store.list_objects(bucket, prefix)}


@dataclass
class _RunningWatch:
    watcher: Watcher
    scope: anyio.CancelScope


class Daemon:
    """One run of the daemon: ``await Daemon(config).run()``."""

    def __init__(
        self,
        config: Config,
        *,
        handle_signals: bool = True,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self._handle_signals = handle_signals
        self._notifier = notifier or Notifier()
        self._stopping = anyio.Event()
        self._force = anyio.Event()
        self._running = anyio.Event()
        self._journal: Journal | None = None
        self._providers: list[CredentialProvider] = []
        self._provider_scopes: dict[int, anyio.CancelScope] = {}
        self._stores: dict[int, ObjectStore] = {}
        """One S3 client per provider, by ``id(provider)``; open until the daemon stops."""
        self._watchers: dict[str, _RunningWatch] = {}
        self._batches: BatchTracker | None = None
        self._state = "starting"
        self._started_at = datetime.now(timezone.utc)
        self._reload_lock = anyio.Lock()
        self._config_loaded_at = self._started_at
        self._reload_error: str | None = None
        self._restart_needed: tuple[str, ...] = ()

    def request_stop(self) -> None:
        """Begin a graceful stop, as SIGTERM does."""
        self._stopping.set()

    async def wait_running(self) -> None:
        """Return once every watcher runs (its first walk follows within EVENTS_FIRST)."""
        await self._running.wait()

    async def journal_statistics(self) -> JournalStatistics:
        assert self._journal is not None, "the daemon is not running"
        return await self._journal.statistics()

    async def run(self) -> None:
        config = self.config
        file = str(config.path) if config.path else "<config>"
        providers = build_providers(config)
        watch_providers = {
            watch.name: provider_for(providers, watch.destination, file, f"watch[{i}].destination")
            for i, watch in enumerate(config.watches)
        }
        await anyio.to_thread.run_sync(
            prepare_socket_path, config.daemon.socket, config.daemon.socket_group
        )
        lock = await anyio.to_thread.run_sync(lock_state_dir, config.daemon.state_dir)
        try:
            journal = await Journal.open(config.daemon.state_dir / JOURNAL_NAME)
        except BaseException:
            os.close(lock)
            raise
        self._journal = journal
        try:
            requeued = await journal.reset_in_flight()
            # A restart is a person's way to say "try again": failed files get a new
            # round of attempts (names S3 cannot take stay failed).
            retried = await journal.retry_failed()
            log.info(
                "starting",
                version=__version__,
                journal=str(journal.path),
                new_journal=journal.created,
                resumed_files=requeued,
                retried_failed_files=retried,
                watches=[w.name for w in config.watches],
            )
            async with AsyncExitStack() as stack:
                for provider in providers:
                    self._stores[id(provider)] = await stack.enter_async_context(
                        ObjectStore.connect(provider.session, config.s3)
                    )
                uploader = Uploader(
                    journal, config.s3, anyio.CapacityLimiter(config.s3.max_concurrency)
                )
                scheduler = Scheduler(
                    journal,
                    uploader,
                    {w.name: w for w in config.watches},
                    {name: self._stores[id(p)] for name, p in watch_providers.items()},
                    workers=config.s3.max_concurrency,
                    file_attempts=config.daemon.file_attempts,
                    providers=watch_providers,
                )
                for provider in providers:
                    provider.on_usable(scheduler.wake)
                self._providers = providers
                await self._supervise(journal, scheduler, uploader, stack)
        finally:
            self._journal = None
            self._notifier.close()
            await journal.close()
            os.close(lock)
        log.info("stopped")

    async def _supervise(
        self,
        journal: Journal,
        scheduler: Scheduler,
        uploader: Uploader,
        stack: AsyncExitStack,
    ) -> None:
        batches = BatchTracker(journal, self.config.watches, self._settling)
        scheduler.on_finished(lambda record: batches.touch(record.watch, record.rel_path))
        self._batches = batches
        registry = self._commands(journal, scheduler, uploader, stack)
        control = ControlServer(
            self.config.daemon.socket, registry, self.config.daemon.socket_group
        )
        status = registry.commands["status"].handler
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            interval = self._notifier.watchdog_interval()
            if interval is not None:
                tg.start_soon(self._notifier.keep_alive, interval)
            if self._handle_signals:
                tg.start_soon(self._signals, registry.commands["reload"].handler)
            await tg.start(control.run)
            if self.config.daemon.metrics_listen:
                metrics = MetricsServer(self.config.daemon.metrics_listen, lambda: status({}))
                await tg.start(metrics.run)
            for provider in self._providers:
                await self._start_provider(provider)
            await tg.start(scheduler.run)
            await tg.start(batches.run)
            watching = anyio.CancelScope()

            async def watch_all() -> None:
                with watching:
                    async with anyio.create_task_group() as group:
                        self._watch_group = group
                        known = set((await journal.statistics()).by_watch)
                        for watch in self.config.watches:
                            await self._start_watch(watch, journal, scheduler, known, wait=True)
                        log.info("running")
                        self._state = "running"
                        self._running.set()
                        self._notifier.ready(status_line(await status({})))
                        await anyio.sleep_forever()  # a reload may add watches later

            tg.start_soon(watch_all)
            if self._notifier.enabled:
                tg.start_soon(self._extend_start)
                tg.start_soon(self._report_status, status)
            await self._stopping.wait()
            self._state = "stopping"
            busy = scheduler.statistics().busy
            drain_timeout = self.config.daemon.drain_timeout
            self._notifier.stopping(
                f"stopping: letting {busy} uploads finish (at most {drain_timeout:g} s)",
                drain_timeout + STOP_MARGIN,
            )
            for running in self._watchers.values():
                running.watcher.stop()
            watching.cancel()
            scheduler.drain()
            batches.stop()
            async with anyio.create_task_group() as drain:

                async def until_idle() -> None:
                    with anyio.move_on_after(self.config.daemon.drain_timeout) as deadline:
                        await scheduler.wait_idle()
                    if deadline.cancelled_caught:
                        log.warning("drain_timeout", seconds=self.config.daemon.drain_timeout)
                    await batches.wait_hooks()  # a running hook's grace; then it is killed
                    drain.cancel_scope.cancel()

                drain.start_soon(until_idle)
                await self._force.wait()
                drain.cancel_scope.cancel()
            tg.cancel_scope.cancel()

    async def _start_provider(self, provider: CredentialProvider) -> None:
        scope = anyio.CancelScope()
        self._provider_scopes[id(provider)] = scope

        async def run(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await provider.run(task_status=task_status)

        await self._task_group.start(run)

    async def _start_watch(
        self,
        watch: WatchConfig,
        journal: Journal,
        scheduler: Scheduler,
        known: set[str],
        *,
        wait: bool,
    ) -> None:
        """Start one watch's watcher (with ``wait``, until it runs).

        A watch the journal has never seen may point at data uploaded before
        (by hand, or by a lost journal): its destination is listed first, so
        those files are checked on the server rather than sent again.
        """
        watcher = Watcher(
            watch,
            journal,
            scheduler.wake,
            self.config.daemon.rescan_interval,
            on_rejected=scheduler.remember,
        )
        scope = anyio.CancelScope()
        self._watchers[watch.name] = _RunningWatch(watcher, scope)

        async def run(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            with scope:
                if watch.name not in known:
                    await self._list_destination(watcher, scheduler.store(watch.name))
                await watcher.run(task_status=task_status)

        if wait:
            await self._watch_group.start(run)
        else:  # a reload: listing a large destination must not hold up the reply
            self._watch_group.start_soon(run)

    async def _extend_start(self) -> None:
        """Listing a large destination before the first walk may outlast TimeoutStartSec."""
        while not self._running.is_set():
            self._notifier.extend_timeout(START_EXTENSION)
            with anyio.move_on_after(START_EXTENSION / 3):
                await self._running.wait()

    async def _report_status(self, status: Handler) -> None:
        """Keep systemd's one-line STATUS= (``systemctl status``) current."""
        while not self._stopping.is_set():
            await anyio.sleep(STATUS_INTERVAL)
            if self._state == "running":
                self._notifier.status(status_line(await status({})))

    # -- reload ----------------------------------------------------------------------------

    async def _reload(
        self, journal: Journal, scheduler: Scheduler, stack: AsyncExitStack
    ) -> dict[str, Any]:
        """Read the configuration file again and apply it (SIGHUP, ``cpg-daemon reload``).

        Watches are added, removed or changed and credentials entries swapped
        without touching the queue or the uploads in flight. A configuration
        that does not load, or that leaves a watch without credentials, changes
        nothing: the old one keeps running and the error shows in status.
        Settings that only take effect at start are reported as needing a restart.
        """
        if self._state in ("starting", "stopping"):
            raise CommandError(f"the daemon is {self._state}; reload once it is running")
        async with self._reload_lock:
            self._notifier.reloading()
            try:
                return await self._apply(journal, scheduler, stack)
            except ConfigError as exc:
                self._reload_error = str(exc)
                log.error(
                    "reload_failed",
                    error=str(exc),
                    consequence="the previous configuration keeps running",
                )
                raise CommandError(
                    f"configuration not reloaded, the previous one keeps running: {exc}"
                ) from None
            finally:
                self._notifier.ready("reloaded")

    async def _apply(
        self, journal: Journal, scheduler: Scheduler, stack: AsyncExitStack
    ) -> dict[str, Any]:
        old = self.config
        if old.path is None:
            raise ConfigError("<config>", "", "the daemon was started without a configuration file")
        new = await anyio.to_thread.run_sync(load_config, old.path)
        restart_needed = restart_only_changes(old, new)
        # What needs a restart keeps its running value until then.
        new = dataclasses.replace(
            new,
            s3=old.s3,
            daemon=dataclasses.replace(
                new.daemon,
                state_dir=old.daemon.state_dir,
                socket=old.daemon.socket,
                socket_group=old.daemon.socket_group,
                metrics_listen=old.daemon.metrics_listen,
            ),
        )
        file = str(old.path)
        # Everything that can fail is done before anything changes.
        providers = build_providers(new, self._providers)
        watch_providers = {
            watch.name: provider_for(providers, watch.destination, file, f"watch[{i}].destination")
            for i, watch in enumerate(new.watches)
        }
        for provider in providers:
            if id(provider) not in self._stores:
                self._stores[id(provider)] = await stack.enter_async_context(
                    ObjectStore.connect(provider.session, new.s3)
                )
                provider.on_usable(scheduler.wake)
                await self._start_provider(provider)
        for provider in self._providers:
            if provider not in providers:
                # Its renewals stop; its client stays open for uploads still in flight.
                self._provider_scopes.pop(id(provider)).cancel()
        self._providers = providers

        before = {w.name: w for w in old.watches}
        after = {w.name: w for w in new.watches}
        rescan_changed = old.daemon.rescan_interval != new.daemon.rescan_interval
        removed = sorted(set(before) - set(after))
        added = sorted(set(after) - set(before))
        changed = sorted(
            name
            for name in set(before) & set(after)
            if before[name] != after[name] or rescan_changed
        )
        self.config = new
        scheduler.reconfigure(
            after,
            {name: self._stores[id(p)] for name, p in watch_providers.items()},
            watch_providers,
            file_attempts=new.daemon.file_attempts,
        )
        if self._batches is not None:
            self._batches.reconfigure(new.watches)
        for name in removed + changed:
            running = self._watchers.pop(name)
            running.watcher.stop()
            running.scope.cancel()
        known = set((await journal.statistics()).by_watch)
        for name in added + changed:
            await self._start_watch(after[name], journal, scheduler, known, wait=False)
        if (new.daemon.log_level, new.daemon.log_format) != (
            old.daemon.log_level,
            old.daemon.log_format,
        ):
            logs.configure(new.daemon.log_format, new.daemon.log_level)
        self._config_loaded_at = datetime.now(timezone.utc)
        self._reload_error = None
        self._restart_needed = restart_needed
        result = {
            "added": added,
            "removed": removed,
            "changed": changed,
            "restart_needed": list(restart_needed),
        }
        log.info("reloaded", **result)
        if restart_needed:
            log.warning(
                "restart_needed",
                settings=list(restart_needed),
                consequence="these settings keep their old values until the daemon restarts",
            )
        return result

    def _commands(
        self,
        journal: Journal,
        scheduler: Scheduler,
        uploader: Uploader,
        stack: AsyncExitStack,
    ) -> Registry:
        """The control socket's commands; adding one is one entry here."""

        def names() -> list[str]:
            return [w.name for w in self.config.watches]

        def chosen(args: Mapping[str, Any]) -> str | None:
            watch = args.get("watch")
            if watch is None:
                return None
            if watch not in names():
                known = ", ".join(names()) or "none"
                raise CommandError(f"no watch named {watch!r} (watches: {known})")
            return str(watch)

        def selected(watch: str | None) -> list[str]:
            return names() if watch is None else [watch]

        async def status(args: Mapping[str, Any]) -> dict[str, Any]:
            stats = scheduler.statistics()
            state = self._state
            everything = stats.paused_all or (names() and set(names()) <= set(stats.paused))
            if state == "running" and everything:
                state = "paused"
            reply = gather(
                state=state,
                started_at=self._started_at,
                watches=self.config.watches,
                journal=await journal.statistics(),
                scheduler=stats,
                uploader=uploader.statistics(),
                watchers=[r.watcher.statistics() for r in self._watchers.values()],
                credentials=[p.statistics() for p in self._providers],
                batches=self._batches.statistics() if self._batches else None,
            )
            reply["config"] = {
                "path": str(self.config.path) if self.config.path else None,
                "loaded_at": self._config_loaded_at.isoformat(timespec="seconds"),
                "reload_error": self._reload_error,
                "restart_needed": list(self._restart_needed),
            }
            return reply

        async def pause(args: Mapping[str, Any]) -> dict[str, Any]:
            watch = chosen(args)
            scheduler.pause(watch)
            return {"paused": selected(watch)}

        async def resume(args: Mapping[str, Any]) -> dict[str, Any]:
            watch = chosen(args)
            scheduler.resume(watch)
            return {"resumed": selected(watch)}

        async def retry(args: Mapping[str, Any]) -> dict[str, Any]:
            watch = chosen(args)
            count = await journal.retry_failed(watch)
            scheduler.wake()
            return {"requeued": count, "watches": selected(watch)}

        async def rescan(args: Mapping[str, Any]) -> dict[str, Any]:
            watch = chosen(args)
            for running in self._watchers.values():
                if watch is None or running.watcher.watch.name == watch:
                    running.watcher.request_rescan()
            return {"rescanning": selected(watch)}

        async def verify_(args: Mapping[str, Any]) -> dict[str, Any]:
            watch = chosen(args)
            result = await verify.verify(
                [
                    (w, scheduler.store(w.name))
                    for w in self.config.watches
                    if watch is None or w.name == watch
                ],
                self.config.daemon.state_dir / JOURNAL_NAME,
                quick=bool(args.get("quick")),
                concurrency=self.config.s3.max_concurrency,
            )
            rows = [r for r in result.rows if args.get("rows") or r.status != "match"]
            return {
                "ok": result.ok,
                "summary": result.summary(),
                "counts": dict(result.counts),
                "seconds": result.seconds,
                "rows": list(verify.row_dicts(rows)),
            }

        async def reload(args: Mapping[str, Any]) -> dict[str, Any]:
            return await self._reload(journal, scheduler, stack)

        registry = Registry()

        async def help_(args: Mapping[str, Any]) -> dict[str, str]:
            return registry.help()

        registry.add(
            "status", status, "what the daemon is doing, as one JSON object", mutating=False
        )
        registry.add(
            "pause", pause, "stop starting new files (all watches, or args.watch)", mutating=True
        )
        registry.add("resume", resume, "start new files again (all, or args.watch)", mutating=True)
        registry.add("retry", retry, "queue failed files again (all, or args.watch)", mutating=True)
        registry.add(
            "rescan", rescan, "walk the watched folders now (all, or args.watch)", mutating=True
        )
        registry.add(
            "verify",
            verify_,
            "compare local files with staged objects (args.watch, args.quick, args.rows)",
            mutating=False,
        )
        registry.add(
            "reload",
            reload,
            "read the configuration file again (as SIGHUP); refused if it is invalid",
            mutating=True,
        )
        registry.add("help", help_, "the commands and what they do", mutating=False)
        return registry

    @staticmethod
    async def _list_destination(watcher: Watcher, store: ObjectStore) -> None:
        destination = watcher.watch.destination
        try:
            watcher.remote_sizes = await remote_sizes(store, destination.bucket, destination.prefix)
        except CpgError as exc:
            log.warning(
                "destination_not_listed",
                watch=watcher.watch.name,
                error=str(exc),
                consequence="each file found now is looked up on the server before upload",
            )
            watcher.check_all_first_walk = True

    def _settling(self, watch: str, folder: str) -> bool:
        """Whether files under a watch's top-level folder may still reach the journal."""
        running = self._watchers.get(watch)
        return running is None or running.watcher.settling_under(folder)

    async def _signals(self, reload: Handler) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.info("reloading", signal=name)
                    with contextlib.suppress(CommandError):  # logged; the old config runs on
                        await reload({})
                elif not self._stopping.is_set():
                    log.info("stopping", signal=name)
                    self._stopping.set()
                else:
                    log.warning("stopping_now", signal=name)
                    self._force.set()


def restart_only_changes(old: Config, new: Config) -> tuple[str, ...]:
    """Settings that differ between two configurations but only apply at start."""
    changed = [
        f"daemon.{name}"
        for name in ("state_dir", "socket", "socket_group", "metrics_listen")
        if getattr(old.daemon, name) != getattr(new.daemon, name)
    ]
    changed += [
        f"s3.{field.name}"
        for field in dataclasses.fields(old.s3)
        if getattr(old.s3, field.name) != getattr(new.s3, field.name)
    ]
    return tuple(changed)


def status_line(status: Mapping[str, Any]) -> str:
    """The one line ``systemctl status`` shows (sd_notify STATUS=)."""
    files = status["files"]
    line = (
        f"{status['state']}: {files['uploaded']:,} uploaded, {files['uploading']:,} uploading, "
        f"{files['queued']:,} queued, {files['failed']:,} failed"
    )
    rate = status["throughput_bytes_per_s"]
    if rate > 0:
        line += f"; {format_size(rate)}/s"
    if status.get("config", {}).get("reload_error"):
        line += "; last reload failed (see cpg-daemon status)"
    if status.get("journal", {}).get("error"):
        line += "; JOURNAL UNWRITABLE (disk full?), no new uploads (see cpg-daemon status)"
    return line


def forbid_core_dumps() -> None:
    """Keep the keys in this process's memory out of core dumps and other users' reach.

    prctl(PR_SET_DUMPABLE, 0): no core dump, no ptrace by processes of the same
    user, and /proc/<pid>/ files (environ, mem) owned by root. Linux only; elsewhere
    (or if it fails) nothing changes.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


async def run(config: Config) -> None:
    """Run the daemon until SIGTERM/SIGINT (SIGHUP reloads the configuration)."""
    forbid_core_dumps()
    await Daemon(config).run()
