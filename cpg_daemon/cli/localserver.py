"""A local S3-compatible server: moto's, in a child process on a loopback port.

One launcher for ``cpg-daemon demo``, the test suite (``tests/s3server.py``) and the
benchmarks (``bench/plate.py``). moto comes with the ``server`` extra. The server takes
path-style requests only (``S3_IGNORE_SUBDOMAIN_BUCKETNAME``), its output goes to a log
file (werkzeug's access log: one line per request), and it never sees a user's AWS
configuration or keys.

The child runs this module (``python -m cpg_daemon.cli.localserver HOST PORT``): moto's
S3 application alone behind werkzeug. ``python -m moto.server`` would put moto's
every-service dispatcher in front, which for each request lists moto's package folder
and tries hundreds of host patterns under one lock: half of the server's CPU per small
PUT (4.3 ms -> 2.0 ms measured, 2,000 PUTs of 4 bytes). This is the one module that
reaches into moto beyond ``moto.server``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["HOST", "LocalS3Server", "LocalServerError"]

HOST = "127.0.0.1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

_Server = TypeVar("_Server", bound="LocalS3Server")


class LocalServerError(RuntimeError):
    """The local S3 server did not come up."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _server_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        S3_IGNORE_SUBDOMAIN_BUCKETNAME="true",
        PYTHONUNBUFFERED="1",
        PYTHONIOENCODING="utf-8",
        # Keep the server from reaching real AWS or a user's configuration.
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing-secret",
        AWS_DEFAULT_REGION="us-east-1",
    )
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        env.pop(name, None)
    return env


class LocalS3Server:
    """A moto S3 server child process bound to 127.0.0.1."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.endpoint_url = f"http://{HOST}:{port}"
        self.log_path = log_path

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def spawn(cls: type[_Server], log_path: Path, *, own_session: bool = False) -> _Server:
        """Start the process on a free port (without waiting for it to answer).

        ``own_session``: in a session of its own, so that Ctrl-C in a terminal reaches
        only the caller, which stops the server when it is ready to.
        """
        port = free_port()
        with open(log_path, "wb") as log_file:
            # The child keeps its own copy of the descriptor; ours is closed on exit.
            process = subprocess.Popen(
                [sys.executable, "-m", "cpg_daemon.cli.localserver", HOST, str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=_server_environment(),
                start_new_session=own_session,
            )
        return cls(process, port, log_path)

    @classmethod
    def start(
        cls: type[_Server], log_dir: Path, *, timeout: float = START_TIMEOUT, attempts: int = 3
    ) -> _Server:
        """Start a server logging to a file in ``log_dir`` and wait until it answers.

        Tries a fresh port if the process exits early (the port was taken between
        choosing it and binding it). Raises :class:`LocalServerError` with the log's
        tail if the server does not come up.
        """
        log_dir.mkdir(parents=True, exist_ok=True)
        last_error: LocalServerError | None = None
        for attempt in range(1, attempts + 1):
            server = cls.spawn(log_dir / f"moto_server-{attempt}.log")
            try:
                server.wait_ready(timeout)
            except LocalServerError as exc:
                exited = not server.running
                server.stop()
                last_error = exc
                if not exited:
                    break  # it neither answered nor exited: retrying will not help
                continue
            except BaseException:
                server.stop()
                raise
            return server
        assert last_error is not None
        raise last_error

    def answers(self) -> bool:
        """Whether the server answers HTTP now."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=2.0)
        try:
            conn.request("GET", "/moto-api/")
            conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
        return True

    def check_running(self) -> None:
        """Raise :class:`LocalServerError` if the process has exited."""
        if self.process.poll() is not None:
            raise LocalServerError(
                f"the local S3 server exited with status {self.process.returncode} before "
                f"answering on port {self.port}; see {self.log_path}:\n{self.log_tail()}"
            )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the server answers HTTP (blocking: not for an event loop)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_running()
            if self.answers():
                return
            if time.monotonic() >= deadline:
                raise LocalServerError(
                    f"the local S3 server did not answer on port {self.port} within "
                    f"{timeout:g} s; see {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Terminate the server (kill it if it does not exit within ``timeout``)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        else:
            self.process.wait()

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def __enter__(self) -> LocalS3Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- its log -----------------------------------------------------------------------

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def serve(host: str, port: int) -> None:  # pragma: no cover - runs in the child process
    """Serve moto's S3 (and its ``/moto-api`` recorder and reset) until terminated."""
    from moto.moto_server import werkzeug_app
    from werkzeug.serving import run_simple

    s3 = werkzeug_app.create_backend_app("s3")
    api = werkzeug_app.create_backend_app("moto_api")

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        target = api if environ.get("PATH_INFO", "").startswith("/moto-api") else s3
        return target(environ, start_response)

    # Newer moto keeps the underscores of S3 metadata names; 5.1.0 has no such handler.
    handler = getattr(werkzeug_app, "MotoRequestHandler", None)
    run_simple(host, port, app, threaded=True, request_handler=handler)


if __name__ == "__main__":  # pragma: no cover - the child process
    serve(sys.argv[1], int(sys.argv[2]))
