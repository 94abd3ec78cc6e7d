"""The event-loop guard of the async tests: no blocking call of the daemon's code on the loop.

Two checks, each measuring something a loaded machine cannot inflate much:

* **Blocking I/O** (files, sockets, SQLite, ``time.sleep``, lock waits) called on the
  loop's thread from ``cpg_daemon`` code is caught by ``blockbuster`` at the call itself,
  however fast the disk or slow the machine. The test harness's own synchronous calls
  (the boto3 client of the ``s3_client`` fixture, reading moto's access log, writing test
  files) are not looked at: blockbuster only reports calls with a ``cpg_daemon`` frame on
  the stack.
* **Computation**: each step of the loop (one ``asyncio.Handle._run``) may use at most
  ``STEP_CPU_SECONDS`` of CPU time on the loop's thread (``time.thread_time``, which does
  not count time spent waiting for a core). Not counted in a step: the garbage collector
  (it runs in whichever step allocates), first-time imports (paid once per process), and
  the harness's own synchronous work, marked with :func:`harness` (the test, not the
  daemon, does it). A step over budget is reported with the task's coroutine and where
  it resumed and where it next stopped.

Steps longer than ``STEP_WALL_SECONDS`` of wall time are reported too (asyncio's debug
mode): a blocking call blockbuster does not know. The bound is far above what a loaded
2-core machine makes of any step that is not blocked.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import gc
import importlib
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, ParamSpec, TypeVar

from blockbuster import BlockBuster, BlockingError

STEP_CPU_SECONDS = 0.25
"""A loop step that computes this long is a blocking call.

Measured in this suite: the daemon's own steps use at most 0.045 s (a botocore request
built and signed on the loop), the tests' own at most 0.1 s (random payloads); thread
CPU time of a fixed computation varied by 15 % between an idle machine and one with a
core kept busy, while its wall time varied tenfold.
"""
STEP_WALL_SECONDS = 5.0
"""A step that takes this long in wall time is blocked, however loaded the machine."""

P = ParamSpec("P")
T = TypeVar("T")


class _Excluded(threading.local):
    """CPU seconds of this thread spent in work that is not the loop step's own."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.depth = 0


_excluded = _Excluded()


@contextlib.contextmanager
def _off_the_books() -> Iterator[None]:
    """Count the CPU time of the block as not the current loop step's (outermost only)."""
    if _excluded.depth:
        _excluded.depth += 1
        try:
            yield
        finally:
            _excluded.depth -= 1
        return
    _excluded.depth = 1
    started = time.thread_time()
    try:
        yield
    finally:
        _excluded.depth = 0
        _excluded.seconds += time.thread_time() - started


def harness(func: Callable[P, T]) -> Callable[P, T]:
    """Mark a synchronous test helper: its CPU time is the test's, not the loop step's."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with _off_the_books():
            return func(*args, **kwargs)

    return wrapper


class HarnessClient:
    """A boto3 client whose calls are harness work (see :func:`harness`)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if callable(value) and not isinstance(value, type):
            return harness(value)
        return value


def _task_of(handle: asyncio.Handle) -> asyncio.Task[Any] | None:
    """The task a step runs (``Task.task_wakeup`` and ``Task.__step`` are bound to it)."""
    owner = getattr(getattr(handle, "_callback", None), "__self__", None)
    return owner if isinstance(owner, asyncio.Task) else None


def _stopped_at(task: asyncio.Task[Any] | None) -> tuple[str, str, int]:
    """(coroutine, file, line) where a task is suspended: the innermost awaiting coroutine
    outside the libraries (or the innermost one), cheap enough for every step."""
    if task is None:
        return ("(no task)", "", 0)
    awaiting: Any = task.get_coro()
    place = (getattr(awaiting, "__qualname__", type(awaiting).__name__), "(finished)", 0)
    while awaiting is not None:
        frame: FrameType | None = getattr(awaiting, "cr_frame", None) or getattr(
            awaiting, "gi_frame", None
        )
        if frame is None:
            break
        filename = frame.f_code.co_filename
        if place[2] == 0 or not any(lib in filename for lib in _LIBRARIES):
            place = (getattr(awaiting, "__qualname__", "?"), filename, frame.f_lineno)
        awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "gi_yieldfrom", None)
    return place


_LIBRARIES = ("/site-packages/", "/asyncio/", "/lib/python3")


