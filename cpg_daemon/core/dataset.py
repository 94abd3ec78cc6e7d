"""A dataset as the gallery's maintainers see it, and what the gallery's guide asks of it.

``analyse`` is a pure function of a listing: the paths and sizes of the objects (or
files) below a project folder (``cpgNNNN-name/``) or one of its source folders. It
sorts them into batches and plates, counts what each plate has (images, illumination
functions, LoadData CSVs, CellProfiler output, profiles) and reports what is missing
or inconsistent, as a :class:`DatasetReport`. Listing, printing and exit statuses are
others' business (``engine.dataset``, ``cli.main``).

The checks and where the gallery writes them down are in ``CHECKS``. A check is
*required* where the gallery's documents say "required" or "must", or where the
layout they give has no other reading (a plate's files in a folder per batch and
plate); it is *advice* where they say "typically", or where the contributor chooses
(which components to contribute). Every key is also held to the per-key folder
rules of ``core.structure`` (as ``check`` and the daemon apply them), reported once
per folder and rule, required or advice as that rule is.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cpg_daemon.core.structure import Finding, check_key

__all__ = [
    "CHECKS",
    "PER_PLATE",
    "Batch",
    "Check",
    "DatasetReport",
    "Plate",
    "Problem",
    "Source",
    "analyse",
    "same_plate",
]

FORMAT_VERSION = 1
"""``DatasetReport.to_json()["format"]``: raised when a key changes meaning or goes away."""

PER_PLATE = ("load_data_csv", "analysis", "backend", "profiles")
"""The ``workspace/`` folders laid out ``<folder>/<batch>/<plate>/`` (data_structure.md)."""

POINTER_MINIMUM = (
    "Cell Painting Gallery contributing_to_cpg.md, 'Contributing Data to the Gallery' "
    "(\"Note that `metadata` and `load_data_csv` are required\")"
)
POINTER_ARRAYED = (
    "Cell Painting Gallery data_structure.md, 'Arrayed Cell Painting experiments' "
    "(\"the <plate-name> used in the images folder must match that used in the workspace "
    'folder")'
)
POINTER_WORKSPACE = (
    "Cell Painting Gallery data_structure.md, the `analysis`, `backend`, `load_data_csv` "
    "and `profiles` folder structures (a folder per batch, in it a folder per plate)"
)
POINTER_COMPONENTS = (
    "Cell Painting Gallery contributing_to_cpg.md, the components a contribution chooses "
    "(major components: images, analysis, backend, load_data_csv, profiles)"
)
POINTER_METADATA = "Cell Painting Gallery data_structure.md, '`metadata` folder structure'"


@dataclass(frozen=True)
class Check:
    """One dataset-level check, as the README's table lists it."""

    id: str
    required: bool
    summary: str
    pointer: str


