"""cpg-daemon processes for tests, started by forking a process that has imported it.

Every test that runs ``cpg-daemon run`` or a one-shot command starts a real process,
and most of such a process's CPU before it does anything is Python importing the
package (botocore, aiohttp, structlog, awscrt: about 0.6 s a start). The suite starts
some 300 of them, on two cores; a fork server pays the imports once per pytest worker.

The server is a plain Python process (``python tests/forkserver.py``) that imports the
command line and every module a command loads, then forks one child per request. The
child is a real process with its own pid, standard streams, environment, working
directory and signals; it runs ``python -m cpg_daemon ARGS`` exactly as the interpreter
would (``runpy``, then the interpreter's normal exit: ``atexit``, threads joined).
Its exit status comes back over the request's connection. What the fork server cannot
reproduce, it does not attempt: a command under a wrapper (``unshare``, faketime), with
descriptors to pass, or with an environment whose ``PYTHON*``/``LD_*`` variables differ
from the server's runs as a fresh interpreter (:func:`eligible`), and
``CPG_TESTS_FORK=0`` turns the server off altogether.

Standard library only: the server must not import pytest.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import io
import json
import locale
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PRELOAD = (
    "cpg_daemon.cli.main",
    "cpg_daemon.ops.daemon",
    "cpg_daemon.engine.oneshot",
    "cpg_daemon.engine.verify",
    "cpg_daemon.engine.dataset",
    "cpg_daemon.engine.manifest",
)
"""What the server imports before it forks (what the commands import between them)."""

_INHERITED_PREFIXES = ("PYTHON", "LD_", "FAKETIME")
"""Environment variables that act when the interpreter starts: they must match."""

MAX_MESSAGE = 1 << 20


# -- the server ----------------------------------------------------------------------------


class _BecomeChild(BaseException):
    """Raised in a forked child: unwinds the server's frames (closing its copies of the
    server's sockets) up to :func:`main`, which then runs the command."""

    def __init__(self, request: dict[str, Any]) -> None:
        super().__init__()
        self.request = request


def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    fds = array.array("i")
    data = b""
    while not data.endswith(b"\n"):
        message, ancillary, _, _ = conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(64 * fds.itemsize))
        if not message:
            raise EOFError("the client hung up before its request was complete")
        data += message
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return json.loads(data), list(fds)


def _status(wait_status: int) -> int:
    """A wait status as ``Popen.returncode`` gives it (minus the signal's number)."""
    return os.waitstatus_to_exitcode(wait_status)


