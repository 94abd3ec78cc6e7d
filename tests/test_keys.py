"""Object names and multipart layout: the arithmetic every upload relies on."""

from __future__ import annotations

import os
import re
from pathlib import PurePosixPath

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from cpg_daemon.core.objectkeys import (
    MAX_KEY_BYTES,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    MiB,
    PathFilter,
    S3Location,
    choose_part_size,
    glob_to_regex,
    key_problem,
    object_key,
    parse_s3_uri,
    part_count,
    part_ranges,
    target_covers,
)

GiB = 1024**3
DEFAULT_EXCLUDE = (".*", "**/.*", "*.tmp", "**/*.tmp", "**/Thumbs.db")

# -- grant targets ----------------------------------------------------------------------

GALLERY = "s3://staging-cellpainting-gallery/"


@pytest.mark.parametrize(
    ("target", "destination", "covered"),
    [
        ("cpg0123-example/*", "cpg0123-example/", True),
        ("cpg0123-example/*", "cpg0123-example/source/images/2024_01_01_Batch1/", True),
        ("cpg0123-example/*", "cpg0123-example-other/", False),  # a / boundary, not a string
        ("cpg0123-example/*", "cpg0123/", False),
        ("cpg0123-example/source/*", "cpg0123-example/", False),  # wider than the grant
        ("*", "anything/at/all/", True),
        ("*", "", True),
        ("", "anything/", True),  # no target: the entry covers every destination
    ],
)
def test_a_target_covers_its_folder_and_below_at_a_slash(
    target: str, destination: str, covered: bool
) -> None:
    full = GALLERY + target if target else ""
    where = parse_s3_uri(GALLERY + destination)
    assert target_covers(full, where) is covered
    assert not target_covers(full.replace("staging-", "other-"), where) or not full


@given(
    st.from_regex(r"[a-z0-9]{1,8}(/[a-z0-9-]{1,8}){0,3}", fullmatch=True),
    st.text("-_x", max_size=3),
)
def test_no_target_covers_a_sibling_whose_name_only_begins_the_same(
    folder: str, suffix: str
) -> None:
    assume(suffix)
    assert not target_covers(f"{GALLERY}{folder}/*", parse_s3_uri(f"{GALLERY}{folder}{suffix}/"))
    assert target_covers(f"{GALLERY}{folder}/*", parse_s3_uri(f"{GALLERY}{folder}/{suffix}/"))


# -- parse_s3_uri ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix"),
    [
        ("s3://staging-cellpainting-gallery/cpg0123/", "staging-cellpainting-gallery", "cpg0123/"),
        ("s3://staging-cellpainting-gallery/cpg0123", "staging-cellpainting-gallery", "cpg0123/"),
        ("s3://bucket/a/b/c", "bucket", "a/b/c/"),
        ("s3://bucket/a/b/c/", "bucket", "a/b/c/"),
        ("s3://bucket", "bucket", ""),
        ("s3://bucket/", "bucket", ""),
        ("s3://my.bucket.name/x", "my.bucket.name", "x/"),
        ("s3://bucket/with space/", "bucket", "with space/"),
    ],
)
def test_parse_s3_uri(uri: str, bucket: str, prefix: str) -> None:
    location = parse_s3_uri(uri)
    assert location == S3Location(bucket, prefix)
    assert str(location) == f"s3://{bucket}/{prefix}"


@given(
    st.lists(
        st.text(st.characters(categories=["L", "N"], include_characters="-_."), min_size=1),
        min_size=1,
        max_size=5,
    ),
    st.booleans(),
)
def test_parse_s3_uri_prefix_always_a_folder(segments: list[str], trailing: bool) -> None:
    assume(all(s not in {".", ".."} for s in segments))
    path = "/".join(segments) + ("/" if trailing else "")
    location = parse_s3_uri(f"s3://bucket/{path}")
    assert location.prefix == "/".join(segments) + "/"
    assert not location.prefix.startswith("/")
    # and it round-trips through its own str()
    assert parse_s3_uri(str(location)) == location


@pytest.mark.parametrize(
    "uri",
    [
        "https://bucket/prefix/",
        "s3a://bucket/prefix/",
        "gs://bucket/prefix/",
        "/local/path",
        "bucket/prefix",
        "s3:///prefix/",
        "s3://",
        "",
    ],
)
def test_parse_s3_uri_rejects_other_schemes(uri: str) -> None:
    with pytest.raises(ValueError, match="s3://"):
        parse_s3_uri(uri)


@pytest.mark.parametrize(
    "bucket",
    ["ab", "a" * 64, "Staging-Gallery", "my bucket"],
)
def test_parse_s3_uri_rejects_bad_bucket_names(bucket: str) -> None:
    with pytest.raises(ValueError, match="bucket name"):
        parse_s3_uri(f"s3://{bucket}/prefix/")


