"""Revisited-Paris table: GeM vs R-MAC, single vs multi-scale, with alpha-QE, alpha-DBA, diffusion.

Every row is what one ``cbir bench revisited`` command prints (the command is in the row).
To keep a 2-core CPU run short, the images are described once: one backbone pass per
image and scale, every pooling of the table computed from those feature maps, with the
very modules the commands build (a check on the first batch asserts the vectors equal
each descriptor's own output). The R-MAC region whitening is learned first, on a seeded
subset of ``train-pool/objects`` (never the evaluation images), and saved as the
descriptor file the R-MAC commands load.

    nice -n 5 .venv/bin/python bench/revisited_table.py

Prints a Markdown table and writes bench/results/revisited_table.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cbir.benchmarks import PostProcessing, learn_region_whitening, rank_revisited
from cbir.data.revisited import load_revisited
from cbir.eval.revisited import evaluate_revisited
from cbir.extract import iter_extract
from cbir.models import RADENOVIC_SCALES, build_descriptor
from cbir.models.descriptor import Descriptor
from cbir.models.pooling import l2n, multiscale_combine

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Config:
    label: str
    args: str  # the options of `cbir bench revisited` that build this descriptor
    descriptor: Descriptor


POSTS: list[tuple[str, str, PostProcessing]] = [
    ("", "", PostProcessing()),
    ("+ alpha-QE", "--qe 2 --qe-alpha 3", PostProcessing(qe_k=2, qe_alpha=3.0)),
    ("+ alpha-DBA", "--dba 2 --dba-alpha 3", PostProcessing(dba_k=2, dba_alpha=3.0)),
    ("+ alpha-DBA + alpha-QE", "--dba 2 --dba-alpha 3 --qe 2 --qe-alpha 3", PostProcessing(qe_k=2, dba_k=2)),
    ("+ diffusion", "--diffusion", PostProcessing(diffusion=True)),
]


def multi_runner(configs: list[Config], scales: tuple[float, ...], check: list[bool]):
    """One backbone pass per scale, then every config's pooling + scale combination."""
    backbone = configs[0].descriptor.backbone
    preprocess = configs[0].descriptor.preprocess

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = preprocess.normalize(torch.from_numpy(batch))
            maps = {}
            for s in scales:
                xs = x
                if s != 1.0:  # the resampling of Descriptor.pooled
                    xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
                maps[s] = backbone(xs)
            outs = []
            for cfg in configs:
                d = cfg.descriptor
                vectors = [l2n(d.pooling(maps[s])) for s in d.scales]
                outs.append(l2n(multiscale_combine(vectors, d.multiscale_power)))
            if not check[0]:  # the shared pass must give each descriptor's own vectors
                for cfg, out in zip(configs, outs, strict=True):
                    ref = cfg.descriptor(x[:1])  # one image: the check stays cheap
                    err = float((ref - out[:1]).abs().max())
                    if err > 1e-5:
                        raise AssertionError(f"{cfg.label}: shared pass differs by {err}")
                check[0] = True
            return torch.cat(outs, dim=1).numpy()

    return run


def describe_all(configs, paths, boxes, workers):
    scales = tuple(sorted({s for c in configs for s in c.descriptor.scales}, reverse=True))
    dims = [c.descriptor.dim for c in configs]
    out = np.zeros((len(paths), sum(dims)), np.float32)
    check = [False]
    start = time.perf_counter()
    for batch in iter_extract(
        configs[0].descriptor,
        paths,
        runner=multi_runner(configs, scales, check),
        boxes=boxes,
        workers=workers,
        progress=True,
        desc="describing",
    ):
        if batch.failures:
            raise RuntimeError(f"failed to decode: {batch.failures[:3]}")
        out[batch.indices] = batch.vectors
    seconds = time.perf_counter() - start
    splits = np.cumsum(dims)[:-1]
    return np.split(out, splits, axis=1), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="../shared/datasets/rparis-mini")
    ap.add_argument("--train", default="../shared/datasets/train-pool/objects")
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--rw-images", type=int, default=300, help="train images for region whitening")
    ap.add_argument("--rw-dim", type=int, default=512, help="region whitening output dimension")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "revisited_table.json"))
    args = ap.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    size = args.image_size
    common = f"--image-size {size} --resize keep" if size != 512 else ""
    rw_file = RESULTS / f"rmac-rw-{size}-{args.rw_dim}.cbir"
    rw_rel = os.path.relpath(rw_file)
    rw_cmd = (
        f"cbir rmac-whiten {args.train} --out {rw_rel} "
        f"--image-size {size} --resize keep --max-images {args.rw_images} --dim {args.rw_dim}"
    )

    def desc(**kw) -> Descriptor:
        return build_descriptor(args.model, image_size=size, resize="keep", **kw)

    t0 = time.perf_counter()
    if not rw_file.exists():
        print(f"learning region whitening: {rw_cmd}", file=sys.stderr)
        rw = desc(pooling="rmac")
        learn_region_whitening(
            args.train, rw, dim=args.rw_dim, max_images=args.rw_images, workers=args.workers
        )
        rw.save(rw_file)
    rw_seconds = time.perf_counter() - t0
    ms = list(RADENOVIC_SCALES)
    configs = [
        Config("GeM", f"--pooling gem {common}", desc(pooling="gem")),
        Config("GeM, ms", f"--pooling gem --scales ms {common}", desc(pooling="gem", scales=ms)),
        Config("R-MAC (no region whitening)", f"--pooling rmac {common}", desc(pooling="rmac")),
        Config("R-MAC", f"--model {rw_rel}", build_descriptor(rw_file)),
        Config("R-MAC, ms", f"--model {rw_rel} --scales ms", build_descriptor(rw_file, scales=ms)),
    ]
    ds = load_revisited(args.root)
    gnd = ds.gnd_dicts()
    db, db_s = describe_all(configs, ds.database_paths, None, args.workers)
    qs, q_s = describe_all(configs, ds.query_paths, ds.query_boxes, args.workers)

    rows = []
    for i, cfg in enumerate(configs):
        posts = POSTS if "no region" not in cfg.label else POSTS[:1]
        for post_label, post_args, post in posts:
            ranks = rank_revisited(qs[i], db[i], post)
            res = evaluate_revisited(ranks, gnd)
            cmd = f"cbir bench revisited {args.root} {cfg.args} {post_args}"
            rows.append(
                {
                    "descriptor": f"{cfg.label} {post_label}".strip(),
                    "name": cfg.descriptor.describe_name(),
                    "command": " ".join(cmd.split()),
                    **{s: res[s].to_dict() for s in ("easy", "medium", "hard")},
                }
            )

    print("| descriptor | E mAP | M mAP | H mAP | M mP@10 | command |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        e, m, h = (r[s]["mAP"] for s in ("easy", "medium", "hard"))
        p10 = r["medium"]["mP@k"]["10"]
        print(f"| {r['descriptor']} | {e:.2f} | {m:.2f} | {h:.2f} | {p10:.2f} | `{r['command']}` |")
    n_img = len(ds.database_paths) + len(ds.query_paths)
    summary = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "dataset": ds.name,
        "model": args.model,
        "image_size": size,
        "region_whitening": {"command": rw_cmd, "seconds": rw_seconds},
        "describe_seconds": db_s + q_s,
        "images": n_img,
        "queries_without_hard_positives": rows[0]["hard"]["queries_without_positives"],
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(
        f"\n{n_img} images described once for all {len(configs)} descriptors in "
        f"{db_s + q_s:.0f} s; region whitening {rw_seconds:.0f} s -> {args.out}"
    )


if __name__ == "__main__":
    main()
