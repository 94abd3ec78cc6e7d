"""Manifests: what was uploaded, checked by someone who does not have the local files."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from daemonproc import (
    ConfigMaker,
    Daemon,
    object_bytes,
    one_watch_config,
    run_cli,
    status_json,
    wait_until,
    write_config,
    write_file,
)
from fakes import AuthProxy, FakeControlPlane, KeyRegistry
from faultproxy import Fault, FaultProxy, Rule, S3Error
from memory_s3 import MemoryStore
from s3server import S3Server

from cpg_daemon.core.checksums import ALGORITHMS, encode
from cpg_daemon.core.objectkeys import (
    is_manifest_key,
    manifest_folder,
    manifest_key,
    parse_s3_uri,
)
from cpg_daemon.core.structure import check_key
from cpg_daemon.engine import manifest
from cpg_daemon.journal import (
    JOURNAL_NAME,
    Discovered,
    Journal,
    Upload,
    counted_uploads,
    read_uploads,
)

ACCOUNT = "309624411020"
PREFIX = "cpg0001-test/broad/images/"


# -- the format ---------------------------------------------------------------------------


def _uploads(prefix: str, files: dict[str, bytes]) -> list[Upload]:
    return [
        Upload(
            rel,
            prefix + rel,
            len(data),
            1_700_000_000_000_000_000,
            f'"{hashlib.md5(data).hexdigest()}"',
            "CRC32C",
            encode(ALGORITHMS["CRC32C"].digest(data)),
            1_700_000_100.0,
        )
        for rel, data in files.items()
    ]


FILES = {"Plate2/b.tiff": b"bbbb", "Plate1/a.tiff": b"aaa", "Plate1/c.csv": b"c,c\n"}


def test_a_manifest_is_json_lines_in_key_order_and_reads_back(tmp_path: Path) -> None:
    destination = parse_s3_uri("s3://bkt/cpg0001-test/broad/images/Batch1/")
    built = manifest.build(
        _uploads(destination.prefix, FILES), destination, "plates", "Batch1", tmp_path
    )
    path = tmp_path / "m.jsonl"
    digest = manifest.write(built, path)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["format"] == "cpg-daemon-manifest/1"
    assert (header["destination"], header["files"], header["bytes"]) == (str(destination), 3, 11)
    assert [json.loads(line)["key"] for line in lines[1:]] == sorted(
        destination.prefix + rel for rel in FILES
    )
    first = json.loads(lines[1])
    assert first == {
        "key": destination.prefix + "Plate1/a.tiff",
        "size": 3,
        "checksum_algorithm": "CRC32C",
        "checksum": encode(ALGORITHMS["CRC32C"].digest(b"aaa")),
        "etag": hashlib.md5(b"aaa").hexdigest(),
        "mtime": "2023-11-14T22:13:20Z",
        "uploaded_at": "2023-11-14T22:15:00Z",
    }
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "m.jsonl.sha256").read_text() == f"{digest}  m.jsonl\n"  # sha256sum -c
    assert manifest.read(path) == built


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("", "is empty"),
        ('{"a": 1}\n', "not a cpg-daemon manifest"),
        ("key,size\n", "line 1: not JSON"),
    ],
)
def test_what_is_not_a_manifest_is_named(tmp_path: Path, text: str, said: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(text)
    with pytest.raises(manifest.ManifestError, match=said):
        manifest.read(path)


def test_a_manifest_cut_short_is_refused(tmp_path: Path) -> None:
    destination = parse_s3_uri("s3://bkt/p/Batch1/")
    path = tmp_path / "m.jsonl"
    built = manifest.build(_uploads("p/Batch1/", FILES), destination, "w", "B", tmp_path)
    manifest.write(built, path)
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(manifest.ManifestError, match="lists 2 objects but its header says 3"):
        manifest.read(path)


@pytest.mark.anyio
async def test_staging_against_a_manifest_names_each_difference(tmp_path: Path) -> None:
    store = MemoryStore()
    store.create_bucket("bkt")
    destination = parse_s3_uri("s3://bkt/p/Batch1/")
    files = {f"Plate{i}/f{i}.tiff": os.urandom(100 + i) for i in range(6)}

    async def put(key: str, data: bytes) -> None:
        await store.put_object("bkt", key, data, encode(store.algorithm.digest(data)))

    for rel, data in files.items():
        await put(destination.prefix + rel, data)
    uploads = []
    for rel in files:
        head = await store.head("bkt", destination.prefix + rel)
        assert head is not None
        name = next(iter(head.checksums))
        uploads.append(
            Upload(rel, head.key, head.size, 0, head.etag, name, head.checksums[name], 0.0)
        )
    listed = manifest.build(uploads, destination, "w", "Batch1", tmp_path)
    matched = await manifest.verify_manifest(listed, store)
    assert matched.ok and matched.counts["match"] == 6

    key = destination.prefix + "Plate{}/f{}.tiff"
    await store.delete_object("bkt", key.format(0, 0))
    same_size = os.urandom(101)  # overwritten: same size, other bytes
    await put(key.format(1, 1), same_size)
    await put(key.format(2, 2), os.urandom(500))
    await put(destination.prefix + "stray.csv", b"x")
    await put("p/Batch2/other.csv", b"y")
    checked = await manifest.verify_manifest(listed, store)
    assert {(row.path, row.status) for row in checked.rows if row.status != "match"} == {
        ("Plate0/f0.tiff", "missing"),
        ("Plate1/f1.tiff", "checksum_mismatch"),
        ("Plate2/f2.tiff", "size_mismatch"),
        ("stray.csv", "extra"),  # under the batch's folder; Batch2 is not this manifest's
    }
    assert checked.counts["match"] == 3


@pytest.mark.anyio
async def test_manifests_uploaded_beside_the_data_are_not_extra(tmp_path: Path) -> None:
    """A manifest whose destination is a whole source folder lists workspace/qc/ too: the
    daemon's own uploaded manifests there are not ``extra``; anything else is."""
    store = MemoryStore()
    store.create_bucket("bkt")
    destination = parse_s3_uri("s3://bkt/cpg0001-x/broad/")
    data = {"images/B1/P1/a.tiff": b"aaa"}
    own = [
        manifest_key(destination, "images", f"images-20251202T164000Z.jsonl{suffix}")
        for suffix in ("", ".sha256")
    ]
    for key, body in [(destination.prefix + rel, b) for rel, b in data.items()] + [
        (key, b"{}") for key in own
    ]:
        await store.put_object("bkt", key, body, encode(store.algorithm.digest(body)))
    listed = manifest.build(_uploads(destination.prefix, data), destination, "w", "", tmp_path)
    checked = await manifest.verify_manifest(listed, store)
    assert [row.status for row in checked.rows] == ["match"]
    stray = destination.prefix + "workspace/qc/upload_manifests/images/notes.txt"
    await store.put_object("bkt", stray, b"x", encode(store.algorithm.digest(b"x")))
    checked = await manifest.verify_manifest(listed, store)
    assert [(row.key, row.status) for row in checked.rows if row.status != "match"] == [
        (stray, "extra")
    ]


