"""``check-dataset``: the analysis from tables of keys (no I/O), the parallel listing on
the in-memory store, and the command end to end on the demo's plate, on the real moto
server and on a local folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from daemonproc import run_cli
from memory_s3 import MemoryStore
from s3server import S3Server

from cpg_daemon.cli import demo
from cpg_daemon.core.checksums import ALGORITHMS, encode
from cpg_daemon.core.dataset import CHECKS, FOLDER_RULE, DatasetReport, Problem, analyse, same_plate
from cpg_daemon.core.objectkeys import S3Location
from cpg_daemon.engine.dataset import PLATE_DEPTH, list_prefix

BATCH = "2021_04_26_Batch1"
FULL = "BR00117035__2021-05-02T16_02_51-Measurement1"
PLATE = "BR00117035"


def plate_keys(batch: str, full: str, plate: str) -> list[str]:
    """One plate as the guide's JUMP example lays it out (below the source folder)."""
    return [
        f"images/{batch}/images/{full}/Images/r01c01f01p01-ch1sk1fk1fl1.tiff",
        f"images/{batch}/images/{full}/Images/r01c01f01p01-ch2sk1fk1fl1.tiff",
        f"images/{batch}/images/{full}/Images/Index.idx.xml",
        f"images/{batch}/illum/{plate}/{plate}_IllumDNA.npy",
        f"images/{batch}/illum/{plate}/{plate}_IllumER.npy",
        f"workspace/load_data_csv/{batch}/{plate}/load_data.csv",
        f"workspace/load_data_csv/{batch}/{plate}/load_data_with_illum.csv",
        f"workspace/backend/{batch}/{plate}/{plate}.sqlite",
        f"workspace/backend/{batch}/{plate}/{plate}.csv",
        f"workspace/analysis/{batch}/{plate}/analysis/{plate}-A01-1/Cells.csv",
        f"workspace/profiles/{batch}/{plate}/{plate}_normalized.csv.gz",
    ]


METADATA = [
    f"workspace/metadata/platemaps/{BATCH}/barcode_platemap.csv",
    f"workspace/metadata/platemaps/{BATCH}/platemap/OAA01.txt",
]
COMPLETE = [
    *plate_keys(BATCH, FULL, PLATE),
    *plate_keys(BATCH, "BR00117036__2021-05-02T18_01_40-Measurement1", "BR00117036"),
    *METADATA,
]


def report(keys: list[str], source: str | None = "source_4") -> DatasetReport:
    return analyse(((key, 10) for key in keys), project="cpg0016-jump", source=source)


def found(result: DatasetReport) -> list[tuple[str, bool, str, str, str]]:
    """(check or rule, required, batch, plate, folder) of every problem."""
    return [
        (p.rule if p.check == FOLDER_RULE else p.check, p.required, p.batch, p.plate, p.folder)
        for p in result.problems
    ]


def without(keys: list[str], part: str) -> list[str]:
    return [key for key in keys if part not in key]


