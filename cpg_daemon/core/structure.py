"""The Cell Painting Gallery's folder rules, checked on object keys before upload.

The rules come from the gallery's own documentation: ``data_structure.md`` (the
folder tree every project follows) and ``contributing_to_cpg.md`` (names to
avoid). ``check_key`` is a pure function of one key; a key that follows the
rules gives no findings.

Where the documentation only recommends (batch folders "typically" start with a
date; "additional" workspace folders are welcome) or says itself that it is a
work in progress (``workspace_dl``), or where it does not say (odd characters
in *file* names: the gallery asks only about folder names, and its own pooled
example has commas in microscope file names), a finding is *advice*: it is
shown, never used to keep a file out. Only findings marked ``required`` count for the
``structure = "reject"`` policy: a false warning is a nuisance, a false reject
stops a lab's upload.

Below the first level of ``workspace/`` and ``workspace_dl/`` the documentation
draws a tree per folder (``backend/<batch>/<plate>/<plate>.sqlite``,
``embeddings/<model>/<batch>/<plate>/<well>-<site>/``, ...) and describes it
("is a folder for each batch", "typically"), never demands it: those rules
(``LAYOUTS``) are advice, as are the pooled experiments' cycle-folder names,
which it says "should" follow. The project folder must carry the identifier
the gallery assigns (``cpgNNNN-<name>``); that the name is in lower case is
advice, because published projects such as ``cpg0036-EU-OS-bioactives`` are not.

Findings depend on the folder a file is in far more than on its name, so the
folder part is computed once per folder (cached) and only the file name is
looked at per key: 100,000 keys take a small fraction of a second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

AREAS = ("images", "workspace", "workspace_dl")
"""The folders under ``<project>/<source>/``."""

WORKSPACE_FOLDERS = frozenset(
    {
        # required ("minimally required top-level folders under workspace")
        "analysis",
        "backend",
        "load_data_csv",
        "metadata",
        "profiles",
        # optional, as data_structure.md lists them
        "assaydev",
        "embeddings",
        "pipelines",
        "profiles_assembled",
        "qc",
        "quality_control",
        "segmentation",
        "software",
        # not in any text of data_structure.md found, but used by published gallery
        # projects: the data behind a paper (cpg0016, cpg0021, cpg0034, cpg0042), and the
        # gallery's harmonized metadata (cpg0016-jump/source_all/workspace/metadata_harmonized/)
        "metadata_harmonized",
        "publication_data",
    }
)
WORKSPACE_DL_FOLDERS = frozenset({"collated", "consensus", "embeddings", "profiles"})

POINTER_TOP = "Cell Painting Gallery data_structure.md, the parent structure at the top"
POINTER_IMAGES = "Cell Painting Gallery data_structure.md, section 'images folder structure'"
POINTER_BATCH = (
    "Cell Painting Gallery data_structure.md, sections 'Arrayed Cell Painting experiments' "
    "and 'Pooled Cell Painting experiments'"
)
POINTER_ILLUM = (
    "Cell Painting Gallery data_structure.md, the 'illum' folder in 'Arrayed Cell Painting "
    "experiments' (and 'Pooled Cell Painting experiments' for Cycle and Round names)"
)
POINTER_WORKSPACE = "Cell Painting Gallery data_structure.md, section 'workspace folder structure'"
POINTER_WORKSPACE_DL = (
    "Cell Painting Gallery data_structure.md, section 'workspace_dl folder structure'"
)
POINTER_NAMES = (
    "Cell Painting Gallery contributing_to_cpg.md, 'Remove special characters in folder names'"
)
POINTER_POOLED = (
    "Cell Painting Gallery data_structure.md, section 'Pooled Cell Painting experiments'"
)


def _section(name: str, area: str = "workspace") -> str:
    """Where data_structure.md draws the tree below one folder of ``workspace[_dl]/``."""
    return (
        f"Cell Painting Gallery data_structure.md, section '{name} folder structure' "
        f"under '{area} folder structure'"
    )


@dataclass(frozen=True)
class Rule:
    """One of the gallery's rules, as the README's table lists it."""

    id: str
    required: bool
    """Whether ``structure = "reject"`` keeps a file with this finding out."""
    summary: str
    pointer: str


RULES: dict[str, Rule] = {
    rule.id: rule
    for rule in (
        Rule(
            "layout",
            True,
            "keys are <project>/<source>/(images|workspace|workspace_dl)/..., and images/ "
            "holds batch folders",
            POINTER_TOP,
        ),
        Rule(
            "project-name",
            True,
            "the project folder is the identifier the gallery assigned: cpgNNNN-<name>",
            POINTER_TOP,
        ),
        Rule(
            "project-name-style",
            False,
            "the project's name is in lower-case letters, digits, '-' and '_' (some "
            "published projects differ: keep the identifier the gallery assigned)",
            POINTER_TOP,
        ),
        Rule(
            "area",
            True,
            "under <source>/ only images/, workspace/ and workspace_dl/",
            POINTER_TOP,
        ),
        Rule(
            "batch-name",
            False,
            "batch folders start with the acquisition date, YYYY_MM_DD_<name>",
            POINTER_IMAGES,
        ),
        Rule(
            "batch-content",
            True,
            "a batch folder holds images/, illum/ and images_<manipulation>/ folders",
            POINTER_BATCH,
        ),
        Rule(
            "illum-layout",
            True,
            "illum/ holds one folder per plate, with the plate's files in it",
            POINTER_ILLUM,
        ),
        Rule(
            "illum-name",
            True,
            "illumination functions are named <plate>_Illum<Channel>.npy "
            "(or <plate>_Cycle<n>_Illum<Channel>.npy)",
            POINTER_ILLUM,
        ),
        Rule(
            "pooled-cycle",
            False,
            "a pooled plate's cycle folders are <magnification>X_..._SBS-<n> (barcoding) or "
            "<magnification>X_CP_... (Cell Painting)",
            POINTER_POOLED,
        ),
        Rule(
            "workspace-folder",
            False,
            "workspace/ holds the documented folders (analysis, backend, ...); others are "
            "allowed but shown, in case of a typo",
            POINTER_WORKSPACE,
        ),
        Rule(
            "analysis-layout",
            False,
            "analysis/<batch>/<plate>/analysis/<plate>-<well>-<site>/ holds CellProfiler's "
            "CSVs (and outlines/ or masks/ below)",
            _section("analysis"),
        ),
        Rule(
            "backend-layout",
            False,
            "backend/<batch>/<plate>/ holds <plate>.sqlite and <plate>.csv",
            _section("backend"),
        ),
        Rule(
            "load-data-layout",
            False,
            "load_data_csv/<batch>/<plate>/ holds load_data.csv and load_data_with_illum.csv",
            _section("load_data_csv"),
        ),
        Rule(
            "platemaps-layout",
            False,
            "metadata/platemaps/<batch>/ holds barcode_platemap.csv and platemap/<name>.txt",
            _section("metadata"),
        ),
        Rule(
            "profiles-layout",
            False,
            "profiles/<batch>/<plate>/ holds the plate's profiles",
            _section("profiles"),
        ),
        Rule(
            "segmentation-layout",
            False,
            "segmentation/<software>_<hash>/ holds model/, training/ and objects/",
            _section("segmentation"),
        ),
        Rule(
            "workspace-dl-folder",
            False,
            "workspace_dl/ holds collated, consensus, embeddings and profiles",
            POINTER_WORKSPACE_DL,
        ),
        Rule(
            "dl-collated-layout",
            False,
            "collated/<model>/ holds the well-level profiles of all plates",
            _section("collated", "workspace_dl"),
        ),
        Rule(
            "dl-consensus-layout",
            False,
            "consensus/<model>/ holds the treatment-level profiles of all plates",
            _section("consensus", "workspace_dl"),
        ),
        Rule(
            "dl-embeddings-layout",
            False,
            "embeddings/<model>/<batch>/<plate>/<well>-<site>/ (or <well>/<site>/) holds "
            "the single-cell embeddings",
            _section("embeddings", "workspace_dl"),
        ),
        Rule(
            "dl-profiles-layout",
            False,
            "profiles/<model>/<batch>/<plate>/ holds <plate>.parquet",
            _section("profiles", "workspace_dl"),
        ),
        Rule(
            "whitespace",
            True,
            "no whitespace in folder names",
            POINTER_NAMES,
        ),
        Rule(
            "characters",
            True,
            "folder names use only letters, digits, '_', '-' and '.'",
            POINTER_NAMES,
        ),
        Rule(
            "file-name",
            False,
            "file names without whitespace, and best with only letters, digits, '_', '-', '.' "
            "and ','",
            POINTER_NAMES,
        ),
    )
}


@dataclass(frozen=True)
class Finding:
    """One way a key departs from the gallery's rules."""

    rule: str
    """Short id of the rule, a key of ``RULES``."""
    message: str
    """One sentence naming the offending name and what is expected."""
    pointer: str
    """Where the rule is written down (no link: the gallery's docs move)."""
    folder: str
    """The key prefix (ending in ``/``, or empty for the bucket's top) the finding is about.

    Every file in that folder has the same finding, so it is reported once per folder.
    """
    required: bool
    """True when the documentation requires it (``reject`` keeps the file out); False
    for advice (documented as a recommendation, or a rule the docs leave open)."""

    def __str__(self) -> str:
        return f"[{self.rule}] {self.message} (see {self.pointer})"


