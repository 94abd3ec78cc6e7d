"""The control socket's client side: one request, one reply (for the command line).

Only the standard library: ``cpg-daemon status``, ``pause`` and the other commands
that talk to a running daemon import this, not the daemon's server side (anyio,
structlog, the peer checks), so they start in a fraction of the time and on any
system (where Python has no Unix sockets, as on Windows, they say so). The protocol
is described in ``cpg_daemon.ops.control``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROTOCOL_VERSION = 1
CLIENT_TIMEOUT = 10.0
"""Seconds a command-line request waits for the daemon's reply."""


class CommandError(Exception):
    """A request the daemon understood but cannot do (unknown watch, say): an error reply."""


class NoDaemonError(Exception):
    """Nothing answered on the socket; the message says what was tried and why it failed."""


class SocketPermissionError(NoDaemonError):
    """The socket is there, but this user may not connect to it."""


class NoUnixSocketsError(NoDaemonError):
    """This Python has no Unix sockets (Windows): no daemon can be reached from here."""


def unix_sockets_missing(command: str) -> str | None:
    """Why ``command`` cannot reach a daemon from here (no Unix sockets), or None."""
    if hasattr(socket, "AF_UNIX"):
        return None
    return (
        f"the daemon's control socket is a Unix socket, which Python has not on this system "
        f"({sys.platform}): run `cpg-daemon {command}` on the machine the daemon runs on"
    )


def request(
    path: Path,
    command: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout: float = CLIENT_TIMEOUT,
) -> Any:
    """Send one command to the running daemon (blocking; for the command line)."""
    missing = unix_sockets_missing(command)
    if missing is not None:
        raise NoUnixSocketsError(missing)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise NoDaemonError(
                f"no cpg-daemon is listening on {path}: the daemon is not running, or it "
                "uses another socket (see daemon.socket, or pass -s / -c)"
            ) from None
        except ConnectionRefusedError:
            raise NoDaemonError(
                f"no cpg-daemon is listening on {path} (a stale socket: the daemon is not running)"
            ) from None
        except PermissionError:
            raise SocketPermissionError(
                f"permission denied on {path}: run as root, the daemon's user, or a member "
                "of daemon.socket_group"
            ) from None
        except OSError as exc:
            raise NoDaemonError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        line = json.dumps({"v": PROTOCOL_VERSION, "command": command, "args": dict(args or {})})
        # Turned away (busy) before the request was read: the reply is here all the same.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(line.encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise NoDaemonError(f"the daemon on {path} closed the connection")
            reply += chunk
    except TimeoutError:
        raise NoDaemonError(f"the daemon on {path} did not answer in {timeout:g} s") from None
    finally:
        sock.close()
    answer = json.loads(reply)
    if not answer.get("ok"):
        raise CommandError(str(answer.get("error")))
    return answer.get("result")