def test_a_complete_dataset_has_no_problem_and_its_plates_by_their_short_names() -> None:
    result = report(COMPLETE)
    assert found(result) == []
    assert result.complete and result.objects == len(COMPLETE)
    (source,) = result.sources
    assert (source.name, source.prefix, source.areas) == ("source_4", "", ("images", "workspace"))
    assert source.workspace == {
        "analysis": 2,
        "backend": 4,
        "load_data_csv": 4,
        "metadata": 2,
        "profiles": 2,
    }
    (batch,) = source.batches
    assert [p.name for p in batch.plates] == ["BR00117035", "BR00117036"]
    plate = batch.plates[0]
    assert plate.image_folders == (FULL,)
    assert (plate.images, plate.illum, plate.load_data_csv, plate.analysis) == (3, 2, 2, 1)
    assert (plate.backend, plate.backend_sqlite, plate.profiles) == (2, True, 1)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        pytest.param(
            without(COMPLETE, f"load_data_csv/{BATCH}/{PLATE}/"),
            [
                (
                    "load-data-csv",
                    True,
                    BATCH,
                    PLATE,
                    f"workspace/load_data_csv/{BATCH}/{PLATE}/",
                )
            ],
            id="a plate without its load_data_csv folder",
        ),
        pytest.param(
            [*COMPLETE, f"images/{BATCH}/illum/BR09/BR09_IllumDNA.npy"],
            [("illum-without-images", True, BATCH, "BR09", f"images/{BATCH}/illum/BR09/")],
            id="illum without images",
        ),
        pytest.param(
            [*COMPLETE, f"workspace/profiles/{BATCH}/BR09/BR09.csv.gz"],
            [("plate-without-images", True, BATCH, "BR09", f"workspace/profiles/{BATCH}/BR09/")],
            id="a workspace plate without images",
        ),
        pytest.param(
            without(COMPLETE, f"illum/{PLATE}/"),
            [("illum-missing", False, BATCH, PLATE, f"images/{BATCH}/illum/{PLATE}/")],
            id="images without illum is advice",
        ),
        pytest.param(
            without(COMPLETE, f"{PLATE}/{PLATE}.sqlite"),
            [("backend-sqlite", True, BATCH, PLATE, f"workspace/backend/{BATCH}/{PLATE}/")],
            id="a backend folder without the plate's sqlite",
        ),
        pytest.param(
            without(without(COMPLETE, f"backend/{BATCH}/{PLATE}/"), f"analysis/{BATCH}/{PLATE}/"),
            [("features", False, BATCH, PLATE, f"workspace/backend/{BATCH}/{PLATE}/")],
            id="a plate without CellProfiler output",
        ),
        pytest.param(
            without(COMPLETE, f"profiles/{BATCH}/{PLATE}/"),
            [("component-gap", False, BATCH, PLATE, f"workspace/profiles/{BATCH}/{PLATE}/")],
            id="a plate without the profiles the others have",
        ),
        pytest.param(
            [
                *COMPLETE,
                "workspace/load_data_csv/load_data.csv",
                f"workspace/backend/{BATCH}/{PLATE}.sqlite",
                f"images/{BATCH}/images/loose.tiff",
            ],
            [
                ("depth", True, "", "", f"images/{BATCH}/images/"),
                ("depth", True, "", "", f"workspace/backend/{BATCH}/"),
                ("depth", True, "", "", "workspace/load_data_csv/"),
            ],
            id="files at the wrong depth",
        ),
        pytest.param(
            without(COMPLETE, "metadata/"),
            [("minimum", True, "", "", "")],
            id="no metadata",
        ),
        pytest.param(
            without(COMPLETE, "barcode_platemap.csv"),
            [("metadata-batch", False, BATCH, "", "workspace/metadata/")],
            id="metadata without the batch's platemap",
        ),
        pytest.param(
            [*COMPLETE, f"workspace/analysis/{BATCH}/{PLATE}/Cells.csv"],
            [("analysis-nesting", False, BATCH, PLATE, f"workspace/analysis/{BATCH}/{PLATE}/")],
            id="analysis files beside the legacy analysis folder",
        ),
        pytest.param(
            [*COMPLETE, f"images/{BATCH}/illum/{PLATE}/flat_field.npy"],
            [("illum-name", True, "", "", f"images/{BATCH}/illum/{PLATE}/")],
            id="a per-key folder rule, once per folder",
        ),
    ],
)
def test_what_is_missing_or_inconsistent(
    keys: list[str], expected: list[tuple[str, bool, str, str, str]]
) -> None:
    result = report(keys)
    assert found(result) == expected
    assert result.complete == (not any(required for _, required, *_ in expected))


def test_a_problem_says_which_plate_and_folder_and_where_the_guide_says_so() -> None:
    (problem,) = report(without(COMPLETE, f"load_data_csv/{BATCH}/{PLATE}/")).problems
    assert PLATE in problem.message
    assert f"workspace/load_data_csv/{BATCH}/{PLATE}/" in problem.message
    assert problem.source == "source_4"
    assert "contributing_to_cpg.md" in problem.pointer


def test_only_images_and_workspace_folders_without_any_minimum_is_one_problem() -> None:
    result = report(["workspace_dl/collated/efficientnet_ec756ff/collated.parquet"])
    assert [(p.check, p.required) for p in result.problems] == [("minimum", True)]
    assert "no images/" in result.problems[0].message


def test_an_empty_listing_is_incomplete() -> None:
    assert found(report([], source=None)) == [("minimum", True, "", "", "")]
    assert not report([]).complete


def test_a_project_lists_each_source_and_prefixes_folders_with_it() -> None:
    keys = [f"source_4/{key}" for key in COMPLETE]
    keys += [f"source_2/{key}" for key in without(COMPLETE, f"load_data_csv/{BATCH}/{PLATE}/")]
    result = report(keys, source=None)
    assert [s.name for s in result.sources] == ["source_2", "source_4"]
    assert [s.prefix for s in result.sources] == ["source_2/", "source_4/"]
    assert found(result) == [
        ("load-data-csv", True, BATCH, PLATE, f"source_2/workspace/load_data_csv/{BATCH}/{PLATE}/")
    ]
    assert result.problems[0].source == "source_2"