def serve(listener: socket.socket, parent: int) -> None:
    """Fork a child for each request until ``parent`` (a pipe from the pytest worker)
    closes; report each child's exit status on its request's connection."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_write)
    children: dict[int, socket.socket] = {}
    with selectors.DefaultSelector() as selector:
        selector.register(listener, selectors.EVENT_READ, "accept")
        selector.register(parent, selectors.EVENT_READ, "parent")
        selector.register(wake_read, selectors.EVENT_READ, "child")
        while True:
            for key, _ in selector.select():
                if key.data == "parent":
                    return  # the worker is gone: its children are its tests' to stop
                if key.data == "child":
                    os.read(wake_read, 4096)
                    _reap(children)
                    continue
                conn, _ = listener.accept()
                try:
                    conn.settimeout(10)
                    request, fds = _recv_request(conn)
                except (OSError, EOFError, ValueError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for other in children.values():
                        other.close()
                    os.close(wake_read)
                    os.close(wake_write)
                    os.close(parent)
                    conn.close()
                    request["fds"] = fds
                    raise _BecomeChild(request)
                for fd in fds:
                    os.close(fd)
                with contextlib.suppress(OSError):  # a client that hung up: reaped all the same
                    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                children[pid] = conn
                _reap(children)  # a child that exited before it was registered


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"returncode": _status(wait_status)}).encode() + b"\n")
        conn.close()


def _become(request: dict[str, Any]) -> None:
    """In the child: become ``python -m cpg_daemon ARGS`` and exit as it would."""
    import runpy

    fds: list[int] = request["fds"]
    for fd, target in zip(fds, (0, 1, 2), strict=True):
        os.dup2(fd, target)  # (received descriptors are above 2: the server's streams are open)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGQUIT", "SIGALRM"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    sys.argv = ["-m", *request["args"]]
    sys.path[0] = os.getcwd()  # as `python -m` has it (the server's is tests/)
    runpy.run_module("cpg_daemon", run_name="__main__", alter_sys=True)


def main() -> None:
    """``python forkserver.py SOCKET_PATH PARENT_FD``."""
    path, parent = sys.argv[1], int(sys.argv[2])
    for module in PRELOAD:
        __import__(module)
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise SystemExit("a thread runs after the imports: forking would copy it half-done")
    request = None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen(64)
            print("ready", flush=True)
            serve(listener, parent)
    except _BecomeChild as child:  # (outside the handler: no exception context is left)
        request = child.request
    if request is not None:
        _become(request)  # raises SystemExit, or returns: the interpreter exits 0


# -- the client ------------------------------------------------------------------------------


class ForkedProcess:
    """The part of ``subprocess.Popen`` the tests use, for a child of the fork server
    (it is not this process's child: its status comes over the request's connection)."""

    def __init__(self, args: Sequence[str], conn: socket.socket, pid: int) -> None:
        self.args = list(args)
        self.pid = pid
        self.returncode: int | None = None
        self._conn = conn
        self._buffer = b""

    def _read_status(self, timeout: float | None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        self._conn.settimeout(timeout)
        try:
            while b"\n" not in self._buffer:
                chunk = self._conn.recv(4096)
                if not chunk:
                    raise RuntimeError(f"the fork server lost track of process {self.pid}")
                self._buffer += chunk
        except (TimeoutError, BlockingIOError):
            return None
        self.returncode = int(json.loads(self._buffer)["returncode"])
        self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._read_status(0.0)

    def wait(self, timeout: float | None = None) -> int:
        status = self._read_status(timeout)
        if status is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return status

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """One server per pytest worker, started on first use."""

    _instance: ForkServer | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="cpg-fork-")
        self.path = str(Path(self._folder.name) / "fork.sock")
        read_end, self._parent = os.pipe()
        self._log = open(Path(self._folder.name) / "server.log", "wb")  # noqa: SIM115
        self.env = dict(os.environ)
        self.process = subprocess.Popen(
            [sys.executable, __file__, self.path, str(read_end)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            pass_fds=[read_end],
            env=self.env,
        )
        os.close(read_end)
        atexit.register(self.stop)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            self.process.kill()
            raise RuntimeError(f"the fork server did not start: {self.log_text()}")

    def stop(self) -> None:
        """Close the pipe the server watches: it exits (its children are left to their tests)."""
        with contextlib.suppress(OSError):
            os.close(self._parent)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        self._folder.cleanup()

    def log_text(self) -> str:
        return Path(self._folder.name, "server.log").read_text(errors="replace")

    @classmethod
    def get(cls) -> ForkServer | None:
        """The worker's server (None when it is turned off)."""
        if os.environ.get("CPG_TESTS_FORK", "1") == "0":
            return None
        with cls._lock:
            if cls._instance is None or cls._instance.process.poll() is not None:
                cls._instance = ForkServer()
            return cls._instance

    def eligible(self, env: Mapping[str, str]) -> bool:
        """Whether a fresh interpreter with ``env`` would start as the server did."""

        def startup(values: Mapping[str, str]) -> dict[str, str]:
            return {k: v for k, v in values.items() if k.startswith(_INHERITED_PREFIXES)}

        return startup(env) == startup(self.env)

    def spawn(
        self,
        args: Sequence[str],
        *,
        stdin: int,
        stdout: int,
        stderr: int,
        env: Mapping[str, str],
        cwd: str | None = None,
    ) -> ForkedProcess:
        """``python -m cpg_daemon ARGS`` with these descriptors as its standard streams."""
        request = {"args": list(args), "env": dict(env), "cwd": cwd or os.getcwd()}
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(30)
            conn.connect(self.path)
            fds = array.array("i", [stdin, stdout, stderr])
            conn.sendmsg(
                [json.dumps(request).encode() + b"\n"],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())],
            )
            buffer = b""
            while b"\n" not in buffer:
                chunk = conn.recv(4096)
                if not chunk:
                    raise RuntimeError(f"the fork server did not start {args}: {self.log_text()}")
                buffer += chunk
        except BaseException:
            conn.close()
            raise
        line, rest = buffer.split(b"\n", 1)
        process = ForkedProcess(["cpg-daemon", *args], conn, int(json.loads(line)["pid"]))
        process._buffer = rest
        return process


def run(
    args: Sequence[str], *, timeout: float, input: str | None
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run([python, -m, cpg_daemon, *args], capture_output=True, text=True,
    timeout=..., input=...)``, through the fork server when it can serve it."""
    server = ForkServer.get()
    env = dict(os.environ)
    if server is None or not server.eligible(env):
        return subprocess.run(
            [sys.executable, "-m", "cpg_daemon", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    in_read, in_write = os.pipe()
    try:
        process = server.spawn(args, stdin=in_read, stdout=out_write, stderr=err_write, env=env)
    finally:
        for fd in (out_write, err_write, in_read):
            os.close(fd)
    outputs: dict[int, bytearray] = {out_read: bytearray(), err_read: bytearray()}

    def feed() -> None:
        try:
            if input is not None:
                os.write(in_write, input.encode(locale.getpreferredencoding(False)))
        except BrokenPipeError:
            pass
        finally:
            os.close(in_write)

    def drain(fd: int) -> None:
        while chunk := os.read(fd, 65536):
            outputs[fd] += chunk
        os.close(fd)

    threads = [threading.Thread(target=feed, daemon=True)]
    threads += [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in outputs]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    try:
        for thread in threads[1:]:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                raise subprocess.TimeoutExpired(process.args, timeout)
        returncode = process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        raise

    def text(data: bytearray) -> str:
        encoding = locale.getpreferredencoding(False)
        return io.TextIOWrapper(io.BytesIO(bytes(data)), encoding=encoding).read()

    return subprocess.CompletedProcess(
        process.args, returncode, text(outputs[out_read]), text(outputs[err_read])
    )


if __name__ == "__main__":
    main()
