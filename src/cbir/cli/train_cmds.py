"""``cbir train``: fine-tune a descriptor for retrieval (a thin layer over :mod:`cbir.train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cbir.cli import output
from cbir.cli.commands import app
from cbir.cli.options import ImageSizeOpt, ModelOpt, QuietOpt
from cbir.defaults import DEFAULT_BACKBONE, RADENOVIC_LR_DECAY


@app.command("train")
def train_cmd(
    data: Annotated[
        list[Path],
        typer.Argument(
            metavar="DATA...",
            help="Class folders DATA/<class>/*.jpg (one or more roots), "
            "or one CSV of query,positive,cluster rows."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Descriptor file to write (use it with --model).")
    ],
    model: ModelOpt = DEFAULT_BACKBONE,
    pooling: Annotated[
        str, typer.Option("--pooling", "-p", help="gem or rgem (p is learned), or mac/spoc.")
    ] = "gem",
    loss: Annotated[
        str,
        typer.Option("--loss", help="contrastive (Radenovic et al.) or triplet (Gordo et al.)."),
    ] = "contrastive",
    margin: Annotated[
        float | None,
        typer.Option("--margin", help="Loss margin [default: 0.7 contrastive, 0.1 triplet]."),
    ] = None,
    epochs: Annotated[
        int, typer.Option("--epochs", "-e", help="Epochs (negatives are re-mined before each).")
    ] = 10,
    max_tuples: Annotated[
        int, typer.Option("--max-tuples", help="Training tuples per epoch.")
    ] = 1000,
    negatives: Annotated[
        int, typer.Option("--negatives", "-k", help="Hard negatives per tuple.")
    ] = 5,
    pool_size: Annotated[
        int, typer.Option("--pool-size", help="Random images described to mine negatives from.")
    ] = 2000,
    image_size: ImageSizeOpt = None,
    batch: Annotated[
        int, typer.Option("--batch", help="Tuples per optimizer step (gradients accumulated).")
    ] = 5,
    chunk: Annotated[
        int, typer.Option("--chunk", help="Tuples per forward pass (memory vs speed).")
    ] = 1,
    lr: Annotated[
        float, typer.Option("--lr", help="Adam learning rate of the backbone (GeM p gets 10x).")
    ] = 1e-6,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="Backbone weight decay (none on p).")
    ] = 1e-6,
    lr_decay: Annotated[
        float, typer.Option("--lr-decay", help="Learning-rate factor per epoch.")
    ] = RADENOVIC_LR_DECAY,
    freeze_bn: Annotated[
        bool, typer.Option("--freeze-bn/--train-bn", help="Keep BatchNorm statistics frozen.")
    ] = True,
    freeze: Annotated[
        float,
        typer.Option(
            "--freeze",
            help="Share of backbone weights (input side first) kept fixed: faster on a CPU.",
        ),
    ] = 0.0,
    val: Annotated[
        Path | None,
        typer.Option("--val", help="Validation class folders (default: hold out classes of DATA)."),
    ] = None,
    val_fraction: Annotated[
        float,
        typer.Option("--val-fraction", help="Share of classes held out when no --val (0: none)."),
    ] = 0.1,
    stratify: Annotated[
        bool,
        typer.Option(
            "--stratify/--no-stratify",
            help="With several DATA roots: hold out classes of each root and average the "
            "validation mAP over roots (else one pooled draw and score).",
        ),
    ] = True,
    sampling: Annotated[
        str,
        typer.Option(
            "--sampling",
            help="Queries drawn uniformly over 'image's (Radenovic et al.) or over 'class'es.",
        ),
    ] = "image",
    augment: Annotated[
        bool,
        typer.Option(
            "--augment/--no-augment",
            help="Random crop (50-100% of the area) and flip of each training image.",
        ),
    ] = False,
    keep: Annotated[
        str,
        typer.Option("--keep", help="Output the 'best' epoch by validation mAP, or the 'last'."),
    ] = "best",
    whiten: Annotated[
        bool,
        typer.Option(
            "--whiten/--no-whiten", help="Fit learned whitening on the training data afterwards."
        ),
    ] = False,
    whiten_dim: Annotated[
        int | None, typer.Option("--whiten-dim", help="Whitening output dimension.")
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Random seed: the same seed reproduces a run.")
    ] = 0,
    time_limit: Annotated[
        float | None,
        typer.Option("--time-limit", help="Minutes; no epoch is started that would overrun."),
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(
            "--patience",
            help="Stop after this many epochs without a better validation mAP (early stopping).",
        ),
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
) -> None:
    """Fine-tune a backbone for retrieval with hard-negative mining (Radenovic et al. 2018)."""
    from cbir import api
    from cbir.train import default_checkpoint_dir

    config = dict(
        model=model,
        pooling=pooling,
        loss=loss,
        margin=margin,
        epochs=epochs,
        max_tuples=max_tuples,
        negatives=negatives,
        pool_size=pool_size,
        image_size=image_size,
        batch_size=batch,
        chunk=chunk,
        lr=lr,
        weight_decay=weight_decay,
        lr_decay=lr_decay,
        freeze_bn=freeze_bn,
        freeze=freeze,
        val_fraction=0.0 if val is not None else val_fraction,
        stratify=stratify,
        sampling=sampling,
        augment=augment,
        seed=seed,
        whiten=whiten,
        whiten_dim=whiten_dim,
        keep=keep,
        time_limit=time_limit * 60 if time_limit else None,
        patience=patience,
    )
    ckpt = checkpoints or default_checkpoint_dir(out)
    result = api.fine_tune(
        data, out, val=val, resume=resume, checkpoint_dir=ckpt,
        progress=output.progress_enabled(quiet), log=output.note, **config,
    )  # fmt: skip
    rows = [
        (
            str(h.epoch),
            "-" if h.loss is None else f"{h.loss:.4f}",
            "-" if h.val_map is None else f"{h.val_map:.4f}",
            "-" if h.p is None else f"{h.p:.3f}",
            f"{h.seconds:.0f}",
        )
        for h in result.history
    ]
    columns = ["epoch", "loss", "val mAP", "p", "seconds"]
    title = f"fine-tuning {model} on {', '.join(map(str, data))}"
    output.show(output.table(columns, rows, title=title, right=columns))
    w = (
        f", whitened (val mAP {result.whitening_val_map:.4f})"
        if result.whitening_val_map is not None
        else ""
    )
    output.write(
        f"kept epoch {result.best_epoch}{w}; {result.seconds / 60:.1f} min -> {out} "
        f"({result.descriptor.describe_name()}); checkpoints in {ckpt}"
    )
