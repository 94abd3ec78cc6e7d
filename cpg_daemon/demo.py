"""``cpg-daemon demo``: the whole pipeline on this machine, without AWS.

Starts a local S3-compatible server (moto, from the ``server`` extra) on
127.0.0.1, runs the real daemon on a temporary watched folder, drops a sample
Cell Painting batch into it (moved in, as a person would), shows progress,
then checks every object against the disk by size and whole-file CRC32C.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import aioboto3
import anyio
import anyio.to_thread

from cpg_daemon import control, logs
from cpg_daemon.config import Config, CredentialsConfig, DaemonConfig, S3Config, WatchConfig
from cpg_daemon.daemon import Daemon
from cpg_daemon.files import FileStat, whole_file_checksum
from cpg_daemon.keys import parse_s3_uri
from cpg_daemon.status import render
from cpg_daemon.store import ObjectStore
from cpg_daemon.units import format_size

BUCKET = "staging-cellpainting-gallery"
DESTINATION = f"s3://{BUCKET}/cpg0000-demo/broad/images/"
BATCH = "2026_11_25_DemoBatch"
KiB = 1024
MiB = 1024 * KiB


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalS3:
    """moto's S3 server in a subprocess on a free loopback port."""

    def __init__(self, log_path: Path) -> None:
        self.port = _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, S3_IGNORE_SUBDOMAIN_BUCKETNAME="true")
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError("the local S3 server exited at start-up")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError("the local S3 server did not start in time")

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()


def make_sample(root: Path, seed: int = 2026) -> dict[str, int]:
    """A small Cell Painting batch: one plate of images, illumination files, a large image."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for row in "AB":
        for column in range(1, 13):
            for channel in range(1, 4):
                name = f"r{'AB'.index(row) + 1:02d}c{column:02d}f01p01-ch{channel}sk1fk1fl1.tiff"
                files[f"images/DemoPlate1/{name}"] = rng.randbytes(200 * KiB)
    for stain in ("DNA", "ER", "Mito"):
        files[f"illum/DemoPlate1/DemoPlate1_Illum{stain}.npy"] = rng.randbytes(64 * KiB)
    files["images/DemoPlate1/Index.idx.xml"] = b"<EvaluationInputData/>\n"
    # A large stitched overview: big enough to go up in parts.
    files["images/DemoPlate1/DemoPlate1_overview.tiff"] = rng.randbytes(24 * MiB)
    sizes = {}
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        sizes[rel] = len(data)
    return sizes


async def _create_bucket(endpoint_url: str) -> None:
    async with aioboto3.Session().client(
        "s3", endpoint_url=endpoint_url, region_name="us-east-1"
    ) as client:
        await client.create_bucket(Bucket=BUCKET)


async def _verify(config: Config, watch: WatchConfig) -> tuple[int, list[str]]:
    """Compare every local file with its object: size and whole-file CRC32C."""
    problems: list[str] = []
    matched = 0
    async with ObjectStore.connect(aioboto3.Session(), config.s3) as store:
        for path in sorted(p for p in watch.path.rglob("*") if p.is_file()):
            rel = path.relative_to(watch.path).as_posix()
            key = watch.destination.prefix + rel
            remote = await store.head(watch.destination.bucket, key)
            info = path.stat()
            if remote is None:
                problems.append(f"missing: {key}")
                continue
            local = await whole_file_checksum(
                path, "CRC32C", FileStat(info.st_size, info.st_mtime_ns)
            )
            if remote.size != info.st_size or remote.checksums.get("CRC32C") != local:
                problems.append(f"differs: {key}")
            else:
                matched += 1
    return matched, problems


async def _show_progress(daemon: Daemon, total_files: int, total_bytes: int) -> None:
    started = time.monotonic()
    while True:
        stats = await daemon.journal_statistics()
        done = stats.total("uploaded")
        failed = stats.total("failed").files
        elapsed = time.monotonic() - started
        print(
            f"  {done.files}/{total_files} files, {format_size(done.bytes)} of "
            f"{format_size(total_bytes)} uploaded, {failed} failed ({elapsed:.1f} s)",
            flush=True,
        )
        if done.files + failed >= total_files:
            return
        await anyio.sleep(0.5)


async def run_demo(once: bool) -> int:
    """Run the demo; 0 when every sample file is uploaded and verified."""
    os.environ.update(
        AWS_ACCESS_KEY_ID="demo-access-key",
        AWS_SECRET_ACCESS_KEY="demo-secret-key",
        AWS_DEFAULT_REGION="us-east-1",
    )
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        os.environ.pop(name, None)
    with tempfile.TemporaryDirectory(prefix="cpg-daemon-demo-") as tmp:
        base = Path(tmp)
        outbox, staging, state = base / "outbox", base / "staging", base / "state"
        for folder in (outbox, staging, state):
            folder.mkdir()
        server = LocalS3(base / "s3-server.log")
        try:
            await anyio.to_thread.run_sync(server.wait_ready)
            await _create_bucket(server.endpoint_url)
            watch = WatchConfig("demo", outbox, parse_s3_uri(DESTINATION), settle=1.0)
            config = Config(
                None,
                DaemonConfig(state_dir=state, socket=base / "control.sock", log_level="warning"),
                S3Config(
                    endpoint_url=server.endpoint_url,
                    part_size=8 * MiB,
                    multipart_threshold=16 * MiB,
                ),
                (CredentialsConfig(source="environment"),),
                (watch,),
            )
            print(f"local S3 server:  {server.endpoint_url} (bucket {BUCKET})")
            print(f"watched folder:   {outbox}")
            print(f"destination:      {DESTINATION}")
            daemon = Daemon(config)
            code = 0
            async with anyio.create_task_group() as tg:

                async def run_daemon() -> None:
                    await daemon.run()
                    tg.cancel_scope.cancel()

                tg.start_soon(run_daemon)
                await daemon.wait_running()
                sizes = await anyio.to_thread.run_sync(make_sample, staging / BATCH)
                total = sum(sizes.values())
                print(
                    f"dropping a sample batch into the watched folder: {len(sizes)} files, "
                    f"{format_size(total)} (moved in as {BATCH}/)"
                )
                await anyio.to_thread.run_sync(os.rename, staging / BATCH, outbox / BATCH)
                await _show_progress(daemon, len(sizes), total)
                print("cpg-daemon status (asked over the control socket):")
                reply = await anyio.to_thread.run_sync(
                    control.request, config.daemon.socket, "status", None
                )
                print("  " + render(reply).replace("\n", "\n  "))
                matched, problems = await _verify(config, watch)
                for problem in problems:
                    print(f"  {problem}")
                print(
                    f"verify: {matched} files match their objects (size and CRC32C), "
                    f"{len(problems)} differ"
                )
                code = 0 if not problems and matched == len(sizes) else 1
                if once:
                    daemon.request_stop()
                else:
                    print(f"the daemon keeps running: drop files into {outbox}; Ctrl-C stops it")
                    logs.configure("console", "info")  # from now on, show each upload
        finally:
            server.stop()
    return code
