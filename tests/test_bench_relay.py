"""The benchmark's simulated link (bench/relay.py) and bench/compare.py over it, in their
tiniest form: CI runs benchmarks only as this smoke test (bench/RESULTS.md has the figures).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load_relay() -> ModuleType:
    """bench/relay.py, by its path: bench/ is not a package, nor put on sys.path here."""
    spec = importlib.util.spec_from_file_location("bench_relay", BENCH / "relay.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


relay = _load_relay()
LinkSpec, selftest = relay.LinkSpec, relay.selftest


def test_link_names_parse() -> None:
    link = LinkSpec.parse("rtt100+think20+1gbit")
    assert (link.rtt_ms, link.think_ms, link.mbit, link.one_way_s) == (100, 20, 1000, 0.05)
    assert not LinkSpec.parse("loopback").relayed
    with pytest.raises(ValueError, match="rtt<ms>"):
        LinkSpec.parse("wan")


def test_the_relay_adds_its_round_trip_and_is_a_delay_line() -> None:
    result = selftest(LinkSpec.parse("rtt40"), rounds=8, bulk=1 << 20)
    assert min(result.rtt_ms) >= 40
    assert result.first_ms >= 80  # the connection's handshake round trip, then the first
    # Sent 5 ms apart without waiting, each message still takes one round trip: a relay
    # that slept per chunk would queue them (the i-th back after about 40 + 15 i ms).
    assert min(result.pipelined_ms) >= 40
    assert result.pipelined_median_ms < 80
    assert result.relay_cpu_s is not None


def test_compare_uploads_through_the_relay(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(BENCH / "compare.py"),
        "--server=moto",
        "--clients=cpg-daemon",
        "--datasets=tiny",
        "--sizes=tiny=3x64KiB",
        "--protocols=http",
        "--links=rtt40",
        "--runs=1",
        "--warmup=0",
        "--selftest-rounds=5",
        f"--out={tmp_path}",
        f"--results={tmp_path / 'RESULTS.md'}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    (raw,) = tmp_path.glob("compare-*.json")
    report = json.loads(raw.read_text())
    (run,) = report["results"]
    assert (run["client"], run["link"], run["ok"], run["error"]) == (
        "cpg-daemon",
        "rtt40",
        True,
        "",
    )
    assert run["relay_cpu_s"] is not None
    (test,) = report["selftests"]
    assert test["median_ms"] >= 40
    section = (tmp_path / "RESULTS.md").read_text()
    assert "links=rtt40" in section
    assert "| tiny | rtt40 |" in section
