"""``cbir train``: fine-tune a descriptor for retrieval (a thin layer over :mod:`cbir.train`).

Settings the user does not give come from a recipe (:mod:`cbir.train.recipes`: ``cpu`` by
default, or ``paper``); every option given explicitly overrides it. Torch is imported inside
the command, so ``cbir --help`` does not load it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cbir.cli import output
from cbir.cli.commands import app
from cbir.cli.mining import NEIGHBOURS, GeometryOpt, MinInliersOpt, NeighboursOpt, VerifyOpt, report_text, run_mining
from cbir.cli.options import QuietOpt

RECIPE_HELP = (
    "Where the settings you do not give come from: 'cpu' (default; what validation chose for about an "
    "hour on a CPU: 50 epochs of 200 tuples, pool 500, lr 2e-5, margin 1.0, 40% of the backbone frozen, "
    "class sampling) or 'paper' (Radenovic et al. 2018 on a GPU: 100 epochs of 2,000 tuples, pool 20,000, "
    "lr 1e-6, margin 0.7, nothing frozen, image sampling, 362 px). Any option given explicitly wins."
)


def _r(text: str) -> str:
    """Help text of an option whose default comes from the recipe."""
    return f"{text} [default: from --recipe]"


@app.command("train")
def train_cmd(
    data: Annotated[
        list[Path],
        typer.Argument(
            help="Class folders DATA/<class>/*.jpg (one or more roots), one CSV of query,positive,cluster "
            "rows, or with --unlabelled one folder of unlabelled images (any layout)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Descriptor file to write (use it with --model).")],
    recipe: Annotated[str, typer.Option("--recipe", help=RECIPE_HELP)] = "cpu",
    unlabelled: Annotated[
        bool,
        typer.Option(
            "--unlabelled",
            help="DATA is one folder of unlabelled images: mine verified pairs first (as cbir mine; "
            "written to OUT's name + .pairs.csv), then train on them. No folder name is read.",
        ),
    ] = False,
    verify: VerifyOpt = "sift",
    geometry: GeometryOpt = "homography",
    min_inliers: MinInliersOpt = None,
    neighbours: NeighboursOpt = NEIGHBOURS,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Backbone (efficientnet-lite0/1/2, timm:<name>) or a descriptor file."),
    ] = None,
    pooling: Annotated[
        str,
        typer.Option(
            "--pooling",
            "-p",
            help="gem or rgem (p is learned), mac, spoc, or rmac (R-MAC with its region whitening trained "
            "end to end as a shift + projection initialised by PCA, Gordo et al. 2017).",
        ),
    ] = "gem",
    loss: Annotated[
        str | None, typer.Option("--loss", help=_r("contrastive (Radenovic et al.) or triplet (Gordo et al.)."))
    ] = None,
    margin: Annotated[float | None, typer.Option("--margin", help=_r("Loss margin."))] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", "-e", help=_r("Epochs (negatives are re-mined before each)."))
    ] = None,
    max_tuples: Annotated[int | None, typer.Option("--max-tuples", help=_r("Training tuples per epoch."))] = None,
    negatives: Annotated[int | None, typer.Option("--negatives", help=_r("Hard negatives per tuple."))] = None,
    pool_size: Annotated[
        int | None, typer.Option("--pool-size", help=_r("Random images described to mine negatives from."))
    ] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help=_r("Training input size (the model's own in 'cpu')."))
    ] = None,
    batch: Annotated[
        int | None, typer.Option("--batch", help=_r("Tuples per optimizer step (gradients accumulated)."))
    ] = None,
    chunk: Annotated[int, typer.Option("--chunk", help="Tuples per forward pass (memory vs speed).")] = 1,
    lr: Annotated[
        float | None, typer.Option("--lr", help=_r("Adam learning rate of the backbone (GeM p gets 10x)."))
    ] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help=_r("Backbone weight decay."))] = None,
    lr_decay: Annotated[float | None, typer.Option("--lr-decay", help=_r("Learning-rate factor per epoch."))] = None,
    freeze_bn: Annotated[
        bool | None, typer.Option("--freeze-bn/--train-bn", help=_r("Keep BatchNorm statistics frozen."))
    ] = None,
    freeze: Annotated[
        float | None,
        typer.Option("--freeze", help=_r("Share of backbone weights (input side first) kept fixed.")),
    ] = None,
    val: Annotated[
        Path | None,
        typer.Option("--val", help="Validation class folders (default: hold out classes of DATA)."),
    ] = None,
    val_fraction: Annotated[
        float,
        typer.Option("--val-fraction", help="Share of classes (clusters) held out when no --val (0: none)."),
    ] = 0.1,
    holdout: Annotated[
        list[Path] | None,
        typer.Option(
            "--holdout",
            help="Class folders never trained on, added to validation as domains of their own, so the kept "
            "epoch and --interpolate auto see what fine-tuning costs outside the training data (repeatable).",
        ),
    ] = None,
    interpolate: Annotated[
        str | None,
        typer.Option(
            "--interpolate",
            help="Against forgetting (WiSE-FT): average the off-the-shelf and fine-tuned weights, A in [0, 1] "
            "being the fine-tuned share, or 'auto' to choose A on validation (use --holdout with it).",
        ),
    ] = None,
    distill: Annotated[
        float,
        typer.Option(
            "--distill",
            help="Against forgetting: weight W of a loss term W * |f(x) - f0(x)|^2 keeping each training image's "
            "descriptor near the starting network's f0 (0: none). Combines with --interpolate.",
        ),
    ] = 0.0,
    device: Annotated[
        str, typer.Option("--device", help="Where training runs: auto (a GPU when torch sees one), cpu, cuda.")
    ] = "auto",
    stratify: Annotated[
        bool,
        typer.Option(
            "--stratify/--no-stratify",
            help="With several DATA roots: hold out classes of each root and average the "
            "validation mAP over roots (else one pooled draw and score).",
        ),
    ] = True,
    sampling: Annotated[
        str | None,
        typer.Option("--sampling", help=_r("Queries drawn uniformly over 'image's or over 'class'es.")),
    ] = None,
    augment: Annotated[
        bool | None,
        typer.Option("--augment/--no-augment", help=_r("Random crop (50-100% of the area) and flip.")),
    ] = None,
    keep: Annotated[
        str,
        typer.Option("--keep", help="Output the 'best' epoch by validation mAP, or the 'last'."),
    ] = "best",
    whiten: Annotated[
        bool,
        typer.Option("--whiten/--no-whiten", help="Fit learned whitening on the training data afterwards."),
    ] = False,
    whiten_dim: Annotated[int | None, typer.Option("--whiten-dim", help="Whitening output dimension.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: the same seed reproduces a run.")] = 0,
    time_limit: Annotated[
        float | None,
        typer.Option("--time-limit", help="Minutes; no epoch is started that would overrun."),
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option("--patience", help="Stop after this many epochs without a better validation mAP."),
    ] = None,
    checkpoints: Annotated[
        Path | None,
        typer.Option("--checkpoints", help="Checkpoint folder [default: OUT's name + .ckpt]."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue exactly from a checkpoint (its settings are used; --epochs may extend).",
        ),
    ] = None,
    quiet: QuietOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Fine-tune a backbone for retrieval with hard-negative mining (Radenovic et al. 2018);
    with --unlabelled, on pairs it mines itself."""
    from cbir import api
    from cbir.api import user_errors
    from cbir.models.backbones import DEFAULT_BACKBONE
    from cbir.train import TrainDataError, default_checkpoint_dir

    explicit = {
        "loss": loss, "margin": margin, "epochs": epochs, "max_tuples": max_tuples, "negatives": negatives,
        "pool_size": pool_size, "image_size": image_size, "batch_size": batch, "lr": lr,
        "weight_decay": weight_decay, "lr_decay": lr_decay, "freeze_bn": freeze_bn, "freeze": freeze,
        "sampling": sampling, "augment": augment,
    }  # fmt: skip
    with user_errors():  # bad values and missing files -> CbirErrors, reported by the CLI's group
        if unlabelled:
            if len(data) != 1 or not data[0].is_dir():
                raise TrainDataError("--unlabelled takes one folder of images")
            pairs_csv = out.with_name(out.stem + ".pairs.csv")
            report = run_mining(
                data[0], pairs_csv, model=model, verify=verify, geometry=geometry, min_inliers=min_inliers,
                neighbours=neighbours, progress=output.progress_enabled(quiet),
            )  # fmt: skip
            output.note(f"mined: {report_text(report)} -> {pairs_csv}")
            data = [pairs_csv]
    ckpt = checkpoints or default_checkpoint_dir(out)
    result = api.fine_tune(
        data, out, recipe=recipe, val=val, holdout=holdout, resume=resume, checkpoint_dir=ckpt,
        progress=output.progress_enabled(quiet), log=output.note, **explicit,
        model=model or DEFAULT_BACKBONE, pooling=pooling, chunk=chunk,
        val_fraction=0.0 if val is not None else val_fraction, stratify=stratify, seed=seed, whiten=whiten,
        whiten_dim=whiten_dim, keep=keep, time_limit=time_limit * 60 if time_limit else None, patience=patience,
        interpolate=interpolate, distill=distill, device=device,
    )  # fmt: skip
    if json_out:
        output.emit_json({
            "out": str(out), "descriptor": result.descriptor.describe_name(), "best_epoch": result.best_epoch,
            "seconds": result.seconds, "whitening_val_map": result.whitening_val_map,
            "stopped_early": result.stopped_early, "checkpoints": str(ckpt), "device": result.device,
            "alpha": result.extra.get("alpha"),
            "history": [dataclasses.asdict(h) for h in result.history],
        })  # fmt: skip
        return
    table = Table(title=f"fine-tuning {model or DEFAULT_BACKBONE} on {', '.join(map(str, data))} (recipe {recipe})")
    for col in ("epoch", "loss", "val mAP", "p", "seconds"):
        table.add_column(col, justify="right")
    for h in result.history:
        table.add_row(
            str(h.epoch),
            "-" if h.loss is None else f"{h.loss:.4f}",
            "-" if h.val_map is None else f"{h.val_map:.4f}",
            "-" if h.p is None else f"{h.p:.3f}",
            f"{h.seconds:.0f}",
        )
    output.show(table)
    w = f", whitened (val mAP {result.whitening_val_map:.4f})" if result.whitening_val_map is not None else ""
    a = f", interpolated at {result.extra['alpha']:g}" if "alpha" in result.extra else ""
    output.show(
        f"kept epoch {result.best_epoch}{a}{w}; {result.seconds / 60:.1f} min -> {out} "
        f"({result.descriptor.describe_name()}); checkpoints in {ckpt}"
    )
