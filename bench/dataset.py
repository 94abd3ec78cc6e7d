"""Benchmark: `cpg-daemon check-dataset` over a large dataset on a local S3 server.

Stages a dataset laid out as the gallery's guide lays it out (empty objects: only keys
matter here) on moto, then times the command as a subprocess, and, in this process,
the listing it makes (level by level, then each plate folder whole, 32 in flight)
against one ListObjectsV2 of the whole prefix, page after page. Median of --runs.

    .venv/bin/python bench/dataset.py --objects 100000 --runs 3
    .venv/bin/python bench/dataset.py --objects 5000 --runs 1     # a smoke run

moto answers one request at a time per core and sorts the whole bucket for every
page of 1,000, so the server's time dominates and the two listings take the same time
there (measured: 100,004 objects, 88 s and 90 s; the command 89 s wall, 12 s of its
own CPU); on S3, which serves requests in parallel, the parallel listing's gain is up
to the number of requests in flight. Staging 100,000 objects takes a few minutes
(untimed, 32 PutObject in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import os
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

from cpg_daemon.core.config import S3Config  # noqa: E402
from cpg_daemon.core.objectkeys import S3Location  # noqa: E402
from cpg_daemon.engine.dataset import PLATE_DEPTH, list_prefix, open_store  # noqa: E402
from cpg_daemon.ops import logs  # noqa: E402

BUCKET = "bench-dataset"
SOURCE = "cpg0001-bench/broad/"
PER_PLATE = 2_000
"""Objects per plate: 1,700 images, 5 illum, 2 LoadData CSVs, 2 backend, 290 analysis, 1 profile."""


def dataset_keys(objects: int) -> list[str]:
    """About ``objects`` keys: plates of PER_PLATE objects, 25 plates a batch."""
    keys = []
    plates = max(1, objects // PER_PLATE)
    for index in range(plates):
        batch = f"2024_01_{index // 25 + 1:02d}_Batch{index // 25 + 1}"
        plate = f"BR{index:08d}"
        full = f"{plate}__2024-01-01T00_00_00-Measurement1"
        keys += [f"images/{batch}/images/{full}/Images/r{i:04d}-ch1.tiff" for i in range(1_700)]
        keys += [f"images/{batch}/illum/{plate}/{plate}_Illum{c}.npy" for c in "ABCDE"]
        keys += [f"workspace/load_data_csv/{batch}/{plate}/load_data{s}.csv" for s in ("", "_w")]
        keys += [f"workspace/backend/{batch}/{plate}/{plate}.{x}" for x in ("sqlite", "csv")]
        keys += [
            f"workspace/analysis/{batch}/{plate}/analysis/{plate}-A{i:02d}-1/Cells.csv"
            for i in range(290)
        ]
        keys.append(f"workspace/profiles/{batch}/{plate}/{plate}.csv.gz")
    for batch in sorted({key.split("/")[1] for key in keys if key.startswith("images/")}):
        keys += [
            f"workspace/metadata/platemaps/{batch}/barcode_platemap.csv",
            f"workspace/metadata/platemaps/{batch}/platemap/map.txt",
        ]
    return keys


def session() -> aioboto3.Session:
    return aioboto3.Session(
        aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
    )


async def stage(endpoint: str, keys: list[str]) -> None:
    async with session().client("s3", endpoint_url=endpoint) as client:
        await client.create_bucket(Bucket=BUCKET)
        queue = iter(keys)

        async def put() -> None:
            for key in queue:
                await client.put_object(Bucket=BUCKET, Key=SOURCE + key, Body=b"")

        await asyncio.gather(*(put() for _ in range(32)))


def timed_command(endpoint: str) -> tuple[float, float, str]:
    """Wall and CPU seconds of one `check-dataset`, and its last line."""
    command = [sys.executable, "-m", "cpg_daemon", "check-dataset", f"s3://{BUCKET}/{SOURCE}"]
    started, before = time.monotonic(), os.times()
    process = subprocess.Popen(
        [*command, "--endpoint-url", endpoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench"),
    )
    out, err = process.communicate()
    wall = time.monotonic() - started
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    if process.returncode != 0:
        output = out.decode() + err.decode()
        raise SystemExit(f"check-dataset exited {process.returncode}:\n{output}")
    lines = out.decode().strip().splitlines()
    return wall, cpu, lines[0] + " / " + lines[-1]


async def timed_listing(endpoint: str, depth: int) -> tuple[float, int, int]:
    """Seconds, objects and requests of one listing of the source prefix."""
    s3 = S3Config(endpoint_url=endpoint)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    async with open_store(s3, None) as store:
        started = time.monotonic()
        listing = await list_prefix(store, S3Location(BUCKET, SOURCE), depth=depth)
        return time.monotonic() - started, len(listing.entries), listing.requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logs.configure("console", "error")
    keys = dataset_keys(args.objects)
    with tempfile.TemporaryDirectory(prefix="cpg-bench-dataset-") as tmp:
        server = start_moto(Path(tmp))
        try:
            endpoint = server.endpoint_url
            started = time.monotonic()
            asyncio.run(stage(endpoint, keys))
            print(f"staged {len(keys):,} objects in {time.monotonic() - started:.0f} s")
            command, parallel, flat = [], [], []
            for _ in range(args.runs):  # interleaved
                command.append(timed_command(endpoint))
                parallel.append(asyncio.run(timed_listing(endpoint, PLATE_DEPTH)))
                flat.append(asyncio.run(timed_listing(endpoint, 0)))
        finally:
            server.stop()
    print(f"check-dataset of {len(keys):,} objects on moto, median of {args.runs} runs:")
    wall = statistics.median(r[0] for r in command)
    cpu = statistics.median(r[1] for r in command)
    print(f"  the command          {wall:6.1f} s wall, {cpu:.1f} s CPU (start-up included)")
    print(f"                       {command[-1][2]}")
    for name, runs in (("parallel listing", parallel), ("one flat listing", flat)):
        seconds = statistics.median(r[0] for r in runs)
        print(f"  {name:20} {seconds:6.1f} s, {runs[-1][1]:,} objects, {runs[-1][2]:,} listings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
