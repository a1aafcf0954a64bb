"""One index type at several search settings on a synthetic collection: the probe behind
the plan's tuning round (docs/benchmarks/2026-12-03-ann-1m.md). Never on gpr-mini.

    .venv/bin/python bench/ann_probe.py HNSW32_SQ8 --n 1000000 ef_search=96 ef_search=128
    .venv/bin/python bench/ann_probe.py "IVF1024,PQ320x4fs,Refine(SQ8)" nprobe=128,k_factor=128 \\
        nprobe=64,stage=base

Each setting is ``key=value[,key=value]`` with keys ``nprobe``, ``ef_search``, ``k_factor``
and ``stage=base`` (the first stage alone). The collection (``--n`` synthetic descriptors,
seed 0, 1,000 held-out queries: the same draw as ``bench/ann_1m.py``) is memory-mapped under
``--workdir`` and kept there with its exact neighbours between runs; the index is built as
the store builds it (:func:`cbir.index.ann_bench.build`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from cbir.index import ann_bench
from cbir.index.ann_bench import Candidate
from cbir.index.synthetic import DescriptorModel, write_collection


def collection(n: int, queries: int, workdir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, queries, exact top 10), written once per (n, queries) and reused."""
    stem = workdir / f"synthetic-{n}-{queries}"
    if not (stem.with_suffix(".truth.npy")).exists():
        workdir.mkdir(parents=True, exist_ok=True)
        x, q = write_collection(DescriptorModel.load(), n, queries=queries, seed=0, path=stem.with_suffix(".npy"))
        np.save(stem.with_suffix(".queries.npy"), q)
        np.save(stem.with_suffix(".truth.npy"), ann_bench.exact_neighbours(x, q))
    x = np.load(stem.with_suffix(".npy"), mmap_mode="r")
    return x, np.load(stem.with_suffix(".queries.npy")), np.load(stem.with_suffix(".truth.npy"))


def setting(factory: str, text: str) -> Candidate:
    kw: dict[str, object] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key == "stage":
            kw[key] = value
        elif key in ("nprobe", "ef_search"):
            kw[key] = int(value)
        elif key == "k_factor":
            kw[key] = float(value)
        else:
            raise SystemExit(f"unknown setting {key!r} in {text!r}")
    return Candidate(factory, **kw)  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("factory")
    ap.add_argument("settings", nargs="+")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2, help="build threads (search: one)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cbir-ann-probe"))
    args = ap.parse_args()
    x, q, truth = collection(args.n, args.queries, args.workdir)
    index, build_s, memory = ann_bench.build(args.factory, x, threads=args.threads)
    print(f"{args.factory} on {args.n:,}: built in {build_s:.0f}s, {memory / 2**20:,.0f} MiB", flush=True)
    for cand in (setting(args.factory, s) for s in args.settings):
        target = faiss.downcast_index(index.base_index) if cand.stage == "base" else index
        params = cand.search_parameters(target)
        found, ms, _ = ann_bench.search_one_by_one(target, q, params)
        print(f"  {cand.params()}: recall@10 {ann_bench.recall_at_k(found, truth):.4f}, "
              f"median {ann_bench.percentile(ms, 50):.2f} ms", flush=True)  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] done", file=sys.stderr)


if __name__ == "__main__":
    main()