@dataclass(frozen=True)
class Layout:
    """The folders data_structure.md draws below one folder of ``workspace[_dl]/``.

    A level in angle brackets (``<batch>``) stands for any name; any other level
    is the name (or ``|``-separated names) that must be there.
    """

    rule: str
    levels: tuple[str, ...]
    """Folders every file is in, below the documented folder."""
    holds: str
    """What the innermost level holds, for the messages."""
    optional: tuple[str, ...] = ()
    """Folders that may follow ``levels``."""
    deeper: bool = False
    """Whether folders of the tool's or imager's own may follow."""


LAYOUTS: dict[tuple[str, ...], Layout] = {
    ("workspace", "analysis"): Layout(
        "analysis-layout",
        ("<batch>", "<plate>", "analysis", "<plate>-<well>-<site>"),
        "CellProfiler's CSVs for one site (or well)",
        deeper=True,  # outlines/, masks/
    ),
    ("workspace", "backend"): Layout(
        "backend-layout", ("<batch>", "<plate>"), "<plate>.sqlite and <plate>.csv"
    ),
    ("workspace", "load_data_csv"): Layout(
        "load-data-layout",
        ("<batch>", "<plate>"),
        "the plate's LoadData CSVs (load_data.csv, load_data_with_illum.csv)",
    ),
    ("workspace", "metadata", "platemaps"): Layout(
        "platemaps-layout",
        ("<batch>",),
        "barcode_platemap.csv (and platemap/<name>.txt)",
        optional=("platemap",),
    ),
    ("workspace", "profiles"): Layout(
        "profiles-layout",
        ("<batch>", "<plate>"),
        "the plate's profiles",
        deeper=True,  # versioned recipe outputs nest further
    ),
    ("workspace", "segmentation"): Layout(
        "segmentation-layout",
        ("<software>_<hash>", "model|training|objects"),
        "the model's README.md, training data or the objects",
        deeper=True,
    ),
    ("workspace_dl", "collated"): Layout(
        "dl-collated-layout", ("<model>",), "collated.parquet (or .csv)"
    ),
    ("workspace_dl", "consensus"): Layout(
        "dl-consensus-layout", ("<model>",), "consensus.parquet (or .csv)"
    ),
    ("workspace_dl", "embeddings"): Layout(
        "dl-embeddings-layout",
        ("<model>", "<batch>", "<plate>", "<well>-<site>"),
        "embedding.parquet or embedding.npz",
        deeper=True,  # DeepProfiler: <well>/<site>/
    ),
    # The text says "a file for each plate" in the batch folder, the tree a plate folder.
    ("workspace_dl", "profiles"): Layout(
        "dl-profiles-layout", ("<model>", "<batch>"), "<plate>.parquet", optional=("<plate>",)
    ),
}
"""Per folder of ``<project>/<source>/``: its documented tree (all advice)."""

