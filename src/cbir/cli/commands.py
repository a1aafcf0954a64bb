"""Registry of the command families: one module each, attached to one typer app."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="cbir",
    help="Content-based image retrieval: describe, benchmark, index and search images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

bench_app = typer.Typer(help="Score a descriptor on a retrieval benchmark.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

# Command modules register themselves on import.
from cbir.cli import ann_cmds as _ann_cmds  # noqa: E402,F401
from cbir.cli import describe_cmds as _describe_cmds  # noqa: E402,F401
from cbir.cli import duplicates_cmds as _duplicates_cmds  # noqa: E402,F401
from cbir.cli import index_cmds as _index_cmds  # noqa: E402,F401
from cbir.cli import mine_cmds as _mine_cmds  # noqa: E402,F401
from cbir.cli import revisited_cmds as _revisited_cmds  # noqa: E402,F401
from cbir.cli import serve_cmds as _serve_cmds  # noqa: E402,F401
from cbir.cli import train_cmds as _train_cmds  # noqa: E402,F401
