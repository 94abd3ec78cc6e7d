"""Descriptors as a budget: the open-files limit, and accept loops no client can exhaust.

A daemon that uploads holds a descriptor per file being read and per connection to
S3. Its listeners (the control socket, the metrics endpoint) must not let clients
take those: each serves at most ``limit`` clients at once and turns the next ones away
at once, and running out of descriptors in ``accept()`` (``EMFILE``) pauses that
listener instead of ending the daemon. At start-up the soft open-files limit is raised
to the hard one (systemd starts services with a soft limit of 1,024).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.abc
import structlog

from cpg_daemon.core.clock import SYSTEM_CLOCK, Clock

log = structlog.get_logger(__name__)

FD_CEILING = 1 << 20
"""The soft limit is raised to the hard one, but no further than this."""
ACCEPT_PAUSE = 0.5
"""Seconds a listener waits after ``accept()`` failed (out of descriptors, say)."""
WARN_EVERY = 60.0
"""Seconds between two warnings of one kind from one listener."""

Stream = anyio.abc.SocketStream
Handler = Callable[[Stream], Awaitable[None]]


def raise_open_files_limit(ceiling: int = FD_CEILING) -> int:
    """Raise the soft limit on open descriptors to the hard one; the soft limit now."""
    import resource  # POSIX only, and only the daemon needs it

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a container may refuse: keep what we have
            return soft
        return target
    return soft


async def serve(
    listeners: Sequence[anyio.abc.SocketListener],
    handler: Handler,
    *,
    name: str,
    limit: int,
    turn_away: Handler | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> None:
    """Accept clients on ``listeners`` until cancelled, at most ``limit`` served at once.

    A client beyond the limit gets ``turn_away`` (a short refusal, given at most 1 s)
    and is closed; beyond ``limit`` refusals at once, it is closed without one.
    ``accept()`` failing pauses that listener for ``ACCEPT_PAUSE``. Both are logged at
    most once a minute each (``{name}_busy``, ``{name}_accept_failed``).
    """
    active = refusing = 0
    warned: dict[str, float] = {}

    def warn(event: str, **fields: object) -> None:
        now = clock.monotonic()
        if now - warned.get(event, -WARN_EVERY) >= WARN_EVERY:
            warned[event] = now
            log.warning(event, **fields)

    async def run(stream: Stream) -> None:
        nonlocal active
        try:
            await handler(stream)
        finally:
            active -= 1
            await stream.aclose()

    async def refuse(stream: Stream) -> None:
        nonlocal refusing
        refusing += 1
        try:
            with anyio.move_on_after(1.0):
                if turn_away is not None:
                    with contextlib.suppress(
                        anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
                    ):
                        await turn_away(stream)
        finally:
            refusing -= 1
            await stream.aclose()

    async def accept(listener: anyio.abc.SocketListener) -> None:
        nonlocal active
        while True:
            try:
                stream = await listener.accept()
            except (OSError, anyio.BrokenResourceError) as exc:
                warn(f"{name}_accept_failed", error=str(exc.__cause__ or exc))
                await clock.sleep(ACCEPT_PAUSE)
                continue
            if active >= limit:
                warn(f"{name}_busy", clients=active, consequence="new clients are turned away")
                if refusing < limit:
                    clients.start_soon(refuse, stream)
                else:  # refusals are capped too: the rest are closed without a word
                    await stream.aclose()
                continue
            active += 1
            clients.start_soon(run, stream)

    async with anyio.create_task_group() as clients:
        for listener in listeners:
            clients.start_soon(accept, listener)
