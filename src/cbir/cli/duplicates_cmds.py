"""``cbir duplicates``: near-duplicate groups of an index.

Its own module (not index_cmds) so the duplicates work can change it without touching
the other search-engine commands; it shares their ``--db``/``--json`` options and error mapping.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cbir.cli.commands import app
from cbir.cli.index_cmds import DbOpt, JsonOpt, _open, _user_errors, console
from cbir.index import DEFAULT_DB


@app.command("duplicates")
def duplicates_cmd(
    db: DbOpt = Path(DEFAULT_DB),
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            "-t",
            help="Cosine similarity at or above which two images are duplicates.",
        ),
    ] = 0.9,
    json_out: JsonOpt = False,
) -> None:
    """Group near-duplicate images (connected groups, largest first)."""
    with _user_errors():
        with _open(db, readonly=True) as idx:
            groups = idx.duplicates(threshold)
    if json_out:
        typer.echo(json.dumps({"groups": [[{"path": h.path, "score": h.score} for h in g] for g in groups]}))
        return
    if not groups:
        console.print(f"no duplicates at threshold {threshold}")
        return
    for n, group in enumerate(groups, 1):
        console.print(f"[bold]group {n}[/] ({len(group)} images)")
        for h in group:
            console.print(f"  {h.score:.4f}  {h.path}")
    console.print(f"{len(groups)} groups, {sum(len(g) for g in groups)} images")
