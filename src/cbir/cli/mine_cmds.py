"""``cbir mine``: matching pairs from unlabelled images (a thin layer over
:mod:`cbir.train.discovery`). Torch and OpenCV are imported inside the command, so
``cbir --help`` loads neither."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cbir.cli.commands import app
from cbir.errors import CbirError

NEIGHBOURS = 5  # the same as cbir.train.discovery.DEFAULT_NEIGHBOURS (not imported: no torch at --help)

VerifyOpt = Annotated[
    str,
    typer.Option("--verify", help="Local features of the geometric check: sift (robust) or orb (faster)."),
]
GeometryOpt = Annotated[
    str,
    typer.Option(
        "--geometry",
        help="RANSAC model: homography (strict: copies, planar or distant views) or fundamental (3D views).",
    ),
]
MinInliersOpt = Annotated[
    int | None, typer.Option("--min-inliers", help="RANSAC inliers a pair needs to count as a match [default: 15].")
]
NeighboursOpt = Annotated[
    int, typer.Option("--neighbours", "-k", help="Candidates per image: its nearest neighbours by descriptor.")
]
MineModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Off-the-shelf descriptor proposing candidates [default: cbir's default]."),
]


def run_mining(
    folder: Path,
    out: Path,
    *,
    model: str | None,
    verify: str,
    geometry: str,
    min_inliers: int | None,
    neighbours: int,
    progress: bool,
) -> dict:
    """Mine ``folder``, write the pairs CSV and its report (``OUT`` with ``.json``); returns
    the report. Shared by ``cbir mine`` and ``cbir train --unlabelled``."""
    from cbir.fileio import atomic_write_text
    from cbir.train.discovery import mine_folder

    result = mine_folder(
        folder,
        model=model,
        features=verify,
        geometry=geometry,
        min_inliers=min_inliers,
        neighbours=neighbours,
        progress=progress,
        log=lambda m: typer.echo(m, err=True),
    )
    result.write_csv(out)
    report = {"folder": str(folder), "pairs_csv": str(out), **result.report()}
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=1))
    return report


def report_text(report: dict) -> str:
    s = report["seconds"]
    return (
        f"{report['images']} images: {report['pairs_tried']} pairs tried, {report['pairs_verified']} verified, "
        f"{report['clusters']} clusters ({report['images_in_clusters']} images, largest {report['largest_cluster']}); "
        f"{sum(s.values()):.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in s.items()) + ")"
    )


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
) -> None:
    """Find matching pairs without labels: k-NN candidates verified by RANSAC; clusters =
    connected groups (Radenovic et al. 2018). Writes OUT and OUT.json (the report)."""
    try:
        report = run_mining(
            folder,
            out,
            model=model,
            verify=verify,
            geometry=geometry,
            min_inliers=min_inliers,
            neighbours=neighbours,
            progress=not quiet,
        )
    except CbirError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from exc
    typer.echo(report_text(report))
    typer.echo(f"-> {out} (train on it: cbir train {out} --out model.cbir); report {out.with_suffix('.json')}")