# The identifier the gallery assigns (required): 'cpg', four digits, '-' and a name.
_PROJECT_ID = re.compile(r"cpg[0-9]{4}-.")
# The name as data_structure.md asks ([a-z0-9_]), with the '-' all projects use (advice).
_PROJECT_STYLE = re.compile(r"cpg[0-9]{4}-[a-z0-9]+(?:[_-][a-z0-9]+)*")
_PROJECT_ODD = re.compile(r"[^A-Za-z0-9_-]")
# YYYY_MM_DD as documented; YYYYMMDD too, because the gallery's own pooled example
# (cpg0021-periscope, 20210422_6W_CP257) uses it. A name after the date is optional.
_BATCH = re.compile(
    r"[0-9]{4}(?:_(?:0[1-9]|1[0-2])_(?:0[1-9]|[12][0-9]|3[01])"
    r"|(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01]))(?:_.*)?"
)
_MANIPULATION = re.compile(r"images_[A-Za-z0-9][A-Za-z0-9_.-]*")
# <plate>_Illum<Channel>.npy, <plate>_Cycle<n>_Illum<Channel>.npy, with optional
# suffixes such as _Round1 (repeated stains) or _H/_L (BR00117035_IllumBrightfield_H.npy).
_ILLUM_REST = re.compile(r"(?:Cycle[0-9]+_)?Illum[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*\.npy")
# Pooled plates: a folder per imaging cycle, named for the magnification, then
# ..._SBS-<n> (barcoding; the guide's own example is '10X_c1-SBS-1') or _CP_ (painting).
# Other folders in a plate folder are the imager's own (an arrayed plate's 'Images/'),
# so only a name that looks meant as a cycle folder is checked.
_CYCLE_LIKE = re.compile(r"^[0-9]+[Xx]_|SBS|sbs|(?:^|_)CP(?:_|$)")
_CYCLE = re.compile(r"[0-9]+X_(?:(?:.*[_-])?SBS-[0-9]+|(?:.*_)?CP(?:_.*)?)")
_WHITESPACE = re.compile(r"\s")
_FOLDER_BAD = re.compile(r"[^A-Za-z0-9_.-]")
# File names may also hold ',' (the gallery's pooled example has Nikon names such as
# Well1_Point1_0000_ChannelDAPI,Cy3,A594,Cy5,Cy7_Seq0000.nd2).
_FILE_BAD = re.compile(r"[^A-Za-z0-9_.,-]")


