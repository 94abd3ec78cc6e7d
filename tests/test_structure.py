"""The gallery's folder rules: on the documented trees, on bad names, and in the daemon.

The example keys are the trees drawn in the Cell Painting Gallery's
``data_structure.md`` (JUMP ``cpg0016-jump/source_4`` and the pooled
``cpg0021-periscope``), written out as object keys.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from daemonproc import (
    ConfigMaker,
    Daemon,
    journal_rows,
    object_bytes,
    run_cli,
    status_json,
    wait_until,
    write_file,
)
from hypothesis import given
from hypothesis import strategies as st

from cpg_daemon.core.config import WatchConfig
from cpg_daemon.core.objectkeys import parse_s3_uri
from cpg_daemon.core.structure import (
    LAYOUTS,
    RULES,
    WORKSPACE_FOLDERS,
    Finding,
    blocking,
    check_key,
)
from cpg_daemon.discovery.watcher import Watcher
from cpg_daemon.journal import Journal

JUMP = "cpg0016-jump/source_4/"
BATCH = "2021_04_26_Batch1"
JUMP_TREE = [
    # images/: illumination functions per plate, and the plates as the microscope wrote them
    *(
        f"{JUMP}images/{BATCH}/illum/BR00117035/BR00117035_Illum{channel}.npy"
        for channel in (
            "AGP",
            "Brightfield",
            "Brightfield_H",
            "Brightfield_L",
            "DNA",
            "ER",
            "Mito",
            "RNA",
        )
    ),
    f"{JUMP}images/{BATCH}/illum/BR00117036/BR00117036_IllumDNA.npy",
    f"{JUMP}images/{BATCH}/images/BR00117035__2021-05-02T16_02_51-Measurement1/Images/"
    "r01c01f01p01-ch1sk1fk1fl1.tiff",
    f"{JUMP}images/{BATCH}/images/BR00117035__2021-05-02T16_02_51-Measurement1/Images/"
    "Index.idx.xml",
    f"{JUMP}images/{BATCH}/images/BR00117036__2021-05-02T18_01_40-Measurement1/Images/"
    "r16c24f09p01-ch5sk1fk1fl1.tiff",
    f"{JUMP}images/2021_05_31_Batch2/images/BR00121331__2021-06-01T10_00_00-Measurement1/x.tiff",
    # workspace/
    *(
        f"{JUMP}workspace/analysis/{BATCH}/BR00117035/analysis/BR00117035-A01-1/{name}"
        for name in ("Cells.csv", "Cytoplasm.csv", "Experiment.csv", "Image.csv", "Nuclei.csv")
    ),
    f"{JUMP}workspace/analysis/{BATCH}/BR00117035/analysis/BR00117035-A01-1/outlines/"
    "A01_s1--cell_outlines.png",
    f"{JUMP}workspace/analysis/{BATCH}/BR00117035/analysis/BR00117035-A01-1/outlines/"
    "A01_s1--nuclei_outlines.png",
    f"{JUMP}workspace/backend/{BATCH}/BR00117035/BR00117035.csv",
    f"{JUMP}workspace/backend/{BATCH}/BR00117035/BR00117035.sqlite",
    f"{JUMP}workspace/load_data_csv/{BATCH}/BR00117035/load_data.csv.gz",
    f"{JUMP}workspace/load_data_csv/{BATCH}/BR00117035/load_data_with_illum.csv.gz",
    f"{JUMP}workspace/metadata/external_metadata/external_metadata.tsv",
    f"{JUMP}workspace/metadata/platemaps/{BATCH}/barcode_platemap.csv",
    f"{JUMP}workspace/metadata/platemaps/{BATCH}/platemap/OAA01.02.03.04.A.txt",
    f"{JUMP}workspace/quality_control/heatmap/{BATCH}/BR00117035/BR00117035_cell_count.png",
    f"{JUMP}workspace/profiles/{BATCH}/BR00117035/BR00117035.csv.gz",
    f"{JUMP}workspace/profiles/{BATCH}/BR00117035/"
    "BR00117035_normalized_feature_select_negcon_plate.csv.gz",
    f"{JUMP}workspace/segmentation/cellpose_c632b05b6930/model/README.md",
    f"{JUMP}workspace/segmentation/cellpose_c632b05b6930/objects/{BATCH}/BR00117036/"
    "BR00117036.zarr/source_4__2021_04_26_Batch1__BR00117036__A01__1/.zgroup",
    f"{JUMP}workspace/segmentation/cellpose_c632b05b6930/objects/{BATCH}/BR00117036/"
    "channel_mapping.json",
    # workspace_dl/
    f"{JUMP}workspace_dl/collated/efficientnet_v2_imagenet1k_s_feature_vector_2_ec756ff/"
    "collated.parquet",
    f"{JUMP}workspace_dl/consensus/efficientnet_v2_imagenet1k_s_feature_vector_2_ec756ff/"
    "consensus.parquet",
    f"{JUMP}workspace_dl/embeddings/efficientnet_v2_imagenet1k_s_feature_vector_2_ec756ff/"
    f"{BATCH}/BR00117035/A01-1/embedding.parquet",
    f"{JUMP}workspace_dl/embeddings/efficientnet_v2_imagenet1k_s_feature_vector_2_ec756ff/"
    f"{BATCH}/BR00117035/A01/1/embedding.npz",
    f"{JUMP}workspace_dl/profiles/efficientnet_v2_imagenet1k_s_feature_vector_2_ec756ff/"
    f"{BATCH}/BR00117035/BR00117035.parquet",
]

PERISCOPE = "cpg0021-periscope/broad/images/20210422_6W_CP257/"
PERISCOPE_TREE = [
    *(
        f"{PERISCOPE}illum/CP257A/CP257A_{name}.npy"
        for name in (
            "IllumAGP",
            "IllumDNA",
            "IllumER",
            "IllumMito",
            "IllumRNA",
            "Cycle1_IllumA",
            "Cycle1_IllumC",
            "Cycle1_IllumDNA",
            "Cycle1_IllumG",
            "Cycle1_IllumT",
        )
    ),
    f"{PERISCOPE}illum/CP257B/CP257B_IllumDNA_Round1.npy",
    f"{PERISCOPE}images_aligned/CP257A/x.tiff",
    f"{PERISCOPE}images_corrected_cropped/CP257A-Well1-0/CorrDNA/CorrDNA_Site_1.tiff",
    f"{PERISCOPE}images_corrected_cropped/CP257A-Well1-0/CorrDNA/CorrDNA_Site_10.tiff",
    f"{PERISCOPE}images_corrected_cropped/CP257A-Well1-0/Cycle01_A/x.tiff",
    f"{PERISCOPE}images_corrected/barcoding/CP257A-Well1-0/"
    "Plate_CP257A_Well_1_Site_0_Cycle01_A.tiff",
    f"{PERISCOPE}images_corrected/painting/CP257A-Well1-1/x.tiff",
    f"{PERISCOPE}images/CP257A/10X_c1-SBS-1/"
    "Well1_Point1_0000_ChannelDAPI,Cy3,A594,Cy5,Cy7_Seq0000.nd2",
    f"{PERISCOPE}images/CP257A/10X_c2-SBS-2/"
    "Well1_Point1_0001_ChannelDAPI,Cy3,A594,Cy5,Cy7_Seq0001.nd2",
    f"{PERISCOPE}images/CP257A/20X_CP_CP257A/x.nd2",
    "cpg0021-periscope/broad/images/20200805_A549_WG_Screen/images/P1/x.tiff",
    "cpg0021-periscope/broad/workspace/publication_data/2022_PERISCOPE/hits.csv",
]

OTHER_DOCUMENTED = [
    # the uploading tutorial's destinations
    "cpg0123-example/broad/images/2024_04_01_Batch8/images/Plate1/r01c01f01p01-ch1.tiff",
    "cpg0123-example/broad/workspace/profiles/2024_04_01_Batch8/Plate1/Plate1.csv.gz",
    # the arrayed z-stack example, project names with '_' and several '-', a source
    # aggregated from several, and versioned assembled profiles
    "cpg0001-cellpainting-protocol/broad/images/2020_01_02_Test/images_projected/P1/x.tiff",
    "cpg0026-lacoste_haghighi-rare-diseases/broad/images/2019_01_01_B1/images/P1/x.tiff",
    "cpg0016-jump-assembled/source_all/workspace/profiles_assembled/compound_no_source7/"
    "v1.0/profiles_var_mad_int_featselect.parquet",
]


WS = "cpg0123-example/broad/workspace/"
DL = "cpg0123-example/broad/workspace_dl/"


def _rules(key: str) -> list[str]:
    return [f.rule for f in check_key(key)]


@pytest.mark.parametrize("key", JUMP_TREE + PERISCOPE_TREE + OTHER_DOCUMENTED)
def test_the_trees_in_the_gallerys_documentation_follow_the_rules(key: str) -> None:
    assert check_key(key) == []


@pytest.mark.parametrize("folder", sorted(WORKSPACE_FOLDERS))
def test_every_known_workspace_folder_is_known(folder: str) -> None:
    assert "workspace-folder" not in _rules(f"cpg0016-jump/source_1/workspace/{folder}/x/y.csv")


BAD = [
    # (key, rule, required, words the message names)
    ("CPG0123-Example/broad/images/2024_04_01_B/images/P1/x.tiff", "project-name", True,
     ["'CPG0123-Example'", "lower case", "'cpg0123-example'"]),
    ("myproject/broad/images/2024_04_01_B/images/P1/x.tiff", "project-name", True,
     ["'myproject'", "cpgNNNN-<name>"]),
    ("cpg0123/broad/images/2024_04_01_B/images/P1/x.tiff", "project-name", True, ["'cpg0123'"]),
    ("cpg123-example/broad/images/2024_04_01_B/images/P1/x.tiff", "project-name", True,
     ["'cpg123-example'", "cpgNNNN-<name>"]),
    ("cpg0123-/broad/images/2024_04_01_B/images/P1/x.tiff", "project-name", True, ["'cpg0123-'"]),
    ("cpg0036-EU-OS-bioactives/FMP/images/2023_03_01_Batch1_HepG2/images/P1/x.tiff",
     "project-name-style", False, ["'cpg0036-EU-OS-bioactives'", "capitals", "keep it"]),
    ("cpg0040-garcia-fossa-AgNP/broad/images/2023_01_01_B/images/P1/x.tiff",
     "project-name-style", False, ["'cpg0040-garcia-fossa-AgNP'", "capitals"]),
    ("cpg0123-my.project/broad/images/2024_04_01_B/images/P1/x.tiff", "project-name-style",
     False, ["'.'", "lower-case letters and digits"]),
    ("cpg0123-a--b/broad/images/2024_04_01_B/images/P1/x.tiff", "project-name-style", False,
     ["stray"]),
    ("cpg0123-my project/broad/images/2024_04_01_B/images/P1/x.tiff", "whitespace", True,
     ["'cpg0123-my project'"]),
    ("cpg0123-a#b/broad/images/2024_04_01_B/images/P1/x.tiff", "characters", True, ["'#'"]),
    ("cpg0123-example/broad/Images/2024_04_01_B/images/P1/x.tiff", "area", True,
     ["'Images'", "lower case"]),
    ("cpg0123-example/broad/raw/2024_04_01_B/x.tiff", "area", True,
     ["'raw'", "images/, workspace/ or workspace_dl/"]),
    ("cpg0123-example/broad/x.tiff", "layout", True, ["'cpg0123-example/broad/'"]),
    ("cpg0123-example/broad/images/x.tiff", "layout", True, ["batch folder"]),
    ("cpg0123-example/broad/images/Batch8/images/P1/x.tiff", "batch-name", False,
     ["'Batch8'", "YYYY_MM_DD_<batch-name>"]),
    ("cpg0123-example/broad/images/2024_04_01_B/Plate1/x.tiff", "batch-content", True,
     ["'Plate1'", "images/, illum/ or images_<manipulation>/"]),
    ("cpg0123-example/broad/images/2024_04_01_B/Illum/P1/P1_IllumDNA.npy", "batch-content",
     True, ["'Illum'", "lower case"]),
    ("cpg0123-example/broad/images/2024_04_01_B/notes.txt", "batch-content", True,
     ["directly in batch folder"]),
    ("cpg0123-example/broad/images/2024_04_01_B/illum/P1_IllumDNA.npy", "illum-layout", True,
     ["<plate-name>"]),
    ("cpg0123-example/broad/images/2024_04_01_B/illum/P1/old/P1_IllumDNA.npy", "illum-layout",
     True, ["too deep"]),
    ("cpg0123-example/broad/images/2024_04_01_B/illum/P1/P1_IllumDNA.mat", "illum-name", True,
     ["'P1_IllumDNA.mat'", "'P1_Illum<Channel>.npy'"]),
    ("cpg0123-example/broad/images/2024_04_01_B/illum/P1/P2_IllumDNA.npy", "illum-name", True,
     ["'P2_IllumDNA.npy'", "'P1_Illum<Channel>.npy'"]),
    ("cpg0123-example/broad/images/2024_04_01_B/illum/P1/P1_DNA.npy", "illum-name", True,
     ["'P1_DNA.npy'"]),
    # pooled plates' cycle folders
    (f"{PERISCOPE}images/CP257A/c1-SBS-1/x.nd2", "pooled-cycle", False,
     ["'c1-SBS-1'", "'CP257A'", "magnification", "'10X_c1-SBS-1'"]),
    (f"{PERISCOPE}images/CP257A/10X_c1_SBS1/x.nd2", "pooled-cycle", False, ["'10X_c1_SBS1'"]),
    (f"{PERISCOPE}images/CP257A/20X_cellpainting/x.nd2", "pooled-cycle", False,
     ["'20X_cellpainting'", "'20X_CP_CP257A'"]),
    (f"{PERISCOPE}images/CP257A/20x_CP_CP257A/x.nd2", "pooled-cycle", False, ["'20x_CP_CP257A'"]),
    ("cpg0123-example/broad/workspace/profile/B/P/x.csv", "workspace-folder", False,
     ["'profile'", "spelling"]),
    # below the first level of workspace/
    (f"{WS}analysis/B/P1/Cells.csv", "analysis-layout", False,
     ["directly in", "belong deeper", "analysis/<batch>/<plate>/analysis/<plate>-<well>-<site>/"]),
    (f"{WS}analysis/B/P1/analysis/Cells.csv", "analysis-layout", False, ["belong deeper"]),
    (f"{WS}analysis/B/P1/results/P1-A01-1/Cells.csv", "analysis-layout", False,
     ["'results'", "is not analysis/"]),
    (f"{WS}backend/P1.sqlite", "backend-layout", False,
     ["belong deeper", "backend/<batch>/<plate>/", "<plate>.sqlite"]),
    (f"{WS}backend/B/P1.sqlite", "backend-layout", False, ["belong deeper"]),
    (f"{WS}backend/B/P1/old/P1.sqlite", "backend-layout", False, ["too deep", "old/"]),
    (f"{WS}backend/B/P1/cells.sqlite", "backend-layout", False,
     ["'cells.sqlite'", "'P1.sqlite'", "'P1.csv'"]),
    (f"{WS}load_data_csv/load_data.csv", "load-data-layout", False,
     ["belong deeper", "load_data_csv/<batch>/<plate>/", "load_data_with_illum.csv"]),
    (f"{WS}load_data_csv/B/load_data.csv", "load-data-layout", False, ["belong deeper"]),
    (f"{WS}load_data_csv/B/P1/v2/load_data.csv", "load-data-layout", False, ["too deep"]),
    (f"{WS}metadata/platemaps/barcode_platemap.csv", "platemaps-layout", False,
     ["belong deeper", "platemaps/<batch>/"]),
    (f"{WS}metadata/platemaps/B/maps/M1.txt", "platemaps-layout", False,
     ["'maps'", "is not platemap/"]),
    (f"{WS}metadata/platemaps/B/platemap/old/M1.txt", "platemaps-layout", False, ["too deep"]),
    (f"{WS}profiles/P1.csv.gz", "profiles-layout", False,
     ["belong deeper", "profiles/<batch>/<plate>/"]),
    (f"{WS}profiles/B/P1.csv.gz", "profiles-layout", False, ["belong deeper"]),
    (f"{WS}segmentation/README.md", "segmentation-layout", False, ["belong deeper"]),
    (f"{WS}segmentation/cellpose_c632b05b6930/masks/x.png", "segmentation-layout", False,
     ["'masks'", "model/ or training/ or objects/"]),
    # below the first level of workspace_dl/
    (f"{DL}collated/collated.parquet", "dl-collated-layout", False,
     ["belong deeper", "collated/<model>/"]),
    (f"{DL}collated/m1/B/collated.parquet", "dl-collated-layout", False, ["too deep"]),
    (f"{DL}consensus/consensus.parquet", "dl-consensus-layout", False, ["consensus/<model>/"]),
    (f"{DL}embeddings/m1/B/P1/embedding.parquet", "dl-embeddings-layout", False,
     ["belong deeper", "embeddings/<model>/<batch>/<plate>/<well>-<site>/"]),
    (f"{DL}embeddings/embedding.parquet", "dl-embeddings-layout", False, ["belong deeper"]),
    (f"{DL}profiles/m1/P1.parquet", "dl-profiles-layout", False,
     ["belong deeper", "profiles/<model>/<batch>/"]),
    (f"{DL}profiles/m1/B/P1/x/P1.parquet", "dl-profiles-layout", False, ["too deep"]),
    ("cpg0123-example/broad/workspace/readme.txt", "workspace-folder", False,
     ["directly in"]),
    ("cpg0123-example/broad/workspace_dl/features/m/x.parquet", "workspace-dl-folder", False,
     ["'features'"]),
    ("cpg0123-example/broad/images/2024_04_01_B/images/Plate 1/x.tiff", "whitespace", True,
     ["'Plate 1'"]),
    ("cpg0123-example/broad/images/2024_04_01_B/images/P\t1/x.tiff", "whitespace", True, []),
    ("cpg0123-example/broad/images/2024_04_01_B/images/P#1(copy)/x.tiff", "characters", True,
     ["'P#1(copy)'", "'#'", "'('", "')'"]),
    ("cpg0123-example/broad/images/2024_04_01_B/images/Plätte/x.tiff", "characters", True,
     ["'ä'"]),
    ("cpg0123-example/broad/images/2024_04_01_B/images/P1/r01 c01.tiff", "file-name", False,
     ["'r01 c01.tiff'", "whitespace"]),
    ("cpg0123-example/broad/images/2024_04_01_B/images/P1/x&y.tiff", "file-name", False,
     ["'&'"]),
]  # fmt: skip


@pytest.mark.parametrize(("key", "rule", "required", "words"), BAD)
def test_each_bad_name_is_flagged_by_its_rule_with_a_clear_message(
    key: str, rule: str, required: bool, words: list[str]
) -> None:
    findings = [f for f in check_key(key) if f.rule == rule]
    assert len(findings) == 1, check_key(key)
    finding = findings[0]
    assert finding.required is required
    assert finding.required is RULES[rule].required
    for word in words:
        assert word in finding.message
    assert finding.pointer == RULES[rule].pointer
    assert "http" not in finding.pointer and finding.pointer.startswith("Cell Painting Gallery")
    assert key.startswith(finding.folder) and finding.folder.endswith("/")
    assert str(finding).startswith(f"[{rule}] {finding.message}")


GOOD = [
    # (rule, key): keys in the shape the documentation draws, which that rule lets pass
    ("project-name", "cpg0036-EU-OS-bioactives/FMP/images/2023_03_01_Batch1_HepG2/images/P1/x"),
    ("project-name-style", "cpg0026-lacoste_haghighi-rare-diseases/broad/workspace/qc/x.csv"),
    ("pooled-cycle", f"{PERISCOPE}images/CP257A/10X_SBS-12/x.nd2"),
    ("pooled-cycle", f"{PERISCOPE}images/CP257A/20X_CP_round_1/x.nd2"),
    ("pooled-cycle", f"{PERISCOPE}images/CP257A/20X_CP/x.nd2"),
    ("pooled-cycle", f"{JUMP}images/{BATCH}/images/BR00117035__2021-05-02T16_02_51/Images/x.tiff"),
    ("pooled-cycle", "cpg0123-example/broad/images/2024_01_01_B/images/P1/TimePoint_1/x.tif"),
    ("workspace-folder", "cpg0016-jump/source_all/workspace/metadata_harmonized/draft.csv"),
    ("analysis-layout", f"{WS}analysis/B/P1/analysis/P1-A01/Cells.csv"),
    ("analysis-layout", f"{WS}analysis/B/P1/analysis/P1-A01-1/masks/A01_s1--nuclei.tiff"),
    ("backend-layout", f"{WS}backend/B/P1/P1.csv.gz"),
    ("backend-layout", f"{WS}backend/B/P1/P1_augmented.csv"),
    ("load-data-layout", f"{WS}load_data_csv/B/P1/load_data_with_illum.csv"),
    ("load-data-layout", f"{WS}load_data_csv/B/P1/load_data_pipeline9.csv"),
    ("platemaps-layout", f"{WS}metadata/platemaps/B/platemap/M1.txt"),
    ("platemaps-layout", f"{WS}metadata/external_metadata/external_metadata.tsv"),
    ("platemaps-layout", f"{WS}metadata/B/Barcodes.csv"),  # pooled metadata
    ("platemaps-layout", f"{WS}metadata/barcodes.csv"),
    ("profiles-layout", f"{WS}profiles/recipe_2024_a917fa7/ORF/v1.0a/profiles.parquet"),
    ("segmentation-layout", f"{WS}segmentation/cellpose_c632b05b6930/training/x.tiff"),
    ("dl-collated-layout", f"{DL}collated/m1/collated.csv"),
    ("dl-consensus-layout", f"{DL}consensus/m1/consensus.csv"),
    ("dl-embeddings-layout", f"{DL}embeddings/m1/B/P1/A18/embedding.parquet"),
    ("dl-profiles-layout", f"{DL}profiles/m1/B/P1.parquet"),
]


@pytest.mark.parametrize(("rule", "key"), GOOD)
def test_each_new_or_changed_rule_lets_documented_shapes_pass(rule: str, key: str) -> None:
    assert rule in RULES
    assert [f for f in check_key(key) if f.rule == rule or f.required] == []


def test_every_rule_has_a_bad_example_and_each_new_or_changed_one_a_good_one() -> None:
    assert {rule for _, rule, _, _ in BAD} == set(RULES)
    changed = {"project-name", "project-name-style", "pooled-cycle", "workspace-folder"}
    assert {rule for rule, _ in GOOD} >= changed | {layout.rule for layout in LAYOUTS.values()}


# Keys in the shape of published gallery projects: the documentation's examples and
# names, the object keys a public summary of the cpg0016 bucket quotes, the projects the
# guide names (cpg0010, cpg0011, cpg0022, cpg0028, cpg0031), and the recent projects
# whose names have capitals. Plate and file names past the documented levels are
# representative, not copied from a listing.
PUBLISHED_SHAPES = [
    # cpg0036-EU-OS-bioactives: four sources, one batch per cell line
    "cpg0036-EU-OS-bioactives/FMP/images/2023_03_01_Batch1_HepG2/images/"
    "EOS-FMP-HepG2-P01__2023-03-01T10_00_00-Measurement1/Images/r01c01f01p01-ch1sk1fk1fl1.tiff",
    "cpg0036-EU-OS-bioactives/FMP/images/2023_03_01_Batch1_HepG2/illum/EOS-FMP-HepG2-P01/"
    "EOS-FMP-HepG2-P01_IllumDNA.npy",
    "cpg0036-EU-OS-bioactives/FMP/images/2023_03_01_Batch2_U2OS/images/P02/r02c03f04p01-ch2.tiff",
    "cpg0036-EU-OS-bioactives/USC/images/2023_04_12_Batch1_U2OS/images/P01/P01_A01_s1_w1.tif",
    "cpg0036-EU-OS-bioactives/MEDINA/workspace/load_data_csv/2023_05_02_Batch1_HepG2/P01/"
    "load_data_with_illum.csv",
    "cpg0036-EU-OS-bioactives/IMTM/workspace/backend/2023_06_20_Batch1_U2OS/P01/P01.sqlite",
    "cpg0036-EU-OS-bioactives/IMTM/workspace/profiles/2023_06_20_Batch1_U2OS/P01/"
    "P01_normalized_feature_select_negcon_batch.csv.gz",
    "cpg0036-EU-OS-bioactives/FMP/workspace/metadata/platemaps/2023_03_01_Batch1_HepG2/"
    "barcode_platemap.csv",
    "cpg0036-EU-OS-bioactives/FMP/workspace_dl/embeddings/cpcnn_zenodo_7114558/"
    "2023_03_01_Batch1_HepG2/P01/A01-1/embedding.parquet",
    "cpg0040-garcia-fossa-AgNP/broad/images/2023_10_03_AgNP_Batch1/images/Plate1/x.tiff",
    "cpg0040-garcia-fossa-AgNP/broad/workspace/analysis/2023_10_03_AgNP_Batch1/Plate1/analysis/"
    "Plate1-B02-1/Cells.csv",
    # cpg0016-jump and its assembled profiles
    "cpg0016-jump/source_all/workspace/metadata_harmonized/cpg0016-jump_draft.csv",
    "cpg0016-jump/source_4/workspace/profiles/2021_04_26_Batch1/BR00117035/BR00117035.parquet",
    "cpg0016-jump/source_4/workspace_dl/profiles/cpcnn_zenodo_7114558/2021_04_26_Batch1/"
    "BR00117035/BR00117035.parquet",
    "cpg0016-jump/source_4/workspace_dl/profiles/cpdistiller_mesmer_s41467_025_62193_z/"
    "2021_04_26_Batch1/BR00117035/BR00117035.parquet",
    "cpg0016-jump/source_4/workspace_dl/embeddings/cpcnn_zenodo_7114558/2021_04_26_Batch1/"
    "BR00117035/A04-08/embedding.parquet",
    "cpg0016-jump/source_4/workspace_dl/embeddings/"
    "efficientnet_v2_imagenet21k_s_feature_vector_2_0260bc96/2021_04_26_Batch1/BR00117035/A18/"
    "embedding.parquet",
    "cpg0016-jump/source_4/workspace/load_data_csv/2021_04_26_Batch1/BR00117035/"
    "load_data_with_illum.parquet",
    "cpg0016-jump/source_4/workspace/analysis/2021_04_26_Batch1/BR00117035/analysis/"
    "BR00117035-A01-1/Image.csv",
    "cpg0016-jump/source_4/workspace/backend/2021_04_26_Batch1/BR00117035/BR00117035.sqlite",
    "cpg0016-jump/source_10/images/2021_08_17_U2OS_48_hr_run16/images/Dest210823-174240/"
    "W0001F0001T0001Z001C1.tif",
    "cpg0016-jump/source_3/images/CP_25_all_Phenix1/images/"
    "B40803aW__2021-07-20T22_35_02-Measurement1/Images/r01c01f01p01-ch1sk1fk1fl1.tiff",
    "cpg0016-jump/source_13/images/20220914_Run1/images/CP-CC9-R1-01/CP-CC9-R1-01_A01_T0001F001"
    "L01A01Z01C01.tif",
    "cpg0016-jump-assembled/source_all/workspace/profiles_assembled/COMPOUND/v1.0/"
    "profiles_var_mad_int_featselect_harmony.parquet",
    "cpg0016-jump-assembled/source_all/workspace/profiles/jump-profiling-recipe_2024_a917fa7/"
    "ORF/v1.0a/profiles_wellpos_cc_var_mad_outlier_featselect_sphering_harmony.parquet",
    # the pilots and earlier projects
    "cpg0000-jump-pilot/source_4/images/2020_11_04_CPJUMP1/images/"
    "BR00117011__2020-11-08T19_57_47-Measurement1/Images/r01c01f01p01-ch1sk1fk1fl1.tiff",
    "cpg0000-jump-pilot/source_4/images/2020_11_04_CPJUMP1/illum/BR00117011/"
    "BR00117011_IllumAGP.npy",
    "cpg0000-jump-pilot/source_4/workspace/load_data_csv/2020_11_04_CPJUMP1/BR00116991/"
    "load_data.csv",
    "cpg0001-cellpainting-protocol/source_4/images/2020_01_02_TestPhalloidinConcentration/"
    "images_projected/BR00112197/r01c01f01-ch1.tiff",
    "cpg0003-rosetta/broad/workspace/profiles/2017_12_05_Batch2/BR00092655/"
    "BR00092655_normalized_variable_selected.csv",
    "cpg0004-lincs/broad/workspace/backend/2016_04_01_a549_48hr_batch1/SQ00014812/"
    "SQ00014812.sqlite",
    "cpg0004-lincs/broad/workspace/metadata/platemaps/2016_04_01_a549_48hr_batch1/platemap/"
    "C-7161-01-LM6-001.txt",
    "cpg0010-caie-drugresponse/broad/images/2014_11_06_Batch1/images/Plate1/x.tif",
    "cpg0011-lipocyteprofiler/broad/workspace/pipelines/2020_01_01_Batch1/analysis.cppipe",
    "cpg0022-cmqtl/broad/workspace/quality_control/heatmap/2019_06_10_Batch3/BR00106708/"
    "BR00106708_cell_count.png",
    "cpg0028-kelley-resistance/broad/workspace/software/profiling-recipe/README.md",
    "cpg0031-caicedo-cmvip/broad/workspace/segmentation/cellpose_0d8d2f32/objects/"
    "2022_01_01_Batch1/P1/P1.zarr/.zgroup",
    # pooled: cpg0021-periscope
    "cpg0021-periscope/broad/images/20200805_A549_WG_Screen/images/CP186A/10X_c0-SBS-0/"
    "Well1_Point1_0000_ChannelC,A,T,G,DAPI_Seq0000.nd2",
    "cpg0021-periscope/broad/images/20200805_A549_WG_Screen/images/CP186A/20X_CP_CP186A/"
    "Well1_Point1_0000_ChannelPhalloAF750,ZO1-AF488,DAPI_Seq0000.nd2",
    "cpg0021-periscope/broad/images/20200805_A549_WG_Screen/illum/CP186A/CP186A_Cycle1_IllumA.npy",
    "cpg0021-periscope/broad/workspace/metadata/20210422_6W_CP257/Barcodes.csv",
    "cpg0021-periscope/broad/workspace/metadata/20210422_6W_CP257/metadata.json",
    "cpg0021-periscope/broad/workspace/load_data_csv/20210422_6W_CP257/CP257A/"
    "load_data_pipeline1.csv",
    "cpg0021-periscope/broad/workspace/analysis/20210422_6W_CP257/CP257A/analysis/"
    "CP257A-Well1-0/Cells.csv",
    # optional workspace folders, and the deep-learning area's aggregates
    "cpg0016-jump/source_4/workspace/assaydev/2021_04_26_Batch1/x.csv",
    "cpg0016-jump/source_4/workspace/qc/2021_04_26_Batch1/summary.csv",
    "cpg0016-jump/source_4/workspace/embeddings/cpcnn_zenodo_7114558/x.parquet",
    "cpg0016-jump/source_4/workspace_dl/collated/efficientnet_v2_imagenet1k_s_feature_vector_2_"
    "ec756ff/collated.parquet",
    "cpg0016-jump/source_4/workspace_dl/consensus/efficientnet_v2_imagenet1k_s_feature_vector_2_"
    "ec756ff/consensus.parquet",
]
ADVICE_ON_PUBLISHED_SHAPES = {
    # (rule, folder): what the published shapes above draw, all of it advice
    ("project-name-style", "cpg0036-EU-OS-bioactives/"),
    ("project-name-style", "cpg0040-garcia-fossa-AgNP/"),
    ("batch-name", "cpg0016-jump/source_3/images/CP_25_all_Phenix1/"),
}


def test_published_shapes_break_no_required_rule() -> None:
    assert 40 <= len(PUBLISHED_SHAPES) <= 80
    found = {(f.rule, f.folder) for key in PUBLISHED_SHAPES for f in check_key(key)}
    assert found == ADVICE_ON_PUBLISHED_SHAPES
    assert all(blocking(check_key(key)) is None for key in PUBLISHED_SHAPES)


def test_the_readme_table_lists_the_rules_and_their_levels() -> None:
    """README's "Gallery folder rules" table names every rule, in order, with its level."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Gallery folder rules", 1)[1].split("\n### ", 1)[0]
    listed: list[tuple[str, str]] = []
    for line in section.splitlines():
        if line.startswith("| `"):
            names, kind = (cell.strip() for cell in line.split("|")[1:3])
            listed += [(name, kind) for name in re.findall(r"`([a-z-]+)`", names)]
    assert listed == [(r.id, "required" if r.required else "advice") for r in RULES.values()]


