"""How fast the engine goes: SlowDown back-off, retry delays, bandwidth and memory budgets.

The time policies (``backoff``, ``SlowDownPacer``, ``TokenBucket.take``) are handed
the time (``now``, monotonic seconds) and answer with how long to wait; none of them
sleeps, so each is tested with tables against plain numbers (rclone's ``lib/pacer``
is the model). The waiting is done by their callers, on an injected ``Clock``; jitter
is injected too, as a ``uniform(low, high)`` function. ``MemoryBudget`` waits for
bytes, not time, and so is a plain anyio primitive.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskStatus

from cpg_daemon.core.bandwidth import BandwidthLimit, describe_rate
from cpg_daemon.core.clock import SYSTEM_CLOCK, Clock
from cpg_daemon.s3.dataplane import Body, PacedBody

log = structlog.get_logger(__name__)

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


PACE_SLICE = 0.1
"""Seconds of the limit one paced read may take: the wire follows the limit over
windows of a few tenths of a second, not a request body at a time."""
PACE_CHUNK_MIN = 16 * 1024
PACE_CHUNK_MAX = 1024 * 1024


def pace_chunk(rate: int) -> int:
    """Bytes per paced read at ``rate`` bytes per second; 0 (unlimited): no pacing."""
    if rate <= 0:
        return 0
    return min(max(int(rate * PACE_SLICE), PACE_CHUNK_MIN), PACE_CHUNK_MAX)


class TokenBucket:
    """The time policy of a shared link: ``rate`` bytes per second, 0 = unlimited.

    Credit accrues at ``rate`` up to ``burst``, a tenth of a second's worth
    (``PACE_SLICE``). A read goes once the credit covers it (or covers ``burst``, for a
    read larger than that, which leaves a debt the next reads wait out) and takes its
    bytes from the credit. So any stretch of time carries at most ``rate`` bytes per
    second, plus ``burst``, plus the one read that opened it; and a stall of the caller
    (a busy machine) saves up no more than ``burst`` to send at once afterwards. The
    caller lets one read at a time ask (``Bandwidth.take``: a line, first come first
    served).
    """

    def __init__(self, rate: int, now: float = 0.0) -> None:
        self.rate = rate
        self._credit = self.burst
        """Bytes that may go now; below 0 after a read larger than ``burst``."""
        self._stamp = now
        """Monotonic time up to which ``_credit`` has accrued."""

    @property
    def burst(self) -> float:
        """The most credit the link saves up, in bytes."""
        return self.rate * PACE_SLICE

    def _accrue(self, now: float) -> None:
        if now > self._stamp:
            self._credit = min(self.burst, self._credit + (now - self._stamp) * self.rate)
            self._stamp = now

    def take(self, now: float, amount: int) -> float:
        """``amount`` bytes at ``now``: 0.0 when they may go (and are taken), else the
        seconds until they may (nothing is taken: ask again then)."""
        if self.rate <= 0 or amount <= 0:
            return 0.0
        self._accrue(now)
        wait = (min(amount, self.burst) - self._credit) / self.rate
        # A wait within the rounding of ``now`` itself (a few ulps of a large monotonic
        # time) is none: otherwise a caller told to come back then could be sent away again.
        if wait > max(1e-9, abs(now) * 1e-15):
            return wait
        self._credit -= amount
        return 0.0

    def set_rate(self, now: float, rate: int) -> None:
        """Change the rate at ``now``: a debt is paid off at the new rate, credit is kept
        up to the new ``burst``."""
        self._accrue(now)
        self.rate = rate
        self._credit = min(self._credit, self.burst)


FOLLOW_MAX = 60.0
"""Seconds at most between two looks at the timetable (the wall clock may be set)."""


@dataclass(frozen=True)
class BandwidthStatistics:
    limit_bytes_per_s: int
    """The limit in force now; 0 = unlimited."""
    schedule: str
    """``s3.max_bandwidth`` as configured ("" for none)."""


def local_time(seconds: float) -> datetime:
    """Seconds since the epoch as the machine's local (naive) time."""
    return datetime.fromtimestamp(seconds)


