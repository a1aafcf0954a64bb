"""``cbir mine``: matching pairs from unlabelled images (a thin layer over
:mod:`cbir.train.discovery`). Torch and OpenCV are imported inside the command, so
``cbir --help`` loads neither."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cbir.cli import output
from cbir.cli.commands import app
from cbir.cli.mining import (
    NEIGHBOURS,
    GeometryOpt,
    MineModelOpt,
    MinInliersOpt,
    NeighboursOpt,
    VerifyOpt,
    report_text,
    run_mining,
)
from cbir.cli.output import progress_enabled


@app.command("mine")
def mine_cmd(
    folder: Annotated[Path, typer.Argument(help="Unlabelled images, any layout (folder names are never read).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Pairs CSV to write (query,positive,cluster).")] = Path(
        "pairs.csv"
    ),
    verify: VerifyOpt = "sift",
    geometry: GeometryOpt = "homography",
    min_inliers: MinInliersOpt = None,
    neighbours: NeighboursOpt = NEIGHBOURS,
    model: MineModelOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Find matching pairs without labels: k-NN candidates verified by RANSAC; clusters =
    connected groups (Radenovic et al. 2018). Writes OUT and OUT.json (the report)."""
    report = run_mining(
        folder, out, model=model, verify=verify, geometry=geometry, min_inliers=min_inliers,
        neighbours=neighbours, progress=progress_enabled(quiet),
    )  # fmt: skip  (a CbirError is reported by the CLI's group, once)
    if json_out:
        output.emit_json(report)
        return
    typer.echo(report_text(report))
    typer.echo(f"-> {out} (train on it: cbir train {out} --out model.cbir); report {out.with_suffix('.json')}")
