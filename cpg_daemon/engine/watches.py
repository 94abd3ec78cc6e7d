"""The table of active watches, and what a reload changes in it (pure).

The engine holds one immutable ``WatchTable`` and swaps it whole on a reload; the
scheduler and the batch tracker read the current one instead of keeping copies, so
there is one place where a watch's settings, S3 client and keys are looked up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpg_daemon.core.config import Config, WatchConfig

if TYPE_CHECKING:
    from cpg_daemon.engine.grants import Grant


@dataclass(frozen=True)
class ActiveWatch:
    """One ``[[watch]]`` at work: its settings and the grant (keys + S3 client) it uses."""

    config: WatchConfig
    grant: Grant

    @property
    def name(self) -> str:
        return self.config.name


class WatchTable(Mapping[str, ActiveWatch]):
    """Watches by name, in configuration order. Never changed: a reload builds a new one."""

    __slots__ = ("_configs", "_watches")

    def __init__(self, watches: Iterable[ActiveWatch] = ()) -> None:
        self._watches = {w.name: w for w in watches}
        self._configs = {name: w.config for name, w in self._watches.items()}

    def __getitem__(self, name: str) -> ActiveWatch:
        return self._watches[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._watches)

    def __len__(self) -> int:
        return len(self._watches)

    def configs(self) -> Mapping[str, WatchConfig]:
        """Each watch's settings by name."""
        return self._configs


RESTART_ONLY_DAEMON = ("state_dir", "socket", "socket_group", "metrics_listen")
"""``[daemon]`` settings read once at start."""
RELOADED_S3 = ("max_bandwidth",)
"""``[s3]`` settings a reload applies; the others are read once at start."""


def restart_only_changes(old: Config, new: Config) -> tuple[str, ...]:
    """Settings that differ between two configurations but only apply at start."""
    changed = [
        f"daemon.{name}"
        for name in RESTART_ONLY_DAEMON
        if getattr(old.daemon, name) != getattr(new.daemon, name)
    ]
    changed += [
        f"s3.{field.name}"
        for field in dataclasses.fields(old.s3)
        if field.name not in RELOADED_S3
        and getattr(old.s3, field.name) != getattr(new.s3, field.name)
    ]
    return tuple(changed)


@dataclass(frozen=True)
class ReloadPlan:
    """What applying a newly read configuration does to the running one."""

    config: Config
    """The configuration to run from now on: the new one, with the settings that need a
    restart kept at their running values."""
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    """Watches whose settings changed: their watchers restart (queued files stay)."""
    restart_needed: tuple[str, ...]
    logging_changed: bool

    def summary(self) -> dict[str, list[str]]:
        """The ``reload`` command's reply and the ``reloaded`` log event's fields."""
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "restart_needed": list(self.restart_needed),
        }


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """Compare the running configuration with a newly read one."""
    restart_needed = restart_only_changes(old, new)
    effective = dataclasses.replace(
        new,
        s3=dataclasses.replace(old.s3, **{name: getattr(new.s3, name) for name in RELOADED_S3}),
        daemon=dataclasses.replace(
            new.daemon, **{name: getattr(old.daemon, name) for name in RESTART_ONLY_DAEMON}
        ),
    )
    before = {w.name: w for w in old.watches}
    after = {w.name: w for w in new.watches}
    # The rescan interval is every watcher's: a change restarts them all.
    rescan_changed = old.daemon.rescan_interval != new.daemon.rescan_interval
    return ReloadPlan(
        config=effective,
        added=tuple(sorted(set(after) - set(before))),
        removed=tuple(sorted(set(before) - set(after))),
        changed=tuple(
            sorted(
                name
                for name in set(before) & set(after)
                if before[name] != after[name] or rescan_changed
            )
        ),
        restart_needed=restart_needed,
        logging_changed=(new.daemon.log_level, new.daemon.log_format)
        != (old.daemon.log_level, old.daemon.log_format),
    )
