"""The pacing policies on their own: SlowDown back-off, retry delays, bandwidth, memory.

Each policy is handed the time, so these tests replay sequences against plain
numbers (and a ManualClock where something waits): no test here sleeps.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import anyio
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from cpg_daemon.core.bandwidth import parse_bandwidth
from cpg_daemon.core.clock import ManualClock
from cpg_daemon.engine.pacing import (
    IN_FLIGHT_START,
    RETRY_MAX,
    THROTTLE_MAX,
    Bandwidth,
    BandwidthStatistics,
    InFlightPolicy,
    MemoryBudget,
    SlowDownPacer,
    TokenBucket,
    Uniform,
    backoff,
    pace_chunk,
    wait_event,
)
from cpg_daemon.engine.uploader import Throughput
from cpg_daemon.s3.dataplane import PacedBody, memory_cost


def middle(low: float, high: float) -> float:
    """A jitter that always lands in the middle: the delays without their spread."""
    return (low + high) / 2


def fraction(f: float) -> Uniform:
    """A jitter that lands at ``f`` of the way between its bounds."""
    return lambda low, high: low + f * (high - low)


# -- retry back-off -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "seconds"),
    [(0, 5), (1, 10), (2, 20), (3, 40), (4, 80), (5, 160), (6, 320), (7, 640), (8, 900),
     (20, 900), (10**6, 900)],
)  # fmt: skip
def test_backoff_doubles_from_five_seconds_to_fifteen_minutes(attempt: int, seconds: float) -> None:
    assert backoff(attempt, middle) == pytest.approx(seconds)


@settings(deadline=None)  # a loaded machine must not fail a test for its speed
@given(attempt=st.integers(0, 10**6), f=st.floats(0, 1))
def test_backoff_spreads_by_a_fifth_and_never_passes_its_cap_by_more(
    attempt: int, f: float
) -> None:
    base = backoff(attempt, middle)
    delay = backoff(attempt, fraction(f))
    assert 0.8 * base - 1e-9 <= delay <= 1.2 * base + 1e-9
    assert delay <= 1.2 * RETRY_MAX + 1e-9
    assert backoff(attempt + 1, fraction(f)) >= delay


def test_backoff_uses_random_jitter_by_default() -> None:
    delays = {backoff(0) for _ in range(20)}
    assert len(delays) > 1
    assert all(4.0 <= d <= 6.0 for d in delays)


# -- SlowDown -------------------------------------------------------------------------------


def test_each_throttled_probe_doubles_the_pause_up_to_a_minute() -> None:
    pacer = SlowDownPacer(8, uniform=middle)
    now = 100.0
    pauses = []
    for _ in range(10):
        pause = pacer.throttled(now, "SlowDown")
        assert pause is not None
        pauses.append(pause)
        assert pacer.allowed == 1  # one file at a time after every pause
        now += pause  # the pause ends; the probe is throttled again
    assert pauses == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert pacer.put_back == 10
    assert pacer.last_error == "SlowDown"


def test_files_throttled_during_a_pause_are_put_back_without_a_longer_pause() -> None:
    pacer = SlowDownPacer(4, uniform=middle)
    assert pacer.throttled(0.0, "SlowDown") == 1.0
    assert pacer.throttled(0.5, "SlowDown again") is None
    assert pacer.throttled(0.99, "SlowDown again") is None
    assert (pacer.put_back, pacer.last_error, pacer.until) == (3, "SlowDown again", 1.0)
    assert pacer.pause_left(0.25) == 0.75
    assert pacer.pause_left(1.0) == 0.0
    assert pacer.pause_left(5.0) == 0.0
    assert pacer.throttled(1.0, "SlowDown") == 2.0  # the probe after the pause


def test_successes_double_the_files_allowed_back_to_all_workers() -> None:
    pacer = SlowDownPacer(12, uniform=middle)
    assert not pacer.active(0.0)
    pacer.throttled(0.0, "SlowDown")
    pacer.throttled(1.0, "SlowDown")
    assert pacer.active(2.5)  # pause running
    assert pacer.active(3.5)  # pause over, still one file at a time
    allowed = []
    for _ in range(5):
        pacer.succeeded()
        allowed.append(pacer.allowed)
    assert allowed == [2, 4, 8, 12, 12]
    assert not pacer.active(3.5)
    # Back to full speed: the next SlowDown starts again at the first pause.
    assert pacer.throttled(10.0, "SlowDown") == 1.0


def test_a_probe_throttled_before_full_speed_keeps_doubling_the_pause() -> None:
    pacer = SlowDownPacer(16, uniform=middle)
    assert pacer.throttled(0.0, "x") == 1.0
    pacer.succeeded()
    pacer.succeeded()
    assert pacer.allowed == 4
    assert pacer.throttled(5.0, "x") == 2.0
    assert pacer.allowed == 1


@settings(deadline=None)  # a loaded machine must not fail a test for its speed
@given(f=st.floats(0, 1), probes=st.integers(1, 12))
def test_slowdown_pauses_spread_by_a_fifth(f: float, probes: int) -> None:
    plain = SlowDownPacer(4, uniform=middle)
    spread = SlowDownPacer(4, uniform=fraction(f))
    for i in range(probes):
        base = plain.throttled(1000.0 * i, "x")
        pause = spread.throttled(1000.0 * i, "x")
        assert base is not None and pause is not None
        assert 0.8 * base - 1e-9 <= pause <= 1.2 * base + 1e-9
        assert pause <= 1.2 * THROTTLE_MAX + 1e-9


@pytest.mark.parametrize(
    ("allowed", "in_hand", "busy", "claim"),
    [
        (8, 0, 0, 8),  # full speed: one per free worker
        (8, 3, 3, 5),
        (8, 8, 8, 1),  # all busy: one more, for the next worker to be free
        (1, 0, 0, 1),  # throttled: the probe
        (1, 1, 1, 0),  # the probe is out: wait for it
        (2, 1, 1, 1),
        (4, 4, 2, 0),  # files in hand count, busy or not
        (4, 6, 6, 0),
    ],
)
def test_the_feeder_claims_within_the_allowance(
    allowed: int, in_hand: int, busy: int, claim: int
) -> None:
    pacer = SlowDownPacer(8)
    pacer.allowed = allowed
    assert pacer.claim_limit(in_hand, busy) == claim


# -- bandwidth ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asks", "answers"),
    [
        # (now, bytes) -> 0.0 (sent, taken from the credit) or the seconds to ask again in.
        # 100 B/s: the credit is at most 10 bytes, a tenth of a second's worth.
        ([(0.0, 10), (0.0, 10), (0.1, 10), (0.1, 5)], [0.0, 0.1, 0.0, 0.05]),
        # A read larger than the credit goes once the credit is full, and leaves a debt.
        ([(0.0, 100), (0.0, 100), (0.5, 100), (1.0, 100)], [0.0, 1.0, 0.5, 0.0]),
        # Idle for a long time: still only 10 bytes saved up.
        ([(0.0, 10), (100.0, 30), (100.0, 10)], [0.0, 0.0, 0.3]),
        ([(0.0, 0), (0.0, 10), (0.0, 0)], [0.0, 0.0, 0.0]),  # nothing to send: no wait
    ],
)
def test_reads_wait_for_the_credit_they_need(
    asks: list[tuple[float, int]], answers: list[float]
) -> None:
    link = TokenBucket(100)
    assert [link.take(now, amount) for now, amount in asks] == pytest.approx(answers)


def test_no_bandwidth_limit_never_waits() -> None:
    link = TokenBucket(0)
    assert [link.take(0.0, 10**9) for _ in range(3)] == [0.0, 0.0, 0.0]


@settings(deadline=None)  # a loaded machine must not fail a test for its speed
@given(
    rate=st.integers(1, 10**9),
    reads=st.lists(st.tuples(st.floats(0, 10), st.integers(0, 10**8)), min_size=1),
)
@example(rate=1, reads=[(0.0, 67_108_865), (0.0, 1)])  # a wait within the rounding of `now`
def test_a_link_never_sends_faster_than_its_rate_and_never_idles_a_waiter(
    rate: int, reads: list[tuple[float, int]]
) -> None:
    """Reads one after another (the line), each asked again when told, after ``gap``:
    between any two of them the link sent at most ``rate`` bytes per second, plus the
    credit saved up (``burst``), plus the last read; and a read told to wait goes when
    it asks again then."""
    link = TokenBucket(rate)
    now = 0.0
    sent: list[tuple[float, int]] = []
    for gap, amount in reads:
        now += gap
        wait = link.take(now, amount)
        if wait > 0:
            now += wait
            assert link.take(now, amount) == 0.0
        if amount:
            sent.append((now, amount))
    for first in range(len(sent)):
        total = 0
        for at, amount in sent[first:]:
            total += amount
            allowed = rate * (at - sent[first][0]) + link.burst + amount
            assert total <= allowed * (1 + 1e-9) + 1e-6


@pytest.mark.parametrize(
    ("steps", "answers"),
    [
        # (now, a new rate, or None to ask for 100 bytes) -> each ask's answer; 100 B/s
        # a debt of 90 bytes and a credit of 20 to make up at 200 B/s
        ([(0.0, None), (0.0, None), (0.0, 200), (0.0, None)], [0.0, 1.0, 0.55]),
        # at 0.5 s a debt of 40 bytes, and a credit of 5 to make up, at 50 B/s
        ([(0.0, None), (0.5, 50), (0.5, None)], [0.0, 0.9]),
        ([(0.0, None), (0.0, 0), (0.0, None)], [0.0, 0.0]),  # off: no waiting
        ([(0.0, 0), (0.0, None), (0.0, 100), (0.0, None), (0.1, None)], [0.0, 0.1, 0.0]),
    ],
)
def test_a_new_rate_applies_to_the_debt_and_the_credit(
    steps: list[tuple[float, int | None]], answers: list[float]
) -> None:
    link = TokenBucket(100)
    seen = []
    for now, rate in steps:
        if rate is None:
            seen.append(link.take(now, 100))
        else:
            link.set_rate(now, rate)
    assert seen == pytest.approx(answers)


@pytest.mark.parametrize(
    ("rate", "chunk"),
    [
        (0, 0),  # unlimited: no pacing, the body goes whole
        (1000, 16 * 1024),  # slow links: at least 16 KiB a read
        (2 * 1024**2, 2 * 1024**2 // 10),  # a tenth of a second's worth
        (100 * 1000**2, 1024**2),  # fast links: at most 1 MiB a read
    ],
)
def test_paced_reads_are_a_tenth_of_a_second_within_bounds(rate: int, chunk: int) -> None:
    assert pace_chunk(rate) == chunk


class _Timetable:
    """A Bandwidth on a ManualClock whose local time starts on Monday 2026-12-07 at ``start``."""

    def __init__(self, limit: str, start: str = "07:59:58") -> None:
        self.clock = ManualClock()
        hour, minute, second = (int(p) for p in start.split(":"))
        origin = datetime(2026, 12, 7, hour, minute, second)
        wall = self.clock.time()
        self.link = Bandwidth(
            parse_bandwidth(limit),
            self.clock,
            local=lambda t: origin + timedelta(seconds=t - wall),
        )


@pytest.mark.anyio
async def test_the_limit_changes_at_the_boundaries_and_is_logged_once() -> None:
    table = _Timetable("08:00,1MB 08:01,off")
    link, clock = table.link, table.clock
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(link.follow)
            assert link.statistics() == BandwidthStatistics(0, "08:00,1MB 08:01,off")
            await clock.settle()
            clock.advance(2.0)  # 08:00:00
            await clock.settle()
            assert link.statistics().limit_bytes_per_s == 1000**2
            assert link.chunk() == 100_000
            clock.advance(30.0)
            await clock.settle()
            clock.advance(30.0)  # 08:01:00
            await clock.settle()
            assert link.chunk() == 0
            link.set_limit(parse_bandwidth("2MB"))  # a reload
            await clock.settle()
            tg.cancel_scope.cancel()
    changes = [(e["limit_bytes_per_s"], e["schedule"]) for e in logs]
    assert [e["event"] for e in logs] == ["bandwidth_limit_changed"] * 3
    assert changes == [
        (1000**2, "08:00,1MB 08:01,off"),
        (0, "08:00,1MB 08:01,off"),
        (2 * 1000**2, "2MB"),
    ]


@pytest.mark.anyio
async def test_paced_bodies_share_the_limit_a_tenth_of_a_second_at_a_time() -> None:
    """Three 300 kB bodies written at once at 1 MB/s: 100 kB reads, one after another, so
    no second of the run carries more than the limit and the one read that opened it."""
    table = _Timetable("1MB", start="12:00:00")
    link, clock = table.link, table.clock
    sent: list[tuple[float, int]] = []

    async def write(body: PacedBody) -> None:
        async for piece in body:
            sent.append((clock.monotonic(), len(piece)))

    bodies = [PacedBody(bytes(300_000), link) for _ in range(3)]
    assert all(body.must_stream() for body in bodies)
    async with anyio.create_task_group() as tg:
        for body in bodies:
            tg.start_soon(write, body)
        await clock.run_until_idle()
    assert sum(n for _, n in sent) == 900_000
    assert {n for _, n in sent} == {100_000}
    assert [t for t, _ in sent] == pytest.approx([i * 0.1 for i in range(9)])
    for start in [t for t, _ in sent]:
        window = sum(n for t, n in sent if start <= t < start + 1.0)
        assert window <= 1000**2


@pytest.mark.anyio
async def test_a_body_of_one_read_is_paid_whole_and_unlimited_ones_go_at_once() -> None:
    table = _Timetable("1MB", start="12:00:00")
    link, clock = table.link, table.clock
    paid: list[float] = []

    async def pay(body: PacedBody) -> None:
        assert not body.must_stream()  # one read: any plane may send it, after pay()
        await body.pay()
        paid.append(clock.monotonic())

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(pay, PacedBody(bytes(100_000), link))
        await clock.run_until_idle()
    assert paid == pytest.approx([0.0, 0.1, 0.2])

    body = PacedBody(b"abcdef", _Timetable("off").link)
    assert not body.must_stream()
    assert [bytes(p) async for p in body] == [b"abcdef"]  # unlimited: whole, at once
    assert (body.tell(), body.seek(2), body.read(3), body.read()) == (6, 2, b"cde", b"f")
    into = bytearray(4)  # how the CRT reads it: into its own buffer
    assert (body.seek(1), body.readinto(memoryview(into)), into) == (1, 4, bytearray(b"bcde"))
    assert (body.readinto(memoryview(into)), body.readinto(memoryview(into))) == (1, 0)


def test_bodies_are_paced_only_when_a_limit_may_be_in_force() -> None:
    data = b"x" * 10
    assert _Timetable("").link.body(data) is data  # botocore sends bytes as they are
    assert isinstance(_Timetable("08:00,1MB 19:00,off").link.body(data), PacedBody)


@pytest.mark.anyio
async def test_bandwidth_paces_concurrent_uploads_on_the_clock() -> None:
    table = _Timetable("1000", start="12:00:00")
    link, clock = table.link, table.clock
    sent: list[tuple[str, float]] = []

    async def upload(name: str, size: int) -> None:
        await link.take(size)
        sent.append((name, clock.monotonic()))

    async with anyio.create_task_group() as tg:
        for name in "abcd":
            tg.start_soon(upload, name, 500)
        await clock.run_until_idle()
    assert sent == [("a", 0.0), ("b", 0.5), ("c", 1.0), ("d", 1.5)]


def test_throughput_is_bytes_per_second_over_the_last_window() -> None:
    clock = ManualClock()
    meter = Throughput(20.0, clock)
    assert meter.per_second() == 0.0
    meter.add(1000)
    assert meter.per_second() == 1000.0  # under a second: counted as one
    clock.advance(4.0)
    meter.add(1000)
    assert meter.per_second() == 500.0  # 2000 bytes in 4 s
    clock.advance(16.0)
    assert meter.per_second() == 100.0  # 2000 bytes in the 20 s window
    clock.advance(1.0)
    assert meter.per_second() == 1000.0 / 17  # the first left: since the second (at 4 s)
    clock.advance(30.0)
    assert meter.per_second() == 0.0


# -- memory budget --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_memory_budget_is_first_come_first_served() -> None:
    clock = ManualClock()
    budget = MemoryBudget(100)
    got: list[str] = []

    async def take(name: str, amount: int) -> None:
        await budget.acquire(amount)
        got.append(name)

    first = await budget.acquire(60)
    with anyio.fail_after(5):  # a budget that never lets a request go fails, not hangs
        async with anyio.create_task_group() as tg:
            tg.start_soon(take, "large", 60)
            await clock.settle()
            tg.start_soon(take, "small", 10)  # would fit now, but the large part asked first
            await clock.settle()
            assert got == []
            budget.release(first)
    assert got == ["large", "small"]
    assert budget.used == 70


@pytest.mark.anyio
async def test_a_grown_budget_lets_a_waiter_in_and_never_shrinks_below_the_configured() -> None:
    clock = ManualClock()
    budget = MemoryBudget(100)
    held = await budget.acquire(80)
    got: list[int] = []

    async def take() -> None:
        got.append(await budget.acquire(50))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await clock.settle()
            assert got == [] and budget.waiting
            budget.scale(1.5)  # more requests allowed: 150 bytes, the waiter fits
    assert got == [50] and not budget.waiting and budget.used == 130
    budget.scale(0.5)
    assert budget.limit == 100  # the configured budget is the least
    budget.release(held)


def test_the_crt_s_copy_counts_against_the_budget() -> None:
    assert memory_cost("crt", 2 * 1024**2) == 4 * 1024**2
    assert memory_cost("crt", 8 * 1024**2) == 8 * 1024**2  # parts go through botocore
    assert memory_cost("botocore", 2 * 1024**2) == 2 * 1024**2


@pytest.mark.anyio
async def test_a_body_larger_than_the_budget_goes_alone() -> None:
    clock = ManualClock()
    budget = MemoryBudget(100)
    got: list[str] = []

    async def take(name: str, amount: int) -> int:
        held = await budget.acquire(amount)
        got.append(name)
        return held

    small = await budget.acquire(10)
    with anyio.fail_after(5):  # a budget that never lets a request go fails, not hangs
        async with anyio.create_task_group() as tg:
            tg.start_soon(take, "huge", 250)
            await clock.settle()
            assert got == []  # not while anything else is held
            budget.release(small)
        assert got == ["huge"]
        assert budget.used == 100  # it holds the whole budget, not more
        async with anyio.create_task_group() as tg:
            tg.start_soon(take, "after", 1)
            await clock.settle()
            assert got == ["huge"]
            budget.release(100)
    assert got == ["huge", "after"]


@settings(deadline=None, max_examples=50)  # each example runs an event loop
@given(
    limit=st.integers(1, 1000),
    requests=st.lists(st.tuples(st.integers(0, 1500), st.integers(1, 5)), min_size=1, max_size=30),
)
def test_memory_in_flight_never_exceeds_the_budget_and_every_request_is_served(
    limit: int, requests: list[tuple[int, int]]
) -> None:
    async def main() -> None:
        clock = ManualClock()
        budget = MemoryBudget(limit)
        served: list[int] = []
        peak = 0

        async def request(i: int, amount: int, seconds: int) -> None:
            nonlocal peak
            held = await budget.acquire(amount)
            served.append(i)
            peak = max(peak, budget.used)
            await clock.sleep(seconds)  # the request is in flight
            budget.release(held)

        async with anyio.create_task_group() as tg:
            for i, (amount, seconds) in enumerate(requests):
                tg.start_soon(request, i, amount, seconds)
                await clock.settle()  # asked in this order
            await clock.run_until_idle(rounds=4 * len(requests) + 10)
            assert served == list(range(len(requests)))  # all of them, first come first served
        assert peak <= limit
        assert budget.used == 0

    anyio.run(main)


# -- waiting on the clock -------------------------------------------------------------------


@pytest.mark.anyio
async def test_wait_event_ends_at_the_event_or_after_the_time_on_the_clock() -> None:
    clock = ManualClock()
    event = anyio.Event()
    ended: list[float] = []

    async def waiter(seconds: float) -> None:
        await wait_event(event, seconds, clock)
        ended.append(clock.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, 2.0)
        tg.start_soon(waiter, 10.0)
        await clock.settle()
        clock.advance(2.0)
        await clock.settle()
        assert ended == [2.0]
        event.set()
    assert ended == [2.0, 2.0]
    assert clock.sleepers == 0  # the other timer is gone
    await wait_event(event, 100.0, clock)  # already set: no wait


# -- requests in flight -------------------------------------------------------------------


def _run_link(
    policy: InFlightPolicy,
    seconds: float,
    *,
    rtt: float,
    size: int,
    most_per_s: float,
    queued: bool = True,
) -> list[int]:
    """Feed the policy what a link would show: ``limit`` requests of ``size`` bytes in
    flight, each taking ``rtt``, and at most ``most_per_s`` finished a second (the
    client's CPU or the link's bandwidth). Returns the number allowed, second by second."""
    now, seen, next_second = 0.0, [], 1.0
    while now < seconds:
        per_s = min(policy.limit / rtt, most_per_s)
        now += 1 / per_s
        new = policy.finished(now, size, saturated=queued)
        assert new is None or new == policy.limit
        if now >= next_second:
            seen.append(policy.limit)
            next_second += 1.0
    return seen


@pytest.mark.parametrize(
    ("rtt", "most_per_s", "at_least", "at_most"),
    [
        (0.100, 450.0, 45, 64),  # 100 ms away, 450 files/s of CPU: 45 are needed
        (0.040, 450.0, 18, 40),  # 40 ms: 18 are needed
        (0.001, 450.0, 16, 16),  # loopback: 16 already fill the CPU, more are undone
    ],
)
def test_the_requests_allowed_climb_to_what_the_link_needs_and_no_further(
    rtt: float, most_per_s: float, at_least: int, at_most: int
) -> None:
    policy = InFlightPolicy(64)
    seen = _run_link(policy, 60, rtt=rtt, size=64 * 1024, most_per_s=most_per_s)
    settled = seen[20:]
    assert min(settled) >= at_least, seen
    # Most of the time at most what is needed; a probe of half as many again now and
    # then (undone within seconds).
    assert sorted(settled)[len(settled) * 3 // 4] <= at_most, seen
    assert max(settled) <= max(at_most * 3 // 2, at_most + 2), seen


def test_at_first_the_requests_allowed_double_until_a_step_does_not_pay() -> None:
    """A one-shot upload of a thousand small files lasts a few seconds: over 100 ms the
    number must reach what the link needs (45 at 450 files/s) within the first second,
    not after several steps of half as many again."""
    policy = InFlightPolicy(256)
    seen = _run_link(policy, 12, rtt=0.1, size=64 * 1024, most_per_s=450)
    assert seen[0] >= 45, seen
    # 64 was reached, 128 did not pay (450 files/s need 45): from there the steps are
    # by half, and the probes never go back to twice as many.
    assert max(seen[2:]) <= 96, seen


def test_a_large_file_few_parts_at_a_time_still_climbs() -> None:
    """16 MiB parts, as many in flight as the memory budget (which grows with the number
    allowed) holds: one at first. 100 ms away each takes 0.26 s; the number climbs
    within a few parts, and with it the parts in flight."""
    policy = InFlightPolicy(64)
    now, parts_seen = 0.0, []
    for _ in range(40):
        parts = max(1, policy.limit * 24 // 16 // 16)  # 24 MiB at the start, 16 MiB parts
        now += 0.26 / parts
        policy.finished(now, 16 * 1024**2, saturated=True, in_flight=parts)
        parts_seen.append(parts)
    assert parts_seen[0] == 1 and max(parts_seen) >= 3, parts_seen


def test_without_files_waiting_the_number_stays() -> None:
    """Fewer requests than allowed: the number is not what holds the uploads back."""
    policy = InFlightPolicy(64)
    seen = _run_link(policy, 30, rtt=0.1, size=64 * 1024, most_per_s=450, queued=False)
    assert set(seen) == {IN_FLIGHT_START}


def test_failures_cut_a_third_and_the_climb_waits() -> None:
    policy = InFlightPolicy(64)
    _run_link(policy, 30, rtt=0.1, size=64 * 1024, most_per_s=450)
    high = policy.limit
    assert policy.failed() == high * 2 // 3
    for _ in range(20):
        policy.failed()
    assert policy.limit == 4  # the floor
    # After failures, a few seconds pass before the first step up.
    seen = _run_link(policy, 10, rtt=0.1, size=64 * 1024, most_per_s=450)
    assert seen[:5] == [4] * 5, seen


def test_the_ceiling_is_max_concurrency_even_below_the_start() -> None:
    policy = InFlightPolicy(8)
    assert policy.limit == 8
    seen = _run_link(policy, 30, rtt=0.1, size=64 * 1024, most_per_s=450)
    assert max(seen) == 8
    assert InFlightPolicy(2).failed() is None  # the floor is the ceiling's when lower