def _where(place: tuple[str, str, int]) -> str:
    name, filename, line = place
    return f"{name} at {filename}:{line}" if line else f"{name} {filename}"


class LoopGuard:
    """Records the blocking calls and heavy steps of one test's event loop."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self._gc_started = 0.0
        self._thread = threading.get_ident()

    # -- time that is not the step's ----------------------------------------------------

    def _garbage_collection(self, phase: str, info: dict[str, int]) -> None:
        if threading.get_ident() != self._thread:
            return
        if phase == "start":
            self._gc_started = time.thread_time()
        else:
            _excluded.seconds += time.thread_time() - self._gc_started

    # -- the checks ---------------------------------------------------------------------

    def _measured(self, original: Callable[[asyncio.Handle], None]) -> Callable[..., None]:
        def run(handle: asyncio.Handle) -> None:
            task = _task_of(handle)
            before = _stopped_at(task)
            started, excluded = time.thread_time(), _excluded.seconds
            try:
                original(handle)
            finally:
                used = time.thread_time() - started - (_excluded.seconds - excluded)
                if used >= STEP_CPU_SECONDS:
                    self.found.append(
                        f"a loop step used {used:.3f} s of CPU: {handle!r}, "
                        f"resumed {_where(before)}, then stopped {_where(_stopped_at(task))}"
                    )

        return run

    def _blocking(self, error: BlockingError, message: str) -> None:
        """Keep blockbuster's finding even if the daemon's code catches the exception."""
        stack = traceback.extract_stack(limit=40)
        ours = [f for f in stack if "/cpg_daemon/" in f.filename]
        where = f" from {ours[-1].filename}:{ours[-1].lineno}" if ours else ""
        self.found.append(f"{message}{where}")

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        guard = self
        original_run = asyncio.events.Handle._run
        original_init = BlockingError.__init__

        def recording_init(error: BlockingError, func: str) -> None:
            original_init(error, func)
            guard._blocking(error, str(error))

        asyncio.events.Handle._run = self._measured(original_run)  # type: ignore[method-assign]
        BlockingError.__init__ = recording_init  # type: ignore[method-assign]
        gc.callbacks.append(self._garbage_collection)
        buster = _buster()
        buster.activate()
        try:
            with _imports_off_the_books():
                yield
        finally:
            buster.deactivate()
            gc.callbacks.remove(self._garbage_collection)
            BlockingError.__init__ = original_init  # type: ignore[method-assign]
            asyncio.events.Handle._run = original_run  # type: ignore[method-assign]


KNOWN_BLOCKING: list[tuple[str, set[str]]] = [
    # ObjectStore.connect creates its aiobotocore client on the loop; botocore's loader
    # then looks on disk (os.stat) for optional model files it never caches a miss of.
    # Microseconds on a local disk; to go once the client is created off the loop.
    ("aiobotocore/session.py", {"_create_client"}),
    # A library's warning logged through the standard library (botocore's "refreshing
    # temporary credentials failed"): the daemon writes its log on the loop by design.
    ("logging/__init__.py", {"emit", "flush"}),
    # botocore's credential chain, walked on the loop because its last providers (IMDS,
    # SSO) wait for HTTP there, reads the shared credentials and config files on the way
    # (once per session; microseconds on a local disk).
    ("botocore/configloader.py", {"raw_config_parse"}),
]
"""(file, functions) in whose calls the daemon's code may still block (blockbuster's form)."""


def _buster() -> BlockBuster:
    """blockbuster for the calls made from the daemon's code."""
    buster = BlockBuster(scanned_modules=["cpg_daemon"])
    for function in buster.functions.values():
        for filename, names in KNOWN_BLOCKING:
            function.can_block_in(filename, names)
    return buster


@contextlib.contextmanager
def _imports_off_the_books() -> Iterator[None]:
    """First-time imports are paid once per process, not by the step that happens to run one."""
    original_import = builtins.__import__
    original_import_module = importlib.import_module

    def counted_import(name: str, *args: Any, **kwargs: Any) -> Any:
        with _off_the_books():
            return original_import(name, *args, **kwargs)

    def counted_import_module(name: str, package: str | None = None) -> Any:
        with _off_the_books():
            return original_import_module(name, package)

    builtins.__import__ = counted_import
    importlib.import_module = counted_import_module
    try:
        yield
    finally:
        builtins.__import__ = original_import
        importlib.import_module = original_import_module
