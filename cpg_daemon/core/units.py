"""Parsing of human-friendly durations and sizes used in the configuration.

Pure functions: "30s", "15m", "12h", "1d", "1h30m" or a number of seconds;
"64MiB", "100MB", "5 GiB" or a number of bytes.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from decimal import Decimal

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def parse_duration(value: object) -> float:
    """Seconds in a duration such as ``"30s"``, ``"1h30m"`` or ``45`` (seconds).

    Raises ValueError with a short explanation on anything else, including
    negative numbers and booleans (TOML ``true`` is not a duration).
    """
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "30s", "15m" or "12h"')
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError("a duration must be a finite number of seconds >= 0")
        return float(value)
    if not isinstance(value, str):
        raise ValueError('expected a duration such as "30s", "15m" or "12h"')
    text = value.strip().lower()
    if not text:
        raise ValueError("empty duration")
    position = 0
    total = 0.0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            raise ValueError(
                f"cannot read duration {value!r}: use a number with a unit s, m, h or d, "
                'such as "30s", "15m", "12h" or "1h30m"'
            )
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
        while position < len(text) and text[position] == " ":
            position += 1
    return total


def parse_size(value: object) -> int:
    """Bytes in a size such as ``"64MiB"``, ``"100MB"`` or ``1048576``.

    Decimal units (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB,
    GiB, TiB) powers of 1024, as everywhere else. Fractions are rounded down
    to whole bytes.
    """
    if isinstance(value, bool):
        raise ValueError('expected a size such as "64MiB" or "100MB"')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size must be >= 0 bytes")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError("a size must be a finite number of bytes >= 0")
        return int(value)
    if not isinstance(value, str):
        raise ValueError('expected a size such as "64MiB" or "100MB"')
    match = _SIZE.fullmatch(value.strip().lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ValueError(
            f"cannot read size {value!r}: use a number with a unit B, kB, MB, GB, KiB, MiB "
            'or GiB, such as "64MiB"'
        )
    return int(Decimal(match.group(1)) * _SIZE_UNITS[match.group(2)])


def format_size(n: float) -> str:
    """A short human form of a byte count, in binary units (``"1.5 GiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1023.95 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """``3d 4h``, ``2h 13m``, ``5m 7s``, ``12s``."""
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def timestamp(seconds: float) -> str:
    """Seconds since the epoch as an ISO 8601 UTC time, to the second (status, hooks)."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")