def test_a_key_with_several_problems_gets_each_outermost_first() -> None:
    key = "cpg0123-example/broad/images/Batch8/Plate 1/r01 c01.tiff"
    findings = check_key(key)
    assert [f.rule for f in findings] == [
        "batch-name",
        "batch-content",
        "whitespace",
        "file-name",
    ]
    assert [f.folder for f in findings] == [
        "cpg0123-example/broad/images/Batch8/",
        "cpg0123-example/broad/images/Batch8/Plate 1/",
        "cpg0123-example/broad/images/Batch8/Plate 1/",
        "cpg0123-example/broad/images/Batch8/Plate 1/",
    ]
    blocked = blocking(findings)
    assert blocked is not None and blocked.rule == "batch-content"
    assert blocking([f for f in findings if not f.required]) is None


def test_findings_of_one_folder_are_shared_by_all_its_files() -> None:
    """So the daemon and ``check`` can report each once per folder."""
    folder = "cpg0123-example/broad/images/Batch8/"
    a = check_key(folder + "images/P1/a.tiff")
    b = check_key(folder + "images/P2/b.tiff")
    assert a == b == [next(f for f in a if f.rule == "batch-name")]
    assert a[0].folder == folder


# -- properties ----------------------------------------------------------------------------

_WORD = st.text(string.ascii_letters + string.digits, min_size=1, max_size=8)
_NAME = st.builds(
    lambda first, rest: first + rest,
    _WORD,
    st.text(string.ascii_letters + string.digits + "_-.", max_size=12),
)
_PROJECT = st.builds(
    lambda number, name: f"cpg{number:04d}-{name}",
    st.integers(0, 9999),
    st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=10),
)
_BATCH = st.builds(
    lambda y, m, d, name: f"{y:04d}_{m:02d}_{d:02d}_{name}",
    st.integers(1990, 2100),
    st.integers(1, 12),
    st.integers(1, 31),
    _NAME,
)


