"""When a file is finished: the settle rule, as a tracker fed with observations and times.

A file is *settled* once its size and mtime have not changed for the watch's
``settle`` time: either its mtime is already that old by the wall clock, or it was
seen unchanged for that long by the monotonic clock. The wall clock is only ever
compared with mtimes (both are wall time); how long a file has been watched is
measured on the monotonic clock. So a wall clock set back never holds a file back
(its mtime looks young, or in the future, but it settles once seen unchanged for
``settle``); one set forward makes files written before the jump look old, and
they settle at the next look, as files copied in with old mtimes do.

The tracker does no I/O and reads no clock: the watcher stats files in a worker
thread and hands the results in, with the time, on the event loop thread; that
thread is the only one that changes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cpg_daemon.core.clock import Clock
from cpg_daemon.discovery.scan import Seen


@dataclass(frozen=True)
class Instant:
    """One reading of both clocks."""

    monotonic: float
    wall: float
    """Seconds since the epoch."""

    @classmethod
    def of(cls, clock: Clock) -> Instant:
        return cls(clock.monotonic(), clock.time())


@dataclass(frozen=True)
class _Pending:
    size: int
    mtime_ns: int
    since: float
    """Monotonic time this version of the file was first seen."""


class SettleTracker:
    """The files of one watch that were seen but have not settled yet."""

    def __init__(self, settle: float) -> None:
        self.settle = settle
        """Seconds a file must stay unchanged (0: every file is settled when seen)."""
        self._pending: dict[str, _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, rel_path: object) -> bool:
        return rel_path in self._pending

    def observe(self, seen: Seen, now: Instant) -> bool:
        """Takes one look at a file; True when it is settled (and so no longer tracked)."""
        settle_ns = int(self.settle * 1e9)
        # With no settle time every file is ready, even one whose mtime lies in the
        # future (a fast clock on the acquisition PC that wrote it).
        old_enough = settle_ns <= 0 or int(now.wall * 1e9) - seen.mtime_ns >= settle_ns
        previous = self._pending.get(seen.rel_path)
        if previous is not None and (previous.size, previous.mtime_ns) == (
            seen.size,
            seen.mtime_ns,
        ):
            if old_enough or now.monotonic - previous.since >= self.settle:
                del self._pending[seen.rel_path]
                return True
            return False
        if old_enough:
            self._pending.pop(seen.rel_path, None)
            return True
        self._pending[seen.rel_path] = _Pending(seen.size, seen.mtime_ns, now.monotonic)
        return False

    def observe_many(self, found: Iterable[Seen], now: Instant) -> list[Seen]:
        """``observe`` for each file; returns those settled, in the order given."""
        return [seen for seen in found if self.observe(seen, now)]

    def due(self, monotonic: float) -> list[str]:
        """Files seen unchanged for ``settle``: look at them again and ``observe`` them.

        They are not settled yet: a file may have changed without a filesystem
        event (missed events, polling, a network mount), which only a fresh stat shows.
        """
        return [rel for rel, p in self._pending.items() if monotonic - p.since >= self.settle]

    def forget(self, rel_path: str, *, seen_before: float | None = None) -> None:
        """Stops tracking a file (deleted, or gone when looked at again).

        With ``seen_before`` (a monotonic time), only if the version tracked was
        first seen before then: one seen changed since (rewritten after a stat found
        the file gone, say) stays tracked.
        """
        pending = self._pending.get(rel_path)
        if pending is not None and (seen_before is None or pending.since < seen_before):
            del self._pending[rel_path]

    def pending_under(self, folder: str) -> bool:
        """Whether a file below ``folder`` (relative to the watch root) is still settling."""
        prefix = folder + "/"
        return any(rel.startswith(prefix) for rel in self._pending)
