"""Names in human-readable output: escaped so that nothing in them acts on a terminal."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from cpg_daemon.core.text import printable, printable_tree

_ESCAPE = re.compile(r"\\(\\|n|r|t|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


def _unescape(text: str) -> str:
    """The inverse of printable, written from its documented notation."""

    def one(match: re.Match[str]) -> str:
        code = match[1]
        if code in ("\\", "n", "r", "t"):
            return {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}[code]
        value = int(code[1:], 16)
        if code[0] == "x" and value >= 0x80:  # a byte that is not UTF-8
            return chr(0xDC00 + value)
        return chr(value)

    return _ESCAPE.sub(one, text)


# Names as os.fsdecode gives them: any bytes, those that are not UTF-8 as surrogates.
names = st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")) | st.text()


@given(names)
def test_the_escaped_name_holds_nothing_a_terminal_acts_on_and_reads_back_exactly(
    name: str,
) -> None:
    shown = printable(name)
    assert all(c.isprintable() for c in shown), repr(shown)
    assert _unescape(shown) == name


def test_what_the_attacks_used_is_written_out_and_ordinary_names_are_left_alone() -> None:
    assert printable("\x1b[2J\x1b]0;pwned\x07x.tiff") == "\\x1b[2J\\x1b]0;pwned\\x07x.tiff"
    assert printable("a\n999 uploaded, 0 failed") == "a\\n999 uploaded, 0 failed"
    assert printable("\u202egnp.exe") == "\\u202egnp.exe"  # right-to-left override
    assert printable("\x9b2J") == "\\u009b2J"  # C1 CSI, a character
    assert printable(b"\x9b".decode("utf-8", "surrogateescape")) == "\\x9b"  # a raw byte
    assert printable("C:\\data") == "C:\\\\data"
    plain = "Plate1/r01c01f01p01-ch1sk1fk1fl1.tiff ünïcødé 漢字 🙂"
    assert printable(plain) is plain


def test_a_status_tree_is_escaped_through_and_through() -> None:
    tree = {"watches": [{"name": "w", "path": "/x\n"}], "n": 3, "t": ("a\x1b",)}
    escaped = {"watches": [{"name": "w", "path": "/x\\n"}], "n": 3, "t": ("a\\x1b",)}
    assert printable_tree(tree) == escaped
