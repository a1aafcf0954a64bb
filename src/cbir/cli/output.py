"""Everything the ``cbir`` command writes goes through here: one place decides what a pipe gets.

- On a terminal: rich tables and colours, wrapped to the terminal's width, progress bars on stderr.
- Into a pipe or a file: nothing wrapped or cut (a path stays on one line, a suggested command
  can be pasted), no colour codes and no progress bar (no carriage returns in logs).
- A reader that goes away (``cbir search Q --format paths | head -3``) ends the command quietly
  with status 0, not with a traceback.
- Errors: one line on stderr, ``error: <message>``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

#: Width given to rich when the output is not a terminal: wide enough that nothing wraps.
_UNWRAPPED = 1_000_000

#: The listing formats of ``--format``.
FORMATS = ("table", "json", "paths")


def _console(stream: Any) -> Console:
    tty = stream.isatty()
    if tty:
        return Console(file=stream, highlight=False)
    return Console(file=stream, width=_UNWRAPPED, soft_wrap=True, no_color=True, highlight=False)


def stdout_console() -> Console:
    """A console on the current stdout (looked up per call: tests and pipes replace it)."""
    return _console(sys.stdout)


def stderr_console() -> Console:
    """A console on the current stderr."""
    return _console(sys.stderr)


def progress_enabled(quiet: bool = False) -> bool:
    """Draw progress bars only for a person watching: not with ``-q``, not into a log file."""
    return not quiet and sys.stderr.isatty()


def closed_pipe() -> None:
    """The reader went away: send what is left of stdout nowhere and stop with status 0."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture)
        pass
    finally:
        os.close(devnull)
    raise SystemExit(0)


def write(text: str = "") -> None:
    """One line (or several) of plain text on stdout, never wrapped."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        closed_pipe()


def write_lines(lines: Iterable[str]) -> None:
    """Many lines on stdout, stopping quietly if the reader goes away."""
    try:
        for line in lines:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        closed_pipe()


def emit_json(obj: Any) -> None:
    """One JSON document on stdout (what ``--json`` and ``--format json`` print)."""
    write(json.dumps(obj, default=str))


def show(renderable: Any) -> None:
    """A rich renderable (a table, marked-up text) on stdout."""
    try:
        stdout_console().print(renderable)
        sys.stdout.flush()
    except BrokenPipeError:
        closed_pipe()


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
          right: Sequence[str] = ()) -> Table:  # fmt: skip
    """A rich table; ``right``: the columns aligned right (numbers)."""
    t = Table(title=title)
    for name in columns:
        t.add_column(name, justify="right" if name in right else "left", overflow="fold")
    for row in rows:
        t.add_row(*(escape(str(cell)) for cell in row))
    return t


def note(message: str) -> None:
    """A line for the person at the terminal (stderr; markup allowed)."""
    stderr_console().print(message)


def warn_failure(path: str, reason: str) -> None:
    """One line on stderr for a file that could not be used (reported once, where it happened)."""
    stderr_console().print(f"[yellow]failed[/] {escape(str(path))}: {escape(str(reason))}")


def error(message: str) -> None:
    """The single line an error gets: ``error: <message>`` on stderr."""
    stderr_console().print(f"[red]error:[/] {escape(message)}")


def check_format(fmt: str, json_flag: bool = False) -> str:
    """The effective listing format: ``--json`` is ``--format json``."""
    from cbir.errors import UsageError

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return "json" if json_flag else fmt