# Names an imager could give a plate's subfolders that are not cycle folders.
_NOT_CYCLE = re.compile(r"[0-9][Xx]_|SBS|sbs|CP")


@st.composite
def _workspace_tail(draw: st.DrawFn, folder: str) -> str:
    """What follows ``workspace/<folder>/`` in the documented tree (or anything, if none)."""
    batch, plate = draw(_BATCH), draw(_WORD)
    rest = "/".join(draw(st.lists(_NAME, min_size=1, max_size=3)))
    if folder == "analysis":
        return f"{batch}/{plate}/analysis/{plate}-{draw(_WORD)}/{rest}"
    if folder == "backend":
        return f"{batch}/{plate}/{plate}.{draw(st.sampled_from(['sqlite', 'csv']))}"
    if folder == "load_data_csv":
        return f"{batch}/{plate}/{draw(_NAME)}"
    if folder == "metadata":
        platemap = draw(st.sampled_from(["barcode_platemap.csv", f"platemap/{draw(_WORD)}.txt"]))
        return f"platemaps/{batch}/{platemap}"
    if folder == "profiles":
        return f"{batch}/{plate}/{rest}"
    if folder == "segmentation":
        kind = draw(st.sampled_from(["model", "training", "objects"]))
        return f"{draw(_WORD)}/{kind}/{rest}"
    return rest