CHECKS: dict[str, Check] = {
    check.id: check
    for check in (
        Check(
            "minimum",
            True,
            "a dataset has images/ (plates in images/<batch>/images/), workspace/metadata/ "
            "and workspace/load_data_csv/",
            POINTER_MINIMUM,
        ),
        Check(
            "load-data-csv",
            True,
            "every plate with images has workspace/load_data_csv/<batch>/<plate>/",
            POINTER_MINIMUM + "; " + POINTER_WORKSPACE,
        ),
        Check(
            "illum-without-images",
            True,
            "every images/<batch>/illum/<plate>/ is a plate of images/<batch>/images/",
            POINTER_ARRAYED,
        ),
        Check(
            "plate-without-images",
            True,
            "every workspace/<folder>/<batch>/<plate>/ (load_data_csv, analysis, backend, "
            "profiles) is a plate of images/<batch>/images/",
            POINTER_ARRAYED,
        ),
        Check(
            "backend-sqlite",
            True,
            "workspace/backend/<batch>/<plate>/ holds the single-cell <plate>.sqlite",
            "Cell Painting Gallery data_structure.md, '`backend` folder structure'",
        ),
        Check(
            "depth",
            True,
            "files lie in plate folders: images/<batch>/images/<plate>/..., and "
            "workspace/<folder>/<batch>/<plate>/... for load_data_csv, analysis, backend and "
            "profiles",
            POINTER_WORKSPACE,
        ),
        Check(
            "illum-missing",
            False,
            "every plate with images has images/<batch>/illum/<plate>/ (a batch 'typically' "
            "has both)",
            POINTER_ARRAYED,
        ),
        Check(
            "features",
            False,
            "every plate with images has its CellProfiler output: "
            "workspace/backend/<batch>/<plate>/<plate>.sqlite or "
            "workspace/analysis/<batch>/<plate>/",
            POINTER_COMPONENTS,
        ),
        Check(
            "component-gap",
            False,
            "a per-plate component (analysis, backend, profiles) the dataset has is there "
            "for every plate with images",
            POINTER_COMPONENTS,
        ),
        Check(
            "analysis-nesting",
            False,
            "workspace/analysis/<batch>/<plate>/ holds only the legacy analysis/ folder",
            "Cell Painting Gallery data_structure.md, '`analysis` folder structure'",
        ),
        Check(
            "metadata-batch",
            False,
            "workspace/metadata/ describes each batch: platemaps/<batch>/barcode_platemap.csv "
            "(arrayed) or <batch>/Barcodes.csv (pooled)",
            POINTER_METADATA,
        ),
    )
}
FOLDER_RULE = "folder-rule"
"""``Problem.check`` of a per-key folder rule (``core.structure``); ``Problem.rule`` names it."""


@dataclass(frozen=True)
class Problem:
    """One thing missing or inconsistent, about one folder (relative to the target)."""

    check: str
    """A key of ``CHECKS``, or ``FOLDER_RULE``."""
    required: bool
    message: str
    folder: str
    """Relative to the target, ending in ``/`` ("" for the target itself)."""
    source: str = ""
    batch: str = ""
    plate: str = ""
    rule: str = ""
    """For ``FOLDER_RULE``: the rule's id in ``core.structure.RULES``."""
    files: int = 0
    """How many files share it (depth and folder rules); 0 when it is about a folder."""
    pointer: str = ""


@dataclass(frozen=True)
class Plate:
    """One plate of a batch and how many files each of its folders holds."""

    name: str
    """As illum/ and workspace/ name it (or the images folder's name, when nothing else does)."""
    image_folders: tuple[str, ...]
    """Its folders in ``images/<batch>/images/`` (the full names off the microscope)."""
    images: int
    image_bytes: int
    illum: int
    load_data_csv: int
    analysis: int
    backend: int
    backend_sqlite: bool
    profiles: int


@dataclass(frozen=True)
class Batch:
    name: str
    plates: tuple[Plate, ...]
    image_manipulations: tuple[str, ...]
    """Its ``images_<manipulation>/`` folders."""


@dataclass(frozen=True)
class Source:
    name: str
    prefix: str
    """Relative to the target ("" when the target is this source)."""
    objects: int
    bytes: int
    areas: tuple[str, ...]
    """The folders directly under the source that hold files (images, workspace, ...)."""
    workspace: dict[str, int]
    """Each folder of ``workspace/`` and how many files it holds."""
    batches: tuple[Batch, ...]


@dataclass(frozen=True)
class DatasetReport:
    project: str
    sources: tuple[Source, ...]
    problems: tuple[Problem, ...]
    objects: int
    bytes: int

    @property
    def complete(self) -> bool:
        """Nothing the gallery requires is missing (advice aside)."""
        return not any(problem.required for problem in self.problems)

    @property
    def required(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.required)

    @property
    def advice(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if not p.required)

    def to_json(self, target: str) -> dict[str, Any]:
        """The ``--json`` document (README, "Check a dataset", lists its keys)."""
        return {
            "format": FORMAT_VERSION,
            "target": target,
            "project": self.project,
            "complete": self.complete,
            "objects": self.objects,
            "bytes": self.bytes,
            "required_problems": len(self.required),
            "advice": len(self.advice),
            "sources": [asdict(source) for source in self.sources],
            "problems": [asdict(problem) for problem in self.problems],
        }