def check_key(key: str) -> list[Finding]:
    """Every way ``key`` departs from the gallery's folder rules; [] when it follows them."""
    folder, _, name = key.rpartition("/")
    findings, names = _folder_findings(folder)
    found = list(findings)
    if name:
        found += _name_findings(folder, name, names)
    return found


def blocking(findings: list[Finding]) -> Finding | None:
    """The first finding that ``structure = "reject"`` keeps a file out for, or None."""
    return next((f for f in findings if f.required), None)


def _finding(rule: str, message: str, folder: str) -> Finding:
    spec = RULES[rule]
    return Finding(rule, message, spec.pointer, folder, spec.required)


def _odd(pattern: re.Pattern[str], name: str) -> str:
    """The characters of ``name`` that ``pattern`` finds, each once, quoted."""
    seen = dict.fromkeys(pattern.findall(name))
    return ", ".join(repr(c) for c in seen)


@dataclass(frozen=True)
class _PlateFiles:
    """A folder whose files are named for its plate: the rule that says so, and the plate."""

    rule: str
    plate: str


@lru_cache(maxsize=16384)
def _folder_findings(folder: str) -> tuple[tuple[Finding, ...], _PlateFiles | None]:
    """Findings shared by every file directly in ``folder``, and how its files are named.

    ``folder`` has no trailing ``/``; "" is the top of the bucket. Findings come
    top-down (the outermost folder first).
    """
    parts = folder.split("/") if folder else []
    found: list[Finding] = []
    names = _folder_rules(parts, found)
    for depth in range(len(parts)):
        found += _name_problems(parts[depth], _prefix(parts, depth + 1))
    found.sort(key=lambda f: len(f.folder))  # stable: layout rules before name rules
    return tuple(found), names


