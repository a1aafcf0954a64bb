"""``cbir bench revisited`` (revisited Oxford/Paris protocol) and ``cbir rmac-whiten``.

Thin layer over :func:`cbir.benchmarks.run_revisited` and
:func:`cbir.benchmarks.learn_region_whitening`: parse options, call, print.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from cbir.benchmarks import PostProcessing, learn_region_whitening, run_revisited
from cbir.cli.commands import app, bench_app
from cbir.cli.options import (
    DescriptorOptions,
    ExtractionOptions,
    descriptor_options,
    extraction_options,
)
from cbir.data.revisited import GroundTruthError
from cbir.diffusion import DEFAULT_K, DEFAULT_KQ
from cbir.eval.revisited import RevisitedResult
from cbir.fileio import atomic_numpy_save, atomic_write_text

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


def parse_k_alpha(text: str | None, what: str) -> tuple[int, float]:
    """``"2"`` -> (2, 3.0); ``"2,5"`` -> (2, 5.0); None or ``"0"`` -> disabled (0, 3.0)."""
    if text is None:
        return 0, 3.0
    k_text, _, alpha_text = text.replace(" ", "").partition(",")
    try:
        k = int(k_text)
        alpha = float(alpha_text) if alpha_text else 3.0
    except ValueError as exc:
        raise typer.BadParameter(f"{what} takes K or K,ALPHA (e.g. 2,3), got {text!r}") from exc
    if k < 0 or alpha < 0:
        raise typer.BadParameter(f"{what}: K and ALPHA must not be negative")
    return k, alpha


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
    qe: Annotated[
        str | None, typer.Option("--qe", help="alpha-QE: K or K,ALPHA (e.g. 2 or 2,3).")
    ] = None,
    dba: Annotated[
        str | None, typer.Option("--dba", help="alpha-DBA: K or K,ALPHA (e.g. 2 or 2,3).")
    ] = None,
    diffusion: Annotated[
        bool, typer.Option("--diffusion", help="Diffusion re-ranking (Iscen et al. 2017).")
    ] = False,
    diffusion_k: Annotated[
        int, typer.Option("--diffusion-k", help="Neighbours per node of the database graph.")
    ] = DEFAULT_K,
    diffusion_kq: Annotated[
        int, typer.Option("--diffusion-kq", help="Database neighbours seeding each query.")
    ] = DEFAULT_KQ,
    save_ranks: Annotated[
        Path | None,
        typer.Option("--save-ranks", help="Save the Nq x Ndb rankings (.npy, indices best first)."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write E/M/H mAP and mP@k (percent) as JSON.")
    ] = None,
    *,
    describe: DescriptorOptions,
    extraction: ExtractionOptions,
) -> None:
    """Score a descriptor with the revisited Oxford/Paris protocol (Easy / Medium / Hard).

    With a backbone name and no size options, images are described with their aspect
    kept and the longest side at 512 pixels.
    """
    desc = describe.build(**_instance_defaults(describe))
    qe_k, qe_alpha = parse_k_alpha(qe, "--qe")
    dba_k, dba_alpha = parse_k_alpha(dba, "--dba")
    post = PostProcessing(
        qe_k=qe_k,
        qe_alpha=qe_alpha,
        dba_k=dba_k,
        dba_alpha=dba_alpha,
        diffusion=diffusion,
        diffusion_k=diffusion_k,
        diffusion_kq=diffusion_kq,
    )
    try:
        bench = run_revisited(
            root, desc, gnd=gnd, full_query=full_query, post=post, **extraction.kwargs()
        )
    except (FileNotFoundError, RuntimeError, ValueError, GroundTruthError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    feats = bench.features
    crop_note = "queries cropped to bbx" if feats.cropped_queries else "full query images"
    typer.echo(
        f"{bench.dataset}: {len(feats.queries)} queries, {len(feats.database)} database images; "
        f"{feats.descriptor}; post-processing: {post.describe()}; {crop_note}"
    )
    for line in format_result(bench.result):
        typer.echo(line)
    if save_ranks is not None:
        atomic_numpy_save(save_ranks, np.asarray(bench.ranks, dtype=np.int64))
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(bench.to_dict(), indent=1))


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
    *,
    describe: DescriptorOptions,
    extraction: ExtractionOptions,
) -> None:
    """Learn R-MAC's region-wise PCA-whitening (Gordo et al. 2016) into a descriptor file.

    Use the file as ``--model`` anywhere; it carries backbone, R-MAC and the whitening.
    Region vectors are computed with PyTorch (the fit needs every region, not the pooled
    vector an inference engine returns).
    """
    desc = describe.build(**_instance_defaults(describe))
    try:
        w = learn_region_whitening(
            data, desc, dim=dim, power=power, max_images=max_images, seed=seed,
            engine="torch", **extraction.kwargs(engine=False),
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    desc.save(out)
    typer.echo(
        f"region whitening {w.in_dim} -> {w.out_dim} learned on {w.meta['regions']} regions of "
        f"{w.meta['images']} images -> {out} ({desc.describe_name()})"
    )
