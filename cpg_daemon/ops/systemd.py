"""sd_notify: READY, STATUS, WATCHDOG, RELOADING and STOPPING for systemd.

The protocol is one datagram per message on the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` means Linux's abstract namespace), so no
library is needed. Without ``$NOTIFY_SOCKET`` every call is a no-op, and a send
that fails is logged once and never stops the daemon: systemd's view of the
service is a convenience, the uploads are the job.
"""

from __future__ import annotations

import os
import socket
import time

import anyio
import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """Sends sd_notify messages to the service manager, if there is one."""

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "") if address is None else address
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self._warned = False
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def send(self, **fields: str | int) -> None:
        """One message: ``send(READY=1, STATUS="...")`` sends ``READY=1\\nSTATUS=...``."""
        if self._socket is None:
            return
        message = "\n".join(f"{name}={_one_line(str(value))}" for name, value in fields.items())
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:
            # Not fatal: a full queue or a restarted manager must not stop the uploads.
            if not self._warned:
                self._warned = True
                log.warning("sd_notify_failed", error=exc.strerror or str(exc))

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def reloading(self) -> None:
        """Before a reload; ``ready`` again once it is done (as notify-reload expects)."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec, STATUS="reloading the configuration")

    def stopping(self, status: str, seconds: float) -> None:
        """Shutdown has begun and needs up to ``seconds`` (even past ``TimeoutStopSec``)."""
        self.send(STOPPING=1, STATUS=status, EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def extend_timeout(self, seconds: float) -> None:
        """Still starting, and alive: allow ``seconds`` more than ``TimeoutStartSec``."""
        self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alives (half of ``WatchdogSec``), or None when not asked."""
        if self._socket is None:
            return None
        pid = os.environ.get("WATCHDOG_PID", "")
        if pid and pid != str(os.getpid()):
            return None  # meant for another process (say, a parent shell)
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        return usec / 2e6 if usec > 0 else None

    async def keep_alive(self, interval: float) -> None:
        """Send WATCHDOG=1 every ``interval`` seconds, from the event loop itself.

        Because the pings come from the loop, a loop wedged by a blocking call or
        a busy task stops them, and systemd restarts the service.
        """
        while True:
            self.send(WATCHDOG=1)
            await anyio.sleep(interval)


def _one_line(value: str) -> str:
    return " ".join(value.split("\n"))