@pytest.mark.parametrize("bucket", ["abc", "a" * 63, "cpg0123-x.y"])
def test_parse_s3_uri_accepts_bucket_name_limits(bucket: str) -> None:
    assert parse_s3_uri(f"s3://{bucket}/").bucket == bucket


@pytest.mark.parametrize(
    "bucket",
    ["staging_cellpainting_gallery", "-bucket", "bucket-", "my..bucket", "bucket:9000", "u@bucket"],
)
def test_parse_s3_uri_rejects_bucket_names_s3_refuses(bucket: str) -> None:
    # S3 bucket names are 3-63 of [a-z0-9.-], starting and ending with a letter or digit.
    # A typo such as '_' for '-' should fail at `check`, not on the first upload.
    with pytest.raises(ValueError, match="bucket name"):
        parse_s3_uri(f"s3://{bucket}/prefix/")


@pytest.mark.parametrize(
    "uri",
    ["s3://bucket/a//b/", "s3://bucket/a/b//", "s3://bucket/a///"],
)
def test_parse_s3_uri_rejects_empty_folder_names(uri: str) -> None:
    with pytest.raises(ValueError, match="//"):
        parse_s3_uri(uri)


@pytest.mark.parametrize("uri", ["s3://bucket/a?b=1", "s3://bucket/a#frag"])
def test_parse_s3_uri_rejects_query_and_fragment(uri: str) -> None:
    with pytest.raises(ValueError):
        parse_s3_uri(uri)


# -- object_key ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "relative", "key"),
    [
        ("cpg0123/images/", "plate1/A01_s1.tif", "cpg0123/images/plate1/A01_s1.tif"),
        ("cpg0123/", "a.tif", "cpg0123/a.tif"),
        ("", "a.tif", "a.tif"),
        ("p/", "deep/er/still/f.npy", "p/deep/er/still/f.npy"),
        ("p/", "with space/file name.csv", "p/with space/file name.csv"),
        ("p/", "Müller/画像/ß.tif", "p/Müller/画像/ß.tif"),
        ("p/", PurePosixPath("x/y.tif"), "p/x/y.tif"),
        ("p/", "..hidden..tif", "p/..hidden..tif"),  # '..' inside a name is a name
    ],
)
def test_object_key(prefix: str, relative: str | PurePosixPath, key: str) -> None:
    assert object_key(prefix, relative) == key


@pytest.mark.parametrize(
    "relative",
    ["../escape.tif", "a/../../b", "a/..", "..", "/etc/passwd", "/abs/file.tif", "", "."],
)
def test_object_key_rejects_paths_outside_the_watch(relative: str) -> None:
    with pytest.raises(ValueError, match="relative path"):
        object_key("p/", relative)


@given(
    st.lists(
        st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/\x00"), min_size=1),
        min_size=1,
        max_size=6,
    )
)
def test_object_key_is_prefix_plus_slash_joined_path(segments: list[str]) -> None:
    assume(all(s not in {".", ".."} for s in segments))
    relative = "/".join(segments)
    assert object_key("dest/", relative) == "dest/" + relative


# -- key_problem -----------------------------------------------------------------------


def test_key_problem_accepts_ordinary_keys() -> None:
    assert key_problem("cpg0123/images/plate 1/Müller_画像.tif") is None


def test_key_problem_at_the_1024_byte_limit() -> None:
    assert key_problem("a" * MAX_KEY_BYTES) is None
    problem = key_problem("a" * (MAX_KEY_BYTES + 1))
    assert problem is not None
    assert "1025" in problem
    assert "1024" in problem


def test_key_problem_counts_utf8_bytes_not_characters() -> None:
    # 'é' is two bytes in UTF-8: 512 of them are exactly 1024 bytes.
    assert key_problem("é" * 512) is None
    assert key_problem("é" * 512 + "a") is not None
    # a 3-byte character that crosses the limit
    assert key_problem("a" * 1021 + "画") is None
    assert key_problem("a" * 1022 + "画") is not None


@pytest.mark.parametrize("char", ["\n", "\r", "\t", "\x00", "\x1b", "\x7f"])
def test_key_problem_control_characters(char: str) -> None:
    problem = key_problem(f"p/bad{char}name.tif")
    assert problem is not None
    assert "control" in problem


def test_key_problem_non_utf8_file_name() -> None:
    name = os.fsdecode(b"\xff.tif")
    problem = key_problem(object_key("p/", name))
    assert problem is not None
    assert "UTF-8" in problem


