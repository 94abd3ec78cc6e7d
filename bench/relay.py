"""A delay relay on 127.0.0.1: a simulated wide-area link in front of a local S3 server.

    python3 bench/relay.py serve --upstream 127.0.0.1:PORT --link rtt40 [--lifetime 600]
    python3 bench/relay.py selftest --link rtt100+think20+1000mbit

Clients connect to the relay; it connects to the server (--upstream) and forwards bytes
both ways. Each direction is a delay line, not a sleep per connection: a chunk read at t
is written on at t + the one-way delay (RTT / 2), in order, while later chunks keep being
read, so throughput is not capped at one chunk per round trip. Options of a link, written
in its name (`LinkSpec.parse`):

  rtt<ms>      the round trip it adds: half of it each way (rtt40: 20 ms each way).
  +<n>mbit     a bandwidth cap, per direction, shared by every connection: each chunk
               takes len / rate on the wire after the previous one (a token bucket with
               no burst), then the delay.
  +think<ms>   the server's "think time" (S3's first-byte latency, about 20 ms for a
               PUT): the server's first bytes after a request are held that much longer.
               A request is client bytes after the server last spoke; a `100 Continue`
               interim reply is passed on at once (the final reply then waits). Over TLS
               the relay cannot see the replies, so every server reply after client
               bytes waits, handshake messages included: use it over HTTP.
  loopback     no relay at all (the bench connects to the server itself).

A new connection costs a round trip before its first bytes reach the server, as TCP's
handshake does (the client's connect() returns at once on loopback, so the relay holds
the first client bytes until accept + 3 x one-way delay: SYN, SYN-ACK, then the data).
What it does not model: TCP slow start and congestion control (a warm connection sends at
once at full rate), loss, and jitter. A connection's bytes in the line are bounded per
direction by --window (default 8 MiB, a generous TCP window: 8 MiB / 50 ms = 168 MB/s for
one connection over rtt100); beyond it the relay stops reading that side, so the
client's own socket buffers fill and it waits, as for a closed TCP window.

`serve` prints `listening 127.0.0.1:PORT` once it listens, runs until SIGTERM/SIGINT or
--lifetime seconds (it stops by itself: a bench that died cannot leave it running), and
then prints one JSON line of counters. `selftest` starts an echo server on 127.0.0.1 and
a relay process in front of it, and measures over that relay: connect + first round trip,
the median, min and max of --rounds (20) small round trips on the open connection, and
the time to echo --bulk bytes (16 MiB). bench/compare.py and bench/daemon.py use
`RelayProcess` and `selftest`; the relay imports nothing outside the standard library.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
KiB = 1024
MiB = 1024 * KiB
WINDOW = 8 * MiB
START_TIMEOUT = 10.0
PIPELINE_GAP_S = 0.005
_HERE = Path(__file__).resolve()


# ---------------------------------------------------------------- the link


@dataclass(frozen=True)
class LinkSpec:
    """A simulated link: its name as given, the round trip, the think time and a cap."""

    name: str
    rtt_ms: float = 0.0
    think_ms: float = 0.0
    mbit: float = 0.0
    """Bandwidth per direction in Mbit/s (10^6 bits); 0: no cap."""

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """`loopback`, or `rtt<ms>` with optional `+think<ms>` and `+<n>mbit` / `+<n>gbit`."""
        name = text.strip()
        if name == "loopback":
            return cls(name)
        parts = name.split("+")
        first = re.fullmatch(r"rtt(\d+(?:\.\d+)?)", parts[0])
        if first is None:
            raise ValueError(f"a link is loopback or rtt<ms>[+think<ms>][+<n>mbit]; got {text!r}")
        think = mbit = 0.0
        for part in parts[1:]:
            if match := re.fullmatch(r"think(\d+(?:\.\d+)?)", part):
                think = float(match.group(1))
            elif match := re.fullmatch(r"(\d+(?:\.\d+)?)(mbit|gbit)", part):
                mbit = float(match.group(1)) * (1000 if match.group(2) == "gbit" else 1)
            else:
                raise ValueError(f"unknown link option {part!r} in {text!r}")
        return cls(name, float(first.group(1)), think, mbit)

    @property
    def relayed(self) -> bool:
        return self.name != "loopback"

    @property
    def one_way_s(self) -> float:
        return self.rtt_ms / 2000

    @property
    def think_s(self) -> float:
        return self.think_ms / 1000

    @property
    def bytes_per_s(self) -> float | None:
        return self.mbit * 1e6 / 8 if self.mbit else None

    def describe(self) -> str:
        if not self.relayed:
            return "loopback (no relay)"
        text = f"RTT +{self.rtt_ms:g} ms ({self.rtt_ms / 2:g} ms each way)"
        if self.think_ms:
            text += f", server think time {self.think_ms:g} ms"
        if self.mbit:
            text += f", {self.mbit:g} Mbit/s each way"
        return text


class Line:
    """One direction of the link, shared by every connection: the wire's queue and delay."""

    def __init__(self, delay_s: float, bytes_per_s: float | None) -> None:
        self.delay_s = delay_s
        self.bytes_per_s = bytes_per_s
        self._free_at = 0.0
        self.bytes = 0

    def arrival(self, now: float, size: int) -> float:
        """When `size` bytes put on the wire at `now` arrive at the far end."""
        self.bytes += size
        if self.bytes_per_s is None:
            return now + self.delay_s
        self._free_at = max(now, self._free_at) + size / self.bytes_per_s
        return self._free_at + self.delay_s