def _folder_rules(parts: list[str], found: list[Finding]) -> _PlateFiles | None:
    """Adds the findings of a folder (given as its names) to ``found``.

    Returns how the files directly in it are to be named, where a rule says so.
    """
    here = "/".join(parts) + "/" if parts else ""
    # The fixed levels: <project>/<source>/<area>/.
    if len(parts) < 3:
        where = {
            0: "at the top of the bucket",
            1: f"directly in the project folder '{here}'",
            2: f"directly in the source folder '{here}'",
        }[len(parts)]
        found.append(
            _finding(
                "layout",
                f"files {where} are outside the gallery's layout: expected "
                "<project>/<source>/images/, workspace/ or workspace_dl/ before any file",
                here,
            )
        )
    if parts:
        found += _project_findings(parts[0])
    if len(parts) < 3:
        return None

    area = parts[2]
    if area not in AREAS:
        hint = f" (in lower case: '{area.lower()}/')" if area.lower() in AREAS else ""
        found.append(
            _finding(
                "area",
                f"folder '{area}' under the source folder is not one of the gallery's areas: "
                f"expected images/, workspace/ or workspace_dl/{hint}",
                _prefix(parts, 3),
            )
        )
        return None

    if area == "images":
        found += _images_findings(parts, here)
        if len(parts) == 6 and parts[4] == "illum":
            return _PlateFiles("illum-name", parts[5])
        return None
    if len(parts) == 3:
        if area == "workspace":
            rule = "workspace-folder"
            folders = "a folder such as analysis/, backend/, load_data_csv/, metadata/ or profiles/"
        else:
            rule = "workspace-dl-folder"
            folders = "a folder: collated/, consensus/, embeddings/ or profiles/"
        found.append(_finding(rule, f"files directly in '{here}' belong in {folders}", here))
        return None
    if area == "workspace" and parts[3] not in WORKSPACE_FOLDERS:
        known = ", ".join(sorted(WORKSPACE_FOLDERS))
        found.append(
            _finding(
                "workspace-folder",
                f"folder '{parts[3]}' under workspace/ is not one the gallery documents "
                f"({known}); extra kinds of data may have folders of their own, but check "
                "the spelling",
                _prefix(parts, 4),
            )
        )
        return None
    if area == "workspace_dl" and parts[3] not in WORKSPACE_DL_FOLDERS:
        found.append(
            _finding(
                "workspace-dl-folder",
                f"folder '{parts[3]}' under workspace_dl/ is not one the gallery documents for "
                "deep-learning results (collated, consensus, embeddings, profiles)",
                _prefix(parts, 4),
            )
        )
        return None
    return _layout_rules(parts, found)


def _prefix(parts: list[str], depth: int) -> str:
    """The key prefix of the first ``depth`` folders, ending in ``/``."""
    return "/".join(parts[:depth]) + "/"


