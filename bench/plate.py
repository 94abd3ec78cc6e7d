"""Benchmark: `cpg-daemon upload` of a plate of images plus large files to a local S3 server.

Measures wall time, client CPU seconds and peak RSS of the `cpg-daemon upload` process
(os.wait4), files/s and MB/s, as the median of several runs with a fresh bucket and a
fresh journal each time, then checks every object byte for byte against the disk.

    .venv/bin/python bench/plate.py                     # 1000 x 2 MiB + 2 x 1 GiB, 3 runs
    .venv/bin/python bench/plate.py --files 50 --large 0 --runs 1   # a smoke run

The server is moto's (installed with the `server` extra), on 127.0.0.1 only. It is a
Python server, slower than S3 and than the client, so these figures describe the whole
loop on one 2-core machine, not the client alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

if TYPE_CHECKING:
    from cpg_daemon.cli.localserver import LocalS3Server

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024


def parse_size(text: str) -> int:
    sys.path.insert(0, str(HERE.parent))
    from cpg_daemon.core.units import parse_size as parse

    return parse(text)


def make_dataset(root: Path, files: int, file_size: int, large: int, large_size: int) -> Path:
    """Deterministic data; reused when it already exists with the same shape."""
    name = f"plate-{files}x{file_size}-{large}x{large_size}"
    data = root / name
    done = data / ".complete"
    if done.exists():
        return data
    rng = random.Random(7)
    block = rng.randbytes(MiB)
    for i in range(files):
        path = data / "images" / f"r{i // 24 + 1:02d}c{i % 24 + 1:02d}f01p01-ch1sk1fk1fl1.tiff"
        path.parent.mkdir(parents=True, exist_ok=True)
        head = i.to_bytes(8, "big")  # every file distinct
        path.write_bytes((head + block * (file_size // MiB + 1))[:file_size])
    for i in range(large):
        path = data / "backend" / f"plate_{i}.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            written = 0
            counter = 0
            while written < large_size:
                chunk = (counter.to_bytes(8, "big") + block)[: min(MiB, large_size - written)]
                handle.write(chunk)
                written += len(chunk)
                counter += 1
    done.write_text("ok")
    return data


def start_moto(log_dir: Path) -> LocalS3Server:
    sys.path.insert(0, str(HERE.parent))
    from cpg_daemon.cli.localserver import LocalS3Server

    return LocalS3Server.start(log_dir)


def run_upload(
    data: Path, bucket: str, endpoint: str, state: Path, extra: list[str]
) -> dict[str, float]:
    command = [
        sys.executable,
        "-m",
        "cpg_daemon",
        "upload",
        str(data),
        f"s3://{bucket}/bench/",
        "--endpoint-url",
        endpoint,
        "--state-dir",
        str(state),
        "--quiet",
        *extra,
    ]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    output = process.stdout.read().decode() if process.stdout else ""
    if process.stdout:
        process.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"upload failed: {output}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_mib": usage.ru_maxrss / 1024,
    }


def _sha256(stream: Any) -> bytes:
    digest = hashlib.sha256()
    while chunk := stream.read(8 * MiB):
        digest.update(chunk)
    return digest.digest()


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"}, response_checksum_validation="when_required"
        ),
    )


def verify(client: object, bucket: str, data: Path) -> int:
    """Every local file read back from the server byte for byte; returns the count."""
    count = 0
    for path in sorted(p for p in data.rglob("*") if p.is_file() and p.name != ".complete"):
        key = "bench/" + path.relative_to(data).as_posix()
        body = client.get_object(Bucket=bucket, Key=key)["Body"]  # type: ignore[attr-defined]
        with path.open("rb") as handle:
            if _sha256(body) != _sha256(handle):
                raise AssertionError(f"{key} differs from {path}")
        count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--file-size", default="2MiB")
    parser.add_argument("--large", type=int, default=2)
    parser.add_argument("--large-size", default="1GiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("upload_args", nargs="*", help="extra flags for cpg-daemon upload")
    args = parser.parse_args()
    file_size, large_size = parse_size(args.file_size), parse_size(args.large_size)
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_dataset(args.out / "data", args.files, file_size, args.large, large_size)
    total_bytes = args.files * file_size + args.large * large_size
    total_files = args.files + args.large
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    server = start_moto(args.out / "moto")
    try:
        endpoint = server.endpoint_url
        client = s3_client(endpoint)
        runs = []
        bucket = ""
        for _ in range(args.runs):
            if bucket:  # free the server's memory before the next run (untimed)
                server.stop()
                server = start_moto(args.out / "moto")
                endpoint = server.endpoint_url
                client = s3_client(endpoint)
            bucket = f"bench-{uuid.uuid4().hex[:10]}"
            client.create_bucket(Bucket=bucket)
            state = args.out / "state" / bucket
            runs.append(run_upload(data, bucket, endpoint, state, args.upload_args))
        identical = verify(client, bucket, data)
    finally:
        server.stop()
    wall = statistics.median(r["wall_s"] for r in runs)
    result = {
        "files": total_files,
        "bytes": total_bytes,
        "runs": runs,
        "median_wall_s": round(wall, 2),
        "median_cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 2),
        "max_rss_mib": round(max(r["max_rss_mib"] for r in runs), 1),
        "files_per_s": round(total_files / wall, 1),
        "mb_per_s": round(total_bytes / 1e6 / wall, 1),
        "objects_byte_identical": identical,
    }
    (args.out / "plate.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