def same_plate(folder: str, plate: str) -> bool:
    """Whether ``plate`` (as illum/ and workspace/ name it) names the images folder ``folder``.

    The guide lets the plate's name be the folder's full name off the microscope
    (``BR00117035__2021-05-02T16_02_51-Measurement1``) truncated, as long as the
    relationship is obvious (``BR00117035``): here, the folder's name, or its start up
    to a ``_``, ``-`` or ``.``.
    """
    return folder == plate or (
        len(folder) > len(plate) and folder.startswith(plate) and folder[len(plate)] in "_-."
    )


# Gathering: one pass over the listing.


@dataclass
class _PlateFiles:
    files: int = 0
    bytes: int = 0


@dataclass
class _Gathered:
    """What one source's keys say, before any check (mutable, private)."""

    objects: int = 0
    bytes: int = 0
    areas: Counter[str] = field(default_factory=Counter)
    workspace: Counter[str] = field(default_factory=Counter)
    image_batches: set[str] = field(default_factory=set)
    images: dict[tuple[str, str], _PlateFiles] = field(default_factory=dict)
    """(batch, images folder) -> files."""
    illum: Counter[tuple[str, str]] = field(default_factory=Counter)
    manipulations: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    per_plate: dict[str, Counter[tuple[str, str]]] = field(
        default_factory=lambda: {folder: Counter() for folder in PER_PLATE}
    )
    sqlite: set[tuple[str, str]] = field(default_factory=set)
    loose_analysis: Counter[tuple[str, str]] = field(default_factory=Counter)
    metadata_batches: set[str] = field(default_factory=set)
    misplaced: Counter[str] = field(default_factory=Counter)
    """Folder (relative to the source) -> files at the wrong depth in it."""


def _gather(found: _Gathered, rel: str, size: int) -> None:
    """Sort one file, given by its path below the source."""
    found.objects += 1
    found.bytes += size
    parts = rel.split("/")
    if len(parts) < 2:
        return  # a file directly in the source folder: a folder rule ("layout") says so
    found.areas[parts[0]] += 1
    if parts[0] == "images":
        _gather_images(found, parts, size)
    elif parts[0] == "workspace":
        _gather_workspace(found, parts)


def _gather_images(found: _Gathered, parts: list[str], size: int) -> None:
    # images/<batch>/(images|illum|images_x)/...; shallower files are the folder rules'.
    if len(parts) < 4:
        return
    batch, level = parts[1], parts[2]
    if level == "images":
        found.image_batches.add(batch)
        if len(parts) == 4:
            found.misplaced["/".join(parts[:3]) + "/"] += 1
            return
        files = found.images.setdefault((batch, parts[3]), _PlateFiles())
        files.files += 1
        files.bytes += size
    elif level == "illum":
        if len(parts) == 5:  # illum/<plate>/<file>; other depths: the illum-layout rule
            found.illum[batch, parts[3]] += 1
    elif level.startswith("images_"):
        found.manipulations[batch].add(level)


def _gather_workspace(found: _Gathered, parts: list[str]) -> None:
    if len(parts) < 3:
        return  # a file directly in workspace/: the workspace-folder rule says so
    folder = parts[1]
    found.workspace[folder] += 1
    if folder == "metadata":
        if len(parts) >= 5 and parts[2] == "platemaps" and parts[4] == "barcode_platemap.csv":
            found.metadata_batches.add(parts[3])
        elif len(parts) == 4 and parts[3] == "Barcodes.csv":
            found.metadata_batches.add(parts[2])
        return
    if folder not in PER_PLATE:
        return
    if len(parts) < 5:  # <folder>/<file> or <folder>/<batch>/<file>
        found.misplaced["/".join(parts[:-1]) + "/"] += 1
        return
    batch, plate = parts[2], parts[3]
    found.per_plate[folder][batch, plate] += 1
    if folder == "backend" and len(parts) == 5 and parts[4] == f"{plate}.sqlite":
        found.sqlite.add((batch, plate))
    elif folder == "analysis" and parts[4] != "analysis":
        found.loose_analysis[batch, plate] += 1


# Checking: from what was gathered to plates and problems.


