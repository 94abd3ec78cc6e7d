"""``s3.max_bandwidth``: one limit, or a timetable of limits by local time of day.

Pure: parsing and evaluation, handed the local time; the daemon's ``engine.pacing``
asks for the limit in force as time passes. The forms (rclone's ``--bwlimit``):

- ``""`` or ``"off"``: unlimited; ``"100MB"`` (or a number of bytes): always that;
- ``"08:00,10MB 19:00,off"``: entries ``HH:MM,LIMIT``, each in force from its time
  until the next entry's, wrapping at midnight (before 08:00 the 19:00 entry holds);
- ``"Mon-08:00,10MB Sat-00:00,off"``: with a weekday, an entry holds until the next
  one in the week, wrapping from Sunday to Monday. Entries without a weekday apply on
  every day, so the two kinds mix (two entries for the same minute are an error).

A limit is bytes per second (``core.units.parse_size``: kB, MB, KiB, MiB, ...);
``off`` is unlimited. In a timetable a limit of 0 is refused rather than read as
"unlimited" or as "stop": ``off`` says the one, pausing a watch the other.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from datetime import datetime

from cpg_daemon.core.units import format_size, parse_size

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_SECONDS = 86400
WEEK_SECONDS = 7 * DAY_SECONDS

_ENTRY = re.compile(r"(?:(?P<day>[a-z]{3})-)?(?P<hour>\d{1,2}):(?P<minute>\d{2})")


@dataclass(frozen=True)
class BandwidthLimit:
    """A parsed ``max_bandwidth``: bytes per second by time of the week (0 = unlimited)."""

    starts: tuple[int, ...] = ()
    """Second of the week (Monday 00:00 = 0) at which each entry starts, ascending.
    Empty: unlimited; one entry at 0 and no timetable: a constant limit."""
    rates: tuple[int, ...] = ()
    """Bytes per second from the matching start on; 0 = unlimited."""
    text: str = field(default="", compare=False)
    """As configured (status shows it); two spellings of one timetable compare equal."""

    @classmethod
    def constant(cls, rate: int) -> BandwidthLimit:
        """Always ``rate`` bytes per second (0: unlimited)."""
        if rate <= 0:
            return cls()
        return cls((0,), (rate,), text=str(rate))

    @property
    def limited(self) -> bool:
        """Whether any limit is ever in force."""
        return any(self.rates)

    @property
    def lowest(self) -> int:
        """The smallest limit ever in force (bytes per second), 0 when never limited."""
        return min((r for r in self.rates if r), default=0)

    def at(self, local: datetime) -> int:
        """Bytes per second in force at the local (naive) time ``local``; 0 = unlimited."""
        if not self.starts:
            return 0
        index = bisect.bisect_right(self.starts, _week_second(local)) - 1
        return self.rates[index]  # index -1 (before the first start): the week's last

    def seconds_to_next(self, local: datetime) -> float | None:
        """Seconds from ``local`` to the next entry's start; None without a timetable."""
        if len(self.starts) < 2:
            return None
        now = _week_second(local) + local.microsecond / 1e6
        later = [s for s in self.starts if s > now]
        following = later[0] if later else self.starts[0] + WEEK_SECONDS
        return following - now


def describe_rate(rate: int) -> str:
    """Bytes per second as a person reads them: ``"9.5 MiB/s"``, or ``"unlimited"``."""
    return f"{format_size(rate)}/s" if rate else "unlimited"


def _week_second(local: datetime) -> int:
    return local.weekday() * DAY_SECONDS + local.hour * 3600 + local.minute * 60 + local.second


def parse_bandwidth(value: object) -> BandwidthLimit:
    """A ``max_bandwidth`` value: "", "off", a size, or a timetable. ValueError says why not."""
    if isinstance(value, str):
        text = value.strip()
        if "," in text:
            return _timetable(text)
        if text.lower() in ("", "off"):
            return BandwidthLimit(text=text)
    limit = BandwidthLimit.constant(parse_size(value))
    return BandwidthLimit(limit.starts, limit.rates, text=str(value).strip())


def _timetable(text: str) -> BandwidthLimit:
    by_start: dict[int, tuple[int, str]] = {}
    for entry in text.split():
        when, comma, amount = entry.partition(",")
        match = _ENTRY.fullmatch(when.lower())
        if not comma or match is None:
            raise ValueError(
                f"cannot read {entry!r} in the timetable {text!r}: write entries such as "
                '"08:00,10MB" or "Mon-08:00,10MB", separated by spaces'
            )
        hour, minute = int(match["hour"]), int(match["minute"])
        if hour > 23 or minute > 59:
            raise ValueError(f"{entry!r}: {when!r} is not a time of day (00:00 to 23:59)")
        day = match["day"]
        if day is not None and day not in DAYS:
            raise ValueError(f"{entry!r}: {day!r} is not a weekday (Mon, Tue, ... Sun)")
        rate = _entry_rate(entry, amount)
        days = range(7) if day is None else (DAYS.index(day),)
        for d in days:
            start = d * DAY_SECONDS + hour * 3600 + minute * 60
            if start in by_start:
                raise ValueError(
                    f"{entry!r} and {by_start[start][1]!r} both start at "
                    f"{DAYS[d].title()} {hour:02d}:{minute:02d}; keep one"
                )
            by_start[start] = (rate, entry)
    starts = tuple(sorted(by_start))
    return BandwidthLimit(starts, tuple(by_start[s][0] for s in starts), text=text)


def _entry_rate(entry: str, amount: str) -> int:
    if amount.lower() == "off":
        return 0
    try:
        rate = parse_size(amount)
    except ValueError as exc:
        raise ValueError(f"{entry!r}: {exc}; or write off for no limit") from None
    if rate == 0:
        raise ValueError(
            f'{entry!r}: a limit of 0 would stop uploads; write "off" for no limit '
            "(to stop uploads, pause the watches)"
        )
    return rate