@st.composite
def _dl_tail(draw: st.DrawFn, folder: str) -> str:
    """What follows ``workspace_dl/<folder>/`` in the documented tree."""
    model, batch, plate = draw(_NAME), draw(_BATCH), draw(_WORD)
    if folder in ("collated", "consensus"):
        return f"{model}/{draw(_NAME)}"
    if folder == "embeddings":
        site = draw(st.sampled_from(["A01-1", "A01/1", "A18"]))
        return f"{model}/{batch}/{plate}/{site}/{draw(_NAME)}"
    return f"{model}/{batch}/{plate}/{plate}.parquet"


@st.composite
def _good_key(draw: st.DrawFn) -> str:
    base = f"{draw(_PROJECT)}/{draw(_NAME)}/"
    area = draw(st.sampled_from(["images", "illum", "workspace", "workspace_dl"]))
    if area == "workspace":
        folder = draw(st.sampled_from(sorted(WORKSPACE_FOLDERS)))
        return base + f"workspace/{folder}/" + draw(_workspace_tail(folder))
    if area == "workspace_dl":
        folder = draw(st.sampled_from(["collated", "consensus", "embeddings", "profiles"]))
        return base + f"workspace_dl/{folder}/" + draw(_dl_tail(folder))
    batch = draw(_BATCH)
    if area == "illum":
        plate = draw(_WORD)
        channel = draw(_WORD)
        return base + f"images/{batch}/illum/{plate}/{plate}_Illum{channel}.npy"
    level = draw(st.sampled_from(["images", "images_projected", "images_corrected_cropped"]))
    tail = draw(st.lists(_NAME.filter(lambda n: not _NOT_CYCLE.search(n)), min_size=1, max_size=4))
    return base + f"images/{batch}/{level}/" + "/".join(tail)