class Bandwidth:
    """The link all uploads share: ``s3.max_bandwidth``'s limit in force, paced.

    The limit in force is read from the timetable at the wall clock's local time on
    every use, so it changes at each boundary without a restart; ``follow`` looks at
    the boundaries as they pass, so the change is logged (``bandwidth_limit_changed``)
    even while nothing uploads. All of it runs on the event loop: request bodies are
    paced by ``take`` as they are written (``s3.dataplane.PacedBody``), never on a
    thread of their own.
    """

    def __init__(
        self,
        limit: BandwidthLimit,
        clock: Clock = SYSTEM_CLOCK,
        *,
        local: Callable[[float], datetime] = local_time,
    ) -> None:
        self._limit = limit
        self._clock = clock
        self._local = local
        self._bucket = TokenBucket(limit.at(local(clock.time())), clock.monotonic())
        self._line: anyio.Lock | None = None
        """Held by the one read waiting for credit; the others queue on it in order."""
        self._changed: anyio.Event | None = None
        """Set by a reload, to wake ``follow``."""

    @property
    def limit(self) -> BandwidthLimit:
        return self._limit

    def set_limit(self, limit: BandwidthLimit) -> None:
        """A reloaded ``max_bandwidth``: in force at once."""
        self._limit = limit
        self.rate()
        if self._changed is not None:
            self._changed.set()

    def rate(self) -> int:
        """Bytes per second in force now (0: unlimited); logs when that changed."""
        rate = self._limit.at(self._local(self._clock.time()))
        if rate != self._bucket.rate:
            self._bucket.set_rate(self._clock.monotonic(), rate)
            log.info(
                "bandwidth_limit_changed",
                limit_bytes_per_s=rate,
                limit=describe_rate(rate),
                schedule=self._limit.text,
            )
        return rate

    # -- the s3.dataplane.Pacer protocol --------------------------------------------------

    def chunk(self) -> int:
        """Bytes per paced read now; 0 when unlimited."""
        return pace_chunk(self.rate())

    def slowest(self) -> int:
        """The lowest limit the timetable ever puts in force (0: never limited)."""
        return self._limit.lowest

    async def take(self, amount: int) -> None:
        """Wait, on the clock, until ``amount`` more bytes may go on the wire."""
        if self.rate() <= 0 or amount <= 0:
            return
        if self._line is None:
            self._line = anyio.Lock()
        async with self._line:
            while (wait := self._bucket.take(self._clock.monotonic(), amount)) > 0:
                await self._clock.sleep(wait)
                self.rate()  # a boundary of the timetable may have passed meanwhile

    def body(self, data: bytes | io.BytesIO) -> Body:
        """``data`` as a request body: paced while a limit may be in force."""
        return PacedBody(data, self) if self._limit.limited else data

    # ---------------------------------------------------------------------------------------

    async def follow(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Look at the limit at each boundary of the timetable (and at least every
        minute, or at once after a reload), so its changes show in the log, status and
        metrics when they happen; until cancelled."""
        task_status.started()
        while True:
            self.rate()
            left = self._limit.seconds_to_next(self._local(self._clock.time()))
            wait = FOLLOW_MAX if left is None else min(FOLLOW_MAX, left + 0.001)
            self._changed = anyio.Event()
            await wait_event(self._changed, wait, self._clock)

    def statistics(self) -> BandwidthStatistics:
        return BandwidthStatistics(self.rate(), self._limit.text)


IN_FLIGHT_START = 16
"""Requests in flight at start: the old fixed number, right on a LAN or loopback."""
IN_FLIGHT_FLOOR = 4
IN_FLIGHT_WINDOW = 0.25
"""Seconds of uploading per measurement of the throughput, at least..."""
IN_FLIGHT_ROUNDS = 2
"""...and as many requests finished as this many times the number in flight (each seen
about twice, at least 4): a window spans a few round trips whatever the link, and a
few parts of a large file however few are in flight."""
IN_FLIGHT_GAIN = 0.08
"""A step up is kept when the throughput grew by this fraction; else it is undone."""
IN_FLIGHT_PROBE = 40
"""Measurements held at one number before another step up is tried (10 s and more)."""
IN_FLIGHT_REQUEST_COST = 16 * 1024
"""Bytes a request counts for besides its body: 4 KiB files count for their requests."""


class InFlightPolicy:
    """How many requests may be in flight: climbs while the throughput climbs.

    On a link with a long round trip, each request spends most of its time waiting
    for the other end, and only more of them at once fill the link; on loopback or a
    LAN more of them only cost memory and CPU. Neither is known in advance, so the
    number is measured: each window (``IN_FLIGHT_WINDOW`` seconds and
    ``IN_FLIGHT_ROUNDS`` requests per request allowed, at least) in which the
    requests were the limit (every slot taken, or files waiting for one) yields a
    throughput (body bytes plus ``IN_FLIGHT_REQUEST_COST`` a request, per second).
    The number then steps up: twice as many at first (TCP's slow start), by half once a
    step has been undone or a request failed. A step that did not raise the throughput
    by ``IN_FLIGHT_GAIN`` is undone, and the next try comes ``IN_FLIGHT_PROBE`` windows
    later. Errors (SlowDown, timeouts, 5xx) cut it by a third at once. It stays between
    ``IN_FLIGHT_FLOOR`` and ``ceiling`` (``s3.max_concurrency``). After a change, the
    requests that were in flight under the old number finish before the next window
    opens: each step takes that round and one window.

    A time policy like the others here: handed ``now`` and the facts, it answers
    with the new number, and never waits.
    """

    def __init__(self, ceiling: int, start: int = IN_FLIGHT_START) -> None:
        self.ceiling = max(1, ceiling)
        self.floor = min(IN_FLIGHT_FLOOR, self.ceiling)
        self.limit = max(self.floor, min(start, self.ceiling))
        self.start = self.limit
        """The number to start with (the memory budget is set for it)."""
        self._since: float | None = None
        self._amount = 0
        self._done = 0
        self._busy = 0
        self._flying = 0
        """The requests in flight at each finish of the window, summed."""
        self._base: tuple[int, float] | None = None
        """(number, throughput) before the step being tried; None: no step is tried."""
        self._held = 0
        """Measurements since the last step up, or since one was undone."""
        self._skip: int | None = self.limit
        """Requests to see finish before the next window opens (those in flight under the
        previous number, which would mix the two); None: none."""
        self._in_flight = self.limit
        """Requests in flight at the last finish."""
        self._starting = True
        """Slow start: steps double, until one is undone or a request fails."""

    def finished(
        self, now: float, amount: int, saturated: bool, in_flight: int | None = None
    ) -> int | None:
        """A request's body of ``amount`` bytes went through at ``now``, with
        ``in_flight`` requests in flight (itself included; default: the number
        allowed); ``saturated``: every slot was taken, or someone was waiting for one
        (or for memory). Returns the new number of requests allowed when it changes."""
        flying = self.limit if in_flight is None else in_flight
        self._in_flight = flying
        if self._skip is not None:
            self._skip -= 1
            if self._skip > 0:
                return None
            self._skip = None
            self._reset(now)
            return None
        if self._since is None:
            self._since = now
        self._amount += amount + IN_FLIGHT_REQUEST_COST
        self._done += 1
        self._busy += saturated
        self._flying += flying
        elapsed = now - self._since
        rounds = max(4, IN_FLIGHT_ROUNDS * self._flying // self._done)
        if elapsed < IN_FLIGHT_WINDOW or self._done < rounds:
            return None
        throughput = self._amount / elapsed
        limited = 2 * self._busy >= self._done
        self._reset(now)
        if not limited:
            return None  # fewer requests than allowed: the number was not what held back
        return self._measured(throughput)

    def _measured(self, throughput: float) -> int | None:
        if self._base is not None:
            number, before = self._base
            self._base = None
            if throughput < before * (1 + IN_FLIGHT_GAIN):
                self._held = 1  # the next try comes IN_FLIGHT_PROBE windows later
                self._starting = False
                return self._set(number)  # no better: back to fewer
            self._held = 0  # it paid: on up at once
        self._held += 1
        if self.limit < self.ceiling and (self._held == 1 or self._held > IN_FLIGHT_PROBE):
            self._base = (self.limit, throughput)
            step = self.limit * 2 if self._starting else max(self.limit + 2, self.limit * 3 // 2)
            return self._set(min(self.ceiling, step))
        return None

    def failed(self) -> int | None:
        """A request failed the way a congested link or server fails (SlowDown, a
        timeout, a 5xx): a third fewer at once, and no step up for a while."""
        self._base = None
        self._held = 1
        self._starting = False
        return self._set(max(self.floor, self.limit * 2 // 3))

    def _set(self, number: int) -> int | None:
        if number == self.limit:
            return None
        self._skip = self._in_flight
        self.limit = number
        self._reset(None)
        return number

    def _reset(self, since: float | None) -> None:
        self._since, self._amount, self._done, self._busy, self._flying = since, 0, 0, 0, 0


class MemoryBudget:
    """Bytes of request bodies in memory, shared by all uploads, first come first served.

    A request asks for its body's size before reading it (capped at the whole
    budget, so an oversized body goes alone rather than never). Waiting is
    FIFO: a large part is never starved by a stream of small files.
    """

    def __init__(self, limit: int) -> None:
        self.base = limit
        """The budget as configured; ``scale`` grows it from there (never below)."""
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

    @property
    def waiting(self) -> bool:
        """A request is waiting for room."""
        return self._queue.locked()

    def scale(self, factor: float) -> None:
        """The budget becomes ``factor`` times the configured one (at least 1 time)."""
        self.limit = max(self.base, int(self.base * factor))
        self._freed.set()  # a waiter may fit now


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
