"""What each command needs of the system it runs on, said before it starts.

The one-shot commands (``upload``, ``verify``, ``check``, ``check-dataset``,
``manifest``, ``recover-journal``, ``config``) need nothing beyond Python: they run on
Linux, macOS and Windows. The daemon (``run``, and ``demo``, which runs one) needs a
POSIX system: Unix sockets for its control socket, ``grp``/``pwd`` for the socket's
group, ``resource`` for its open-files limit, SIGHUP for ``reload``; it is built and
tested for Linux (inotify, SO_PEERCRED, systemd). ``install-service`` writes systemd
units: Linux only. The clients of the control socket (``status``, ``pause`` ...) need
Unix sockets, which Python has on Windows neither.

Standard library only (and ``ops.client``), nothing imported that a system may lack:
the command line asks before it imports the command's modules, so a missing one is a
sentence, not a traceback.
"""

from __future__ import annotations

import importlib.util
import signal
import socket
import sys

from cpg_daemon.ops import client

ONE_SHOT = "upload, verify, check and check-dataset"

DAEMON_COMMANDS = ("run", "demo")
DAEMON_MODULES = ("grp", "pwd", "resource")
"""What the daemon imports that only POSIX systems have."""
SERVICE_COMMANDS = ("install-service",)
CLIENT_COMMANDS = ("status", "pause", "resume", "retry", "rescan", "reload", "credentials")
"""Commands that only talk to a running daemon over its control socket."""


def _lacking(modules: tuple[str, ...]) -> list[str]:
    """What this Python lacks of ``modules`` (and of Unix sockets and SIGHUP)."""
    lacking = [name for name in modules if importlib.util.find_spec(name) is None]
    if not hasattr(socket, "AF_UNIX"):
        lacking.append("Unix sockets")
    if not hasattr(signal, "SIGHUP"):
        lacking.append("SIGHUP")
    return lacking


def unsupported(command: str) -> str | None:
    """Why ``command`` cannot run on this system, or None when it can."""
    here = f"Python on this system ({sys.platform})"
    if command in DAEMON_COMMANDS:
        lacking = _lacking(DAEMON_MODULES)
        if lacking:
            return (
                f"the daemon needs a POSIX system (it is built for Linux, with systemd), and "
                f"{here} has no {', '.join(lacking)}. {ONE_SHOT} run here; the daemon runs "
                "on a Linux server (see README, Platforms)"
            )
    elif command in SERVICE_COMMANDS:
        if not sys.platform.startswith("linux"):
            return (
                "it writes systemd units for the Linux server the daemon is to run on: "
                f"run it there (this system, {sys.platform}, is not Linux)"
            )
        lacking = _lacking(("grp", "pwd"))
        if lacking:
            missing = ", ".join(lacking)
            return f"it looks up the daemon's user and group, and {here} has no {missing}"
    elif command in CLIENT_COMMANDS:
        return client.unix_sockets_missing(command)
    return None
