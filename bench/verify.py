"""Benchmark: `cpg-daemon verify` over many objects on a local S3 server.

Makes N small files (deterministic), stages them with PutObject (CRC32C, as the
daemon sends) and writes the daemon's journal for them as the daemon would,
then times `cpg-daemon verify` as a subprocess, median of several runs, in
three ways side by side: with the journal (the ETag in one listing proves each
object), without it (HeadObject per object, each file read again), and against
the manifest `cpg-daemon manifest` writes from that journal, as a maintainer
without the files runs it (`verify --manifest`: one listing, no file read).

    .venv/bin/python bench/verify.py --files 100000 --runs 3
    .venv/bin/python bench/verify.py --files 2000 --runs 1     # a smoke run

The server is moto's (the default) or `rclone serve s3` (`--server rclone`, from
the bench's own venv: see bench/compare.py), on 127.0.0.1. moto is slow at listing
(it sorts the whole bucket for every page of 1,000), so it dominates the figure
with the journal; rclone shows the client's own cost. Staging 100,000 objects
takes a few minutes (untimed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import aioboto3  # noqa: E402
from plate import start_moto  # noqa: E402

from cpg_daemon.cli.localserver import free_port  # noqa: E402
from cpg_daemon.core.checksums import ALGORITHMS, encode  # noqa: E402
from cpg_daemon.journal import Discovered, Journal  # noqa: E402

BUCKET = "bench-verify"
PREFIX = "cpg0001-bench/broad/images/"


def start_rclone(base: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`rclone serve s3` on an empty folder, keys bench/bench."""
    rclone = HERE / ".venv" / "bin" / "rclone"
    if not rclone.exists():
        raise SystemExit(f"{rclone} is missing: set up the bench venv (see bench/compare.py)")
    served = base / "served"
    served.mkdir()
    port = free_port()
    log = open(base / "rclone.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [
            str(rclone),
            "serve",
            "s3",
            str(served),
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            "bench,bench",
            "--config",
            "/dev/null",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    raise SystemExit("rclone serve s3 did not start")


def make_files(root: Path, count: int) -> list[str]:
    names = []
    for i in range(count):
        rel = f"Batch1/images/P{i // 10000:02d}/r{i % 10000:05d}-ch1.tiff"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(i.to_bytes(8, "big") * 64)
        names.append(rel)
    return names


async def stage(endpoint: str, root: Path, names: list[str], state: Path) -> None:
    """PUT every file, then journal the uploads as the daemon does (untimed)."""
    crc = ALGORITHMS["CRC32C"]
    session = aioboto3.Session(
        aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
    )
    journal = await Journal.open(state / "journal.sqlite3")
    async with session.client("s3", endpoint_url=endpoint) as client:
        await client.create_bucket(Bucket=BUCKET)
        queue = iter(names)
        etags: dict[str, tuple[str, str]] = {}

        async def put() -> None:
            for rel in queue:
                data = (root / rel).read_bytes()
                checksum = encode(crc.digest(data))
                reply = await client.put_object(
                    Bucket=BUCKET, Key=PREFIX + rel, Body=data, ChecksumCRC32C=checksum
                )
                etags[rel] = (reply["ETag"], checksum)

        await asyncio.gather(*(put() for _ in range(32)))
    found = []
    for rel in names:
        info = (root / rel).stat()
        found.append(Discovered(rel, BUCKET, PREFIX + rel, info.st_size, info.st_mtime_ns))
    await journal.record_discovered("images", found)
    records = await journal.claim(len(names), ["images"])
    for record in records:
        etag, checksum = etags[record.rel_path]
        await journal.mark_uploaded(
            record, etag=etag, checksum_algorithm="CRC32C", checksum=checksum
        )
    await journal.close()


def write_config(path: Path, state: Path, endpoint: str, root: Path) -> None:
    path.write_text(
        f'[daemon]\nstate_dir = "{state}"\nsocket = "{state}/control.sock"\n'
        f'[s3]\nendpoint_url = "{endpoint}"\n[credentials]\nsource = "environment"\n'
        f'[[watch]]\nname = "images"\npath = "{root}"\n'
        f'destination = "s3://{BUCKET}/{PREFIX}"\n',
        encoding="utf-8",
    )


def timed_verify(config: Path, *extra: str) -> tuple[float, float, int, str]:
    """Wall seconds, CPU seconds, peak RSS (KiB) and the summary line of one run."""
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "cpg_daemon", "verify", "-c", str(config), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench"),
    )
    assert process.stdout is not None and process.stderr is not None
    out, err = process.stdout.read(), process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"verify failed:\n{out.decode()}\n{err.decode()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, out.decode().strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--server", choices=("moto", "rclone"), default="moto")
    parser.add_argument(
        "--modes",
        default="journal,none,manifest",
        help="which of journal, none, manifest to time (none is slow: a HEAD per object)",
    )
    args = parser.parse_args()
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory(prefix="cpg-bench-verify-") as tmp:
        base = Path(tmp)
        root, state, bare = base / "outbox", base / "state", base / "no-journal"
        for folder in (root, state, bare):
            folder.mkdir()
        if args.server == "rclone":
            rclone, endpoint = start_rclone(base)

            def stop() -> None:
                rclone.terminate()
                rclone.wait()
        else:
            moto = start_moto(base / "moto")
            endpoint, stop = moto.endpoint_url, moto.stop
        try:
            names = make_files(root, args.files)
            started = time.monotonic()
            asyncio.run(stage(endpoint, root, names, state))
            print(f"staged {len(names):,} objects in {time.monotonic() - started:.0f} s")
            with_journal, without = base / "with.toml", base / "without.toml"
            write_config(with_journal, state, endpoint, root)
            write_config(without, bare, endpoint, root)
            listed = base / "manifest.jsonl"
            command = [sys.executable, "-m", "cpg_daemon", "manifest", "-c", str(with_journal)]
            subprocess.run(
                [*command, "-o", str(listed)],
                check=True,
                capture_output=True,
            )
            results: dict[str, list[tuple[float, float, int, str]]] = {m: [] for m in modes}
            timers = {
                "journal": lambda: timed_verify(with_journal),
                "none": lambda: timed_verify(without),
                "manifest": lambda: timed_verify(without, "--manifest", str(listed)),
            }
            for _ in range(args.runs):  # interleaved: A B C A B C ...
                for mode in modes:
                    results[mode].append(timers[mode]())
        finally:
            stop()
    print(f"verify of {args.files:,} objects on {args.server}, median of {args.runs} runs:")
    medians = {}
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        rss = statistics.median(r[2] for r in runs) / 1024
        medians[name] = wall
        label = {
            "journal": "with the journal",
            "none": "without a journal",
            "manifest": "--manifest",
        }[name]
        print(f"  {label:18} {wall:6.1f} s wall, {cpu:6.1f} s CPU, {rss:5.0f} MiB peak RSS")
        print(f"  {'':18} {runs[-1][3]}")
    if "none" in medians and "journal" in medians:
        print(f"  without / with: {medians['none'] / medians['journal']:.1f}x the time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
