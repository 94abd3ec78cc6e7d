"""How fast the engine goes: SlowDown back-off, retry delays, bandwidth and memory budgets.

The time policies (``backoff``, ``SlowDownPacer``, ``Bandwidth.reserve``) are handed
the time (``now``, monotonic seconds) and answer with how long to wait; none of them
sleeps, so each is tested with tables against plain numbers (rclone's ``lib/pacer``
is the model). The waiting is done by their callers, on an injected ``Clock``; jitter
is injected too, as a ``uniform(low, high)`` function. ``MemoryBudget`` waits for
bytes, not time, and so is a plain anyio primitive.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
import anyio.lowlevel

from cpg_daemon.core.clock import Clock

Uniform = Callable[[float, float], float]
"""``random.uniform``, or a fixed stand-in in tests."""

RETRY_FIRST = 5.0
"""Seconds before a failed file's second attempt; each further attempt doubles it."""
RETRY_MAX = 900.0
JITTER = 0.2
"""Delays are spread by this fraction either way, so files failed together do not
return together."""
THROTTLE_FIRST = 1.0
"""Seconds of the first pause after S3 says SlowDown; each pause after a probe doubles it."""
THROTTLE_MAX = 60.0
THROTTLE_LEVELS = 8
"""Doublings counted at most (enough to reach ``THROTTLE_MAX``)."""


def _jittered(seconds: float, uniform: Uniform) -> float:
    return seconds * uniform(1.0 - JITTER, 1.0 + JITTER)


def backoff(attempt: int, uniform: Uniform = random.uniform) -> float:
    """Seconds before attempt ``attempt + 1``: 5 s doubling to 15 min, with 20 % jitter."""
    return _jittered(min(RETRY_FIRST * 2.0 ** min(attempt, 20), RETRY_MAX), uniform)


class SlowDownPacer:
    """The whole engine's back-off when S3 asks for fewer requests (SlowDown).

    A throttled file is put back, its attempts untouched (S3's load is not the
    file's fault), new files wait out a pause, and then one file at a time goes
    as a probe. Each probe throttled again doubles the pause (1 s to 60 s); each
    success doubles the files allowed at once, back to ``workers``.
    """

    def __init__(self, workers: int, *, uniform: Uniform = random.uniform) -> None:
        self.workers = workers
        self.allowed = workers
        """Files in flight allowed now."""
        self.until = 0.0
        """Monotonic time at which the pause ends."""
        self.level = 0
        """Pauses in a row without the allowance growing back to ``workers``."""
        self.put_back = 0
        """Files put back because S3 throttled them, in all."""
        self.last_error: str | None = None
        self._uniform = uniform

    def throttled(self, now: float, error: str) -> float | None:
        """A file was throttled at ``now``; the new pause, or None while one runs."""
        self.put_back += 1
        self.last_error = error
        self.allowed = 1
        if now < self.until:
            return None
        self.level = min(self.level + 1, THROTTLE_LEVELS)
        pause = min(THROTTLE_FIRST * 2.0 ** (self.level - 1), THROTTLE_MAX)
        pause = _jittered(pause, self._uniform)
        self.until = now + pause
        return pause

    def succeeded(self) -> None:
        """A file went through: allow twice as many at once (up to ``workers``)."""
        if self.allowed < self.workers:
            self.allowed = min(self.workers, self.allowed * 2)
            if self.allowed == self.workers:
                self.level = 0

    def pause_left(self, now: float) -> float:
        return max(0.0, self.until - now)

    def active(self, now: float) -> bool:
        """Fewer files than ``workers`` allowed, or a pause running."""
        return self.allowed < self.workers or self.pause_left(now) > 0

    def claim_limit(self, in_hand: int, busy: int) -> int:
        """Files to claim now, given those handed out (``in_hand``) and being worked on.

        0 means wait until a file in hand is finished: while throttled, the
        allowance counts every file in hand; otherwise at least one is claimed,
        for the next worker to be free.
        """
        if self.allowed < self.workers:
            return max(0, self.allowed - in_hand)
        return max(1, self.workers - busy)


class Bandwidth:
    """A token bucket shared by all uploads: ``rate`` bytes per second, 0 = unlimited.

    Each request reserves its bytes' time on the link: it may start once the
    requests before it have had theirs, so any stretch of time carries at most
    ``rate`` bytes per second plus the one request that opened it.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._next_free = 0.0
        """Monotonic time at which the bytes reserved so far have had their time."""

    def reserve(self, now: float, amount: int) -> float:
        """Reserve ``amount`` bytes at ``now``; seconds to wait before sending them."""
        if self.rate <= 0 or amount <= 0:
            return 0.0
        start = max(now, self._next_free)
        self._next_free = start + amount / self.rate
        return start - now

    async def consume(self, amount: int, clock: Clock) -> None:
        """Reserve ``amount`` bytes and wait, on ``clock``, until they may be sent."""
        wait = self.reserve(clock.monotonic(), amount)
        if wait > 0:
            await clock.sleep(wait)


class MemoryBudget:
    """Bytes of request bodies in memory, shared by all uploads, first come first served.

    A request asks for its body's size before reading it (capped at the whole
    budget, so an oversized body goes alone rather than never). Waiting is
    FIFO: a large part is never starved by a stream of small files.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._queue = anyio.Lock()
        """Held by the one request waiting for room; the others queue on it in order."""
        self._freed = anyio.Event()

    async def acquire(self, amount: int) -> int:
        """Wait until ``amount`` fits; returns what to hand back to ``release``."""
        amount = min(amount, self.limit)
        async with self._queue:
            while self.used + amount > self.limit:
                self._freed = anyio.Event()
                await self._freed.wait()
            self.used += amount
        return amount

    def release(self, amount: int) -> None:
        self.used -= amount
        self._freed.set()


async def wait_event(event: anyio.Event, seconds: float, clock: Clock) -> None:
    """Wait until ``event`` is set or ``seconds`` have passed on ``clock``."""
    if event.is_set():
        await anyio.lowlevel.checkpoint()
        return

    async def timer() -> None:
        await clock.sleep(seconds)
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(timer)
        await event.wait()
        tg.cancel_scope.cancel()