@given(_good_key())
def test_any_key_built_from_allowed_parts_passes(key: str) -> None:
    assert check_key(key) == []


@given(_good_key(), st.data())
def test_whitespace_in_any_folder_below_the_project_is_flagged_and_required(
    key: str, data: st.DataObject
) -> None:
    parts = key.split("/")
    depth = data.draw(st.integers(1, len(parts) - 2))
    space = data.draw(st.sampled_from([" ", "\t", "\u00a0"]))
    cut = data.draw(st.integers(0, len(parts[depth])))
    parts[depth] = parts[depth][:cut] + space + parts[depth][cut:]
    bad = "/".join(parts)
    found = [f for f in check_key(bad) if f.rule == "whitespace"]
    assert found and found[0].required
    assert found[0].folder == "/".join(parts[: depth + 1]) + "/"
    assert blocking(check_key(bad)) is not None


@given(
    st.text(string.ascii_letters + string.digits + "_-.", min_size=1, max_size=20),
    st.sampled_from(["images/2024_01_01_B/images/P1/x.tiff", "workspace/backend/B/P/P.sqlite"]),
)
def test_no_letter_digit_or_punctuation_in_a_project_name_keeps_a_file_out(
    name: str, rest: str
) -> None:
    """Capitals, '.', '_' and '-' in the name after 'cpgNNNN-' are advice at most."""
    findings = check_key(f"cpg0001-{name}/broad/{rest}")
    assert blocking(findings) is None
    assert {f.rule for f in findings} <= {"project-name-style"}


