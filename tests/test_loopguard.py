"""The event-loop guard (loopguard.py) finds what it must and nothing else.

Each test runs its own event loop under its own guard (plain tests, so the suite's
guard of async tests stays out of the way).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.lowlevel
from loopguard import STEP_CPU_SECONDS, LoopGuard, harness

from cpg_daemon.core.config import load_config


def _guarded(main: Callable[[], Awaitable[None]]) -> list[str]:
    guard = LoopGuard()
    with guard.watching():
        anyio.run(main)
    return guard.found


def _compute(seconds: float) -> None:
    """Use this much CPU time of the calling thread."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def test_blocking_io_of_the_daemons_code_on_the_loop_is_found(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[daemon]\n")

    async def main() -> None:
        # The daemon's code reading a file on the loop: the exception may even be
        # swallowed by the code under test, the finding stays.
        try:
            load_config(config)
        except Exception as exc:
            assert type(exc).__name__ == "BlockingError"

    found = _guarded(main)
    assert len(found) == 1, found
    assert found[0].startswith("Blocking call to "), found
    assert "/cpg_daemon/core/config.py:" in found[0], found


def test_blocking_io_in_a_worker_thread_or_of_the_test_itself_is_not(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[daemon]\n")

    async def main() -> None:
        await anyio.to_thread.run_sync(load_config, config)
        assert config.read_text() == "[daemon]\n"  # the harness may block

    assert _guarded(main) == []


def test_a_step_that_computes_too_long_is_found_with_its_place() -> None:
    async def busy() -> None:
        await anyio.lowlevel.checkpoint()
        _compute(STEP_CPU_SECONDS + 0.05)
        await anyio.lowlevel.checkpoint()

    found = _guarded(busy)
    assert len(found) == 1, found
    assert "s of CPU" in found[0], found
    assert "busy at " in found[0] and "test_loopguard.py" in found[0], found


def test_short_steps_and_the_harness_own_work_are_not() -> None:
    @harness
    def test_side_work() -> None:
        _compute(STEP_CPU_SECONDS + 0.05)

    async def main() -> None:
        for _ in range(3):
            _compute(STEP_CPU_SECONDS / 4)
            await anyio.lowlevel.checkpoint()
        test_side_work()

    assert _guarded(main) == []
