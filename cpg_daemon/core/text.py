"""Names in human-readable output: nothing in a file name may act on a terminal.

A file name is whatever bytes its writer chose: an escape sequence that clears the
screen or sets the window title, a newline that starts a forged line, a right-to-left
override that reverses what follows. Every human-readable output (``status``,
``status --watch``, ``check``, ``upload``, ``verify``) passes names through
:func:`printable`; the JSON outputs need nothing (JSON escapes control characters).

The escapes are visible and unambiguous, in Python's notation: ``\\\\`` for a
backslash; ``\\n``, ``\\r``, ``\\t``; ``\\xNN`` for a byte of the name that is an ASCII
control character or not UTF-8 at all; ``\\uNNNN`` (``\\UNNNNNNNN``) for any other
character a terminal does not simply print (C1 controls, format characters such as
bidirectional overrides, separators other than the space).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

__all__ = ["printable", "printable_tree"]

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
T = TypeVar("T")


def _escape(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on written as an escape."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else _escape(c) for c in text)


def printable_tree(value: T) -> T:
    """Every string in a tree of dicts and lists made :func:`printable` (keys too)."""
    if isinstance(value, str):
        return printable(value)  # type: ignore[return-value]
    if isinstance(value, Mapping):
        return {printable_tree(k): printable_tree(v) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, (list, tuple)):
        return type(value)(printable_tree(v) for v in value)
    return value