@given(st.text(max_size=120))
def test_any_key_gives_findings_of_known_rules_about_folders_of_that_key(key: str) -> None:
    for finding in check_key(key):
        assert finding.rule in RULES
        assert key.startswith(finding.folder)
        assert finding.folder == "" or finding.folder.endswith("/")
        assert finding.message and finding.pointer


# -- the watcher ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_reject_after_warn_fails_queued_files_for_good_and_leaves_uploaded_ones(
    tmp_path: Path,
) -> None:
    """A switch to reject: what was queued is kept out (and `retry` leaves it), uploads stay."""
    root = tmp_path / "outbox"
    for rel in ("Plate 1/queued.tiff", "Plate 1/uploaded.tiff", "images/P1/fine.tiff"):
        write_file(root / rel, rel.encode())
    destination = parse_s3_uri("s3://bucket/cpg0123-example/broad/images/2024_04_01_B/")
    journal = await Journal.open(tmp_path / "journal.sqlite3")
    try:
        warn = WatchConfig("w", root, destination, settle=0.0, structure="warn")
        await Watcher(warn, journal, lambda: None, 600.0).scan()
        claimed = await journal.claim(10)
        for record in claimed:
            if record.rel_path == "Plate 1/uploaded.tiff":
                assert await journal.mark_uploaded(
                    record, etag="e", checksum_algorithm="CRC32C", checksum="c"
                )
            else:
                await journal.mark_failed(record.id, "a network error")  # retry would queue it

        reject = WatchConfig("w", root, destination, settle=0.0, structure="reject")
        watcher = Watcher(reject, journal, lambda: None, 600.0)
        await watcher.scan()
        await watcher.scan()  # a rescan changes nothing more
        rows = {r.rel_path: r for r in await journal.records()}
        assert rows["Plate 1/uploaded.tiff"].state == "uploaded"
        assert rows["Plate 1/queued.tiff"].state == "failed"
        assert str(rows["Plate 1/queued.tiff"].last_error).startswith(
            'kept out by structure = "reject": [batch-content]'
        )
        assert rows["images/P1/fine.tiff"].state == "failed"  # the network error, retried below
        assert await journal.retry_failed() == 1
        row = await journal.get("w", "Plate 1/queued.tiff")
        assert row is not None and row.state == "failed" and row.bucket == ""
        stats = watcher.statistics()
        assert stats.structure_rejected == 1
        assert {(f.rule, f.folder) for f in stats.structure_examples} == {
            ("batch-content", destination.prefix + "Plate 1/"),
            ("whitespace", destination.prefix + "Plate 1/"),
        }
    finally:
        await journal.close()


