"""Commands that describe images: ``extract``, ``whiten`` and ``bench gpr1200``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cbir.cli import output
from cbir.cli.commands import app, bench_app
from cbir.cli.options import (
    DescriptorOptions,
    ExcludeOpt,
    ExtractionOptions,
    IncludeHiddenOpt,
    descriptor_options,
    extraction_options,
)
from cbir.defaults import BLOCK_ROWS

#: ``--json`` of the benchmarks: the scores as JSON on stdout (a file: ``--out``).
BenchJsonOpt = Annotated[bool, typer.Option("--json", help="Print the scores as JSON on stdout instead of a table.")]


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
    inputs: Annotated[
        list[Path], typer.Argument(metavar="INPUTS...", help="Image folders (walked recursively) or files.")
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Output .npy (a .json manifest is written beside it); with --ray, a folder."),
    ],
    ray: RayOpt = None,
    cpus_per_worker: Annotated[
        float, typer.Option("--cpus-per-worker", help="With --ray: CPUs (and model threads) of each actor.")
    ] = 1.0,
    block_rows: Annotated[
        int, typer.Option("--block-rows", help="With --ray: most images per block (one actor call, one shard).")
    ] = BLOCK_ROWS,
    exclude: ExcludeOpt = None,
    include_hidden: IncludeHiddenOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    *,
    describe: DescriptorOptions,
    extraction: ExtractionOptions,
) -> None:
    """Describe every image under INPUTS; write an N x D float32 matrix and its manifest.

    Hidden folders (.*), @eaDir and .thumbnails are skipped unless --include-hidden."""
    from cbir import api

    desc = describe.build()
    if ray is not None:
        from cbir.cli.distributed_cmds import extract_on_ray  # Ray only when asked for

        extract_on_ray(inputs, out, desc, ray, extraction, cpus_per_worker=cpus_per_worker, block_rows=block_rows)
        return
    paths = api.images_in(inputs, exclude=exclude or (), include_hidden=include_hidden)
    result = api.extract(desc, paths, **extraction.kwargs())
    manifest = result.save(out)
    for f in result.failures:  # each failure once; the manifest keeps them with their reasons
        output.warn_failure(f.path, f.reason)
    if json_out:
        output.emit_json({"images": len(result.paths), "dim": desc.dim, "descriptor": desc.describe_name(),
                          "failures": [{"path": f.path, "reason": f.reason} for f in result.failures],
                          "images_per_second": result.images_per_second, "out": str(out), **result.runtime,
                          "manifest": str(manifest)})  # fmt: skip
        return
    output.write(
        f"{len(result.paths)} images described ({desc.dim}-d, {desc.describe_name()}), "
        f"{len(result.failures)} failed, {result.images_per_second:.1f} images/s -> {out} (+ {manifest.name})"
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
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    *,
    describe: DescriptorOptions,
    extraction: ExtractionOptions,
) -> None:
    """Learn PCA or supervised whitening on a separate image set, for use with --whiten."""
    from cbir import api

    desc = describe.build()
    w = api.whitening(data, desc, kind=kind, dim=dim, power=power, **extraction.kwargs())
    w.save(str(out))
    if json_out:
        output.emit_json({"kind": kind, "in_dim": w.in_dim, "out_dim": w.out_dim, "data": str(data), "out": str(out)})
        return
    output.write(f"{kind} whitening {w.in_dim} -> {w.out_dim} learned on {data} -> {out}")


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
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the scores, speed and file order as JSON to this file.")
    ] = None,
    json_out: BenchJsonOpt = False,
) -> None:
    """Score a descriptor with the GPR1200 protocol (Schall et al. 2021)."""
    from cbir import api
    from cbir.fileio import atomic_numpy_save, atomic_write_text

    desc = describe.build()
    bench = api.bench_gpr1200(root, desc, **extraction.kwargs())
    if save_features is not None:
        atomic_numpy_save(save_features, bench.extraction.features.astype("float32"))
    if out is not None:
        atomic_write_text(out, json.dumps(bench.to_dict(), indent=1))
    if json_out:
        output.emit_json(bench.to_dict())
        return
    rows = [("all", f"{bench.result.mAP:.4f}")]
    rows += [(name, f"{value:.4f}") for name, value in bench.result.domains.items()]
    if bench.result.gpr1000 is not None:
        rows.append(("GPR1000 (no faces)", f"{bench.result.gpr1000:.4f}"))
    rows.append(("images/s", f"{bench.extraction.images_per_second:.1f}"))
    title = f"GPR1200 protocol on {root} ({len(bench.files)} images, {desc.describe_name()})"
    output.show(output.table(["metric", "mAP"], rows, title=title, right=["mAP"]))
    output.write(f"mAP {bench.result.mAP:.4f}")
