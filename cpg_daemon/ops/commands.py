"""The control socket's commands: one method each, registered with its help text.

Adding a command is one method and one ``Registry.add`` line in ``Commands.registry``.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import anyio

from cpg_daemon.engine import grants, verify
from cpg_daemon.ops.control import CommandError, Registry
from cpg_daemon.ops.status import StatusReply, gather
from cpg_daemon.s3.credentials import Keys

if TYPE_CHECKING:
    from cpg_daemon.ops.daemon import Daemon

Args = Mapping[str, Any]


class Commands:
    """What a client of the control socket may ask a running daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._verifying = anyio.Lock()

    def registry(self) -> Registry:
        registry = Registry()
        add = registry.add
        add("status", self.status, "what the daemon is doing, as one JSON object", mutating=False)
        add(
            "pause",
            self.pause,
            "stop starting new files (all watches, or args.watch)",
            mutating=True,
        )
        add("resume", self.resume, "start new files again (all, or args.watch)", mutating=True)
        add("retry", self.retry, "queue failed files again (all, or args.watch)", mutating=True)
        add(
            "rescan",
            self.rescan,
            "walk the watched folders now (all, or args.watch)",
            mutating=True,
        )
        add(
            "verify",
            self.verify,
            "compare local files with staged objects (args.watch, args.quick, args.rows)",
            mutating=False,
        )
        add(
            "reload",
            self.reload,
            "read the configuration file again (as SIGHUP); refused if it is invalid",
            mutating=True,
        )

        add(
            "credentials",
            self.credentials,
            'hand over keys to the [credentials] entry with source = "handed-over" '
            "(args.access_key_id, .secret_access_key, .session_token, .expiration, .target)",
            mutating=True,
            secret=True,
        )

        async def help_(args: Args) -> dict[str, str]:
            return registry.help()

        add("help", help_, "the commands and what they do", mutating=False)
        return registry

    # -- arguments -----------------------------------------------------------------------

    def _names(self) -> list[str]:
        return list(self._daemon.engine.table)

    def _chosen(self, args: Args) -> str | None:
        """The watch ``args.watch`` names (None: all); an unknown name is refused."""
        watch = args.get("watch")
        if watch is None:
            return None
        if watch not in self._names():
            known = ", ".join(self._names()) or "none"
            raise CommandError(f"no watch named {watch!r} (watches: {known})")
        return str(watch)

    def _selected(self, watch: str | None) -> list[str]:
        return self._names() if watch is None else [watch]

    # -- the commands --------------------------------------------------------------------

    async def status(self, args: Args) -> StatusReply:
        daemon = self._daemon
        engine = daemon.engine
        stats = engine.scheduler.statistics()
        names = self._names()
        state = daemon.state
        everything = stats.paused_all or (names and set(names) <= set(stats.paused))
        if state == "running" and everything:
            state = "paused"
        return gather(
            state=state,
            started_at=daemon.started_at,
            watches=tuple(engine.table.configs().values()),
            journal=await engine.journal.statistics(),
            scheduler=stats,
            uploader=engine.uploader.statistics(),
            bandwidth=engine.uploader.bandwidth.statistics(),
            watchers=engine.watcher_statistics(),
            credentials=[grant.provider.statistics() for grant in engine.grants],
            batches=engine.batches.statistics(),
            config=daemon.config_status(),
        )

    async def pause(self, args: Args) -> dict[str, Any]:
        watch = self._chosen(args)
        self._daemon.engine.scheduler.pause(watch)
        return {"paused": self._selected(watch)}

    async def resume(self, args: Args) -> dict[str, Any]:
        watch = self._chosen(args)
        self._daemon.engine.scheduler.resume(watch)
        return {"resumed": self._selected(watch)}

    async def retry(self, args: Args) -> dict[str, Any]:
        watch = self._chosen(args)
        engine = self._daemon.engine
        count = await engine.journal.retry_failed(watch)
        engine.scheduler.wake()
        return {"requeued": count, "watches": self._selected(watch)}

    async def rescan(self, args: Args) -> dict[str, Any]:
        watch = self._chosen(args)
        self._daemon.engine.rescan(watch)
        return {"rescanning": self._selected(watch)}

    async def verify(self, args: Args) -> dict[str, Any]:
        if self._verifying.locked():  # each reads every file and lists every destination
            raise CommandError("a verify is running already; try again once it is done")
        async with self._verifying:
            return await self._verify(args)

    async def _verify(self, args: Args) -> dict[str, Any]:
        watch = self._chosen(args)
        engine = self._daemon.engine
        chosen = [a for a in engine.table.values() if watch is None or a.name == watch]
        with ExitStack() as leases:  # a reload may drop a grant meanwhile: not its client
            watches = [(a.config, leases.enter_context(a.grant.lease())) for a in chosen]
            result = await verify.verify(
                watches,
                engine.journal.path,
                quick=bool(args.get("quick")),
                concurrency=engine.config.s3.max_concurrency,
            )
        rows = [r for r in result.rows if args.get("rows") or r.status != "match"]
        return {
            "ok": result.ok,
            "summary": result.summary(),
            "counts": dict(result.counts),
            "seconds": result.seconds,
            "rows": list(verify.row_dicts(rows)),
        }

    async def reload(self, args: Args) -> dict[str, Any]:
        return await self._daemon.reload()

    async def credentials(self, args: Args) -> dict[str, Any]:
        keys = handed_keys(args)
        target = args.get("target") or ""
        if not isinstance(target, str):
            raise CommandError("args.target must be a string")
        engine = self._daemon.engine
        done = await grants.hand_over(engine.grants, engine.table, keys, target)
        return {
            "target": done.target,
            "expires_at": done.expires_at,
            "watches": list(done.watches),
            "note": done.note,
        }


def handed_keys(args: Args) -> Keys:
    """The keys in a ``credentials`` request; a CommandError (never quoting a key) if not."""
    fields = {}
    for name in ("access_key_id", "secret_access_key", "session_token"):
        value = args.get(name, "")
        if not isinstance(value, str) or (name != "session_token" and not value):
            raise CommandError(f"args.{name} must be a non-empty string")
        fields[name] = value
    expiration = args.get("expiration")
    expires_at = None
    if expiration is not None:
        if not isinstance(expiration, str):
            raise CommandError("args.expiration must be an ISO 8601 time")
        try:
            expires_at = datetime.fromisoformat(expiration.replace("Z", "+00:00"))
        except ValueError:
            raise CommandError(f"args.expiration is not an ISO 8601 time: {expiration!r}") from None
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=timezone.utc)
        if expires_at <= datetime.now(timezone.utc):
            raise CommandError(
                f"these keys expired at {expires_at.isoformat(timespec='seconds')}: obtain new ones"
            )
    return Keys(
        fields["access_key_id"], fields["secret_access_key"], fields["session_token"], expires_at
    )
