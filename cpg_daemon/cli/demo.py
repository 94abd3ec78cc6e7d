"""``cpg-daemon demo``: the whole pipeline on this machine, without AWS.

Starts a local S3-compatible server (moto, from the ``server`` extra) on
127.0.0.1, writes a real configuration file with two watches (images and
workspace, as a facility would set them up), runs the real daemon on it, and
moves a fake plate laid out like the Cell Painting Gallery into the watched
folders. It shows the status over the control socket while the files upload,
checks every object against the disk, and prints where everything is.

The demo owns SIGINT, SIGTERM and SIGHUP from its first line to its last, so an
interruption at any moment, even while the server is starting, stops the
daemon gracefully, stops the server and deletes the temporary folder. A
signal before the sample is verified ends the demo with 128 + the signal's
number (130 for Ctrl-C), as an interrupted command does; once it is verified,
Ctrl-C is the documented way to leave and the exit status is the verdict's.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import shlex
import shutil
import signal
import sqlite3
import struct
import sys
import tempfile
import time
from array import array
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aioboto3
import anyio
import anyio.abc
import anyio.to_thread

from cpg_daemon.cli.localserver import LocalS3Server
from cpg_daemon.core.checksums import ChecksumName
from cpg_daemon.core.config import Config, load_config
from cpg_daemon.core.errors import FatalError
from cpg_daemon.core.units import format_size
from cpg_daemon.journal import JOURNAL_NAME
from cpg_daemon.ops import control, logs
from cpg_daemon.ops.daemon import Daemon
from cpg_daemon.ops.status import StatusReply, from_wire, live_view, render
from cpg_daemon.s3.store import ObjectStore

if TYPE_CHECKING:
    from rich.live import Live

BUCKET = "staging-cellpainting-gallery"
PROJECT = "cpg0000-demo/broad"
"""``<project>/<source>``, as the gallery names them."""
BATCH = "2026_11_25_DemoBatch"
PLATE = "DemoPlate1"
MEASUREMENT = f"{PLATE}__2026-11-25T09_00_00-Measurement1"
WATCHES = {
    "images": f"s3://{BUCKET}/{PROJECT}/images/",
    "workspace": f"s3://{BUCKET}/{PROJECT}/workspace/",
}
"""Watch name (also its folder's name) -> destination."""
CHANNELS = (  # Cell Painting stain, Phenix channel number, Harmony's channel name
    ("Mito", 1, "Alexa 647"),
    ("AGP", 2, "Alexa 568"),
    ("RNA", 3, "488 long"),
    ("ER", 4, "Alexa 488"),
    ("DNA", 5, "HOECHST 33342"),
)
WELLS = tuple((row, column) for row in (1, 2) for column in range(1, 7))
IMAGE_SIDE = 320
"""Pixels per side of each 16-bit image: 200 KiB, a twelfth of a Phenix field."""
CELLS_PER_SITE = 2200
"""Rows per site in each compartment's table: a 25 MiB SQLite file, sent in 8 MiB parts."""
CHECKSUM: ChecksumName = "CRC32C"
VERIFY_TIMEOUT = 60.0
"""Seconds the demo waits for the daemon's verify of one watch."""
SERVER_START_TIMEOUT = 30.0
UPLOAD_TIMEOUT = 120.0
"""Seconds without the whole sample uploaded before the demo stops waiting and verifies."""


def _say(text: str = "") -> None:
    """One line, flushed: CI and a test read the output while the demo runs."""
    print(text, flush=True)


# The sample: one plate as the gallery lays it out.


def _tiff(side: int, pixels: bytes) -> bytes:
    """A baseline little-endian TIFF: one 16-bit grey plane in one strip."""
    entries = (  # (tag, type: 3 SHORT or 4 LONG, value), in tag order
        (256, 4, side),  # ImageWidth
        (257, 4, side),  # ImageLength
        (258, 3, 16),  # BitsPerSample
        (259, 3, 1),  # Compression: none
        (262, 3, 1),  # PhotometricInterpretation: BlackIsZero
        (273, 4, 8 + 2 + 12 * 9 + 4),  # StripOffsets: right after this directory
        (277, 3, 1),  # SamplesPerPixel
        (278, 4, side),  # RowsPerStrip
        (279, 4, len(pixels)),  # StripByteCounts
    )
    head = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, kind, value in entries:
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        head += struct.pack("<HHI", tag, kind, 1) + packed
    return head + struct.pack("<I", 0) + pixels


def _npy(side: int, values: array[float]) -> bytes:
    """A NumPy ``.npy`` file (format 1.0) of float32, as CellProfiler saves illumination."""
    order = "<" if sys.byteorder == "little" else ">"
    header = f"{{'descr': '{order}f4', 'fortran_order': False, 'shape': ({side}, {side}), }}"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(values)


def _image_name(row: int, column: int, channel: int) -> str:
    return f"r{row:02d}c{column:02d}f01p01-ch{channel}sk1fk1fl1.tiff"


def _index_xml() -> bytes:
    """The Phenix's ``Index.idx.xml``: the plate and one entry per image."""
    wells = "".join(f'<Well id="{r:02d}{c:02d}" />' for r, c in WELLS)
    images = "".join(
        f'\n    <Image Version="1"><id>{r:02d}{c:02d}K1F1P1R{ch}</id>'
        f"<URL>{_image_name(r, c, ch)}</URL><Row>{r}</Row><Col>{c}</Col>"
        f"<FieldID>1</FieldID><PlaneID>1</PlaneID><TimepointID>1</TimepointID>"
        f"<ChannelID>{ch}</ChannelID><ChannelName>{name}</ChannelName>"
        f"<ImageSizeX>{IMAGE_SIDE}</ImageSizeX><ImageSizeY>{IMAGE_SIDE}</ImageSizeY></Image>"
        for r, c in WELLS
        for _, ch, name in CHANNELS
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<EvaluationInputData xmlns="http://www.perkinelmer.com/PEHH/HarmonyV6" Version="2">\n'
        "  <User>cpg-daemon demo</User>\n"
        f"  <Plates><Plate><PlateID>{PLATE}</PlateID>"
        "<MeasurementStartTime>2026-11-25T09:00:00+00:00</MeasurementStartTime>"
        f"<Name>{PLATE}</Name><PlateTypeName>384 PerkinElmer CellCarrier Ultra</PlateTypeName>"
        f"<PlateRows>16</PlateRows><PlateColumns>24</PlateColumns>{wells}</Plate></Plates>\n"
        f"  <Images>{images}\n  </Images>\n"
        "</EvaluationInputData>\n"
    ).encode()


def _well(row: int, column: int) -> str:
    return f"{'ABCDEFGHIJKLMNOP'[row - 1]}{column:02d}"


def _load_data_csv() -> bytes:
    """CellProfiler's LoadData input: one row per site, a file name and folder per stain."""
    images = f"s3://{BUCKET}/{PROJECT}/images/{BATCH}/images/{MEASUREMENT}/Images/"
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    stains = sorted(CHANNELS, key=lambda c: ("DNA", "ER", "RNA", "AGP", "Mito").index(c[0]))
    writer.writerow(
        ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
        + [f"{kind}_Orig{stain}" for stain, _, _ in stains for kind in ("FileName", "PathName")]
    )
    for r, c in WELLS:
        row = [PLATE, _well(r, c), "1"]
        for _, channel, _ in stains:
            row += [_image_name(r, c, channel), images]
        writer.writerow(row)
    return out.getvalue().encode()


PLATE_MAP = "DemoMap1"


def _platemap() -> tuple[bytes, bytes]:
    """The metadata the gallery requires: ``barcode_platemap.csv`` and the plate map itself."""
    barcodes = f"Assay_Plate_Barcode,Plate_Map_Name\n{PLATE},{PLATE_MAP}\n".encode()
    rows = ["plate_map_name\twell_position\tpert_type"]
    for index, (r, c) in enumerate(WELLS):
        rows.append(f"{PLATE_MAP}\t{_well(r, c)}\t{'negcon' if index % 6 == 0 else 'trt'}")
    return barcodes, ("\n".join(rows) + "\n").encode()


def _backend_sqlite(path: Path, rng: random.Random) -> None:
    """A CellProfiler-style backend: an Image table and per-cell features per compartment."""
    features = ["AreaShape_Area", "AreaShape_Eccentricity", "AreaShape_FormFactor"]
    for stain, _, _ in CHANNELS:
        features += [
            f"Intensity_MeanIntensity_{stain}",
            f"Intensity_IntegratedIntensity_{stain}",
            f"Intensity_StdIntensity_{stain}",
            f"Texture_Contrast_{stain}_3_00_256",
            f"Granularity_1_{stain}",
            f"RadialDistribution_FracAtD_{stain}_1of4",
        ]
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode = OFF")  # no -journal file beside it in the outbox
        db.execute(
            "CREATE TABLE Image (ImageNumber INTEGER PRIMARY KEY, Image_Metadata_Plate TEXT, "
            "Image_Metadata_Well TEXT, Image_Metadata_Site INTEGER, Image_Count_Cells INTEGER)"
        )
        db.executemany(
            "INSERT INTO Image VALUES (?, ?, ?, 1, ?)",
            [(i, PLATE, _well(r, c), CELLS_PER_SITE) for i, (r, c) in enumerate(WELLS, 1)],
        )
        rnd = rng.random
        for compartment in ("Cells", "Cytoplasm", "Nuclei"):
            columns = ", ".join(f"{compartment}_{f} REAL" for f in features)
            db.execute(
                f"CREATE TABLE {compartment} (ImageNumber INTEGER, ObjectNumber INTEGER, "
                f"{columns}, PRIMARY KEY (ImageNumber, ObjectNumber))"
            )
            db.executemany(
                f"INSERT INTO {compartment} VALUES ({', '.join('?' * (len(features) + 2))})",
                (
                    (image, cell, *[rnd() for _ in features])
                    for image in range(1, len(WELLS) + 1)
                    for cell in range(1, CELLS_PER_SITE + 1)
                ),
            )
        db.commit()
    finally:
        db.close()


def make_sample(root: Path, seed: int = 2026) -> dict[str, int]:
    """One plate below ``root/<watch>/``; returns each file's path below ``root`` and size."""
    rng = random.Random(seed)
    images = root / "images" / BATCH / "images" / MEASUREMENT / "Images"
    illum = root / "images" / BATCH / "illum" / PLATE
    backend = root / "workspace" / "backend" / BATCH / PLATE
    load_data = root / "workspace" / "load_data_csv" / BATCH / PLATE
    platemaps = root / "workspace" / "metadata" / "platemaps" / BATCH
    for folder in (images, illum, backend, load_data, platemaps / "platemap"):
        folder.mkdir(parents=True)
    for r, c in WELLS:
        for _, channel, _ in CHANNELS:
            pixels = rng.randbytes(IMAGE_SIDE * IMAGE_SIDE * 2)
            (images / _image_name(r, c, channel)).write_bytes(_tiff(IMAGE_SIDE, pixels))
    (images / "Index.idx.xml").write_bytes(_index_xml())
    # Illumination functions: smooth, brighter in the middle, one per stain.
    middle = (IMAGE_SIDE - 1) / 2
    profile = [1 - ((i - middle) / IMAGE_SIDE) ** 2 for i in range(IMAGE_SIDE)]
    for strength, (stain, _, _) in enumerate(CHANNELS, 1):
        values = array("f", (1 + 0.1 * strength * y * x for y in profile for x in profile))
        (illum / f"{PLATE}_Illum{stain}.npy").write_bytes(_npy(IMAGE_SIDE, values))
    _backend_sqlite(backend / f"{PLATE}.sqlite", rng)
    (load_data / "load_data.csv").write_bytes(_load_data_csv())
    barcodes, platemap = _platemap()
    (platemaps / "barcode_platemap.csv").write_bytes(barcodes)
    (platemaps / "platemap" / f"{PLATE_MAP}.txt").write_bytes(platemap)
    return {
        path.relative_to(root).as_posix(): path.stat().st_size
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# The configuration: a real file, read by the code that reads /etc/cpg-daemon/config.toml.

CONFIG_TEMPLATE = """\
# Written by `cpg-daemon demo`: a real configuration, read by the same code as
# /etc/cpg-daemon/config.toml (config.example.toml documents every key).
# The demo deletes it, with the rest of {base}, when it ends.

[daemon]
# The journal: every file and every finished part.
state_dir = {state_dir}
# What `cpg-daemon status -s ...` talks to.
socket = {socket}
log_level = "warning"
# On Ctrl-C, in-flight requests get this long to finish.
drain_timeout = "5s"

[s3]
# The local S3 server (moto), not AWS.
endpoint_url = {endpoint_url}
# Sent with every request; the demo checks it afterwards.
checksum = "CRC32C"
# Small parts, so that the SQLite file goes up in several.
part_size = "8MiB"
multipart_threshold = "16MiB"

[credentials]
# The demo sets dummy keys in the environment; the local server takes any.
source = "environment"

[[watch]]
name = "images"
path = {images_path}
destination = {images_destination}
# A file is finished once unchanged this long (30s unless set).
settle = "1s"

[[watch]]
name = "workspace"
path = {workspace_path}
destination = {workspace_destination}
settle = "1s"
"""


def _toml(value: object) -> str:
    """A TOML basic string (JSON's escapes are valid TOML)."""
    return json.dumps(str(value))


def write_config(base: Path, endpoint_url: str) -> Path:
    path = base / "config.toml"
    path.write_text(
        CONFIG_TEMPLATE.format(
            base=base,
            state_dir=_toml(base / "state"),
            socket=_toml(base / "control.sock"),
            endpoint_url=_toml(endpoint_url),
            images_path=_toml(base / "outbox" / "images"),
            images_destination=_toml(WATCHES["images"]),
            workspace_path=_toml(base / "outbox" / "workspace"),
            workspace_destination=_toml(WATCHES["workspace"]),
        )
    )
    return path


# The local S3 server.


async def _wait_ready(server: LocalS3Server) -> None:
    """Wait until the server answers (each probe in a worker thread)."""
    try:
        with anyio.fail_after(SERVER_START_TIMEOUT):
            while not await anyio.to_thread.run_sync(server.answers):
                if not server.running:
                    raise FatalError(
                        f"the local S3 server exited at start-up; see {server.log_path}"
                    )
                await anyio.sleep(0.1)
    except TimeoutError:
        raise FatalError(
            f"the local S3 server did not start in {SERVER_START_TIMEOUT:g} s; "
            f"see {server.log_path}"
        ) from None


@contextlib.asynccontextmanager
async def local_s3(log_path: Path) -> AsyncIterator[LocalS3Server]:
    """Start the server; stop it on the way out, whatever happened (shielded)."""
    # On the event loop, not in a worker thread: a cancellation that arrived while a
    # thread started it would lose the process, and fork/exec takes milliseconds.
    # Its own session: Ctrl-C in the terminal reaches the demo only, which stops the
    # daemon first (in-flight requests finish) and the server after it.
    server = LocalS3Server.spawn(log_path, own_session=True)
    try:
        yield server
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.stop)


async def _create_bucket(endpoint_url: str) -> None:
    async with aioboto3.Session().client(
        "s3", endpoint_url=endpoint_url, region_name="us-east-1"
    ) as client:
        await client.create_bucket(Bucket=BUCKET)


# Verification.


async def _bucket_layout(store: ObjectStore) -> list[str]:
    """One line per folder of objects under the demo project, as the gallery lays them out."""
    folders: dict[str, list[int]] = {}
    names: dict[str, str] = {}
    async for obj in store.list_objects(BUCKET, PROJECT + "/"):
        folder, _, name = obj.key.rpartition("/")
        folders.setdefault(folder, []).append(obj.size)
        names[folder] = name
    lines = []
    for folder, sizes in sorted(folders.items()):
        if len(sizes) == 1:
            lines.append(f"s3://{BUCKET}/{folder}/{names[folder]}  {format_size(sizes[0])}")
        else:
            total = format_size(sum(sizes))
            lines.append(f"s3://{BUCKET}/{folder}/  {len(sizes)} objects, {total}")
    return lines


# The demo itself.


def _self_command() -> str:
    """How to run this same cpg-daemon from another terminal, ready to paste."""
    script = Path(sys.argv[0])
    if script.name == "cpg-daemon":
        found = shutil.which("cpg-daemon")
        if found and Path(found).resolve() == script.resolve():
            return "cpg-daemon"
        return shlex.quote(str(script.absolute()))
    return f"{shlex.quote(sys.executable)} -m cpg_daemon"


def _progress_line(status: StatusReply, total_files: int, total_bytes: int) -> str:
    files = status["files"]
    return (
        f"{files['uploaded']}/{total_files} files, {format_size(status['bytes']['uploaded'])} "
        f"of {format_size(total_bytes)} uploaded; {files['uploading']} uploading, "
        f"{files['queued']} queued, {files.get('settling', 0)} settling, {files['failed']} failed"
    )


class _Demo:
    """One run: the folders, the server, the daemon, and who stops what on a signal."""

    def __init__(self, base: Path, once: bool) -> None:
        self.base = base
        self.once = once
        self.terminal = sys.stdout.isatty()
        self.started = time.monotonic()
        self.show = anyio.CancelScope()
        """The part a newcomer watches; a first signal cancels it, the daemon runs on."""
        self.stopping = False
        self.interrupted: signal.Signals | None = None
        self.verdict: int | None = None
        """0 when every sample file was verified, 1 when not; None until verified."""
        self.daemon: Daemon | None = None
        self.daemon_done = anyio.Event()
        self.config: Config | None = None

    def exit_status(self) -> int:
        if self.verdict is not None:
            return self.verdict
        if self.interrupted is not None:
            return 128 + self.interrupted
        return 1

    async def run(self, signals: AsyncIterator[signal.Signals]) -> None:
        async with local_s3(self.base / "s3-server.log") as server:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._on_signals, signals, tg.cancel_scope)
                with self.show:
                    await self._show(server, tg)
                self.stopping = True
                if self.daemon is not None:
                    _say("stopping the daemon (in-flight uploads finish first) ...")
                    self.daemon.request_stop()
                    await self.daemon_done.wait()
                tg.cancel_scope.cancel()
            _say("stopping the local S3 server ...")

    async def _on_signals(
        self, signals: AsyncIterator[signal.Signals], everything: anyio.CancelScope
    ) -> None:
        async for signum in signals:
            if not self.stopping:
                self.stopping = True
                if self.verdict is None:
                    self.interrupted = signal.Signals(signum)
                    _say(f"\ninterrupted ({self.interrupted.name}): cleaning up")
                self.show.cancel()
            else:
                _say(f"\n{signal.Signals(signum).name} again: stopping now")
                everything.cancel()

    async def _run_daemon(self, daemon: Daemon) -> None:
        try:
            await daemon.run()
        finally:
            self.daemon_done.set()

    async def _show(self, server: LocalS3Server, tg: anyio.abc.TaskGroup) -> None:
        """Everything a newcomer watches, step by step."""
        _say("cpg-daemon demo: a local S3 server, the real daemon and a fake plate; no AWS needed")
        _say(f"  temporary folder  {self.base} (deleted when the demo ends)")
        _say(
            f"  local S3 server   {server.endpoint_url} (moto, pid {server.process.pid}), "
            f"bucket {BUCKET}"
        )
        _say(f"  server log        {server.log_path}")
        # Made while the server starts; moved into the watched folders once the daemon runs.
        sizes = await anyio.to_thread.run_sync(make_sample, self.base / "staging")
        try:
            await _wait_ready(server)
        except FatalError as exc:
            print(f"cpg-daemon demo: {exc}", file=sys.stderr, flush=True)
            return
        await _create_bucket(server.endpoint_url)
        config = self._configure(server)
        daemon = self.daemon = Daemon(config, handle_signals=False)
        tg.start_soon(self._run_daemon, daemon)
        await daemon.wait_running()
        await self._upload(config, sizes)
        await self._verify(config, len(sizes))
        if not self.once:
            await self._keep_running(config)

    def _configure(self, server: LocalS3Server) -> Config:
        """The watched folders and a real configuration file, read as the daemon reads it."""
        for name in WATCHES:
            (self.base / "outbox" / name).mkdir(parents=True)
        path = write_config(self.base, server.endpoint_url)
        config = self.config = load_config(path)
        logs.configure(config.daemon.log_format, config.daemon.log_level)
        _say(f"  config file       {path}")
        _say(f"  journal           {config.daemon.state_dir / JOURNAL_NAME}")
        _say(f"  control socket    {config.daemon.socket}")
        for watch in config.watches:
            _say(f"  watch {watch.name:<11} {watch.path}/ -> {watch.destination}")
        if not self.once:
            _say(f"  from another terminal, while the demo runs: {self._status_command()}")
        return config

    def _status_command(self) -> str:
        assert self.config is not None
        return f"{_self_command()} status -s {shlex.quote(str(self.config.daemon.socket))}"

    async def _upload(self, config: Config, sizes: dict[str, int]) -> None:
        """Move the plate in, as a person would, and follow the status until it is up."""
        total = sum(sizes.values())
        in_parts = any(size >= config.s3.multipart_threshold for size in sizes.values())
        _say(
            f"moving a plate into the watched folders, as a person would: {len(sizes)} files, "
            f"{format_size(total)} (TIFFs and Index.idx.xml, illumination .npy files, "
            f"load_data.csv, the platemap, the backend SQLite file"
            f"{' in parts' if in_parts else ''})"
        )
        staging = self.base / "staging"
        for name in WATCHES:
            for entry in sorted((staging / name).iterdir()):
                destination = self.base / "outbox" / name / entry.name
                await anyio.to_thread.run_sync(os.rename, entry, destination)
        reply = await self._follow_upload(config, len(sizes), total)
        _say("cpg-daemon status (asked over the control socket, as `status` does):")
        _say("  " + render(reply).replace("\n", "\n  "))

    async def _verify(self, config: Config, sample_files: int) -> None:
        """``cpg-daemon verify``, asked of the running daemon per watch; sets the verdict."""
        _say(
            "cpg-daemon verify (asked over the control socket, as `verify --via-daemon` does): "
            f"every file's presence, size and {CHECKSUM} against its object"
        )
        matched = problems = 0
        for watch in config.watches:
            reply = await anyio.to_thread.run_sync(
                partial(
                    control.request,
                    config.daemon.socket,
                    "verify",
                    {"watch": watch.name},
                    timeout=VERIFY_TIMEOUT,
                )
            )
            counts = reply["counts"]
            differ = sum(n for status, n in counts.items() if status != "match")
            matched += counts.get("match", 0)
            problems += differ
            _say(
                f"  {watch.name:<10} {counts.get('match', 0)} files match, "
                f"{differ} differ, under {watch.destination}"
            )
            for row in reply["rows"]:
                _say(f"    {row['status']}: {row['key']}")
        _say(
            f"verify: {matched} files match their objects (size and {CHECKSUM}), {problems} differ"
        )
        self.verdict = 0 if problems == 0 and matched == sample_files else 1
        async with ObjectStore.connect(aioboto3.Session(), config.s3) as store:
            layout = await _bucket_layout(store)
        _say("in the bucket now, laid out as in the Cell Painting Gallery:")
        for line in layout:
            _say(f"  {line}")

    async def _keep_running(self, config: Config) -> None:
        batch = self.base / "outbox" / "images" / BATCH
        another = batch.with_name(BATCH.replace("_25_", "_26_"))
        _say("the daemon keeps running. From another terminal, try:")
        _say(f"  cp -r {shlex.quote(str(batch))} {shlex.quote(str(another))}")
        _say(f"  {self._status_command()} --watch")
        _say(f"Ctrl-C stops the daemon and the local S3 server, and deletes {self.base}")
        await self._follow_forever(config)

    async def _status(self, config: Config) -> StatusReply:
        reply: dict[str, Any] = await anyio.to_thread.run_sync(
            control.request, config.daemon.socket, "status", None
        )
        return from_wire(reply)

    async def _follow_upload(
        self, config: Config, total_files: int, total_bytes: int
    ) -> StatusReply:
        """Live status until every sample file is uploaded or failed (or time runs out)."""
        started = time.monotonic()

        def finished(status: StatusReply) -> bool:
            files = status["files"]
            late = time.monotonic() - started > UPLOAD_TIMEOUT
            return bool(files["uploaded"] + files["failed"] >= total_files or late)

        if self.terminal:
            from rich.console import Group
            from rich.text import Text

            with self._live(transient=True) as live:
                while True:
                    reply = await self._status(config)
                    elapsed = time.monotonic() - started
                    heading = Text(f"uploading the sample ({elapsed:.1f} s)", style="bold")
                    live.update(Group(heading, live_view(reply)), refresh=True)
                    if finished(reply):
                        break
                    await anyio.sleep(0.5)
            _say(f"uploaded in {time.monotonic() - started:.1f} s")
            return reply
        shown = -1.0
        while True:
            reply = await self._status(config)
            now = time.monotonic()
            done = finished(reply)
            if done or now - shown >= 1.0:
                shown = now
                progress = _progress_line(reply, total_files, total_bytes)
                _say(f"  {now - started:4.1f} s  {progress}")
            if done:
                return reply
            await anyio.sleep(0.2)

    async def _follow_forever(self, config: Config) -> None:
        """The live view until a signal (in a terminal; without one, just wait)."""
        if not self.terminal:
            await anyio.sleep_forever()
            return
        with self._live(transient=False) as live:
            while True:
                live.update(live_view(await self._status(config)), refresh=True)
                await anyio.sleep(0.5)

    @contextlib.contextmanager
    def _live(self, *, transient: bool) -> Iterator[Live]:
        """A rich live view; warnings go above it while it holds the terminal."""
        from rich.live import Live

        assert self.config is not None
        daemon = self.config.daemon
        try:
            with Live(auto_refresh=False, transient=transient) as live:
                if sys.__stderr__ is not None and sys.__stderr__.isatty():
                    logs.configure("console", daemon.log_level, sys.stderr)  # rich's proxy
                yield live
        finally:
            logs.configure(daemon.log_format, daemon.log_level)


def _isolate_aws() -> None:
    """Dummy keys for the local server; nothing from the user's AWS set-up leaks in."""
    os.environ.update(
        AWS_ACCESS_KEY_ID="demo-access-key",
        AWS_SECRET_ACCESS_KEY="demo-secret-key",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        os.environ.pop(name, None)


async def run_demo(once: bool) -> int:
    """Run the demo; 0 when every sample file is uploaded and verified."""
    _isolate_aws()
    # Signals first: from here on, nothing is created that a signal could leave behind.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        base = Path(tempfile.mkdtemp(prefix="cpg-daemon-demo-"))
        demo = _Demo(base, once)
        try:
            await demo.run(signals)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, base, True)
        _say(
            f"deleted {base}; nothing of the demo is left running "
            f"({time.monotonic() - demo.started:.1f} s in all)"
        )
        return demo.exit_status()