# -- uploaded beside the data (upload_manifest) ----------------------------------------------


def test_an_uploaded_manifest_goes_to_the_source_folders_workspace_qc_and_breaks_no_rule(
    tmp_path: Path,
) -> None:
    destination = parse_s3_uri("s3://bkt/cpg0123-example/broad/images/2024_04_01_Batch8/images/")
    path = manifest.batch_path(tmp_path, "batch8-images", "Plate1", 1_764_693_600.0)
    assert path.name == "Plate1-20251202T164000Z.jsonl"
    folder = "cpg0123-example/broad/workspace/qc/upload_manifests/Plate1/"
    for name in (path.name, path.name + ".sha256"):
        key = manifest_key(destination, "Plate1", name)
        assert key == folder + name
        assert check_key(key) == []  # the gallery's folder rules, required and advice alike
        assert is_manifest_key(key)
    assert manifest_folder(parse_s3_uri("s3://bkt/cpg0123-example/broad/")) == parse_s3_uri(
        "s3://bkt/cpg0123-example/broad/workspace/qc/upload_manifests/"
    )
    with pytest.raises(ValueError, match="not under a <project>/<source>/ folder"):
        manifest_folder(parse_s3_uri("s3://bkt/cpg0123-example/"))


@pytest.mark.parametrize(
    "key",
    [
        "cpg0123-example/broad/workspace/qc/upload_manifests/Plate1/notes.jsonl",
        "cpg0123-example/broad/workspace/qc/upload_manifests/Plate1-20251202T164000Z.jsonl",
        "cpg0123-example/broad/workspace/qc/Plate1/Plate1-20251202T164000Z.jsonl",
        "cpg0123-example/broad/workspace/qc/upload_manifests/P/x/P-20251202T164000Z.jsonl",
        "cpg0123-example/broad/images/qc/upload_manifests/P/P-20251202T164000Z.jsonl",
        "cpg0123-example/broad/workspace/qc/upload_manifests/P/P-20251202T164000Z.csv",
    ],
)
def test_only_the_daemons_own_manifests_are_taken_for_its_own(key: str) -> None:
    """What verify leaves out of ``extra`` is exactly an uploaded manifest or its digest."""
    assert not is_manifest_key(key)