@given(st.text(st.characters(min_codepoint=32, exclude_categories=["Cs"]), max_size=256))
def test_key_problem_none_for_printable_short_keys(key: str) -> None:
    assume("\x7f" not in key)
    assert key_problem(key) is None


# -- multipart layout ------------------------------------------------------------------

MAX_OBJECT = MAX_PART_SIZE * MAX_PARTS

file_sizes = st.one_of(
    st.integers(0, MAX_OBJECT),
    st.integers(0, 100 * MiB),
    st.sampled_from(
        [
            0,
            1,
            MIN_PART_SIZE - 1,
            MIN_PART_SIZE,
            MIN_PART_SIZE + 1,
            MIN_PART_SIZE * MAX_PARTS,
            MIN_PART_SIZE * MAX_PARTS + 1,
            16 * MiB * MAX_PARTS,
            16 * MiB * MAX_PARTS + 1,
            MAX_OBJECT - 1,
            MAX_OBJECT,
        ]
    ),
)
preferred_sizes = st.one_of(
    st.integers(MIN_PART_SIZE, MAX_PART_SIZE),
    st.sampled_from([MIN_PART_SIZE, 8 * MiB, 16 * MiB, 64 * MiB, MAX_PART_SIZE]),
)


@given(file_sizes, preferred_sizes)
def test_part_layout_respects_s3_limits_and_covers_the_file(size: int, preferred: int) -> None:
    part_size = choose_part_size(size, preferred)
    assert MIN_PART_SIZE <= part_size <= MAX_PART_SIZE
    count = part_count(size, part_size)
    assert count <= MAX_PARTS

    ranges = list(part_ranges(size, part_size))
    assert len(ranges) == count
    assert [r.number for r in ranges] == list(range(1, count + 1))
    offset = 0
    for r in ranges:
        assert r.offset == offset  # contiguous, no gap and no overlap
        assert r.length > 0
        offset += r.length
    assert offset == size  # covers exactly [0, size)
    for r in ranges[:-1]:
        assert r.length == part_size
    if ranges:
        assert 0 < ranges[-1].length <= part_size


@given(file_sizes, preferred_sizes)
def test_part_size_is_the_preferred_one_when_it_fits(size: int, preferred: int) -> None:
    part_size = choose_part_size(size, preferred)
    if size <= preferred * MAX_PARTS:
        assert part_size == preferred
    else:
        # grown just enough: a whole number of MiB, and one MiB less would not fit
        assert part_size > preferred
        assert part_size % MiB == 0
        assert part_count(size, part_size - MiB) > MAX_PARTS


@given(st.integers(0, MAX_OBJECT), st.integers(0, MIN_PART_SIZE - 1))
def test_part_size_never_below_five_mib(size: int, preferred: int) -> None:
    assert choose_part_size(size, preferred) >= MIN_PART_SIZE


@given(st.integers(0, MAX_OBJECT), st.integers(MAX_PART_SIZE, 100 * MAX_PART_SIZE))
def test_part_size_never_above_five_gib(size: int, preferred: int) -> None:
    assert choose_part_size(size, preferred) <= MAX_PART_SIZE


@given(st.integers(MAX_OBJECT + 1, MAX_OBJECT * 10), preferred_sizes)
def test_too_large_files_are_refused(size: int, preferred: int) -> None:
    with pytest.raises(ValueError, match="10000 parts"):
        choose_part_size(size, preferred)


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError):
        choose_part_size(-1, 16 * MiB)


def test_part_layout_examples() -> None:
    assert choose_part_size(100 * GiB, 16 * MiB) == 16 * MiB
    # 1 TiB in 16 MiB parts would be 65,536 parts: grown to 105 MiB (ceil(1 TiB / 10,000)).
    assert choose_part_size(1024 * GiB, 16 * MiB) == 105 * MiB
    assert part_count(1024 * GiB, 105 * MiB) <= MAX_PARTS
    assert list(part_ranges(0, 16 * MiB)) == []
    assert part_count(0, 16 * MiB) == 0
    ranges = list(part_ranges(10, 4))
    assert [(r.number, r.offset, r.length) for r in ranges] == [(1, 0, 4), (2, 4, 4), (3, 8, 2)]


def test_part_ranges_rejects_nonpositive_part_size() -> None:
    with pytest.raises(ValueError):
        list(part_ranges(10, 0))


# -- globs and PathFilter --------------------------------------------------------------


