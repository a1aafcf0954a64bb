"""``cbir bench revisited`` (revisited Oxford/Paris protocol) and ``cbir rmac-whiten``.

Thin layer over :func:`cbir.benchmarks.run_revisited` and
:func:`cbir.benchmarks.learn_region_whitening`: parse options, call, print.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cbir.cli import output
from cbir.cli.commands import app, bench_app
from cbir.cli.describe_cmds import BenchJsonOpt
from cbir.cli.options import (
    DescriptorOptions,
    ExtractionOptions,
    descriptor_options,
    extraction_options,
)
from cbir.defaults import DEFAULT_ALPHA, DIFFUSION_K, DIFFUSION_KQ

if TYPE_CHECKING:
    from cbir.eval.revisited import RevisitedResult

#: Input size used when the model is a backbone name and no size is given: instance
#: retrieval needs the whole image at a useful resolution (the papers use max side 1024;
#: 512 keeps a 2-core CPU run of a small dataset in minutes).
DEFAULT_INSTANCE_SIZE = 512


def _instance_defaults(describe: DescriptorOptions) -> dict[str, object]:
    """For a backbone name (not a descriptor file): keep the aspect ratio, max side
    :data:`DEFAULT_INSTANCE_SIZE`, unless the options say otherwise."""
    if describe.model is not None and os.path.isfile(describe.model):
        return {}
    return {
        "resize": describe.resize or "keep",
        "image_size": describe.image_size or DEFAULT_INSTANCE_SIZE,
    }


def format_result(result: RevisitedResult) -> list[str]:
    """The E/M/H table in percent with 2 decimals, one line per setting."""
    ks = result.kappas
    head = f"{'':8s} {'mAP':>7s} " + " ".join(f"{'mP@' + str(k):>7s}" for k in ks)
    lines = [head]
    for name, s in result.settings.items():
        cells = [s.mAP, *(s.mP[k] for k in ks)]
        lines.append(f"{name:8s} " + " ".join(f"{100 * v:7.2f}" for v in cells))
    empty = {n: s.without_positives for n, s in result.settings.items() if s.without_positives}
    if empty:
        left = ", ".join(f"{n} {c}" for n, c in empty.items())
        lines.append(f"queries without positives, left out of the means: {left}")
    return lines


@bench_app.command("revisited")
@extraction_options()
@descriptor_options()
def bench_revisited_cmd(
    root: Annotated[Path, typer.Argument(help="revisitop-format folder (jpg/ and gnd_*.pkl).")],
    gnd: Annotated[
        Path | None, typer.Option("--gnd", help="Ground-truth pickle (default: DIR/gnd_*.pkl).")
    ] = None,
    full_query: Annotated[
        bool, typer.Option("--full-query", help="Describe whole query images, not the bbx crop.")
    ] = False,
    qe: Annotated[int, typer.Option("--qe", help="alpha-query expansion with the top K results (0 = off).")] = 0,
    qe_alpha: Annotated[float, typer.Option("--qe-alpha", help="Query-expansion weight exponent.")] = DEFAULT_ALPHA,
    dba: Annotated[
        int, typer.Option("--dba", help="alpha-DBA: neighbours added to each database vector (0 = off).")
    ] = 0,
    dba_alpha: Annotated[float, typer.Option("--dba-alpha", help="DBA weight exponent.")] = DEFAULT_ALPHA,
    diffusion: Annotated[
        bool, typer.Option("--diffusion", help="Diffusion re-ranking (Iscen et al. 2017).")
    ] = False,
    diffusion_k: Annotated[
        int, typer.Option("--diffusion-k", help="Neighbours per node of the database graph.")
    ] = DIFFUSION_K,
    diffusion_kq: Annotated[
        int, typer.Option("--diffusion-kq", help="Database neighbours seeding each query.")
    ] = DIFFUSION_KQ,
    save_ranks: Annotated[
        Path | None,
        typer.Option("--save-ranks", help="Save the Nq x Ndb rankings (.npy, indices best first)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write E/M/H mAP and mP@k (percent) as JSON to this file.")
    ] = None,
    json_out: BenchJsonOpt = False,
    *,
    describe: DescriptorOptions,
    extraction: ExtractionOptions,
) -> None:
    """Score a descriptor with the revisited Oxford/Paris protocol (Easy / Medium / Hard).

    With a backbone name and no size options, images are described with their aspect
    kept and the longest side at 512 pixels.
    """
    from cbir import api
    from cbir.fileio import atomic_numpy_save, atomic_write_text

    desc = describe.build(**_instance_defaults(describe))
    bench = api.bench_revisited(
        root, desc, qe=qe, qe_alpha=qe_alpha, dba=dba, dba_alpha=dba_alpha, diffusion=diffusion,
        diffusion_k=diffusion_k, diffusion_kq=diffusion_kq, gnd=gnd, full_query=full_query, **extraction.kwargs(),
    )  # fmt: skip
    if save_ranks is not None:
        atomic_numpy_save(save_ranks, bench.ranks.astype("int64"))
    if out is not None:
        atomic_write_text(out, json.dumps(bench.to_dict(), indent=1))
    if json_out:
        output.emit_json(bench.to_dict())
        return
    feats = bench.features
    crop_note = "queries cropped to bbx" if feats.cropped_queries else "full query images"
    output.write(
        f"{bench.dataset}: {len(feats.queries)} queries, {len(feats.database)} database images; "
        f"{feats.descriptor}; post-processing: {bench.post.describe()}; {crop_note}"
    )
    output.write_lines(format_result(bench.result))


@app.command("rmac-whiten")
@extraction_options(omit=("engine",))
@descriptor_options(omit=("whiten",), pooling="rmac")
def rmac_whiten_cmd(
    data: Annotated[
        Path, typer.Argument(help="Training images (walked recursively). Never the evaluation set.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Descriptor file to write (.cbir).")],
    dim: Annotated[
        int | None, typer.Option("--dim", help="Output dimension (default: input dimension).")
    ] = None,
    power: Annotated[
        float, typer.Option("--power", help="Eigenvalue power: 1 whitens fully, 0.5 half.")
    ] = 1.0,
    max_images: Annotated[
        int | None, typer.Option("--max-images", help="Learn on a seeded random subset.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subset.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    *,
    describe: DescriptorOptions,
    extraction: ExtractionOptions,
) -> None:
    """Learn R-MAC's region-wise PCA-whitening (Gordo et al. 2016) into a descriptor file.

    Use the file as ``--model`` anywhere; it carries backbone, R-MAC and the whitening.
    Region vectors are computed with PyTorch (the fit needs every region, not the pooled
    vector an inference engine returns).
    """
    from cbir import api

    desc = describe.build(**_instance_defaults(describe))
    w = api.region_whitening(
        data, desc, dim=dim, power=power, max_images=max_images, seed=seed, **extraction.kwargs(engine=False)
    )
    desc.save(out)
    if json_out:
        output.emit_json({"in_dim": w.in_dim, "out_dim": w.out_dim, "regions": w.meta["regions"],
                          "images": w.meta["images"], "out": str(out), "descriptor": desc.describe_name()})  # fmt: skip
        return
    output.write(
        f"region whitening {w.in_dim} -> {w.out_dim} learned on {w.meta['regions']} regions of "
        f"{w.meta['images']} images -> {out} ({desc.describe_name()})"
    )
