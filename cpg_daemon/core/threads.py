"""Blocking calls (file reads, SQLite) in worker threads, for less event-loop CPU per call.

A small file costs a few trips to a thread (its read, its journal writes), and on
thousands of small files those trips were a tenth of the daemon's CPU:
``anyio.to_thread.run_sync`` spends 50-80 us of event-loop CPU on each, asyncio's
executor about 25 us (measured side by side, 20,000 calls of ``os.stat``, 16 at a
time). The semantics are anyio's default ones: a call is never abandoned; a
cancellation takes effect once the thread has finished, so nothing a thread is
still writing (a request body, a journal row) is ever left half done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import anyio

T = TypeVar("T")


class Threads:
    """A named pool of worker threads (created on first use)."""

    def __init__(self, name: str, workers: int) -> None:
        self._name = name
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """``func(*args)`` in one of the threads; its result or exception."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix=self._name)
        future = asyncio.get_running_loop().run_in_executor(self._executor, func, *args)
        with anyio.CancelScope(shield=True):
            result = await future
        return result

    def shutdown(self) -> None:
        """Let the threads end once idle (a later ``run`` starts new ones)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)


FILES = Threads("cpg-files", 32)
"""Reads and stats of the watched files (several at once: network mounts are slow)."""