# -- the whole hand-over -------------------------------------------------------------------


@pytest.fixture
def plane(bucket: str) -> Iterator[FakeControlPlane]:
    with FakeControlPlane(
        KeyRegistry(), grants=[f"s3://{bucket}/cpg0001-test/*"], expected_account_id=ACCOUNT
    ) as server:
        yield server


@pytest.fixture
def proxy(s3_server: S3Server, plane: FakeControlPlane) -> Iterator[AuthProxy]:
    with AuthProxy(s3_server.endpoint_url, plane.registry) as server:
        yield server


def _report(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


def test_a_maintainer_without_the_files_checks_staging_against_the_batch_manifest(
    tmp_path: Path,
    layout: dict[str, Path],
    make_config: ConfigMaker,
    s3_client: Any,
    bucket: str,
    plane: FakeControlPlane,
    proxy: AuthProxy,
) -> None:
    """The daemon uploads a two-plate batch and writes its manifest; on another machine
    (no local folder, keys of a READ grant) ``verify --manifest`` matches every object,
    then names exactly the one deleted and the one overwritten, and exits 1."""
    batch = layout["watch"] / "2024_01_01_Batch1"
    for plate in ("Plate1", "Plate2"):
        for site in range(3):
            write_file(batch / plate / f"{plate}_s{site}.tiff", os.urandom(5000 + site))
    write_file(batch / "load_data.csv", b"Metadata_Plate,FileName\nPlate1,x\n")
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.3s")
    daemon = Daemon.started(config, tmp_path / "daemon.log")
    try:
        event = daemon.wait_for_event("batch_complete", timeout=60)
        status = json.loads(run_cli("status", "--json", "-c", str(config)).stdout)
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    path = Path(event["manifest"])
    assert path.is_file() and path.parent.parent == layout["state"] / "manifests"
    assert event["manifest_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    (shown,) = status["batches"]["completed"]
    assert (shown["manifest"], shown["manifest_sha256"]) == (str(path), event["manifest_sha256"])
    listed = manifest.read(path)
    assert listed.header.files == 7 and listed.header.batch == "2024_01_01_Batch1"

    # The maintainer's machine: the manifest, a READ grant, no local folder.
    elsewhere = tmp_path / "maintainer"
    elsewhere.mkdir()
    copied = elsewhere / path.name
    copied.write_bytes(path.read_bytes())
    reader = write_config(
        elsewhere / "config.toml",
        state_dir=elsewhere / "state",
        endpoint_url=proxy.endpoint_url,
        watches=[],
        credentials={
            "source": "access-grants",
            "account_id": ACCOUNT,
            "target": f"s3://{bucket}/cpg0001-test/*",
            "permission": "READ",
            "endpoint_url": plane.endpoint_url,
        },
    )
    report = elsewhere / "report.csv"
    ok = run_cli("verify", "--manifest", str(copied), "-c", str(reader), "--report", str(report))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "7 match, 0 missing" in ok.stdout and "7 objects in the manifest" in ok.stdout
    assert {row["status"] for row in _report(report)} == {"match"}
    assert {c.permission for c in plane.data_access_calls} == {"READ"}
    # After a transfer, the gallery bucket is public: no keys at all.
    anonymous = run_cli(
        "verify", "--manifest", str(copied), "--no-sign-request",
        "--endpoint-url", proxy.upstream_url,
    )  # fmt: skip
    assert anonymous.returncode == 0 and "7 match" in anonymous.stdout, anonymous.stderr

    gone, changed = (f"{PREFIX}2024_01_01_Batch1/Plate{n}/Plate{n}_s1.tiff" for n in (1, 2))
    s3_client.delete_object(Bucket=bucket, Key=gone)
    s3_client.put_object(Bucket=bucket, Key=changed, Body=os.urandom(5001))  # same size
    bad = run_cli("verify", "--manifest", str(copied), "-c", str(reader), "--report", str(report))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    rows = [row for row in _report(report) if row["status"] != "match"]
    assert {(row["key"], row["status"]) for row in rows} == {
        (gone, "missing"),
        (changed, "checksum_mismatch"),
    }
    assert "5 match, 1 missing, 0 size_mismatch, 1 checksum_mismatch" in bad.stdout
    # Reading was enough: the proxy refuses any write with READ keys, and refused nothing.
    assert proxy.rejections.get("AccessDenied", 0) == 0


def test_with_upload_manifest_the_manifest_lands_beside_the_data_and_is_no_extra(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    """A watch of a whole source folder: its batch's manifest and .sha256 reach
    workspace/qc/upload_manifests/<batch>/ with the local files' bytes and a CRC32C, the
    key is in the event, status and the hook's JSON, and ``verify`` (which lists the
    source folder, manifests included) and ``verify --manifest`` report no extra."""
    source = "cpg0001-test/broad/"
    for plate in ("Plate1", "Plate2"):
        write_file(layout["watch"] / "images" / "2024_01_01_Batch1" / plate / "a.tiff", b"x" * 700)
    summary = layout["hooks"] / "summary.json"
    config = make_config(
        f"s3://{bucket}/{source}",
        settle="0.3s",
        upload_manifest=True,
        on_batch_complete=f"cat > {summary}",
    )
    daemon = Daemon.started(config, tmp_path / "daemon.log")
    try:
        event = daemon.wait_for_event("batch_complete", timeout=60)
        status = status_json(config)
        human = run_cli("status", "-c", str(config)).stdout
        wait_until(
            lambda: summary.is_file() and summary.read_text().endswith("\n"),
            30,
            "the hook's summary",
        )
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    path = Path(event["manifest"])
    key = f"{source}workspace/qc/upload_manifests/images/{path.name}"
    assert event["manifest_uploaded_to"] == f"s3://{bucket}/{key}"
    assert [e["key"] for e in daemon.events() if e["event"] == "manifest_uploaded"] == [key]
    for name in (key, key + ".sha256"):
        local = path.with_name(name.rsplit("/", 1)[1]).read_bytes()
        assert object_bytes(s3_client, bucket, name) == local
        head = s3_client.head_object(Bucket=bucket, Key=name, ChecksumMode="ENABLED")
        assert head["ChecksumCRC32C"] == encode(ALGORITHMS["CRC32C"].digest(local))
    (shown,) = status["batches"]["completed"]
    assert shown["manifest_uploaded_to"] == event["manifest_uploaded_to"]
    assert f"manifest uploaded to s3://{bucket}/{key}" in human
    assert json.loads(summary.read_text())["manifest_uploaded_to"] == event["manifest_uploaded_to"]

    checked = run_cli("verify", "-c", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "2 match, 0 missing, 0 size_mismatch, 0 checksum_mismatch, 0 extra" in checked.stdout
    whole = tmp_path / "whole.jsonl"  # its destination is the source folder, manifests below
    assert run_cli("manifest", "-c", str(config), "-o", str(whole)).returncode == 0
    against = run_cli("verify", "--manifest", str(whole), "-c", str(config))
    assert against.returncode == 0, against.stdout + against.stderr
    assert "2 match" in against.stdout and "0 extra" in against.stdout
    # Anything else there is still extra.
    s3_client.put_object(Bucket=bucket, Key=f"{source}workspace/qc/stray.csv", Body=b"x")
    stray = run_cli("verify", "-c", str(config))
    assert stray.returncode == 1 and "1 extra" in stray.stdout, stray.stdout


def test_upload_manifest_without_a_source_folder_or_keys_for_it_is_refused_at_start(
    tmp_path: Path, make_config: ConfigMaker, bucket: str
) -> None:
    shallow = make_config(f"s3://{bucket}/cpg0001-test/", upload_manifest=True)
    refused = run_cli("run", "-c", str(shallow))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "watch[0].upload_manifest" in refused.stderr
    assert "not under a <project>/<source>/ folder" in refused.stderr
    narrow = make_config(f"s3://{bucket}/{PREFIX}", name="narrow", upload_manifest=True)
    target = f"s3://{bucket}/{PREFIX}*"
    narrow.write_text(narrow.read_text().replace(
        '[credentials]\nsource = "environment"',
        f'[credentials]\nsource = "environment"\ntarget = "{target}"',
    ))  # fmt: skip
    uncovered = run_cli("run", "-c", str(narrow))
    assert uncovered.returncode == 2, uncovered.stdout + uncovered.stderr
    assert "watch[0].upload_manifest" in uncovered.stderr
    assert f"s3://{bucket}/cpg0001-test/broad/workspace/qc/upload_manifests/" in uncovered.stderr
    assert target in uncovered.stderr


def test_a_manifest_the_bucket_refuses_is_logged_and_the_batch_completes(
    tmp_path: Path, layout: dict[str, Path], s3_server: S3Server, s3_client: Any, bucket: str
) -> None:
    with FaultProxy(s3_server.endpoint_url) as proxy:
        denied = S3Error(403, "AccessDenied", "Access Denied")
        proxy.set_rules(
            Rule(Fault("error", denied), frozenset({"PutObject"}), key="/upload_manifests/")
        )
        config = one_watch_config(
            tmp_path / "run.toml",
            state_dir=layout["state"],
            endpoint_url=proxy.endpoint_url,
            watch_path=layout["watch"],
            destination=f"s3://{bucket}/{PREFIX}",
            settle="0.3s",
            upload_manifest=True,
        )
        write_file(layout["watch"] / "2024_01_01_Batch1" / "Plate1" / "a.tiff", b"a" * 500)
        daemon = Daemon.started(config, tmp_path / "daemon.log")
        try:
            event = daemon.wait_for_event("batch_complete", timeout=60)
            refused = daemon.wait_for_event("manifest_not_uploaded")
        finally:
            assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    assert proxy.faults == {"403 AccessDenied": 1}  # the manifest; its .sha256 is not tried
    assert event["files"] == 1 and event["manifest_uploaded_to"] is None
    assert Path(event["manifest"]).is_file()
    assert refused["level"] == "warning" and "AccessDenied" in refused["error"]
    assert refused["key"] == (
        f"cpg0001-test/broad/workspace/qc/upload_manifests/2024_01_01_Batch1/"
        f"{Path(event['manifest']).name}"
    )
    assert not any(e["event"] == "manifest_uploaded" for e in daemon.events())
    assert object_bytes(s3_client, bucket, f"{PREFIX}2024_01_01_Batch1/Plate1/a.tiff") == b"a" * 500


def test_verify_without_the_local_folder_says_so_and_names_the_manifest_way(
    tmp_path: Path, make_config: ConfigMaker, bucket: str
) -> None:
    config = make_config(f"s3://{bucket}/{PREFIX}")
    text = config.read_text().replace(str(tmp_path / "outbox"), str(tmp_path / "not-here"))
    config.write_text(text)
    result = run_cli("verify", "-c", str(config))
    assert result.returncode == 1
    assert f"the local folder {tmp_path / 'not-here'} is not here" in result.stderr
    assert "cpg-daemon verify --manifest FILE" in result.stderr
    assert "extra" not in result.stdout


def test_the_manifest_command_writes_one_for_a_watch_or_a_folder_from_the_journal(
    tmp_path: Path, layout: dict[str, Path], make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    for name in ("A/one.csv", "A/two.csv", "B/three.csv"):
        write_file(layout["watch"] / name, name.encode())
    config = make_config(f"s3://{bucket}/{PREFIX}", settle="0.3s")
    daemon = Daemon.started(config, tmp_path / "daemon.log")
    try:
        wait_until(
            lambda: len(s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])) == 3,
            30,
            "three uploads",
        )
        whole = run_cli("manifest", "-c", str(config))  # beside the running daemon
        folder = run_cli(
            "manifest", "plates", "A", "-c", str(config), "-o", str(tmp_path / "a.jsonl")
        )
    finally:
        assert daemon.terminate() == 0, daemon.log_text()[-3000:]
    assert whole.returncode == 0, whole.stderr
    lines = whole.stdout.splitlines()
    assert json.loads(lines[0])["files"] == 3 and len(lines) == 4
    assert f"sha256 {hashlib.sha256(whole.stdout.encode()).hexdigest()}" in whole.stderr
    assert folder.returncode == 0, folder.stderr
    only_a = manifest.read(tmp_path / "a.jsonl")
    assert only_a.header.destination == f"s3://{bucket}/{PREFIX}A/"
    assert [e.key for e in only_a.entries] == [f"{PREFIX}A/one.csv", f"{PREFIX}A/two.csv"]
    # Streamed from the journal, byte for byte what building the manifest in memory
    # (all rows read, sorted by key, then encoded) gives, to standard output or to a file.
    journal = layout["state"] / JOURNAL_NAME
    for name, text, made in [
        ("", whole.stdout.encode(), json.loads(lines[0])["created_at"]),
        ("A", (tmp_path / "a.jsonl").read_bytes(), only_a.header.created_at),
    ]:
        uploads = read_uploads(journal, "plates", name)
        assert uploads is not None
        destination = parse_s3_uri(
            f"s3://{bucket}/{PREFIX}{name}/" if name else f"s3://{bucket}/{PREFIX}"
        )
        built = manifest.build(uploads.values(), destination, "plates", name, layout["watch"])
        built = dataclasses.replace(
            built, header=dataclasses.replace(built.header, created_at=made)
        )
        manifest.write(built, tmp_path / "in-memory.jsonl")
        assert text == (tmp_path / "in-memory.jsonl").read_bytes()


@pytest.mark.anyio
async def test_streaming_from_the_journal_writes_what_the_in_memory_manifest_did(
    tmp_path: Path,
) -> None:
    """counted_uploads + dump (the ``manifest`` command): the same bytes as the manifest
    built in memory and sorted by key, whatever the names (SQLite orders the UTF-8 bytes,
    Python the code points: the same order), and a folder is only its own rows."""
    path = tmp_path / "state" / JOURNAL_NAME
    journal = await Journal.open(path)
    names = ["B/z.csv", "B/Z.csv", "B/\u00e9.csv", "B/e\u0301.csv", "B/a b.csv", "B/\U0001f52c.tif"]
    names += ["B0/x", "B-1/y", "B/sub/\u4e2d.csv", "A/1", "top.csv"]
    try:
        await journal.record_discovered(
            "w", [Discovered(rel, "bkt", f"p/{rel}", len(rel), 1) for rel in reversed(names)]
        )
        for record in await journal.claim(len(names), ["w"]):
            await journal.mark_uploaded(
                record, etag=f'"{len(record.rel_path)}"', checksum_algorithm="CRC32C", checksum="c"
            )
    finally:
        await journal.close()
    destination = parse_s3_uri("s3://bkt/p/")

    def both(folder: str) -> tuple[bytes, bytes]:
        with counted_uploads(path, "w", folder) as (files, size, rows):
            header = manifest.header_of(destination, "w", folder, tmp_path, files, size)
            out = io.BytesIO()
            manifest.dump(header, map(manifest.entry_of, rows), out, "out")
        uploads = read_uploads(path, "w", folder)
        assert uploads is not None
        built = manifest.build(uploads.values(), destination, "w", folder, tmp_path)
        built = dataclasses.replace(built, header=header)
        manifest.write(built, tmp_path / "in-memory.jsonl")
        return out.getvalue(), (tmp_path / "in-memory.jsonl").read_bytes()

    streamed, in_memory = await anyio.to_thread.run_sync(both, "")
    assert streamed == in_memory and len(streamed.splitlines()) == len(names) + 1
    streamed, in_memory = await anyio.to_thread.run_sync(both, "B")
    assert streamed == in_memory and len(streamed.splitlines()) == 1 + 7


def test_a_stream_stopped_or_short_of_its_header_leaves_no_file(tmp_path: Path) -> None:
    destination = parse_s3_uri("s3://bkt/p/Batch1/")
    entries = [
        manifest.entry_of(u) for u in _uploads("p/Batch1/", {f"{i}": b"x" for i in range(9000)})
    ]
    header = manifest.header_of(destination, "w", "Batch1", tmp_path, len(entries), 9000)
    path = tmp_path / "m.jsonl"
    with pytest.raises(manifest.ManifestError, match="the daemon is stopping"):
        manifest.write_stream(header, entries, path, stopped=lambda: True)
    with pytest.raises(
        manifest.ManifestError, match="8,999 objects written but the header says 9,000"
    ):
        manifest.write_stream(header, entries[1:], path)
    assert list(tmp_path.iterdir()) == []  # neither the manifest nor a temporary file
    digest = manifest.write_stream(header, sorted(entries, key=lambda e: e.key), path)
    assert manifest.read(path).header.files == 9000
    assert (tmp_path / "m.jsonl.sha256").read_text().startswith(digest)
