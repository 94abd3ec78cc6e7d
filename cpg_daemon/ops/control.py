"""The control socket: a Unix stream socket speaking newline-delimited JSON.

One request per line, one reply per line::

    {"v": 1, "command": "pause", "args": {"watch": "batch8"}}
    {"v": 1, "ok": true, "result": {...}}
    {"v": 1, "ok": false, "error": "..."}

Commands live in a registry (name -> handler, help text, whether it changes
anything), so adding one is one entry. Every client gets its own task, with a
read timeout and a line-length limit, so a slow or broken client cannot stall
the daemon. Commands that change anything check the peer's credentials
(SO_PEERCRED on Linux, LOCAL_PEERCRED on macOS and FreeBSD): root, the daemon's own
user, or a member of the socket's group; where the system reports neither, they are
refused.
No TCP listener exists for control.

The socket is the daemon's own, or, under systemd with ``cpg-daemon.socket``, the one
systemd made (as root: its owner, group and mode are the unit's, whatever groups the
daemon's user is in). An inherited socket is never removed nor bound again by the
daemon; the same permission checks apply to its clients.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import select
import socket
import stat
import struct
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import structlog
from anyio.abc import TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from cpg_daemon.core.errors import CpgError, FatalError
from cpg_daemon.ops import listeners
from cpg_daemon.ops.client import (
    CLIENT_TIMEOUT,
    PROTOCOL_VERSION,
    CommandError,
    NoDaemonError,
    SocketPermissionError,
    request,
)

__all__ = [
    "CLIENT_TIMEOUT",
    "PROTOCOL_VERSION",
    "CommandError",
    "ControlServer",
    "NoDaemonError",
    "Registry",
    "SocketPermissionError",
    "request",
]

log = structlog.get_logger(__name__)

MAX_LINE = 64 * 1024
READ_TIMEOUT = 30.0
GONE_POLL = 0.5
"""Seconds between two looks at whether the client of a running command hung up."""
T = TypeVar("T")
MAX_CLIENTS = 64
"""Clients served at once; the next ones are told the daemon is busy (see listeners)."""
SYSTEMD_NAME = "control"
"""The control socket's name among the sockets systemd passes (FileDescriptorName=)."""

Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    handler: Handler
    help: str
    mutating: bool
    secret: bool = False
    """Its arguments are never logged (keys)."""


class Registry:
    """Command names -> handlers, with their help text."""

    def __init__(self) -> None:
        self.commands: dict[str, Command] = {}

    def add(
        self, name: str, handler: Handler, help: str, *, mutating: bool, secret: bool = False
    ) -> None:
        self.commands[name] = Command(handler, help, mutating, secret)

    def help(self) -> dict[str, str]:
        return {name: command.help for name, command in sorted(self.commands.items())}


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a control connection, as the kernel says."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    """Every group, where the kernel reports them (macOS and FreeBSD: at most 16)."""
    pid: int | None = None
    """Linux only."""


_UCRED = struct.Struct("=iII")
"""Linux's struct ucred (SO_PEERCRED): pid, uid, gid."""
SOL_LOCAL = 0
LOCAL_PEERCRED = 0x001
"""<sys/un.h> on macOS and FreeBSD: the level and option of the peer's credentials."""
XUCRED_VERSION = 0
XUCRED_GROUPS = 16
_XUCRED = struct.Struct(f"=IIh2x{XUCRED_GROUPS}I")
"""struct xucred (<sys/ucred.h>, macOS and FreeBSD): cr_version, cr_uid, cr_ngroups
(a short, then padding), cr_groups[16] (the first is the effective group). FreeBSD
adds the pid after them, which is not asked for."""
PEER_CHECK = sys.platform == "linux" or sys.platform == "darwin" or "freebsd" in sys.platform
"""Whether this system tells the daemon who connected (else changes are refused)."""
UNKNOWN_PEER = "commands that change anything are refused"


def parse_ucred(raw: bytes) -> Peer:
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(uid, gid, pid=pid)


def parse_xucred(raw: bytes) -> Peer:
    """A struct xucred as LOCAL_PEERCRED returns it; ValueError unless it is one of the
    layout this reads (version 0, 1 to 16 groups)."""
    if len(raw) < _XUCRED.size:
        raise ValueError(f"struct xucred of {len(raw)} bytes, expected {_XUCRED.size}")
    version, uid, count, *groups = _XUCRED.unpack_from(raw)
    if version != XUCRED_VERSION:
        raise ValueError(f"struct xucred version {version}, expected {XUCRED_VERSION}")
    if not 1 <= count <= XUCRED_GROUPS:
        raise ValueError(f"struct xucred with {count} groups")
    return Peer(uid, groups[0], tuple(groups[:count]))


