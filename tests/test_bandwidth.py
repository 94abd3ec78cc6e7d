"""``s3.max_bandwidth``'s forms and timetables (core.bandwidth): pure, against plain times."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpg_daemon.core.bandwidth import (
    DAY_SECONDS,
    DAYS,
    WEEK_SECONDS,
    BandwidthLimit,
    describe_rate,
    parse_bandwidth,
)

MB = 1000**2

# 2026-12-07 is a Monday.
MON = 7


def at(day: int, clock: str) -> datetime:
    """A local time: ``day`` of December 2026 (7 = Monday ... 13 = Sunday), "HH:MM[:SS]"."""
    parts = [int(p) for p in clock.split(":")] + [0]
    return datetime(2026, 12, day, parts[0], parts[1], parts[2])


@pytest.mark.parametrize(
    ("value", "limited", "lowest"),
    [
        ("", False, 0),
        ("off", False, 0),
        ("OFF", False, 0),
        (0, False, 0),
        ("0", False, 0),
        ("100MB", True, 100 * MB),
        ("10 MiB", True, 10 * 1024**2),
        (2_000_000, True, 2 * MB),
        ("08:00,10MB 19:00,off", True, 10 * MB),
        ("00:00,off", False, 0),
    ],
)
def test_todays_forms_and_timetables_parse(value: object, limited: bool, lowest: int) -> None:
    limit = parse_bandwidth(value)
    assert limit.limited is limited
    assert limit.lowest == lowest


def test_a_constant_limit_holds_at_every_time() -> None:
    limit = parse_bandwidth("100MB")
    assert limit == BandwidthLimit.constant(100 * MB)
    assert [limit.at(at(d, "03:17")) for d in range(MON, MON + 7)] == [100 * MB] * 7
    assert limit.seconds_to_next(at(MON, "03:17")) is None
    assert parse_bandwidth("").at(at(MON, "12:00")) == 0


DAILY = "08:00,10MB 12:00,512kB 13:00,10MB 19:00,off"


@pytest.mark.parametrize(
    ("when", "rate", "to_next"),
    [
        (at(MON, "00:00"), 0, 8 * 3600),  # before the first entry: the day's last (wraps)
        (at(MON, "07:59:59"), 0, 1),
        (at(MON, "08:00"), 10 * MB, 4 * 3600),
        (at(MON, "12:30"), 512_000, 1800),
        (at(MON, "13:00"), 10 * MB, 6 * 3600),
        (at(MON, "18:59:59"), 10 * MB, 1),
        (at(MON, "19:00"), 0, 13 * 3600),
        (at(MON, "23:59:59"), 0, 8 * 3600 + 1),
        (at(MON + 6, "09:00"), 10 * MB, 3 * 3600),  # every day alike, Sunday too
        (at(MON + 6, "20:00"), 0, 12 * 3600),  # Sunday night wraps to Monday 08:00
    ],
)
def test_a_daily_timetable_holds_each_limit_until_the_next_entry(
    when: datetime, rate: int, to_next: float
) -> None:
    limit = parse_bandwidth(DAILY)
    assert limit.at(when) == rate
    assert limit.seconds_to_next(when) == to_next


WEEKLY = "Mon-08:00,10MB Fri-19:00,off 12:00,1MB"
"""Slow from Monday 08:00 to Friday 19:00, but 1 MB/s every day from noon until the
next entry (the next day's noon, or Monday 08:00 / Friday 19:00 when they come first)."""


@pytest.mark.parametrize(
    ("when", "rate"),
    [
        (at(MON, "07:00"), 1 * MB),  # Sunday's 12:00 entry still holds
        (at(MON, "08:00"), 10 * MB),
        (at(MON, "12:00"), 1 * MB),
        (at(MON + 1, "11:59"), 1 * MB),  # Tuesday: no entry since Monday noon
        (at(MON + 4, "18:00"), 1 * MB),  # Friday noon's
        (at(MON + 4, "19:00"), 0),
        (at(MON + 5, "11:00"), 0),  # Saturday morning: Friday 19:00's "off"
        (at(MON + 5, "12:00"), 1 * MB),
        (at(MON + 6, "23:59"), 1 * MB),
    ],
)
def test_weekday_entries_mix_with_daily_ones(when: datetime, rate: int) -> None:
    assert parse_bandwidth(WEEKLY).at(when) == rate


def test_spellings_of_one_timetable_are_equal_and_keep_their_text() -> None:
    one = parse_bandwidth("08:00,10MB 19:00,off")
    other = parse_bandwidth("  19:00,OFF   8:00,10000000 ")
    assert one == other
    assert one.text == "08:00,10MB 19:00,off"
    assert one != parse_bandwidth("08:00,10MB 19:30,off")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("08:00,10MB 24:00,off", "'24:00' is not a time of day"),
        ("08:60,10MB", "not a time of day"),
        ("08:00,10MB 19:00", 'write entries such as "08:00,10MB"'),
        ("8h,10MB", 'write entries such as "08:00,10MB"'),
        ("08:00,fast", "cannot read size 'fast'"),
        ("08:00,0", "a limit of 0 would stop uploads"),
        ("08:00,-5MB", "cannot read size"),
        ("Xyz-08:00,1MB", "'xyz' is not a weekday"),
        ("08:00,1MB 08:00,2MB", "both start at Mon 08:00"),
        ("Tue-08:00,1MB 08:00,2MB", "both start at Tue 08:00"),
        ("lots", "cannot read size 'lots'"),
        (-1, ">= 0"),
        (True, "expected a size"),
    ],
)
def test_bad_values_say_what_is_wrong(value: object, problem: str) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        parse_bandwidth(value)
    assert problem in str(caught.value)


def test_rates_read_as_a_person_reads_them() -> None:
    assert describe_rate(0) == "unlimited"
    assert describe_rate(10 * 1024**2) == "10.0 MiB/s"


@settings(deadline=None)  # a loaded machine must not fail a test for its speed
@given(
    entries=st.dictionaries(
        st.tuples(st.sampled_from([None, *DAYS]), st.integers(0, 23), st.integers(0, 59)),
        st.integers(0, 10**9),
        min_size=1,
        max_size=12,
    ),
    second=st.integers(0, WEEK_SECONDS - 1),
)
def test_the_limit_is_the_latest_entry_s_and_holds_until_the_next_one(
    entries: dict[tuple[str | None, int, int], int], second: int
) -> None:
    daily = {(h, m) for d, h, m in entries if d is None}
    entries = {k: v for k, v in entries.items() if k[0] is None or (k[1], k[2]) not in daily}
    text = " ".join(
        f"{'' if d is None else d.title() + '-'}{h:02d}:{m:02d},{rate or 'off'}"
        for (d, h, m), rate in entries.items()
    )
    limit = parse_bandwidth(text)
    # Every entry, once per day it applies on, by second of the week.
    starts = {
        day * DAY_SECONDS + h * 3600 + m * 60: rate
        for (d, h, m), rate in entries.items()
        for day in (range(7) if d is None else [DAYS.index(d)])
    }
    latest = max((s for s in starts if s <= second), default=max(starts))
    when = at(MON, "00:00") + timedelta(seconds=second)
    assert limit.at(when) == starts[latest]
    to_next = limit.seconds_to_next(when)
    if len(starts) == 1:
        assert to_next is None
    else:
        assert to_next is not None and 0 < to_next <= WEEK_SECONDS
        assert limit.at(when + timedelta(seconds=to_next - 1)) == starts[latest]
        following = (second + to_next) % WEEK_SECONDS
        assert following in starts
