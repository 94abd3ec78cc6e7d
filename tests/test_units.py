"""Durations and sizes as people write them in the configuration file."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cpg_daemon.core.units import format_size, parse_duration, parse_size

# -- durations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 15 * 60),
        ("12h", 12 * 3600),
        ("1d", 86400),
        ("1h30m", 5400),
        ("1h 30m", 5400),
        ("2h0m5s", 7205),
        ("500ms", 0.5),
        ("1.5h", 5400),
        (" 30s ", 30),
        ("30S", 30),
        ("0s", 0),
        (45, 45),
        (0, 0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_examples(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        -1,
        -0.5,
        math.inf,
        math.nan,
        "",
        "   ",
        "-5s",
        "30",  # a bare number in a string is ambiguous; numbers are written unquoted
        "1h30",
        "30x",
        "5 minutes",
        "h",
        "soon",
        "1h-30m",
        None,
        [30],
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_duration(value)
    message = str(excinfo.value)
    assert message, "the error must say what is wrong"
    assert "Traceback" not in message


def test_parse_duration_message_shows_the_value_and_examples() -> None:
    with pytest.raises(ValueError, match=r"'30x'.*\"30s\""):
        parse_duration("30x")


def test_parse_duration_rejects_booleans_with_a_duration_hint() -> None:
    # TOML `settle = true` must not silently mean 1 second.
    with pytest.raises(ValueError, match="duration"):
        parse_duration(True)


@given(
    hours=st.integers(0, 10_000),
    minutes=st.integers(0, 10_000),
    seconds=st.integers(0, 10_000),
    spaced=st.booleans(),
)
def test_parse_duration_composes_units(
    hours: int, minutes: int, seconds: int, spaced: bool
) -> None:
    sep = " " if spaced else ""
    text = f"{hours}h{sep}{minutes}m{sep}{seconds}s"
    assert parse_duration(text) == hours * 3600 + minutes * 60 + seconds


@given(n=st.integers(0, 10**9), unit=st.sampled_from(["s", "m", "h", "d"]))
def test_parse_duration_single_unit(n: int, unit: str) -> None:
    factor = {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    assert parse_duration(f"{n}{unit}") == n * factor


@given(st.integers(0, 10**12))
def test_parse_duration_numbers_are_seconds(n: int) -> None:
    assert parse_duration(n) == n


# -- sizes -----------------------------------------------------------------------------

SIZE_FACTORS = {
    "": 1,
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "mib": 1024**2,
}


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64MiB", 64 * 2**20),
        ("100MB", 10**8),
        ("5 GiB", 5 * 2**30),
        ("16MiB", 16 * 2**20),
        ("1kB", 1000),
        ("1KiB", 1024),
        ("1.5GiB", 3 * 2**29),
        ("0.5MiB", 2**19),
        ("123", 123),
        ("7B", 7),
        (" 1 TiB ", 2**40),
        (1048576, 1048576),
        (0, 0),
        (1.9, 1),  # fractions of a byte round down
    ],
)
def test_parse_size_examples(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        -1,
        -1.0,
        math.inf,
        math.nan,
        "",
        "MiB",
        "-5MiB",
        "64XB",
        "64 megabytes",
        "64Mi",
        "1e6",
        "five MiB",
        "64MiB64",
        None,
        ["64MiB"],
    ],
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_size(value)
    assert str(excinfo.value)


def test_parse_size_unknown_unit_message_names_value_and_units() -> None:
    with pytest.raises(ValueError, match=r"'64XB'.*MiB"):
        parse_size("64XB")


@given(n=st.integers(0, 10**15), unit=st.sampled_from(sorted(SIZE_FACTORS)), space=st.booleans())
def test_parse_size_is_number_times_unit(n: int, unit: str, space: bool) -> None:
    sep = " " if space and unit else ""
    assert parse_size(f"{n}{sep}{unit}") == n * SIZE_FACTORS[unit]


@given(st.integers(0, 10**18))
def test_parse_size_numbers_are_bytes(n: int) -> None:
    assert parse_size(n) == n


@given(
    whole=st.integers(0, 10_000),
    hundredths=st.integers(0, 99),
    unit=st.sampled_from(["kB", "MB", "GB", "KiB", "MiB", "GiB"]),
)
@example(whole=2, hundredths=1, unit="kB")  # 2009 instead of 2010
@example(whole=8, hundredths=3, unit="kB")  # 8029 instead of 8030
def test_parse_size_decimal_fractions_are_exact(whole: int, hundredths: int, unit: str) -> None:
    # "2.01kB" is exactly 2010 bytes; rounding down applies only to real fractions of a byte.
    text = f"{whole}.{hundredths:02d}"
    exact = int(Decimal(text) * SIZE_FACTORS[unit])
    assert parse_size(text + unit) == exact


# -- format_size -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (64 * 2**20, "64.0 MiB"),
        (3 * 2**29, "1.5 GiB"),
        (2**40, "1.0 TiB"),
        (2048 * 2**40, "2048.0 TiB"),
    ],
)
def test_format_size_examples(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(0, 2**60))
def test_format_size_round_trips_within_rounding(n: int) -> None:
    text = format_size(n)
    number, unit = text.split(" ")
    assert unit in {"B", "KiB", "MiB", "GiB", "TiB"}
    # What is shown is the size to within the shown precision (0.05 of the unit).
    factor = parse_size(f"1{unit}")
    assert abs(float(number) * factor - n) <= 0.05 * factor + 0.5