# -- the daemon ----------------------------------------------------------------------------


def _daemon(tmp_path: Path, make_config: ConfigMaker, destination: str, **watch: Any) -> Daemon:
    config = make_config(destination, settle="1s", **watch)  # the layout's tmp_path/outbox
    daemon = Daemon(config, tmp_path / "daemon.log")
    daemon.wait_for_event("running")
    return daemon


def test_reject_keeps_offending_files_out_visibly_and_uploads_the_rest(
    tmp_path: Path, make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    outbox = tmp_path / "outbox"
    good = {
        "images/Plate1/r01c01f01p01-ch1.tiff": b"image",
        "illum/Plate1/Plate1_IllumDNA.npy": b"illum",
        "images/Plate1/odd name.tiff": b"advice only: uploaded",
    }
    bad = {
        "Plate 2/r01c01f01p01-ch1.tiff": "batch-content",  # a plate outside images/
        "illum/Plate1/notes.txt": "illum-name",
    }
    for rel, data in good.items():
        write_file(outbox / rel, data)
    for rel in bad:
        write_file(outbox / rel, b"kept out")
    prefix = "cpg0123-example/broad/images/2024_04_01_Batch8/"
    daemon = _daemon(tmp_path, make_config, f"s3://{bucket}/{prefix}", structure="reject")
    try:
        for rel, data in good.items():
            wait_until(
                lambda rel=rel, data=data: object_bytes(s3_client, bucket, prefix + rel) == data,
                30,
                f"{rel} on the server",
            )

        def failed() -> list[dict[str, Any]]:
            return [r for r in journal_rows(tmp_path / "state") if r["state"] == "failed"]

        wait_until(lambda: len(failed()) == 2, 30, "both offending files to be marked failed")
        status = status_json(daemon.config)
        text = run_cli("status", "-c", str(daemon.config)).stdout
        retried = run_cli("retry", "-c", str(daemon.config))
        assert retried.returncode == 0 and retried.stdout.startswith("0 failed files"), retried
    finally:
        assert daemon.terminate() == 0
    listed = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert listed == {prefix + rel for rel in good}
    reasons = {row["rel_path"].decode(): row["last_error"] for row in failed()}
    assert set(reasons) == set(bad)
    for rel, rule in bad.items():
        assert reasons[rel].startswith(f'kept out by structure = "reject": [{rule}]')
        assert "Cell Painting Gallery data_structure.md" in reasons[rel]
    watch = status["watches"][0]
    assert watch["files"]["failed"] == 2 and watch["files"]["uploaded"] == 3
    structure = watch["structure"]
    assert structure["policy"] == "reject" and structure["rejected"] == 2
    rejected = {(e["rule"], e["folder"]) for e in structure["examples"] if e["rejected"]}
    assert ("batch-content", prefix + "Plate 2/") in rejected
    assert ("illum-name", prefix + "illum/Plate1/") in rejected
    warned = {e["rule"] for e in structure["examples"] if not e["rejected"]}
    assert warned == {"file-name"}
    assert "structure (reject): 4 warnings (per folder and rule), 2 files kept out" in text
    assert f"kept out [batch-content] {prefix}Plate 2/: folder 'Plate 2'" in text
    events = daemon.events()
    assert {(e["rule"], e["folder"]) for e in events if e.get("event") == "structure_rejected"} >= (
        rejected
    )


def test_warn_uploads_everything_and_reports_each_folder_and_rule_once(
    tmp_path: Path, make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    outbox = tmp_path / "outbox"
    files = [
        "Batch9/images/P1/a.tiff",  # batch-name, for three files
        "Batch9/images/P1/b.tiff",
        "Batch9/images/P2/c.tiff",
        "2024_01_01_B/Plate X/d.tiff",  # batch-content and whitespace, for two files
        "2024_01_01_B/Plate X/e.tiff",
        "2024_01_01_B/images/P1/f.tiff",  # fine
    ]
    for rel in files:
        write_file(outbox / rel, rel.encode())
    prefix = "cpg0123-example/broad/images/"
    daemon = _daemon(tmp_path, make_config, f"s3://{bucket}/{prefix}")  # structure: the default
    try:
        for rel in files:
            wait_until(
                lambda rel=rel: object_bytes(s3_client, bucket, prefix + rel) == rel.encode(),
                30,
                f"{rel} on the server",
            )
        scans = sum(1 for e in daemon.events() if e.get("event") == "scanned")
        assert run_cli("rescan", "-c", str(daemon.config)).returncode == 0
        wait_until(
            lambda: sum(1 for e in daemon.events() if e.get("event") == "scanned") > scans,
            30,
            "a second walk",
        )
        status = status_json(daemon.config)
        text = run_cli("status", "-c", str(daemon.config)).stdout
    finally:
        assert daemon.terminate() == 0
    expected = {
        ("batch-name", prefix + "Batch9/"),
        ("batch-content", prefix + "2024_01_01_B/Plate X/"),
        ("whitespace", prefix + "2024_01_01_B/Plate X/"),
    }
    warnings = Counter(
        (e["rule"], e["folder"]) for e in daemon.events() if e.get("event") == "structure_warning"
    )
    assert warnings == Counter(dict.fromkeys(expected, 1))
    assert not [e for e in daemon.events() if e.get("event") == "structure_rejected"]
    one = next(e for e in daemon.events() if e.get("rule") == "batch-name")
    assert one["watch"] == "plates" and one["level"] == "warning"
    assert "'Batch9'" in one["message"] and "data_structure.md" in one["pointer"]
    watch = status["watches"][0]
    assert watch["files"]["uploaded"] == len(files) and watch["files"]["failed"] == 0
    structure = watch["structure"]
    assert structure["policy"] == "warn" and structure["warnings"] == 3
    assert structure["rejected"] == 0
    assert {(e["rule"], e["folder"]) for e in structure["examples"]} == expected
    assert not any(e["rejected"] for e in structure["examples"])
    assert "structure (warn): 3 warnings" in text
    assert f"[batch-name] {prefix}Batch9/: batch folder 'Batch9'" in text


def test_off_checks_nothing(
    tmp_path: Path, make_config: ConfigMaker, s3_client: Any, bucket: str
) -> None:
    write_file(tmp_path / "outbox" / "Plate 1" / "x.tiff", b"x")
    daemon = _daemon(tmp_path, make_config, f"s3://{bucket}/whatever/", structure="off")
    try:
        wait_until(
            lambda: object_bytes(s3_client, bucket, "whatever/Plate 1/x.tiff") == b"x",
            30,
            "the file on the server",
        )
        status = status_json(daemon.config)
    finally:
        assert daemon.terminate() == 0
    assert not [e for e in daemon.events() if str(e.get("event", "")).startswith("structure")]
    assert status["watches"][0]["structure"] == {
        "policy": "off",
        "warnings": 0,
        "rejected": 0,
        "examples": [],
    }


def test_finding_is_a_frozen_value() -> None:
    finding = check_key("x.tiff")[0]
    assert isinstance(finding, Finding)
    with pytest.raises(AttributeError):
        finding.rule = "other"  # type: ignore[misc]