def _project_findings(project: str) -> list[Finding]:
    """The project folder: the gallery's identifier (required), in lower case (advice)."""
    folder = project + "/"
    if not _PROJECT_ID.match(project):
        if _PROJECT_STYLE.fullmatch(project.lower()):
            expected = f"lower case: '{project.lower()}'"
        else:
            expected = "the identifier the gallery assigned, 'cpgNNNN-<name>' (e.g. 'cpg0016-jump')"
        message = f"project folder '{project}' is not a gallery project name: expected {expected}"
        return [_finding("project-name", message, folder)]
    if _PROJECT_STYLE.fullmatch(project):
        return []
    name = project[len("cpg0000-") :]
    what = " and ".join(
        part
        for part in ("capitals" if name.lower() != name else "", _odd(_PROJECT_ODD, name))
        if part
    )
    return [
        _finding(
            "project-name-style",
            f"project folder '{project}' has {what or 'a stray -/_'}: the gallery asks for "
            "lower-case letters and digits joined by '-' or '_'; if this is the identifier "
            "the gallery assigned, keep it",
            folder,
        )
    ]


def _images_findings(parts: list[str], here: str) -> list[Finding]:
    """``<project>/<source>/images/<batch>/(images|illum|images_<x>)/...``."""
    found: list[Finding] = []
    if len(parts) == 3:
        return [
            _finding(
                "layout",
                f"files directly in '{here}' belong in a batch folder, "
                f"'{here}YYYY_MM_DD_<batch-name>/'",
                here,
            )
        ]
    batch = parts[3]
    if not _BATCH.fullmatch(batch):
        found.append(
            _finding(
                "batch-name",
                f"batch folder '{batch}' does not start with the acquisition date: "
                "recommended 'YYYY_MM_DD_<batch-name>', e.g. '2021_04_26_Batch1'",
                _prefix(parts, 4),
            )
        )
    if len(parts) == 4:
        found.append(
            _finding(
                "batch-content",
                f"files directly in batch folder '{here}' belong in its images/, illum/ or "
                "images_<manipulation>/ folder",
                here,
            )
        )
        return found
    level = parts[4]
    if level not in ("images", "illum") and not _MANIPULATION.fullmatch(level):
        hint = (
            f" (in lower case: '{level.lower()}/')"
            if level.lower() in ("images", "illum") or level.lower().startswith("images_")
            else " (a plate folder goes in images/)"
        )
        found.append(
            _finding(
                "batch-content",
                f"folder '{level}' in batch folder '{batch}' is not images/, illum/ or "
                f"images_<manipulation>/{hint}",
                _prefix(parts, 5),
            )
        )
    elif level == "illum" and len(parts) != 6:
        if len(parts) == 5:
            message = (
                f"files directly in '{here}' belong in a folder per plate, '{here}<plate-name>/'"
            )
        else:
            message = (
                f"'{here}' is nested too deep: illum/<plate-name>/ holds the plate's "
                "illumination files directly"
            )
        found.append(_finding("illum-layout", message, here))
    elif level == "images" and len(parts) >= 7:
        cycle = parts[6]
        if _CYCLE_LIKE.search(cycle) and not _CYCLE.fullmatch(cycle):
            found.append(
                _finding(
                    "pooled-cycle",
                    f"cycle folder '{cycle}' in plate folder '{parts[5]}' is not named as the "
                    "gallery asks: expected the magnification ('10X_'), then '..._SBS-<n>' for a "
                    "barcoding cycle (e.g. '10X_c1-SBS-1') or '_CP_' for Cell Painting "
                    "(e.g. '20X_CP_CP257A')",
                    _prefix(parts, 7),
                )
            )
    return found


