"""Commands that describe images: ``extract``, ``whiten`` and ``bench gpr1200``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from cbir.benchmarks import learn_whitening, run_gpr1200
from cbir.cli.commands import app, bench_app
from cbir.cli.options import (
    DescriptorOptions,
    ExtractionOptions,
    descriptor_options,
    extraction_options,
)
from cbir.data.datasets import list_images
from cbir.extract import extract
from cbir.fileio import atomic_numpy_save, atomic_write_text

console = Console(stderr=False)
err = Console(stderr=True)


RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="auto|local|HOST:PORT|ray://HOST:PORT",
        help="Describe on a Ray cluster (auto: RAY_ADDRESS or the running cluster, else a new local one); "
        "--out is then a folder of Parquet shards, and a re-run describes only what is missing. "
        "INPUTS may be LIST.txt files of paths. --workers: describing actors.",
    ),
]


@app.command("extract")
@extraction_options()
@descriptor_options()
def extract_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="Image folders (walked recursively) or files.")],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Output .npy (a .json manifest is written beside it); with --ray, a folder."),
    ],
    ray: RayOpt = None,
    cpus_per_worker: Annotated[
        float, typer.Option("--cpus-per-worker", help="With --ray: CPUs (and model threads) of each actor.")
    ] = 1.0,
    block_rows: Annotated[
        int, typer.Option("--block-rows", help="With --ray: images per block (per actor call and Parquet shard).")
    ] = 256,
    *,
    describe: DescriptorOptions,
    extraction: ExtractionOptions,
) -> None:
    """Describe every image under INPUTS; write an N x D float32 matrix and its manifest."""
    desc = describe.build()
    if ray is not None:
        from cbir.cli.distributed_cmds import extract_on_ray  # Ray only when asked for

        extract_on_ray(inputs, out, desc, ray, extraction, cpus_per_worker=cpus_per_worker, block_rows=block_rows)
        return
    paths: list[Path] = []
    for p in inputs:
        try:
            paths.extend(list_images(p))
        except FileNotFoundError as exc:
            raise typer.BadParameter(str(exc)) from exc
    if not paths:
        raise typer.BadParameter("no images found")
    result = extract(desc, paths, **extraction.kwargs())
    manifest = result.save(out)
    for f in result.failures:
        err.print(f"[yellow]skipped[/] {f.path}: {f.reason}")
    console.print(
        f"{len(result.paths)} images described ({desc.dim}-d, {desc.describe_name()}), "
        f"{len(result.failures)} skipped, {result.images_per_second:.1f} images/s -> {out} (+ {manifest.name})"
    )


@app.command("whiten")
@extraction_options()
@descriptor_options(omit=("whiten",))
def whiten_cmd(
    data: Annotated[
        Path, typer.Argument(help="Images to learn from (class folders for --kind learned). Never the evaluation set.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Whitening file to write.")],
    kind: Annotated[
        str, typer.Option("--kind", help="pca (unsupervised) or learned (Radenovic's Lw, needs class folders).")
    ] = "pca",
    dim: Annotated[int | None, typer.Option("--dim", help="Output dimension (default: input dimension).")] = None,
    power: Annotated[
        float, typer.Option("--power", help="PCA eigenvalue power: 1 whitens fully, 0 only rotates.")
    ] = 1.0,
    *,
    describe: DescriptorOptions,
    extraction: ExtractionOptions,
) -> None:
    """Learn PCA or supervised whitening on a separate image set, for use with --whiten."""
    desc = describe.build()
    try:
        w = learn_whitening(
            data,
            desc,
            kind=kind,
            dim=dim,
            power=power,
            **extraction.kwargs(),
        )
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    w.save(str(out))
    console.print(f"{kind} whitening {w.in_dim} -> {w.out_dim} learned on {data} -> {out}")


@bench_app.command("gpr1200")
@extraction_options()
@descriptor_options()
def bench_gpr1200_cmd(
    root: Annotated[
        Path, typer.Argument(help="GPR1200-format folder (images, or an images/ folder and subsets.json).")
    ],
    *,
    describe: DescriptorOptions,
    extraction: ExtractionOptions,
    save_features: Annotated[
        Path | None, typer.Option("--save-features", help="Save the N x D descriptors (.npy) in 'files' order.")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the scores, speed and file order as JSON.")
    ] = None,
) -> None:
    """Score a descriptor with the GPR1200 protocol (Schall et al. 2021)."""
    desc = describe.build()
    try:
        bench = run_gpr1200(root, desc, **extraction.kwargs())
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    table = Table(title=f"GPR1200 protocol on {root} ({len(bench.files)} images, {desc.describe_name()})")
    table.add_column("metric")
    table.add_column("mAP", justify="right")
    table.add_row("all", f"{bench.result.mAP:.4f}")
    for name, value in bench.result.domains.items():
        table.add_row(name, f"{value:.4f}")
    if bench.result.gpr1000 is not None:
        table.add_row("GPR1000 (no faces)", f"{bench.result.gpr1000:.4f}")
    table.add_row("images/s", f"{bench.extraction.images_per_second:.1f}")
    console.print(table)
    console.print(f"mAP {bench.result.mAP:.4f}")
    if save_features is not None:
        atomic_numpy_save(save_features, bench.extraction.features.astype(np.float32))
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(bench.to_dict(), indent=1))