def peer_of(sock: socket.socket) -> Peer | None:
    """The connecting process's credentials: SO_PEERCRED on Linux, LOCAL_PEERCRED on
    macOS and FreeBSD. None where the system does not say (or the call failed): then
    commands that change anything are refused (``refusal``)."""
    try:
        if sys.platform == "linux":
            return parse_ucred(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if PEER_CHECK:
            return parse_xucred(sock.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, _XUCRED.size))
    except (OSError, ValueError) as exc:
        log.warning("control_peer_unknown", error=str(exc), consequence=UNKNOWN_PEER)
    return None


def may_change(peer: Peer | None, group: str) -> bool:
    """Root, the daemon's own user, or a member of the socket group."""
    if peer is None:
        return False
    if peer.uid in (0, os.getuid()):
        return True
    if not group:
        return False
    import grp
    import pwd

    try:
        entry = grp.getgrnam(group)
    except KeyError:
        return False
    if entry.gr_gid == peer.gid or entry.gr_gid in peer.groups:
        return True
    try:
        user = pwd.getpwuid(peer.uid).pw_name
    except KeyError:
        return False
    return user in entry.gr_mem


def refusal(command: str, peer: Peer | None, group: str) -> str | None:
    """Why ``command`` (one that changes something) is refused to ``peer``, or None."""
    if peer is None:
        return (
            f"refused: {command} changes the daemon, and the daemon cannot tell who is "
            "asking (it reads the caller's user from SO_PEERCRED on Linux, LOCAL_PEERCRED "
            "on macOS and FreeBSD; this system gave neither), so "
            f"{UNKNOWN_PEER}"
        )
    if may_change(peer, group):
        return None
    return (
        f"permission denied: {command} needs root, the daemon's user or membership of the "
        f"socket group{f' {group!r}' if group else ''}"
    )


def prepare_socket_path(path: Path, group: str = "") -> None:
    """Create the socket's folder (0750, in the socket group); replace a stale socket;
    refuse a live one.

    Called before anything else at start-up, so a second daemon stops before it
    opens the journal.
    """
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o750)
        os.chmod(path.parent, 0o750)  # whatever the umask (systemd's UMask=0077, say)
        if group:
            _chgrp(path.parent, group)
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise FatalError(f"{path} exists and is not a socket; remove it or choose another")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise FatalError(f"cannot check the control socket {path}: {exc}") from None
        path.unlink()  # left behind by a daemon that crashed
        return
    finally:
        probe.close()
    raise FatalError(
        f"another cpg-daemon is already running and listening on {path}; "
        "stop it first (or give this one its own daemon.socket and daemon.state_dir)"
    )


def inherited_listener(passed: list[tuple[str, socket.socket]], path: Path) -> socket.socket | None:
    """The control socket among the sockets systemd passed (``sd_listen_fds``): the one
    named ``control``, or the only one; None when none was passed.

    It must be a listening Unix stream socket. One bound elsewhere than ``path``
    (``daemon.socket``) is used all the same, with a warning: a unit written for an
    older configuration should not stop the uploads. Other sockets are closed.
    """
    if not passed:
        return None
    chosen = next((s for name, s in passed if name == SYSTEMD_NAME), None)
    if chosen is None and len(passed) == 1:
        chosen = passed[0][1]
    for name, other in passed:
        if other is not chosen:
            log.warning("inherited_socket_unused", name=name, consequence="closed")
            other.close()
    if chosen is None:
        names = ", ".join(name for name, _ in passed)
        raise FatalError(
            f"systemd passed sockets ({names}) but none named {SYSTEMD_NAME!r} "
            "(FileDescriptorName=control in cpg-daemon.socket)"
        )
    listening = chosen.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if chosen.family != socket.AF_UNIX or chosen.type != socket.SOCK_STREAM or not listening:
        chosen.close()
        raise FatalError(
            "the control socket systemd passed is not a listening Unix stream socket "
            "(cpg-daemon.socket needs ListenStream=/path/to/control.sock)"
        )
    bound = chosen.getsockname()
    if bound != str(path):
        log.warning(
            "control_socket_elsewhere",
            socket=str(bound),
            configured=str(path),
            consequence=f"clients must be pointed at {bound} (cpg-daemon status -s PATH)",
            fix="run cpg-daemon install-service again, then systemctl daemon-reload and "
            "restart cpg-daemon.socket and cpg-daemon",
        )
    return chosen


def _chgrp(path: Path, group: str) -> None:
    import grp

    try:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    except (KeyError, PermissionError) as exc:
        log.warning("socket_group_not_set", path=str(path), group=group, error=str(exc))