def test_a_plate_imaged_twice_is_one_plate_with_two_folders() -> None:
    second = f"{PLATE}__2021-05-03T10_00_00-Measurement2"
    result = report([*COMPLETE, f"images/{BATCH}/images/{second}/Images/a.tiff"])
    assert found(result) == []
    plate = result.sources[0].batches[0].plates[0]
    assert (plate.name, plate.image_folders, plate.images) == (PLATE, (FULL, second), 4)


def test_folder_rules_count_files_and_keep_their_kind() -> None:
    keys = [*COMPLETE, *(f"images/{BATCH}/images/{FULL}/Images/a b{i}.tiff" for i in range(3))]
    (problem,) = report(keys).problems
    assert (problem.check, problem.rule, problem.required, problem.files) == (
        FOLDER_RULE,
        "file-name",
        False,
        3,
    )


def test_a_local_folders_project_name_is_not_held_to_the_gallerys() -> None:
    keys = ((key, 1) for key in COMPLETE)
    assert analyse(keys, project="My Data", source="broad", check_project_name=False).complete
    held = analyse([(k, 1) for k in COMPLETE], project="My Data", source="broad")
    rules = [p.rule for p in held.problems]
    assert "project-name" in rules


@pytest.mark.parametrize(
    ("folder", "plate", "same"),
    [
        (FULL, PLATE, True),
        (PLATE, PLATE, True),
        ("CP257A", "CP257A", True),
        ("BR0011703", "BR00117035", False),
        ("BR001170350", "BR00117035", False),
        ("BR00117035-A", "BR00117035", True),
        ("BR00117035", "BR00117035__x", False),
    ],
)
def test_a_plate_name_is_the_images_folder_or_its_start(
    folder: str, plate: str, same: bool
) -> None:
    assert same_plate(folder, plate) is same


def test_every_check_is_documented_with_its_kind() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    for check in CHECKS.values():
        kind = "required" if check.required else "advice"
        assert f"| `{check.id}` | {kind} |" in readme, check.id


def test_the_json_document_has_its_documented_keys() -> None:
    document = report(without(COMPLETE, f"load_data_csv/{BATCH}/{PLATE}/")).to_json("s3://b/p/s/")
    assert list(document) == [
        "format",
        "target",
        "project",
        "complete",
        "objects",
        "bytes",
        "required_problems",
        "advice",
        "sources",
        "problems",
    ]
    assert list(document["sources"][0]) == [
        "name",
        "prefix",
        "objects",
        "bytes",
        "areas",
        "workspace",
        "batches",
    ]
    assert list(document["sources"][0]["batches"][0]["plates"][0]) == [
        "name",
        "image_folders",
        "images",
        "image_bytes",
        "illum",
        "load_data_csv",
        "analysis",
        "backend",
        "backend_sqlite",
        "profiles",
    ]
    assert list(document["problems"][0]) == list(Problem.__dataclass_fields__)
    json.dumps(document)


# The listing.


@pytest.mark.anyio
async def test_the_listing_goes_level_by_level_then_each_plate_whole() -> None:
    store = MemoryStore("CRC32C")
    store.create_bucket("b")
    crc = encode(ALGORITHMS["CRC32C"].digest(b"x"))
    keys = [f"cpg0016-jump/source_4/{key}" for key in COMPLETE]
    keys += ["cpg0016-jump/source_4/top.txt", "cpg0016-jump/source_40/other.txt"]
    for key in keys:
        await store.put_object("b", key, b"x", crc)
    location = S3Location("b", "cpg0016-jump/source_4/")
    listing = await list_prefix(store, location, depth=PLATE_DEPTH, concurrency=3)
    assert listing.entries == sorted((key[len(location.prefix) :], 1) for key in keys[:-1])
    levels = [c.key for c in store.calls if c.operation == "ListObjectsV2"]
    assert "cpg0016-jump/source_4/" in levels
    assert f"cpg0016-jump/source_4/images/{BATCH}/images/{FULL}/" in levels
    assert listing.requests == len(levels)


# The command, end to end.


