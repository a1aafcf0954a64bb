"""Fine-tune EfficientNet-Lite0 on train-pool, then score it on gpr-mini next to the
off-the-shelf backbone (issue 5).

train-pool's classes (Caltech-101 objects, Omniglot characters) are disjoint from
gpr-mini's; validation (model selection) uses classes held out of each train-pool root,
scored per root and averaged, so no gpr-mini image is used for training, whitening or
choosing the epoch. gpr-mini is read only after training, to score both descriptors with
the GPR1200 protocol. The defaults are the settings validation chose, which are also
``cbir train --recipe cpu``'s (cbir.train.recipes): queries sampled uniformly over classes,
no augmentation. ``--train`` also takes one CSV of pairs, e.g. the output of bench/mine.py.

Usage (from the project root; the full 60-minute version on 2 CPU cores):

    python bench/finetune.py --minutes 60

It prints both rows (overall and per-domain mAP), the training time and the settings, and
writes bench/results/finetune.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from cbir.benchmarks import run_gpr1200
from cbir.fileio import atomic_write_text
from cbir.models import build_descriptor
from cbir.train import TrainConfig, load_train_data, train
from cbir.train.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("../shared/datasets")
#: the defaults are `cbir train --recipe cpu`'s (chosen by this script's validation runs)
CPU = RECIPES["cpu"].settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--train",
        nargs="+",
        default=[str(DATA / "train-pool/objects"), str(DATA / "train-pool/characters")],
    )
    ap.add_argument("--gpr", default=str(DATA / "gpr-mini"))
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument(
        "--minutes",
        type=float,
        default=60.0,
        help="training time budget (no epoch starts that would overrun)",
    )
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument(
        "--patience",
        type=int,
        default=None,
        help="stop after this many epochs without a better validation mAP",
    )
    ap.add_argument("--max-tuples", type=int, default=CPU["max_tuples"])
    ap.add_argument("--pool-size", type=int, default=CPU["pool_size"])
    ap.add_argument("--negatives", type=int, default=CPU["negatives"])
    ap.add_argument("--batch", type=int, default=CPU["batch_size"])
    ap.add_argument("--lr", type=float, default=CPU["lr"])
    ap.add_argument("--loss", default=CPU["loss"])
    ap.add_argument("--margin", type=float, default=CPU["margin"])
    ap.add_argument("--freeze", type=float, default=CPU["freeze"])
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument(
        "--no-stratify",
        dest="stratify",
        action="store_false",
        help="draw validation classes from all roots at once (pooled validation mAP)",
    )
    ap.add_argument("--sampling", choices=["image", "class"], default=CPU["sampling"])
    ap.add_argument("--augment", action="store_true", help="random crop + flip of training images")
    ap.add_argument("--distill", type=float, default=0.0, help="feature distillation weight (0: none)")
    ap.add_argument("--whiten", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--workers", type=int, default=1, help="decode workers for the gpr-mini scoring"
    )
    ap.add_argument(
        "--baseline-json",
        type=Path,
        default=None,
        help="reuse off-the-shelf scores ('cbir bench gpr1200 --json' of the same descriptor)",
    )
    ap.add_argument("--resume", type=Path, default=None, help="continue from a checkpoint")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/finetuned-lite0.cbir")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/finetune.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.now(UTC).isoformat(timespec="seconds")

    config = TrainConfig(
        model=args.model,
        loss=args.loss,
        margin=args.margin,
        epochs=args.epochs,
        max_tuples=args.max_tuples,
        negatives=args.negatives,
        pool_size=args.pool_size,
        batch_size=args.batch,
        lr=args.lr,
        freeze=args.freeze,
        image_size=args.image_size,
        val_fraction=args.val_fraction,
        stratify=args.stratify,
        sampling=args.sampling,
        augment=args.augment,
        whiten=args.whiten,
        distill=args.distill,
        seed=args.seed,
        keep="best",
        time_limit=args.minutes * 60,
        patience=args.patience,
    )
    data = load_train_data(args.train)
    print(f"training on {len(data)} images of {len(data.classes)} classes: {config}", flush=True)
    result = train(
        config,
        data,
        out=args.out,
        checkpoint_dir=args.out.with_suffix(".ckpt"),
        progress=sys.stderr.isatty(),
        log=lambda m: print(m, flush=True),
        resume=args.resume,
    )
    train_min = result.seconds / 60  # all epochs, those before a resume included

    opts = {"workers": args.workers, "progress": sys.stderr.isatty()}
    base_desc = build_descriptor(args.model)
    if args.baseline_json is not None:
        base = json.loads(args.baseline_json.read_text())
        if base.get("descriptor") != base_desc.describe_name():
            raise SystemExit(
                f"{args.baseline_json} is for {base.get('descriptor')}, "
                f"not {base_desc.describe_name()}"
            )
        skip = ("files", "descriptor", "seconds", "images", "images_per_second")
        base_scores = {k: v for k, v in base.items() if k not in skip}
    else:
        base_scores = run_gpr1200(args.gpr, base_desc, **opts).result.to_dict()
    tuned_scores = run_gpr1200(args.gpr, build_descriptor(str(args.out)), **opts).result.to_dict()

    rows = {"off the shelf": base_scores, "fine-tuned": tuned_scores}
    cols = list(base_scores)
    print(f"\n| {args.model} | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, s in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * s[c]:.2f}" for c in cols) + " |")
    gain = 100 * (tuned_scores["mAP"] - base_scores["mAP"])
    print(
        f"\ngain: {gain:+.2f} mAP points; training {train_min:.1f} min, "
        f"{result.history[-1].epoch} epochs, "
        f"kept epoch {result.best_epoch}, stopped by time limit: {result.stopped_early}"
    )
    report = {
        "date": started,
        "command": "python bench/finetune.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": config.to_dict(),
        "train_data": args.train,
        "train_minutes": round(train_min, 2),
        "threads": args.threads,
        "history": [h.to_dict() for h in result.history],
        "kept_epoch": result.best_epoch,
        "whitening_val_map": result.whitening_val_map,
        "off_the_shelf": base_scores,
        "fine_tuned": tuned_scores,
        "gain_map_points": round(gain, 2),
        "baseline_from": str(args.baseline_json) if args.baseline_json else "computed in this run",
    }
    atomic_write_text(args.json, json.dumps(report, indent=1))
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
