"""Options and the mining step shared by ``cbir mine`` and ``cbir train --unlabelled``.

Its own module, registering no command, so both command modules import it without importing
each other. Torch and OpenCV are imported inside :func:`run_mining`, so ``cbir --help``
loads neither."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

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