@pytest.fixture(scope="module")
def demo_plate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's plate (``cpg-daemon demo``'s sample), made once: cpg0000-demo/broad/."""
    source = tmp_path_factory.mktemp("sample") / "cpg0000-demo" / "broad"
    demo.make_sample(source)
    return source


def upload(s3_client: Any, bucket: str, root: Path, prefix: str) -> list[str]:
    keys = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            key = prefix + path.relative_to(root).as_posix()
            s3_client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            keys.append(key)
    return keys


def test_the_demo_plate_on_s3_is_complete_until_its_load_data_csv_goes(
    s3_server: S3Server, s3_client: Any, bucket: str, demo_plate: Path
) -> None:
    keys = upload(s3_client, bucket, demo_plate, "cpg0000-demo/broad/")
    target = f"s3://{bucket}/cpg0000-demo/broad/"
    args = ("check-dataset", target, "--endpoint-url", s3_server.endpoint_url)
    done = run_cli(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"check-dataset {target}: {len(keys)} objects" in done.stdout
    assert f"  batch {demo.BATCH}: 1 plate" in done.stdout
    assert "complete: nothing the gallery's guide requires is missing" in done.stdout

    csv = f"cpg0000-demo/broad/workspace/load_data_csv/{demo.BATCH}/{demo.PLATE}/load_data.csv"
    s3_client.delete_object(Bucket=bucket, Key=csv)
    done = run_cli(*args)
    assert done.returncode == 1, done.stdout + done.stderr
    folder = f"workspace/load_data_csv/{demo.BATCH}/{demo.PLATE}/"
    assert f"[load-data-csv] plate '{demo.PLATE}' of batch '{demo.BATCH}' has images" in done.stdout
    assert folder in done.stdout
    # No LoadData CSV is left at all: the minimum contribution is not there either.
    assert "[minimum] source 'broad' has no workspace/load_data_csv/" in done.stdout
    assert "incomplete: 2 required problems" in done.stdout

    unsigned = run_cli(*args, "--no-sign-request", "--json")
    assert unsigned.returncode == 1, unsigned.stderr
    document = json.loads(unsigned.stdout)
    assert (document["complete"], document["objects"]) == (False, len(keys) - 1)
    problems = document["problems"]
    required = [(p["check"], p["plate"], p["folder"]) for p in problems if p["required"]]
    assert required == [("minimum", "", ""), ("load-data-csv", demo.PLATE, folder)]
    assert document["listing"]["requests"] > 5


def test_a_project_target_lists_every_source(
    s3_server: S3Server, s3_client: Any, bucket: str, demo_plate: Path
) -> None:
    upload(s3_client, bucket, demo_plate, "cpg0000-demo/broad/")
    s3_client.put_object(Bucket=bucket, Key="cpg0000-demo/other/workspace/qc/x.csv", Body=b"x")
    done = run_cli(
        "check-dataset", f"s3://{bucket}/cpg0000-demo", "--json",
        "--endpoint-url", s3_server.endpoint_url,
    )  # fmt: skip
    document = json.loads(done.stdout)
    assert [s["name"] for s in document["sources"]] == ["broad", "other"]
    assert [(p["check"], p["source"]) for p in document["problems"] if p["required"]] == [
        ("minimum", "other")
    ]
    assert done.returncode == 1


def test_a_local_folder_before_upload(demo_plate: Path, tmp_path: Path) -> None:
    source = tmp_path / "cpg0000-demo" / "broad"
    shutil.copytree(demo_plate, source)
    done = run_cli("check-dataset", str(source))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{demo.PLATE}  " in done.stdout and "+sqlite" in done.stdout
    (source / "workspace" / "load_data_csv" / demo.BATCH / demo.PLATE / "load_data.csv").unlink()
    done = run_cli("check-dataset", str(tmp_path / "cpg0000-demo"))  # the project folder
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"broad/workspace/load_data_csv/{demo.BATCH}/{demo.PLATE}/" in done.stdout


@pytest.mark.parametrize(
    "target",
    ["s3://bucket-name/", "s3://bucket-name/a/b/c/", "s3://UPPER/cpg0000-x/", "/no/such/folder"],
)
def test_a_target_that_is_not_a_dataset_exits_2(target: str) -> None:
    done = run_cli("check-dataset", target)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cpg-daemon check-dataset:" in done.stderr


def test_keys_and_endpoint_from_a_config_file_whose_target_covers_the_dataset(
    s3_server: S3Server, s3_client: Any, bucket: str, demo_plate: Path, tmp_path: Path
) -> None:
    upload(s3_client, bucket, demo_plate, "cpg0000-demo/broad/")
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[s3]\nendpoint_url = "{s3_server.endpoint_url}"\n'
        f'[[credentials]]\nsource = "environment"\ntarget = "s3://{bucket}/cpg0000-demo/*"\n'
        f'[[credentials]]\nsource = "environment"\ntarget = "s3://{bucket}/other/*"\n',
        encoding="utf-8",
    )
    done = run_cli("check-dataset", f"s3://{bucket}/cpg0000-demo/broad/", "-c", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    elsewhere = run_cli("check-dataset", f"s3://{bucket}/cpg0001-x/broad/", "-c", str(config))
    assert elsewhere.returncode == 2, elsewhere.stdout + elsewhere.stderr
    assert "no [credentials] target" in elsewhere.stderr
    assert "give --profile or --no-sign-request" in elsewhere.stderr