def matches(pattern: str, path: str) -> bool:
    return re.fullmatch(glob_to_regex(pattern), path, re.DOTALL) is not None


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("*.tif", "a.tif", True),
        ("*.tif", "dir/a.tif", False),  # * does not cross '/'
        ("*", "a/b", False),
        ("**", "a/b/c.tif", True),  # ** does
        ("a/**", "a/b/c.tif", True),
        ("**/*.tif", "a.tif", True),  # leading **/ also matches at the top
        ("**/*.tif", "x/y/z/a.tif", True),
        ("**/*.tif", "x/a.tiff", False),
        ("a/**/b.txt", "a/b.txt", True),
        ("a/**/b.txt", "a/x/y/b.txt", True),
        ("?.csv", "a.csv", True),
        ("?.csv", "ab.csv", False),
        ("?", "/", False),
        ("[ab].npy", "a.npy", True),
        ("[ab].npy", "c.npy", False),
        ("[!ab].npy", "c.npy", True),
        ("[!ab].npy", "a.npy", False),
        ("a+b(1).tif", "a+b(1).tif", True),  # regex metacharacters are literal
        ("a+b(1).tif", "aab(1)xtif", False),
        ("[unclosed", "[unclosed", True),
    ],
)
def test_glob_to_regex(pattern: str, path: str, expected: bool) -> None:
    assert matches(pattern, path) is expected


@given(
    st.lists(
        st.text(st.characters(exclude_characters="/", exclude_categories=["Cs"]), min_size=1),
        min_size=2,
        max_size=5,
    )
)
def test_single_star_stays_within_one_folder(segments: list[str]) -> None:
    path = "/".join(segments)
    assert not matches("*", path)
    assert matches("**", path)
    assert matches("*/" * (len(segments) - 1) + "*", path)


DEFAULT = PathFilter(("**",), DEFAULT_EXCLUDE)


@pytest.mark.parametrize(
    "path",
    [
        ".DS_Store",
        ".hidden.tif",
        "plate/.hidden.tif",
        "a/b/c/.partial",
        ".git/config",
        "plate/.snapshot/x.tif",
        "a/b/.cache/c/d/e.tif",
        "x.tmp",
        "plate/x.tmp",
        "a/b/c/upload.tif.tmp",
        "Thumbs.db",
        "plate/Thumbs.db",
        "a/b/Thumbs.db",
    ],
)
def test_default_excludes_keep_out_hidden_temp_and_thumbs(path: str) -> None:
    assert not DEFAULT.accepts(path)


@pytest.mark.parametrize(
    "path",
    [
        "A01_s1.tif",
        "plate/A01_s1.tif",
        "a/b/c/d/e.npy",
        "profiles/plate.sqlite",
        "x.tmp.tif",
        "tmp/a.tif",
        "Thumbs.db.bak",
        "dir.with.dots/file",
    ],
)
def test_default_filter_accepts_ordinary_files(path: str) -> None:
    assert DEFAULT.accepts(path)


@pytest.mark.parametrize("folder", [".git", "a/.cache", "a/.cache/deeper", ".x/y"])
def test_hidden_folders_are_excluded_whole(folder: str) -> None:
    assert DEFAULT.excludes_dir(folder)


@pytest.mark.parametrize("folder", ["plate", "a/b/c", "tmp"])
def test_ordinary_folders_are_walked(folder: str) -> None:
    assert not DEFAULT.excludes_dir(folder)


def test_include_patterns_select_only_matching_files_at_any_depth() -> None:
    tifs = PathFilter(("**/*.tif",), DEFAULT_EXCLUDE)
    assert tifs.accepts("a.tif")
    assert tifs.accepts("plate/a.tif")
    assert tifs.accepts("x/y/z/a.tif")
    assert not tifs.accepts("a.npy")
    assert not tifs.accepts("plate/a.csv")
    assert not tifs.accepts("plate/a.tif.tmp")
    assert not tifs.accepts("plate/.a.tif")  # excludes win over includes
    assert not tifs.accepts(".hidden/a.tif")


def test_empty_include_accepts_nothing() -> None:
    nothing = PathFilter((), ())
    assert not nothing.accepts("a.tif")
    assert not nothing.excludes_dir("a")


@given(
    st.lists(
        st.text(st.characters(exclude_characters="/.", exclude_categories=["Cs"]), min_size=1),
        min_size=1,
        max_size=5,
    ),
    st.integers(0, 4),
)
def test_anything_under_a_hidden_folder_is_excluded(segments: list[str], where: int) -> None:
    where = min(where, len(segments) - 1)
    hidden = [*segments]
    hidden[where] = "." + hidden[where]
    assert not DEFAULT.accepts("/".join(hidden))
    assert DEFAULT.accepts("/".join(segments))


def test_bracket_class_with_literal_open_bracket() -> None:
    # fnmatch spells a literal '[' as '[[]'; a user excluding "**/[[]*" must not get a warning
    path_filter = PathFilter(("**",), ("**/[[]*",))
    assert not path_filter.accepts("a/[draft].tif")
    assert path_filter.accepts("a/draft.tif")
