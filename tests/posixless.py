"""Run cpg-daemon commands in this interpreter with the modules Windows lacks made
unimportable: ``python tests/posixless.py COMMANDS.json``.

COMMANDS.json is a list of argument lists (``[["--help"], ["upload", ...], ...]``).
Before ``cpg_daemon`` is imported, ``sys.modules[name] = None`` for each module in
``BLOCKED``, so that any ``import`` of one raises ImportError, as on Windows. The
commands then run one after the other through ``cpg_daemon.cli.main.main``, each with
its standard output and error captured; one JSON list of ``{"args", "exit", "stdout",
"stderr"}`` is printed at the end.

The interpreter must be a fresh one: a process forked from one that had imported
cpg_daemon (``tests/forkserver.py``) would have the modules already, so this refuses to
run if cpg_daemon is imported before it starts.

``journal.lock`` takes its Windows branch when ``fcntl`` cannot be imported:
``msvcrt.locking``. Where this runs on a POSIX system, which has no msvcrt, a stand-in
is installed that does what ``msvcrt.locking`` does with LK_NBLCK and LK_UNLCK (an
immediate failure with EACCES while another process holds the lock) by the real
``flock``, taken before ``fcntl`` is blocked; on Windows the real msvcrt is used. The
standard library guesses Windows from an importable msvcrt (``subprocess`` would then
want ``_winapi``; ``getpass`` its console functions), so those two are imported first,
without it; the stand-in has nothing but ``locking``, so any other use fails loudly.

Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import json
import sys
import traceback
import types
from typing import Any

BLOCKED = ("fcntl", "grp", "pwd", "resource", "termios", "tty", "pty", "syslog")
"""Standard-library modules of POSIX systems that Python on Windows does not have."""
LK_UNLCK, LK_NBLCK = 0, 2
"""msvcrt's values."""


def _msvcrt_stand_in() -> types.ModuleType | None:
    """A stand-in for msvcrt's ``locking`` on flock, or None where flock is missing."""
    try:
        import fcntl
    except ImportError:
        return None
    flock, exclusive, no_wait, unlock = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_NB, fcntl.LOCK_UN

    def locking(fd: int, mode: int, nbytes: int) -> None:
        if mode == LK_NBLCK:
            try:
                flock(fd, exclusive | no_wait)
            except BlockingIOError:
                raise PermissionError(errno.EACCES, "Permission denied") from None
        elif mode == LK_UNLCK:
            flock(fd, unlock)
        else:
            raise ValueError(f"the stand-in has LK_NBLCK and LK_UNLCK only, not {mode}")

    module = types.ModuleType("msvcrt", "A stand-in of tests/posixless.py (locking only).")
    module.LK_NBLCK = LK_NBLCK  # type: ignore[attr-defined]
    module.LK_UNLCK = LK_UNLCK  # type: ignore[attr-defined]
    module.locking = locking  # type: ignore[attr-defined]
    return module


def block() -> None:
    imported = sorted(name for name in sys.modules if name.split(".")[0] == "cpg_daemon")
    if imported:
        raise SystemExit(f"not a fresh interpreter: {imported[:3]} are imported already")
    has_msvcrt = importlib.util.find_spec("msvcrt") is not None
    stand_in = None if has_msvcrt else _msvcrt_stand_in()
    for name in BLOCKED:
        sys.modules[name] = None  # type: ignore[assignment]
    if stand_in is not None:
        import getpass  # noqa: F401 - each decides here, with no msvcrt, that this is not
        import subprocess  # noqa: F401 - Windows

        sys.modules["msvcrt"] = stand_in


def run(args: list[str]) -> dict[str, Any]:
    from cpg_daemon.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status: object = main(args)
        except SystemExit as exc:  # argparse: --help, a usage error
            status = exc.code
        except BaseException:  # what the user would see as a traceback
            traceback.print_exc()
            status = "traceback"
    return {"args": args, "exit": status, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as file:
        commands = json.load(file)
    block()
    results = [run(args) for args in commands]
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
