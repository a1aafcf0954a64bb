"""The ``cbir`` command: a thin typer layer over the Python API (:mod:`cbir.api`).

Each command family lives in its own module and registers itself on :data:`app`. Errors are
mapped once, by the app's group (:class:`cbir.cli.commands.CbirGroup`): a
:class:`cbir.errors.CbirError` becomes one ``error: <message>`` line on stderr and the error's
``exit_code`` (docs/cli.md, "Exit codes"); invalid usage is typer's (status 2); anything else
is a bug and keeps its traceback (status 1).
"""

from __future__ import annotations

import sys

from cbir.cli import output
from cbir.cli.commands import app


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        output.error("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
