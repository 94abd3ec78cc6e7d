"""Pure arithmetic of object names and multipart layout.

Everything here is a pure function of its arguments, so it is proven with
property tests rather than against a server.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath
from urllib.parse import urlsplit

MiB = 1024**2
GiB = 1024**3
MIN_PART_SIZE = 5 * MiB
"""S3's smallest part size (every part but the last)."""
MAX_PART_SIZE = 5 * GiB
"""S3's largest part size."""
MAX_PARTS = 10_000
"""S3's largest number of parts in one multipart upload."""
MAX_SINGLE_PUT = 5 * GiB
"""S3's largest object that one PutObject can write."""
MAX_KEY_BYTES = 1024
"""S3's longest object key, in bytes of UTF-8."""


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix (empty, or ending in ``/``)."""

    bucket: str
    prefix: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_s3_uri(uri: str) -> S3Location:
    """Split ``s3://bucket/some/prefix/`` into bucket and prefix.

    The prefix is normalised to end in ``/`` (a destination is always a
    folder), and never starts with one.
    """
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"expected an s3://bucket/prefix/ URI, got {uri!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"an s3:// URI cannot have '?' or '#' in it: {uri!r}")
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"{bucket!r} is not a valid S3 bucket name (3-63 lower-case letters, digits, "
            "'-' and '.', starting and ending with a letter or digit)"
        )
    if parts.path.startswith("//"):
        raise ValueError(f"empty folder name ('//') in {uri!r}")
    prefix = parts.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if "//" in prefix:
        raise ValueError(f"empty folder name ('//') in {uri!r}")
    return S3Location(bucket, prefix)


def parse_grant_target(target: str) -> S3Location:
    """The folder an Access Grants target (``s3://bucket/folder/*``) covers.

    A target covers a folder and everything under it, so it ends in ``/*``: without
    the ``/``, ``.../cpg0123-example*`` would also cover ``.../cpg0123-example-other/``,
    and without the ``*`` it would name one object. Either is refused with the fix.
    """
    if not target.endswith("/*"):
        fixed = target.rstrip("*").rstrip("/") + "/*"
        why = (
            "without the '/', it would also cover every folder whose name begins the same"
            if target.endswith("*")
            else "a target is a folder and everything under it"
        )
        raise ValueError(f"{target!r} does not end in '/*' ({why}): write {fixed!r}")
    return parse_s3_uri(target[:-1])


def target_covers(target: str, destination: S3Location) -> bool:
    """Whether a target (``s3://bucket/folder/*``, or "" for any) covers a destination:
    the same bucket, and the destination at or under the folder, at a ``/``."""
    if not target:
        return True
    folder = parse_grant_target(target)
    return destination.bucket == folder.bucket and destination.prefix.startswith(folder.prefix)


def object_key(prefix: str, relative_path: str | PurePath) -> str:
    """The key of a file: the destination prefix, then its path below the watch with ``/``.

    ``relative_path`` is ``/``-separated text (as ``discovery.scan`` gives it: a ``\\``
    in it is part of a name, as Linux allows), or a pure path of either flavour, taken
    by its parts (``PureWindowsPath("Batch8\\a.tiff")`` is ``Batch8/a.tiff``).
    """
    relative = PurePosixPath(relative_path) if isinstance(relative_path, str) else relative_path
    if relative.anchor or ".." in relative.parts or not relative.parts:
        raise ValueError(f"not a relative path below the watch: {relative_path!r}")
    return prefix + "/".join(relative.parts)


def relative_key_path(root: PurePath, path: PurePath) -> str:
    """``path`` below ``root``, ``/``-separated whatever the system's separator (the
    part of a key after the prefix): ``D:\\data\\Batch8\\a.tiff`` below ``D:\\data`` is
    ``Batch8/a.tiff``, as ``/data/Batch8/a.tiff`` below ``/data`` is. ValueError when
    ``path`` is not strictly below ``root`` (paths of one flavour; Windows paths compare
    without case)."""
    parts = path.relative_to(root).parts
    if not parts or ".." in parts:
        raise ValueError(f"{path} is not a path below {root}")
    return "/".join(parts)


MANIFEST_FOLDER = "workspace/qc/upload_manifests/"
"""Below ``<project>/<source>/``: where batch manifests are uploaded (``upload_manifest``).

The gallery's ``data_structure.md`` gives ``workspace/`` "everything else", asks that
"additional categories of data/metadata" go "to the workspace folder in their own
folder/s", and lists ``qc`` ("quality control data") among the optional workspace
folders: a manifest is quality-control evidence of the dataset's transfer."""
_MANIFEST_NAME = re.compile(r".+-[0-9]{8}T[0-9]{6}Z\.jsonl(?:\.sha256)?")
"""A manifest's file name as the daemon writes it (``BATCH-YYYYMMDDTHHMMSSZ.jsonl``)
and its digest's (``....jsonl.sha256``)."""


def manifest_folder(destination: S3Location) -> S3Location:
    """Where the manifests of a destination's batches go: its first two folders (the
    project and the source), then ``MANIFEST_FOLDER``. ValueError for a destination
    with fewer than two folders (it names no source)."""
    parts = destination.prefix.split("/")[:-1]
    if len(parts) < 2:
        raise ValueError(
            f"{destination} is not under a <project>/<source>/ folder, and manifests go "
            f"to <project>/<source>/{MANIFEST_FOLDER}"
        )
    return S3Location(destination.bucket, f"{parts[0]}/{parts[1]}/{MANIFEST_FOLDER}")


def manifest_key(destination: S3Location, batch: str, name: str) -> str:
    """The key (in the destination's bucket) a batch's manifest file ``name`` is uploaded
    to: ``<project>/<source>/workspace/qc/upload_manifests/<batch>/<name>``."""
    return object_key(manifest_folder(destination).prefix, f"{batch}/{name}")


def is_manifest_key(key: str) -> bool:
    """Whether ``key`` is a manifest (or its ``.sha256``) that the daemon uploaded: one of
    its own objects, which ``verify`` does not count as ``extra``."""
    parts = key.split("/")
    return (
        len(parts) == 7
        and "/".join(parts[2:5]) + "/" == MANIFEST_FOLDER
        and all(parts)
        and _MANIFEST_NAME.fullmatch(parts[6]) is not None
    )


def key_problem(key: str) -> str | None:
    """Why S3 cannot take this key, or None when it can."""
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        return "the file name is not valid UTF-8, and S3 keys must be"
    if len(encoded) > MAX_KEY_BYTES:
        return f"the object key is {len(encoded)} bytes long; S3 allows at most {MAX_KEY_BYTES}"
    if _CONTROL.search(key):
        return "the file name contains control characters (such as a newline)"
    return None


def choose_part_size(file_size: int, preferred: int) -> int:
    """The part size for a multipart upload of ``file_size`` bytes.

    The preferred size, raised to S3's 5 MiB minimum, and grown (to a whole
    number of MiB) just enough that the file fits in 10,000 parts.
    Raises ValueError for a file S3 cannot hold in 10,000 parts of 5 GiB.
    """
    if file_size < 0:
        raise ValueError("negative file size")
    part_size = min(max(preferred, MIN_PART_SIZE), MAX_PART_SIZE)
    if file_size > part_size * MAX_PARTS:
        needed = -(-file_size // MAX_PARTS)
        part_size = -(-needed // MiB) * MiB
    if part_size > MAX_PART_SIZE:
        raise ValueError(
            f"a file of {file_size} bytes does not fit in {MAX_PARTS} parts of at most 5 GiB"
        )
    return part_size


@dataclass(frozen=True)
class PartRange:
    """One part of a multipart upload: its number (from 1), offset and length in the file."""

    number: int
    offset: int
    length: int


def part_ranges(file_size: int, part_size: int) -> Iterator[PartRange]:
    """The parts that cover a file, in order; a zero-byte file has no parts."""
    if part_size <= 0:
        raise ValueError("part size must be positive")
    number = 1
    for offset in range(0, file_size, part_size):
        yield PartRange(number, offset, min(part_size, file_size - offset))
        number += 1


def part_count(file_size: int, part_size: int) -> int:
    """How many parts ``part_ranges`` yields."""
    if part_size <= 0:
        raise ValueError("part size must be positive")
    return -(-file_size // part_size)


def glob_problem(pattern: str) -> str | None:
    """Why a glob would not mean what it seems to, or None.

    Forms of other glob dialects would otherwise match nothing, silently: an
    ``exclude`` that fails open.
    """
    if _POSIX_CLASS.search(pattern):
        return "POSIX classes such as [[:digit:]] are not supported: write [0-9]"
    outside = _CLASS.sub("", pattern)  # within [...] every character is itself
    if "{" in outside or "}" in outside:
        return (
            "braces {a,b} are not supported: write one pattern each "
            '(["**/*.tif", "**/*.tiff"]); [{] matches a brace itself'
        )
    if "\\" in outside:
        return "a backslash escape is not supported: [*] matches a * itself, [?] a ?"
    return None


_POSIX_CLASS = re.compile(r"\[[^\]]*\[[:=.]")
"""``[:digit:]``, ``[=a=]`` or ``[.x.]`` inside a bracket expression."""
_CLASS = re.compile(r"\[.[^\]]*\]")
"""A bracket expression as glob_to_regex reads it: ``[`` and ``]`` with one or more
characters between."""


def glob_to_regex(pattern: str) -> str:
    """A regular expression for a path glob, matched against ``/``-separated relative paths.

    ``*`` and ``?`` stay within one path segment, ``**`` crosses segments, and a
    leading ``**/`` also matches at the top level (``**/*.tmp`` matches ``a.tmp``).
    """
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 2)
            if end == -1:
                out.append(re.escape(pattern[i]))
                i += 1
            else:
                body = pattern[i + 1 : end]
                negate = body.startswith("!")
                if negate:
                    body = body[1:]
                # Inside a class only '-' keeps its meaning; escape whatever else the
                # regex engine would read (or warn about): \ [ ^ & ~ |.
                for char in "\\[^&~|":
                    body = body.replace(char, "\\" + char)
                out.append(f"[{'^' if negate else ''}{body}]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


class PathFilter:
    """Include/exclude globs of a watch, applied to paths relative to the watch root.

    A path is excluded when an exclude pattern matches it or any of its parent
    folders (so ``.*`` keeps a whole hidden folder out), and included when an
    include pattern matches the path itself.
    """

    def __init__(self, include: tuple[str, ...], exclude: tuple[str, ...]) -> None:
        self._include = _compile(include)
        self._exclude = _compile(exclude)

    def excludes_dir(self, relative_dir: str) -> bool:
        """Whether a folder (and so everything under it) is excluded, itself or by a parent."""
        path = relative_dir
        while True:
            if self._exclude.fullmatch(path):
                return True
            if "/" not in path:
                return False
            path = path.rsplit("/", 1)[0]

    def accepts(self, relative_path: str) -> bool:
        """Whether a file is to be uploaded."""
        if self.excludes_dir(relative_path):
            return False
        return bool(self._include.fullmatch(relative_path))


_NEVER = "(?!)"


def _compile(patterns: tuple[str, ...]) -> re.Pattern[str]:
    body = "|".join(f"(?:{glob_to_regex(p)})" for p in patterns) or _NEVER
    return re.compile(body, re.DOTALL)
