"""`Index.duplicates` at scale: star groups through the index's own kNN search, no n x n matrix.

A real index folder whose catalogue holds ``n`` synthetic descriptors drawn from the model
fitted to real ones (cbir.index.synthetic: clusters of very different tightness, the
default descriptor's 1280 dimensions), of which ``--planted`` are near-copies of other rows
(the original plus noise, cosine 0.93-0.99 to it, above the default threshold). The index
type is what ``cbir index`` would choose for ``n`` (``--index auto``) unless given.
Reports the time and peak memory of ``Index.duplicates()`` at the default threshold, how
many planted copies land in their original's group, and what else was grouped.

Usage (from the project root; the index goes to --work and is deleted after):
    nice -n 19 .venv/bin/python bench/duplicates_scale.py [--n 200000] [--planted 2000] [--index auto]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import faiss
import numpy as np

from cbir.index import Index
from cbir.index.catalog import NewRow
from cbir.index.duplicates import DEFAULT_THRESHOLD
from cbir.index.settings import make_plan
from cbir.index.synthetic import _shipped, write_collection
from cbir.models import build_descriptor

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 10_000


def collection(n: int, planted: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit rows; the last ``planted`` are copies of random earlier rows at cosine
    0.93-0.99. Returns (rows, original row of each planted copy)."""
    rng = np.random.default_rng(seed)
    base, _ = write_collection(_shipped(), n - planted, seed=seed)
    originals = rng.choice(n - planted, size=planted, replace=False)
    cos = rng.uniform(0.93, 0.99, size=planted).astype(np.float32)
    noise = rng.standard_normal((planted, base.shape[1])).astype(np.float32)
    noise -= (noise * base[originals]).sum(1, keepdims=True) * base[originals]  # orthogonal to the original
    faiss.normalize_L2(noise)
    copies = cos[:, None] * base[originals] + np.sqrt(1 - cos**2)[:, None] * noise
    x = np.vstack([base, copies.astype(np.float32)])
    faiss.normalize_L2(x)
    return x, originals


def fill(db: Path, x: np.ndarray, factory: str) -> None:
    with Index.create(db, model=build_descriptor(), factory=factory) as idx:
        for start in range(0, len(x), CHUNK):
            rows = [
                NewRow(f"/bench/img_{i:07d}.jpg", 100_000, 1_700_000_000_000_000_000 + i, f"{i:064x}", vector=x[i])
                for i in range(start, min(start + CHUNK, len(x)))
            ]
            with idx.catalog.transaction() as tx:
                tx.insert(rows)
                tx.bump_generation()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--planted", type=int, default=2_000)
    ap.add_argument("--index", default="auto", help="FAISS factory string, or auto (what cbir index picks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cbir-duplicates-scale"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "duplicates_scale.json")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    run: dict = {"command": "bench/duplicates_scale.py " + " ".join(os.sys.argv[1:]), "n": args.n}
    run["uptime_start"] = _uptime()
    x, originals = collection(args.n, args.planted, args.seed)
    factory = make_plan(args.index, args.n, x.shape[1], None)["factory"] if args.index == "auto" else args.index
    run["index"] = factory
    t0 = time.perf_counter()
    fill(args.work / "db", x, factory)
    del x
    with Index.open(args.work / "db", readonly=True) as idx:  # builds the store from the catalogue
        run["build_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        groups = idx.duplicates(DEFAULT_THRESHOLD)
        run["duplicates_s"] = round(time.perf_counter() - t0, 1)
    run["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    group_of = {}
    for g, members in enumerate(groups):
        for h in members:
            group_of[int(h.path[-11:-4])] = g  # row number from the path
    n_base = args.n - args.planted
    found = sum(1 for c, o in enumerate(originals) if group_of.get(n_base + c, -1) == group_of.get(int(o), -2))
    run.update(
        threshold=DEFAULT_THRESHOLD,
        planted=args.planted,
        planted_in_their_original_group=found,
        groups=len(groups),
        grouped_images=sum(len(g) for g in groups),
        largest_group=max((len(g) for g in groups), default=0),
        uptime_end=_uptime(),
    )
    shutil.rmtree(args.work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(run, indent=1))
    print(json.dumps(run, indent=1))


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


if __name__ == "__main__":
    main()
