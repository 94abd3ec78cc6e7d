"""The injected clock: the system one, and the manual one tests drive."""

from __future__ import annotations

import anyio
import pytest

from cpg_daemon.core.clock import SYSTEM_CLOCK, ManualClock

pytestmark = pytest.mark.anyio


async def test_manual_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = ManualClock()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper, "late", 10.0)
        tg.start_soon(sleeper, "early", 1.0)
        await clock.settle()
        assert clock.sleepers == 2
        clock.advance(0.5)
        await clock.settle()
        assert woke == []
        clock.advance(0.5)
        await clock.settle()
        assert woke == ["early"]
        await clock.run_until_idle()
    assert woke == ["early", "late"]
    assert clock.monotonic() == 10.0


async def test_a_wall_clock_jump_leaves_monotonic_time_and_sleepers_alone() -> None:
    clock = ManualClock(start=1000.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(clock.sleep, 5.0)
        await clock.settle()
        clock.jump(-3600.0)
        await clock.settle()
        assert clock.sleepers == 1
        assert clock.time() == 1000.0 - 3600.0
        assert clock.monotonic() == 0.0
        clock.advance(5.0)
    assert clock.sleepers == 0


async def test_a_cancelled_sleeper_is_forgotten() -> None:
    clock = ManualClock()
    with anyio.move_on_after(0.01):
        await clock.sleep(100.0)
    assert clock.sleepers == 0
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1.0)


async def test_the_system_clock_sleeps_for_real() -> None:
    before = SYSTEM_CLOCK.monotonic()
    await SYSTEM_CLOCK.sleep(0.01)
    await SYSTEM_CLOCK.sleep(-1.0)  # a deadline already past is only a checkpoint
    assert SYSTEM_CLOCK.monotonic() - before >= 0.01
    assert abs(SYSTEM_CLOCK.time() - __import__("time").time()) < 5
