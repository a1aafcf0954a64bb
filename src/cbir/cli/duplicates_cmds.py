"""``cbir duplicates``: near-duplicate groups of an index and the files a user may remove.

Its own module (not index_cmds) so the duplicates work can change it without touching
the other search-engine commands; it shares their ``--db`` option and error mapping.
Output is plain text (no rich markup or wrapping): paths are printed whole, so the
"files to remove" list can be piped (``--format paths | xargs -d '\\n' rm``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cbir.cli.commands import app
from cbir.cli.index_cmds import DbOpt, _open, _user_errors
from cbir.index import DEFAULT_DB
from cbir.index.duplicates import DEFAULT_THRESHOLD, Verification
from cbir.index.removal import KEEP_RULES, DuplicateGroup

FORMATS = ("table", "json", "paths")


def _payload(plan: list[DuplicateGroup], threshold: float, keep: str) -> dict[str, Any]:
    return {
        "threshold": threshold,
        "keep": keep,
        "groups": [
            {
                "keep": g.keep.path,
                "members": [{"path": m.path, "score": m.score, "keep": m is g.keep} for m in g.members],
            }
            for g in plan
        ],
        "remove": [m.path for g in plan for m in g.remove],
    }


def _print_table(plan: list[DuplicateGroup], threshold: float, keep: str) -> None:
    if not plan:
        typer.echo(f"no duplicates at threshold {threshold}")
        return
    for n, g in enumerate(plan, 1):
        typer.echo(f"group {n} ({len(g.members)} images, similarity to the first member)")
        for m in g.members:
            typer.echo(f"  {'keep  ' if m is g.keep else 'remove'}  {m.score:.4f}  {m.path}")
    removable = [m.path for g in plan for m in g.remove]
    typer.echo(f"\n{len(plan)} groups; keeping the {keep} of each; files to remove ({len(removable)}):")
    for path in removable:
        typer.echo(path)


@app.command("duplicates")
def duplicates_cmd(
    db: DbOpt = Path(DEFAULT_DB),
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            "-t",
            help="Cosine similarity to a group's first member at or above which an image is its duplicate "
            f"(default {DEFAULT_THRESHOLD}: calibrated for the default model, see docs/duplicates.md).",
        ),
    ] = DEFAULT_THRESHOLD,
    keep: Annotated[
        str,
        typer.Option(
            "--keep",
            help="Which file of each group to keep: first (the group's centre), largest (most pixels), "
            "oldest (earliest modification time). The others are listed as files to remove.",
        ),
    ] = "first",
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="table (groups, then the files to remove), json, or paths (only the files to remove, "
            "one per line, for xargs).",
        ),
    ] = "table",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON (same as --format json).")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Also group an image's nearest neighbours below the threshold when their local features "
            "match under one geometric transformation (SIFT + RANSAC; finds more copies that were cropped, "
            "shrunk or recompressed; reads the candidate files; needs OpenCV: pip install 'cbir[mine]').",
        ),
    ] = False,
) -> None:
    """Group near-duplicate images (every member close to the group's first), largest group first,
    and list the files to remove so that one file of each group is kept. Nothing is deleted."""
    if keep not in KEEP_RULES:
        raise typer.BadParameter(f"one of {', '.join(KEEP_RULES)}", param_hint="--keep")
    if fmt not in FORMATS:
        raise typer.BadParameter(f"one of {', '.join(FORMATS)}", param_hint="--format")
    with _user_errors():
        with _open(db, readonly=True) as idx:
            plan = idx.duplicate_plan(threshold, keep, verify=Verification() if verify else None)
    if json_out or fmt == "json":
        typer.echo(json.dumps(_payload(plan, threshold, keep)))
    elif fmt == "paths":
        for g in plan:
            for m in g.remove:
                typer.echo(m.path)
    else:
        _print_table(plan, threshold, keep)
