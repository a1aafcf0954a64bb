"""``cbir duplicates``: near-duplicate groups of an index and the files a user may remove.

Its own module (not index_cmds) so the duplicates work can change it without touching
the other search-engine commands; it shares their ``--db`` option and error mapping.
Output is plain text (no rich markup or wrapping): paths are printed whole, so the
"files to remove" list can be piped (``--format paths | xargs -d '\\n' rm``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cbir.cli import output
from cbir.cli.commands import app
from cbir.cli.index_cmds import DbOpt, JsonOpt
from cbir.defaults import DEFAULT_DB

if TYPE_CHECKING:  # FAISS and the index load when the command runs, not for --help
    from cbir.index.removal import DuplicateGroup


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


def _table_lines(plan: list[DuplicateGroup], threshold: float, keep: str) -> list[str]:
    if not plan:
        return [f"no duplicates at threshold {threshold}"]
    lines = []
    for n, g in enumerate(plan, 1):
        lines.append(f"group {n} ({len(g.members)} images, similarity to the first member)")
        lines.extend(f"  {'keep  ' if m is g.keep else 'remove'}  {m.score:.4f}  {m.path}" for m in g.members)
    removable = [m.path for g in plan for m in g.remove]
    lines.append(f"\n{len(plan)} groups; keeping the {keep} of each; files to remove ({len(removable)}):")
    return lines + removable


@app.command("duplicates")
def duplicates_cmd(
    db: DbOpt = Path(DEFAULT_DB),
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            "-t",
            help="Cosine similarity to a group's first member at or above which an image is its duplicate "
            "(default: the value calibrated for the default model, see docs/duplicates.md).",
        ),
    ] = None,
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
            metavar="table|json|paths",
            help="table (groups, then the files to remove), json, or paths (only the files to remove, "
            "one per line, for xargs).",
        ),
    ] = "table",
    json_out: JsonOpt = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Also group an image's nearest neighbours below the threshold when their local features "
            "match under one geometric transformation (SIFT + RANSAC; finds more copies that were cropped, "
            "shrunk or recompressed; reads the candidate files).",
        ),
    ] = False,
) -> None:
    """Group near-duplicate images (every member close to the group's first), largest group first,
    and list the files to remove so that one file of each group is kept. Nothing is deleted."""
    from cbir import api
    from cbir.index.duplicates import DEFAULT_THRESHOLD
    from cbir.index.removal import KEEP_RULES

    if keep not in KEEP_RULES:
        raise typer.BadParameter(f"one of {', '.join(KEEP_RULES)}", param_hint="--keep")
    fmt = output.check_format(fmt, json_out)
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    plan = api.find_duplicates(db, threshold, keep=keep, verify=verify)
    if fmt == "json":
        output.emit_json(_payload(plan, threshold, keep))
    elif fmt == "paths":
        output.write_lines(m.path for g in plan for m in g.remove)
    else:
        output.write_lines(_table_lines(plan, threshold, keep))
