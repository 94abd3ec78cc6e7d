"""A TCP relay in front of the test S3 server that records when the client's bytes arrive.

What a bandwidth limit promises is about the wire, so the test of it measures there:
every connection to :attr:`WireMeter.endpoint_url` is relayed byte for byte to the
upstream server, and each read of the client's bytes is noted with its time
(:meth:`WireMeter.arrivals`). The relay's receive buffer is small, so bytes cannot pile
up unseen on the way in: at most that much arrives late in one lump. Threads, not an
event loop: the code under test owns the test's loop.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType

HOST = "127.0.0.1"
RECEIVE_BUFFER = 64 * 1024


class WireMeter:
    def __init__(self, upstream_url: str) -> None:
        host, _, port = upstream_url.removeprefix("http://").rstrip("/").rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Set before listen(): accepted sockets inherit it (and the TCP window it sets).
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self._listener.bind((HOST, 0))
        self._listener.listen(64)
        self._lock = threading.Lock()
        self._arrivals: list[tuple[float, int]] = []
        """(monotonic time, bytes) of each read from a client; guarded by ``_lock``."""
        self._sockets: list[socket.socket] = []
        """Every socket opened, closed by ``stop``; guarded by ``_lock``."""
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self._listener.getsockname()[1]}"

    def __enter__(self) -> WireMeter:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
        self._thread.join(5)

    def arrivals(self) -> list[tuple[float, int]]:
        with self._lock:
            return list(self._arrivals)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        try:
            while data := source.recv(RECEIVE_BUFFER):
                if record:
                    now = time.monotonic()
                    with self._lock:
                        self._arrivals.append((now, len(data)))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
