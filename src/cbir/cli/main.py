"""The ``cbir`` command: a thin typer layer over the Python API.

Each command family lives in its own module and registers itself on :data:`app`;
this module only assembles them and maps library errors to clean exits.
"""

from __future__ import annotations

import sys

import typer

from cbir.cli.commands import app


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