def _layout_rules(parts: list[str], found: list[Finding]) -> _PlateFiles | None:
    """The documented tree below ``workspace/<folder>/`` or ``workspace_dl/<folder>/`` (advice).

    ``parts`` are the folders of one key, at least ``<project>/<source>/<area>/<folder>``.
    """
    start = 5 if tuple(parts[2:5]) in LAYOUTS else 4
    layout = LAYOUTS.get(tuple(parts[2:start]))
    if layout is None:
        return None
    top = _prefix(parts, start)
    tree = top + "/".join(f"({level})" if "|" in level else level for level in layout.levels) + "/"
    below = parts[start:]
    allowed = layout.levels + layout.optional
    for depth, (name, expected) in enumerate(zip(below, allowed, strict=False)):
        names = expected.split("|")
        if not expected.startswith("<") and name not in names:
            folder = _prefix(parts, start + depth)
            choices = " or ".join(f"{n}/" for n in names)
            found.append(
                _finding(
                    layout.rule,
                    f"folder '{name}' in '{folder}' is not {choices}: expected '{tree}' "
                    f"holding {layout.holds}",
                    _prefix(parts, start + depth + 1),
                )
            )
            return None
    here = _prefix(parts, len(parts))
    if len(below) < len(layout.levels):
        found.append(
            _finding(
                layout.rule,
                f"files directly in '{here}' belong deeper: expected '{tree}' holding "
                f"{layout.holds}",
                here,
            )
        )
    elif len(below) > len(allowed) and not layout.deeper:
        folder = _prefix(parts, start + len(allowed) + 1)
        found.append(
            _finding(
                layout.rule,
                f"'{folder}' is nested too deep: '{tree}' holds {layout.holds} directly",
                folder,
            )
        )
    elif layout.rule == "backend-layout" and len(below) == len(layout.levels):
        return _PlateFiles(layout.rule, below[-1])
    return None


def _name_problems(name: str, folder_of: str) -> list[Finding]:
    """Whitespace and unusual characters in one folder name (required: contributing_to_cpg.md)."""
    found: list[Finding] = []
    if _WHITESPACE.search(name):
        found.append(
            _finding(
                "whitespace",
                f"folder name '{name}' contains whitespace: use '_' or '-' instead",
                folder_of,
            )
        )
    odd = _odd(_FOLDER_BAD, _WHITESPACE.sub("", name)) if _FOLDER_BAD.search(name) else ""
    if odd:
        found.append(
            _finding(
                "characters",
                f"folder name '{name}' contains {odd}: folder names use only letters, digits, "
                "'_', '-' and '.'",
                folder_of,
            )
        )
    return found


def _name_findings(folder: str, name: str, names: _PlateFiles | None) -> list[Finding]:
    """Findings about the file name itself (per key: kept cheap)."""
    here = folder + "/" if folder else ""
    found: list[Finding] = []
    if _FILE_BAD.search(name):
        odd = _odd(_FILE_BAD, _WHITESPACE.sub("", name))
        what = " and ".join(
            part for part in ("whitespace" if _WHITESPACE.search(name) else "", odd) if part
        )
        found.append(
            _finding(
                "file-name",
                f"file name '{name}' contains {what}: file names are safest with only letters, "
                "digits, '_', '-', '.' and ','",
                here,
            )
        )
    if names is None:
        return found
    plate_prefix = names.plate + "_"
    if names.rule == "illum-name":
        if not (name.startswith(plate_prefix) and _ILLUM_REST.fullmatch(name, len(plate_prefix))):
            found.append(
                _finding(
                    "illum-name",
                    f"illumination file '{name}' is not named "
                    f"'{names.plate}_Illum<Channel>.npy' (or "
                    f"'{names.plate}_Cycle<n>_Illum<Channel>.npy' for barcoding cycles)",
                    here,
                )
            )
    elif not (name.startswith(plate_prefix) or name.startswith(names.plate + ".")):
        found.append(
            _finding(
                names.rule,
                f"file '{name}' in backend plate folder '{names.plate}' is not named for its "
                f"plate: expected '{names.plate}.sqlite' (single cells) and "
                f"'{names.plate}.csv' (per well)",
                here,
            )
        )
    return found