@dataclass
class _Plate:
    name: str
    folders: list[str] = field(default_factory=list)
    images: int = 0
    image_bytes: int = 0
    illum: int = 0
    counts: Counter[str] = field(default_factory=Counter)


class _SourceCheck:
    """Plates and problems of one source (``base``: its prefix relative to the target)."""

    def __init__(self, name: str, base: str, found: _Gathered) -> None:
        self.name = name
        self.base = base
        self.found = found
        self.problems: list[Problem] = []

    def problem(
        self,
        check: str,
        message: str,
        folder: str,
        batch: str = "",
        plate: str = "",
        files: int = 0,
    ) -> None:
        spec = CHECKS[check]
        self.problems.append(
            Problem(
                check,
                spec.required,
                message,
                self.base + folder,
                self.name,
                batch,
                plate,
                "",
                files,
                spec.pointer,
            )
        )

    def run(self) -> Source:
        found = self.found
        self._minimum()
        batches = [self._batch(batch) for batch in self._batch_names()]
        for folder, files in sorted(found.misplaced.items()):
            # images/<batch>/images/ and workspace/<folder>/<batch>/ want a plate folder;
            # workspace/<folder>/ wants a batch folder first.
            below = "<batch>/<plate>/" if folder.count("/") == 2 else "<plate>/"
            self.problem(
                "depth",
                f"{files:,} file{'s' if files != 1 else ''} directly in '{self.base}{folder}' "
                f"belong in a plate folder, '{self.base}{folder}{below}'",
                folder,
                files=files,
            )
        return Source(
            name=self.name,
            prefix=self.base,
            objects=found.objects,
            bytes=found.bytes,
            areas=tuple(sorted(found.areas)),
            workspace=dict(sorted(found.workspace.items())),
            batches=tuple(batches),
        )

    def _minimum(self) -> None:
        found = self.found
        missing = []
        if not found.images:
            missing.append("images/ (plate folders in images/<batch>/images/)")
        for folder in ("metadata", "load_data_csv"):
            if not found.workspace[folder]:
                missing.append(f"workspace/{folder}/")
        if missing:
            self.problem(
                "minimum",
                f"source '{self.name}' has no {', no '.join(missing)}: a new dataset needs "
                "images, metadata and LoadData CSVs (an addition to an existing dataset, "
                "such as segmentations, need not)",
                "",
            )
        elif not found.workspace["analysis"] and not found.workspace["backend"]:
            self.problem(
                "features",
                f"source '{self.name}' has neither workspace/analysis/ nor workspace/backend/: "
                "no CellProfiler output is part of this contribution",
                "workspace/",
            )

    def _batch_names(self) -> list[str]:
        found = self.found
        names = set(found.image_batches) | {batch for batch, _ in found.illum}
        for counts in found.per_plate.values():
            names |= {batch for batch, _ in counts}
        return sorted(names)

    def _batch(self, batch: str) -> Batch:
        found = self.found
        plates = {
            folder: _Plate(folder, [folder], files.files, files.bytes)
            for (b, folder), files in sorted(found.images.items())
            if b == batch
        }
        image_folders = list(plates)
        orphans: dict[str, _Plate] = {}

        def owners(name: str) -> list[_Plate]:
            matched = [plates[f] for f in image_folders if same_plate(f, name)]
            if not matched:
                matched = [orphans.setdefault(name, _Plate(name))]
            for plate in matched:
                if len(name) < len(plate.name) and plate.folders:
                    plate.name = name  # the short name illum/ and workspace/ use
            return matched

        for (b, name), files in sorted(found.illum.items()):
            if b != batch:
                continue
            for plate in owners(name):
                plate.illum += files
            if name in orphans:
                self.problem(
                    "illum-without-images",
                    f"illum plate '{name}' of batch '{batch}' has no images: no folder of "
                    f"'{self.base}images/{batch}/images/' is '{name}' or starts with '{name}_'",
                    f"images/{batch}/illum/{name}/",
                    batch,
                    name,
                )
        for folder in PER_PLATE:
            for (b, name), files in sorted(found.per_plate[folder].items()):
                if b != batch:
                    continue
                for plate in owners(name):
                    plate.counts[folder] += files
                    if folder == "backend" and (batch, name) in found.sqlite:
                        plate.counts["sqlite"] += 1
                if name in orphans:
                    self.problem(
                        "plate-without-images",
                        f"'{self.base}workspace/{folder}/{batch}/{name}/' names no plate with "
                        f"images: no folder of '{self.base}images/{batch}/images/' is '{name}' or "
                        f"starts with '{name}_'",
                        f"workspace/{folder}/{batch}/{name}/",
                        batch,
                        name,
                    )
                if folder == "backend" and (batch, name) not in found.sqlite:
                    self.problem(
                        "backend-sqlite",
                        f"'{self.base}workspace/backend/{batch}/{name}/' has no '{name}.sqlite' "
                        "(the plate's single-cell measurements)",
                        f"workspace/backend/{batch}/{name}/",
                        batch,
                        name,
                    )
                if folder == "analysis" and found.loose_analysis[batch, name]:
                    self.problem(
                        "analysis-nesting",
                        f"'{self.base}workspace/analysis/{batch}/{name}/' holds files or folders "
                        "beside its analysis/ folder (the guide: analysis/<batch>/<plate>/"
                        "analysis/<plate>-<well>-<site>/)",
                        f"workspace/analysis/{batch}/{name}/",
                        batch,
                        name,
                        found.loose_analysis[batch, name],
                    )
        merged: dict[str, _Plate] = {}
        for plate in (plates[f] for f in image_folders):
            same = merged.get(plate.name)
            if same is None:
                merged[plate.name] = plate
            else:  # two images folders of one plate (imaged twice): one plate
                same.folders += plate.folders
                same.images += plate.images
                same.image_bytes += plate.image_bytes
        self._plate_checks(batch, list(merged.values()))
        if merged and found.workspace["metadata"] and batch not in found.metadata_batches:
            self.problem(
                "metadata-batch",
                f"workspace/metadata/ has no 'platemaps/{batch}/barcode_platemap.csv' (nor, "
                f"for a pooled screen, '{batch}/Barcodes.csv')",
                "workspace/metadata/",
                batch,
            )
        rows = [*merged.values(), *orphans.values()]
        return Batch(
            batch,
            tuple(_public(plate) for plate in sorted(rows, key=lambda p: p.name)),
            tuple(sorted(found.manipulations.get(batch, ()))),
        )

    def _plate_checks(self, batch: str, imaged: list[_Plate]) -> None:
        found = self.found
        present = {folder for folder in PER_PLATE if found.workspace[folder]}
        for plate in imaged:
            name = plate.name
            if not plate.counts["load_data_csv"]:
                self.problem(
                    "load-data-csv",
                    f"plate '{name}' of batch '{batch}' has images but no "
                    f"'{self.base}workspace/load_data_csv/{batch}/{name}/'",
                    f"workspace/load_data_csv/{batch}/{name}/",
                    batch,
                    name,
                )
            if not plate.illum:
                self.problem(
                    "illum-missing",
                    f"plate '{name}' of batch '{batch}' has images but no illumination "
                    f"functions in '{self.base}images/{batch}/illum/{name}/'",
                    f"images/{batch}/illum/{name}/",
                    batch,
                    name,
                )
            has_features = plate.counts["sqlite"] or plate.counts["analysis"]
            if ("backend" in present or "analysis" in present) and not has_features:
                self.problem(
                    "features",
                    f"plate '{name}' of batch '{batch}' has neither "
                    f"'{self.base}workspace/backend/{batch}/{name}/{name}.sqlite' nor "
                    f"'{self.base}workspace/analysis/{batch}/{name}/'",
                    f"workspace/backend/{batch}/{name}/",
                    batch,
                    name,
                )
            for folder in ("analysis", "backend", "profiles"):
                if folder in present and not plate.counts[folder] and (
                    folder == "profiles" or has_features
                ):
                    self.problem(
                        "component-gap",
                        f"plate '{name}' of batch '{batch}' has no "
                        f"'{self.base}workspace/{folder}/{batch}/{name}/' (other plates have one)",
                        f"workspace/{folder}/{batch}/{name}/",
                        batch,
                        name,
                    )


