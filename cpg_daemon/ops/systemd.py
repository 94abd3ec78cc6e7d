"""systemd's two protocols: sd_notify (READY, STATUS, WATCHDOG, RELOADING, STOPPING) and
sd_listen_fds (the sockets a socket unit opened for the daemon).

sd_notify is one datagram per message on the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` means Linux's abstract namespace), so no
library is needed. Without ``$NOTIFY_SOCKET`` every call is a no-op, and a send
that fails is logged once and never stops the daemon: systemd's view of the
service is a convenience, the uploads are the job.

sd_listen_fds: descriptors 3, 4, ... are listening sockets when ``$LISTEN_PID`` is
this process and ``$LISTEN_FDS`` says how many; ``$LISTEN_FDNAMES`` names them
(``FileDescriptorName=``), colon-separated.
"""

from __future__ import annotations

import os
import socket
import time

import anyio
import structlog

from cpg_daemon.core.errors import FatalError

log = structlog.get_logger(__name__)

LISTEN_FDS_START = 3
"""The first descriptor a service manager passes (``SD_LISTEN_FDS_START``)."""


def listen_fds() -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed this process, with their names (``"unknown"`` when
    the socket unit gave none); empty when nothing was passed, or passed to another
    process.

    As ``sd_listen_fds(1)``: the variables are removed from the environment and the
    descriptors marked close-on-exec, so that no child (a batch hook) inherits them.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if not pid or pid != str(os.getpid()) or not count.isdigit():
        return []
    labels = names.split(":") if names else []
    if len(labels) != int(count):
        labels = ["unknown"] * int(count)
    passed = []
    for fd, label in enumerate(labels, LISTEN_FDS_START):
        try:
            os.set_inheritable(fd, False)
            passed.append((label, socket.socket(fileno=fd)))
        except OSError as exc:
            raise FatalError(
                f"descriptor {fd} ({label}) that systemd passed is not a socket: "
                f"{exc.strerror or exc}"
            ) from None
    return passed


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