class ControlServer:
    """Serves the registry on the daemon's socket until cancelled.

    ``inherited``: the listening socket systemd made (``inherited_listener``); without
    it the server makes its own at ``path`` and removes it on the way out.
    """

    def __init__(
        self,
        path: Path,
        registry: Registry,
        group: str = "",
        *,
        inherited: socket.socket | None = None,
    ) -> None:
        self.path = path
        self.registry = registry
        self.group = group
        self.inherited = inherited

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if not PEER_CHECK:
            log.warning(
                "control_peer_check_unavailable", platform=sys.platform, consequence=UNKNOWN_PEER
            )
        if self.inherited is not None:
            listener = await anyio.abc.SocketListener.from_socket(self.inherited)
            log.info(
                "control_socket_listening",
                socket=str(self.inherited.getsockname()),
                made_by="systemd",
            )
            task_status.started()
            await self._serve(listener)
            return
        await anyio.to_thread.run_sync(prepare_socket_path, self.path, self.group)
        listener = await anyio.create_unix_listener(self.path)
        try:
            await anyio.to_thread.run_sync(self._set_permissions)
            log.info("control_socket_listening", socket=str(self.path))
            task_status.started()
            await self._serve(listener)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._remove)

    async def _serve(self, listener: anyio.abc.SocketListener) -> None:
        async with listener:
            await listeners.serve(
                [listener],
                self._serve_client,
                name="control",
                limit=MAX_CLIENTS,
                turn_away=_turn_away,
            )

    def _set_permissions(self) -> None:
        os.chmod(self.path, 0o660)
        if self.group:
            _chgrp(self.path, self.group)

    def _remove(self) -> None:
        try:
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve_client(self, stream: anyio.abc.SocketStream) -> None:
        """One client's requests; nothing a client sends can end the daemon."""
        try:
            await self._converse(stream)
        except Exception as exc:  # a bug in a handler must not stop the uploads
            log.error("control_client_failed", error=repr(exc))  # listeners.serve closes it

    async def _converse(self, stream: anyio.abc.SocketStream) -> None:
        peer = peer_of(stream.extra(anyio.abc.SocketAttribute.raw_socket))
        buffered = BufferedByteReceiveStream(stream)
        async with stream:
            while True:
                try:
                    with anyio.fail_after(READ_TIMEOUT):
                        line = await buffered.receive_until(b"\n", MAX_LINE)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                    return
                except anyio.DelimiterNotFound:
                    too_long = {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
                    # The client may be gone already: not an error of ours.
                    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                        await _reply(stream, too_long)
                    return
                except TimeoutError:
                    return
                raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                reply = await _unless_gone(raw, functools.partial(self._answer, line, peer))
                if reply is None:
                    log.info("control_client_gone", consequence="its command was cancelled")
                    return
                try:
                    await _reply(stream, reply)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return

    async def _answer(self, line: bytes, peer: Peer | None) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deep
            return {"ok": False, "error": "not a JSON object: send one JSON object per line"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "not a JSON object: send one JSON object per line"}
        version = request.get("v", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            return {"ok": False, "error": f"protocol version {version!r} is not {PROTOCOL_VERSION}"}
        name = request.get("command")
        command = self.registry.commands.get(name) if isinstance(name, str) else None
        if command is None:
            known = ", ".join(sorted(self.registry.commands))
            return {"ok": False, "error": f"unknown command {name!r} (commands: {known})"}
        args = request.get("args", {})
        if not isinstance(args, dict):
            return {"ok": False, "error": "args must be a JSON object"}
        refused = refusal(str(name), peer, self.group) if command.mutating else None
        if refused is not None:
            return {"ok": False, "error": refused}
        try:
            result = await command.handler(args)
        except (CommandError, CpgError) as exc:  # CpgError: a missing bucket in verify, say
            return {"ok": False, "error": str(exc)}
        if command.mutating:
            shown: object = "(not logged)" if command.secret else args
            log.info("control_command", command=name, args=shown, peer_uid=peer and peer.uid)
        return {"ok": True, "result": result}


async def _unless_gone(raw: socket.socket, answer: Callable[[], Awaitable[T]]) -> T | None:
    """``answer()``'s result, or None if the client hung up first (its command cancelled:
    an abandoned ``verify`` stops reading files and listing S3).

    A client that only half-closed (``shutdown(SHUT_WR)``) still waits for its reply:
    only a hang-up (``POLLHUP``, both directions shut) counts.
    """
    result: list[T] = []

    async def run() -> None:
        result.append(await answer())
        tg.cancel_scope.cancel()

    async def watch() -> None:
        poller = select.poll()
        poller.register(raw.fileno(), select.POLLHUP)
        while True:  # nothing wakes a task on a hang-up it does not read: look now and then
            if poller.poll(0):
                tg.cancel_scope.cancel()
                return
            await anyio.sleep(GONE_POLL)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        tg.start_soon(watch)
    return result[0] if result else None


async def _turn_away(stream: anyio.abc.SocketStream) -> None:
    busy = f"the daemon serves {MAX_CLIENTS} clients already; try again in a moment"
    await _reply(stream, {"ok": False, "error": busy})


async def _reply(stream: anyio.abc.SocketStream, reply: dict[str, Any]) -> None:
    body = json.dumps({"v": PROTOCOL_VERSION, **reply}, default=str) + "\n"
    with anyio.fail_after(READ_TIMEOUT):
        await stream.send(body.encode())