def _public(plate: _Plate) -> Plate:
    return Plate(
        name=plate.name,
        image_folders=tuple(plate.folders),
        images=plate.images,
        image_bytes=plate.image_bytes,
        illum=plate.illum,
        load_data_csv=plate.counts["load_data_csv"],
        analysis=plate.counts["analysis"],
        backend=plate.counts["backend"],
        backend_sqlite=bool(plate.counts["sqlite"]),
        profiles=plate.counts["profiles"],
    )


def _rule_problems(keys: Iterable[str], top: str, unnamed: str | None) -> list[Problem]:
    """The per-key folder rules, once per folder and rule, with how many files share each.

    ``top`` is the target's prefix in the keys (``<project>/`` or ``<project>/<source>/``);
    findings about folders above it (the project's own name) are reported as the
    target's, "". ``unnamed``: a project whose own folder's name is not to be judged
    (a local folder's name need not be the destination's).
    """
    counts: Counter[tuple[str, str]] = Counter()
    first: dict[tuple[str, str], Finding] = {}
    for key in keys:
        for finding in check_key(key):
            if unnamed is not None and finding.folder == f"{unnamed}/":
                continue
            at = (finding.rule, finding.folder)
            counts[at] += 1
            first.setdefault(at, finding)
    return [
        Problem(
            FOLDER_RULE,
            finding.required,
            finding.message,
            finding.folder[len(top) :] if finding.folder.startswith(top) else "",
            rule=finding.rule,
            files=counts[at],
            pointer=finding.pointer,
        )
        for at, finding in first.items()
    ]


