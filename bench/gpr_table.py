"""The gpr-mini table: GPR1200-protocol mAP of EfficientNet-Lite0 descriptors, row by row.

Rows: the naive baseline (short side 256, centre crop 224, average pooling), GeM, R-MAC,
multi-scale GeM, and PCA-whitening learned on ../shared/datasets/train-pool (classes
disjoint from gpr-mini: no gpr-mini image is used to learn anything).

Whitened rows apply the learned whitening to the stored descriptors of their base row,
which is the same arithmetic the descriptor does when a whitening file is attached
(``cbir bench gpr1200 ... --whiten W``), without describing gpr-mini twice.

Usage (from the project root):
    .venv/bin/python bench/gpr_table.py [--gpr ../shared/datasets/gpr-mini]
        [--train ../shared/datasets/train-pool] [--engine torch|onnx] [--out bench/results/gpr_table.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cbir.data.datasets import list_images, load_gpr_collection
from cbir.eval import evaluate_gpr1200
from cbir.extract import extract
from cbir.models import RADENOVIC_SCALES, build_descriptor, fit_pca_whitening
from cbir.runtime import DEFAULT_ENGINE

ROOT = Path(__file__).resolve().parents[1]

# name, descriptor options, equivalent CLI options
ROWS = [
    (
        "naive baseline: avg pool, short side 256 + crop 224",
        {"pooling": "spoc", "resize": "crop", "image_size": 256, "crop": 224},
        "--pooling spoc --resize crop --image-size 256 --crop 224",
    ),
    ("GeM p=3, 224 squash (default)", {"pooling": "gem"}, ""),
    ("R-MAC L=3, 224 squash", {"pooling": "rmac"}, "--pooling rmac"),
    (
        "GeM, keep aspect, max side 320",
        {"pooling": "gem", "resize": "keep", "image_size": 320},
        "--resize keep --image-size 320",
    ),
    (
        "GeM multi-scale (1, 1/sqrt2, 1/2), 320 squash",
        {"pooling": "gem", "scales": list(RADENOVIC_SCALES), "image_size": 320},
        "--scales ms --image-size 320",
    ),
]
# whitening variants learned on train-pool, applied to the named base row
WHITENINGS = [
    (
        "GeM default",
        "+ PCA-whitening (train-pool), power 0.5, 512-d",
        {"power": 0.5, "dim": 512},
        "--power 0.5 --dim 512",
    ),
    ("GeM default", "+ PCA-whitening (train-pool), power 1, 256-d", {"power": 1.0, "dim": 256}, "--power 1 --dim 256"),
    ("GeM ms", "+ PCA-whitening (train-pool), power 0.5, 512-d", {"power": 0.5, "dim": 512}, "--power 0.5 --dim 512"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpr", default=str(ROOT.parent / "shared/datasets/gpr-mini"))
    ap.add_argument("--train", default=str(ROOT.parent / "shared/datasets/train-pool"))
    ap.add_argument("--engine", default=DEFAULT_ENGINE)
    ap.add_argument("--out", default=str(ROOT / "bench/results/gpr_table.json"))
    args = ap.parse_args()

    coll = load_gpr_collection(args.gpr)
    train_files = list_images(args.train)
    results = []
    base_features: dict[str, tuple[np.ndarray, object]] = {}

    def record(name: str, cli: str, feats: np.ndarray, ips: float | None) -> None:
        res = evaluate_gpr1200(feats, coll.categories, coll.domains)
        row = {"row": name, "cli": cli, **res.to_dict(), "images_per_second": ips}
        results.append(row)
        doms = " ".join(f"{k}={v:.4f}" for k, v in res.domains.items())
        print(f"{res.mAP:.4f}  {name}  [{doms}]" + (f"  {ips:.1f} img/s" if ips else ""), flush=True)

    for name, opts, cli in ROWS:
        desc = build_descriptor(**opts)
        ext = extract(desc, coll.files, engine=args.engine, progress=False)
        assert not ext.failures, ext.failures[:3]
        record(name, f"cbir bench gpr1200 {args.gpr} {cli}".strip(), ext.features, ext.images_per_second)
        if name.startswith("GeM p=3"):
            base_features["GeM default"] = (ext.features, (desc, cli))
        if name.startswith("GeM multi-scale"):
            base_features["GeM ms"] = (ext.features, (desc, cli))

    train_cache: dict[str, np.ndarray] = {}
    for base, name, wopts, wcli in WHITENINGS:
        feats, (desc, cli) = base_features[base]
        if base not in train_cache:
            t0 = time.perf_counter()
            train_cache[base] = extract(desc, train_files, engine=args.engine, progress=False).features
            print(
                f"   (train-pool descriptors for {base}: {len(train_cache[base])} images, "
                f"{time.perf_counter() - t0:.0f} s)"
            )
        w = fit_pca_whitening(train_cache[base], source=args.train, **wopts)
        whitened = w.apply_numpy(feats)
        command = (
            f"cbir whiten {args.train} --out w.pt {cli} {wcli} && cbir bench gpr1200 {args.gpr} {cli} --whiten w.pt"
        ).replace("  ", " ")
        record(f"{base} {name}", command, whitened, None)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d"), "engine": args.engine, "rows": results}, indent=1)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