# ---------------------------------------------------------------- one connection


class Half:
    """One direction of one connection: a queue of (due, chunk), written on when due.

    Reading stops on the source while more than `window` bytes wait in the line and
    resumes below half of it; writing waits while the destination's buffer is full.
    A chunk of None is the source's EOF, passed on as a half-close.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, line: Line, window: int) -> None:
        self._loop = loop
        self._line = line
        self._window = window
        self._queue: deque[tuple[float, bytes | None]] = deque()
        self._held = 0
        self._last_due = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self.not_before = 0.0
        self.source: asyncio.Transport | None = None
        self.dest: asyncio.Transport | None = None
        self.dest_paused = False
        self.eof_queued = False
        self.eof_sent = False
        self.on_eof: list[Callable[[], None]] = []
        """Called once, when the EOF has been passed on and nothing is left to write."""

    def push(self, data: bytes, extra_s: float = 0.0) -> None:
        due = self._line.arrival(self._loop.time(), len(data)) + extra_s
        self._append(max(due, self.not_before), data)
        self._held += len(data)
        if self._held > self._window and self.source is not None and not self._reading_paused:
            self._reading_paused = True
            self.source.pause_reading()

    def push_eof(self) -> None:
        if not self.eof_queued:
            self.eof_queued = True
            self._append(self._loop.time() + self._line.delay_s, None)

    def _append(self, due: float, data: bytes | None) -> None:
        due = max(due, self._last_due)  # in order, whatever the cap or think time did
        self._last_due = due
        self._queue.append((due, data))
        self.arm()

    def arm(self) -> None:
        if self._timer is None and self._queue and self.dest is not None and not self.dest_paused:
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)

    def _flush(self) -> None:
        self._timer = None
        dest = self.dest
        if dest is None or dest.is_closing():
            self._queue.clear()
            return
        now = self._loop.time()
        while self._queue and self._queue[0][0] <= now and not self.dest_paused:
            _, data = self._queue.popleft()
            if data is None:
                self.eof_sent = True
                if dest.can_write_eof():
                    dest.write_eof()
                continue
            self._held -= len(data)
            dest.write(data)
        if self._reading_paused and self._held <= self._window // 2 and self.source is not None:
            self._reading_paused = False
            if not self.source.is_closing():
                self.source.resume_reading()
        self.arm()
        if self.eof_sent and not self._queue:
            callbacks, self.on_eof = self.on_eof, []
            for callback in callbacks:
                callback()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()


class _Side(asyncio.Protocol):
    """The client's or the server's end of a relayed connection."""

    def __init__(self, connection: Connection, outbound: Half, inbound: Half, client: bool) -> None:
        self._connection = connection
        self._outbound = outbound  # what this side sends
        self._inbound = inbound  # what this side receives
        self._client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._outbound.source = transport
        self._inbound.dest = transport
        self._inbound.arm()

    def data_received(self, data: bytes) -> None:
        self._connection.received(self._client, data)

    def eof_received(self) -> bool:
        self._outbound.push_eof()
        return True  # half-close: keep the other direction open

    def pause_writing(self) -> None:
        self._inbound.dest_paused = True

    def resume_writing(self) -> None:
        self._inbound.dest_paused = False
        self._inbound.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection.lost(self._client)


class Connection:
    """One client connection and its connection to the server, through the link."""

    def __init__(self, relay: Relay, accepted_at: float) -> None:
        self._relay = relay
        link = relay.link
        self.up = Half(relay.loop, relay.uplink, relay.window)
        self.down = Half(relay.loop, relay.downlink, relay.window)
        self.up.not_before = accepted_at + 3 * link.one_way_s if relay.handshake else 0.0
        self.client = _Side(self, self.up, self.down, client=True)
        self.server = _Side(self, self.down, self.up, client=False)
        self._awaiting_reply = False
        self.closed = False
        self.up.on_eof.append(self._maybe_close)
        self.down.on_eof.append(self._maybe_close)

    def received(self, from_client: bool, data: bytes) -> None:
        if from_client:
            self._awaiting_reply = True
            self.up.push(data)
            return
        extra = 0.0
        if self._awaiting_reply:
            self._awaiting_reply = False
            if not data.startswith(b"HTTP/1.1 100 "):
                extra = self._relay.link.think_s
                self._relay.replies += 1
        self.down.push(data, extra)

    def _maybe_close(self) -> None:
        if self.up.eof_sent and self.down.eof_sent:
            self.close()

    def lost(self, from_client: bool) -> None:
        """One end went away: what it sent still goes on, then the other end is closed."""
        if self.closed:
            return
        half = self.up if from_client else self.down
        other = self.down if from_client else self.up
        other.close()  # nobody to deliver to
        other.eof_queued = other.eof_sent = True
        if half.eof_sent:
            self.close()
        else:
            half.push_eof()  # then _maybe_close closes the connection

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.up.close()
        self.down.close()
        for side in (self.client, self.server):
            if side.transport is not None:
                side.transport.close()  # flushes what was written, then closes
        self._relay.connections.discard(self)


class Relay:
    """The relay's listening socket and its connections, in one event loop."""

    def __init__(
        self,
        upstream: tuple[str, int],
        link: LinkSpec,
        window: int = WINDOW,
        handshake: bool = True,
    ) -> None:
        if upstream[0] not in (HOST, "localhost"):
            raise ValueError(f"the relay forwards to loopback only, not {upstream[0]}")
        self.upstream = upstream
        self.link = link
        self.window = window
        self.handshake = handshake
        self.loop = asyncio.get_running_loop()
        self.uplink = Line(link.one_way_s, link.bytes_per_s)
        self.downlink = Line(link.one_way_s, link.bytes_per_s)
        self.connections: set[Connection] = set()
        self.accepted = 0
        self.replies = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> int:
        self._server = await self.loop.create_server(self._accept, HOST, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def _accept(self) -> asyncio.Protocol:
        self.accepted += 1
        connection = Connection(self, self.loop.time())
        self.connections.add(connection)
        task = self.loop.create_task(self._connect(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return connection.client

    async def _connect(self, connection: Connection) -> None:
        try:
            transport, _ = await self.loop.create_connection(
                lambda: connection.server, *self.upstream
            )
        except OSError:
            connection.close()
            return
        if connection.closed:  # the client went away meanwhile, with nothing to send
            transport.close()

    def statistics(self) -> dict[str, int]:
        return {
            "connections": self.accepted,
            "replies": self.replies,
            "bytes_up": self.uplink.bytes,
            "bytes_down": self.downlink.bytes,
        }

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


async def serve(
    upstream: tuple[str, int],
    link: LinkSpec,
    lifetime: float,
    window: int = WINDOW,
    handshake: bool = True,
) -> dict[str, int]:
    """Relays until SIGTERM/SIGINT or `lifetime` seconds; returns the counters."""
    relay = Relay(upstream, link, window, handshake)
    port = await relay.start()
    print(f"listening {HOST}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), lifetime)
    await relay.close()
    return relay.statistics()


# ---------------------------------------------------------------- the relay as a process


class RelayProcess:
    """`relay.py serve` as a child process; stop() gives its CPU seconds and counters."""

    def __init__(self, upstream_port: int, link: LinkSpec, lifetime: float, log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.link = link
        self.log = log
        argv = [
            sys.executable,
            str(_HERE),
            "serve",
            "--upstream",
            f"{HOST}:{upstream_port}",
            "--link",
            link.name,
            "--lifetime",
            f"{lifetime:g}",
        ]
        with log.open("ab") as err:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
            )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT)
        line = self.process.stdout.readline().decode() if ready else ""
        match = re.fullmatch(r"listening 127\.0\.0\.1:(\d+)\n", line)
        if match is None:
            self.stop()
            raise RuntimeError(f"the relay did not start ({line!r}); see {log}")
        self.port = int(match.group(1))
        self.endpoint = f"{HOST}:{self.port}"
        self.counters: dict[str, int] = {}

    def stop(self) -> float | None:
        """Stops the relay; its CPU seconds (user + system), None if it had already exited."""
        if self.process.returncode is not None:
            return None
        alive = self.process.poll() is None
        if alive:
            self.process.terminate()
        try:
            _, _, usage = os.wait4(self.process.pid, 0)
            cpu: float | None = usage.ru_utime + usage.ru_stime
        except ChildProcessError:  # reaped by poll(): it had ended by itself
            cpu = None
        self.process.returncode = 0
        assert self.process.stdout is not None
        with contextlib.suppress(ValueError):
            self.counters = json.loads(self.process.stdout.read().decode() or "{}")
        self.process.stdout.close()
        return cpu if alive else None


# ---------------------------------------------------------------- self-test


class EchoServer:
    """Echoes every byte back, one thread per connection, on 127.0.0.1."""

    def __init__(self) -> None:
        self._sock = socket.create_server((HOST, 0))
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(256 * KiB):
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


@dataclass
class SelfTest:
    """What a relay adds, measured over it with an echo server behind it."""

    link: str
    preset_rtt_ms: float
    first_ms: float
    """connect + the first round trip (the handshake round trip included)."""
    rtt_ms: list[float] = field(default_factory=list)
    """Round trips one at a time on the open connection."""
    pipelined_ms: list[float] = field(default_factory=list)
    """Round trips of messages sent PIPELINE_GAP_S apart without waiting for the replies:
    each still takes one RTT (a delay line), not the sum of the ones before it."""
    bulk_bytes: int = 0
    bulk_s: float = 0.0
    relay_cpu_s: float | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.rtt_ms)

    @property
    def pipelined_median_ms(self) -> float:
        return statistics.median(self.pipelined_ms)

    def summary(self) -> str:
        bulk = (
            f"; {self.bulk_bytes / MiB:g} MiB echoed in {self.bulk_s:.2f} s "
            f"({self.bulk_bytes / 1e6 / self.bulk_s:.0f} MB/s each way)"
            if self.bulk_bytes
            else ""
        )
        return (
            f"{self.link}: RTT median {self.median_ms:.1f} ms (min {min(self.rtt_ms):.1f}, "
            f"max {max(self.rtt_ms):.1f}) over {len(self.rtt_ms)} round trips, preset "
            f"{self.preset_rtt_ms:g} ms; connect + first round trip {self.first_ms:.1f} ms; "
            f"{len(self.pipelined_ms)} messages sent {PIPELINE_GAP_S * 1000:g} ms apart "
            f"without waiting came back after a median {self.pipelined_median_ms:.1f} ms "
            f"(max {max(self.pipelined_ms):.1f}){bulk}"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "median_ms": self.median_ms,
            "pipelined_median_ms": self.pipelined_median_ms,
        }


def _exchange(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    got = 0
    while got < len(payload):
        chunk = sock.recv(len(payload) - got)
        if not chunk:
            raise ConnectionError("the relay closed the connection")
        got += len(chunk)


def _pipelined(sock: socket.socket, count: int) -> list[float]:
    """Sends `count` 16-byte messages PIPELINE_GAP_S apart; each one's round trip, in ms."""
    size = 16
    sent: list[float] = []
    back: list[float] = []

    def read() -> None:
        got = 0
        while got < count * size:
            chunk = sock.recv(64 * KiB)
            if not chunk:
                return
            got += len(chunk)
            now = time.perf_counter()
            while len(back) < got // size:
                back.append(now)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    start = time.perf_counter()
    for i in range(count):
        time.sleep(max(0.0, start + i * PIPELINE_GAP_S - time.perf_counter()))
        sent.append(time.perf_counter())
        sock.sendall(i.to_bytes(size, "big"))
    reader.join(30 + count)
    if len(back) < count:
        raise ConnectionError(f"{count - len(back)} of {count} messages did not come back")
    return [(b - a) * 1000 for a, b in zip(sent, back, strict=True)]


def _bulk(sock: socket.socket, size: int) -> None:
    """Sends `size` bytes and reads them back at once (a writer thread, this reader)."""
    block = os.urandom(256 * KiB)

    def write() -> None:
        sent = 0
        while sent < size:
            sent += sock.send(block[: size - sent])

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    got = 0
    while got < size:
        chunk = sock.recv(1 * MiB)
        if not chunk:
            raise ConnectionError("the relay closed the connection")
        got += len(chunk)
    writer.join()


def selftest(
    link: LinkSpec, rounds: int = 20, bulk: int = 16 * MiB, log: Path | None = None
) -> SelfTest:
    """Measures a relay process (as the bench runs it) in front of an echo server."""
    if not link.relayed:
        raise ValueError("loopback has no relay to test")
    echo = EchoServer()
    relay = RelayProcess(echo.port, link, 60 + rounds * link.rtt_ms / 100, log or Path(os.devnull))
    try:
        started = time.perf_counter()
        with socket.create_connection((HOST, relay.port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _exchange(sock, b"x" * 64)
            result = SelfTest(link.name, link.rtt_ms, (time.perf_counter() - started) * 1000)
            for _ in range(rounds):
                began = time.perf_counter()
                _exchange(sock, b"y" * 64)
                result.rtt_ms.append((time.perf_counter() - began) * 1000)
            result.pipelined_ms = _pipelined(sock, rounds)
            if bulk:
                began = time.perf_counter()
                _bulk(sock, bulk)
                result.bulk_s = time.perf_counter() - began
                result.bulk_bytes = bulk
    finally:
        cpu = relay.stop()
        echo.close()
    result.relay_cpu_s = cpu
    return result


# ---------------------------------------------------------------- command line


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="relay to --upstream until stopped or --lifetime")
    run.add_argument("--upstream", type=_hostport, required=True, help="127.0.0.1:PORT")
    run.add_argument("--link", type=LinkSpec.parse, required=True)
    run.add_argument("--lifetime", type=float, default=3600.0, help="seconds, then it stops")
    run.add_argument("--window", type=int, default=WINDOW, help="bytes per direction")
    run.add_argument("--no-handshake", action="store_true", help="no round trip per connect")
    test = commands.add_parser("selftest", help="measure a relay in front of an echo server")
    test.add_argument("--link", type=LinkSpec.parse, default=LinkSpec.parse("rtt40"))
    test.add_argument("--rounds", type=int, default=20)
    test.add_argument("--bulk", type=int, default=16 * MiB, help="bytes echoed (0: none)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        counters = asyncio.run(
            serve(args.upstream, args.link, args.lifetime, args.window, not args.no_handshake)
        )
        print(json.dumps(counters), flush=True)
        return 0
    result = selftest(args.link, args.rounds, args.bulk)
    print(result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