def analyse(
    entries: Iterable[tuple[str, int]],
    *,
    project: str,
    source: str | None = None,
    check_project_name: bool = True,
) -> DatasetReport:
    """The report on a listing of one project (``source`` None) or one of its sources.

    ``entries`` are (path, size) with paths relative to the target: ``<source>/...``
    for a project, ``images/...``, ``workspace/...`` for a source. The per-key folder
    rules see each path as ``<project>/<source>/...``; ``check_project_name=False``
    leaves out what they say about the project folder's own name (a local folder's
    name is not the destination's).
    """
    gathered: dict[str, _Gathered] = defaultdict(_Gathered)
    keys: list[str] = []
    top = f"{project}/" if source is None else f"{project}/{source}/"
    total = size_total = 0
    for rel, size in entries:
        total += 1
        size_total += size
        keys.append(top + rel)
        if source is None:
            name, slash, rest = rel.partition("/")
            if slash:  # a file directly in the project folder is a folder rule's ("layout")
                _gather(gathered[name], rest, size)
        else:
            _gather(gathered[source], rel, size)
    if source is not None and source not in gathered:
        gathered[source] = _Gathered()
    sources: list[Source] = []
    problems: list[Problem] = []
    for name in sorted(gathered):
        check = _SourceCheck(name, "" if source is not None else f"{name}/", gathered[name])
        sources.append(check.run())
        problems += check.problems
    if not sources:
        problems.append(
            Problem(
                "minimum",
                True,
                f"project '{project}' has no source folders (such as 'broad/' or 'source_4/') "
                "with data in them",
                "",
                pointer=CHECKS["minimum"].pointer,
            )
        )
    # A folder a dataset check already names (files at the wrong depth, beside the
    # analysis/ folder) is not named again by a per-key rule about its layout.
    claimed = {p.folder for p in problems if p.check in ("depth", "analysis-nesting")}
    names = {s.name for s in sources}
    for problem in _rule_problems(keys, top, project if not check_project_name else None):
        if problem.folder in claimed:
            continue
        owner = source if source is not None else problem.folder.split("/", 1)[0]
        problems.append(replace(problem, source=owner if owner in names else ""))
    problems.sort(key=lambda p: (not p.required, p.source, p.batch, p.plate, p.folder, p.check))
    return DatasetReport(project, tuple(sources), tuple(problems), total, size_total)
