"""Time as a dependency: every component that waits or stamps reads one ``Clock``.

The daemon runs on ``SYSTEM_CLOCK``. Tests hand components a ``ManualClock`` and move
time themselves, so settle times, back-off, the SlowDown pause, batch quiet times and
wall-clock jumps are tested in milliseconds instead of seconds (trio's ``MockClock``
is the model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import anyio.lowlevel


class Clock(Protocol):
    """What a component may ask of time."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (stamps, due times kept in the journal)."""
        ...

    def monotonic(self) -> float:
        """Seconds that only ever go forward (intervals, deadlines)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait this many monotonic seconds (0 or less: only a checkpoint)."""
        ...


class SystemClock:
    """The machine's clocks and anyio's sleep."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(seconds, 0.0))


SYSTEM_CLOCK: Clock = SystemClock()


@dataclass(order=True)
class _Sleeper:
    deadline: float
    order: int
    event: anyio.Event = field(compare=False)


class ManualClock:
    """A clock that moves only when told: ``advance`` for time passing, ``jump`` for
    the wall clock being set (NTP, an admin), which the monotonic clock does not see.

    Sleepers wake, in deadline order, when ``advance`` reaches their deadline; each
    wake-up is a real anyio event, so the woken tasks run at the caller's next
    checkpoint (``anyio.lowlevel.checkpoint()`` or ``await clock.settle()``).
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._wall_offset = start
        self._now = 0.0
        self._sleepers: list[_Sleeper] = []
        self._count = 0

    def time(self) -> float:
        return self._wall_offset + self._now

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        self._count += 1
        sleeper = _Sleeper(self._now + seconds, self._count, anyio.Event())
        self._sleepers.append(sleeper)
        try:
            await sleeper.event.wait()
        finally:
            if sleeper in self._sleepers:
                self._sleepers.remove(sleeper)

    @property
    def sleepers(self) -> int:
        """How many tasks are asleep on this clock now."""
        return len(self._sleepers)

    def next_deadline(self) -> float | None:
        """The monotonic time the next sleeper wakes at, if any sleeps."""
        return min((s.deadline for s in self._sleepers), default=None)

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass on both clocks, waking every sleeper that is due."""
        if seconds < 0:
            raise ValueError("time does not run backwards; use jump() for the wall clock")
        self._now += seconds
        for sleeper in sorted(self._sleepers):
            if sleeper.deadline <= self._now:
                self._sleepers.remove(sleeper)
                sleeper.event.set()

    def jump(self, seconds: float) -> None:
        """Set the wall clock forward (or back, negative) without time passing."""
        self._wall_offset += seconds

    async def settle(self, rounds: int = 10) -> None:
        """Give woken tasks a few scheduling rounds to run until they wait again."""
        for _ in range(rounds):
            await anyio.lowlevel.checkpoint()

    async def run_until_idle(self, limit: float = 3600.0, rounds: int = 10) -> None:
        """Advance from deadline to deadline until nothing sleeps or ``limit`` seconds passed."""
        end = self._now + limit
        await self.settle(rounds)
        while (deadline := self.next_deadline()) is not None and deadline <= end:
            self.advance(deadline - self._now)
            await self.settle(rounds)
