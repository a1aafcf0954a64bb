"""The ANN targets of issue 12, measured side by side in one run.

1. A million synthetic 1280-d descriptors (drawn from the model fitted to real ones,
   :mod:`cbir.index.synthetic`), written to a memory map under ``--workdir`` and deleted
   afterwards, with 1,000 held-out draws as queries: exact Flat (the baseline, in the same
   run), the plan ``--index auto`` picks (``chosen``) and the same index at other search
   settings and without its refinement. Targets: recall@10 >= 0.95 against exact search
   at median <= 5 ms per query on one thread, search memory <= 2 GiB, build <= 30 min on
   2 cores.
2. The real gpr-mini descriptors (a measurement only: nothing is chosen from them): every
   image queries the collection, as in GPR1200's protocol. At 4,070 vectors auto picks
   Flat; the large-collection plan applied to them is reported too, labelled as such.

Run it alone on the machine (it holds ~5 GB for the Flat baseline):

    flock /work/coord/bench.lock nice -n 5 .venv/bin/python bench/ann_1m.py \\
        --gpr-vectors out/descriptors/gpr-mini.npy --out out/ann_1m.json --markdown out/ann_1m.md

``--gpr-vectors`` is ``cbir extract ../shared/datasets/gpr-mini --out out/descriptors/gpr-mini.npy``
(or ``--gpr-db`` an index of gpr-mini made with ``cbir index``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cbir.index import ann, ann_bench


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def gpr_rows(vectors: np.ndarray, args: argparse.Namespace) -> list[ann_bench.Result]:
    """gpr-mini: every image is a query (self included, as GPR1200 counts it). Besides
    what auto picks at its size (and the large-collection plan for its size), the plan
    auto picks at ``--n`` applied to it, at that plan's search settings."""
    queries = np.ascontiguousarray(vectors)
    rows = ann_bench.bench_vectors(vectors, queries, threads=args.threads, log=log)
    big = ann.plan_index(args.n, vectors.shape[1])
    cand = ann_bench.Candidate(big.factory, nprobe=big.nprobe, ef_search=big.ef_search, k_factor=big.k_factor,
                               label=f"the plan auto picks at {args.n:,}")  # fmt: skip
    return rows + ann_bench.run(vectors, queries, [cand], threads=args.threads, log=log)


def load_gpr(args: argparse.Namespace) -> np.ndarray | None:
    if args.gpr_vectors:
        return np.ascontiguousarray(np.load(args.gpr_vectors), dtype=np.float32)
    if args.gpr_db:
        return ann_bench.index_vectors(args.gpr_db)
    return None


def markdown(sections: list[tuple[str, list[ann_bench.Result]]]) -> str:
    head = (
        "| collection | index | search params | recall@10 | median ms | p99 ms | median CPU ms | build s | "
        "memory MiB (estimate) | chosen | note |\n|---|---|---|---:|---:|---:|---:|---:|---:|---|---|\n"
    )
    lines = [head]
    for title, rows in sections:
        for r in rows:
            params = ", ".join(f"{k}={v}" for k, v in r.params.items()) or "exact"
            lat = f" ({r.latency_queries} q)" if r.index == "Flat" else ""
            lines.append(
                f"| {title} | {r.index} | {params} | {r.recall_at_10:.4f} | {r.median_ms:.2f}{lat} | "
                f"{r.p99_ms:.2f} | {r.median_cpu_ms:.2f} | {r.build_s:.1f} | "
                f"{r.memory_mb:,.0f} ({r.estimated_mb:,.0f}) | "
                f"{'**yes**' if r.chosen else ''} | {r.label} |\n"
            )
    return "".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--flat-queries", type=int, default=30, help="Flat latency on this many queries (~1 s each)")
    ap.add_argument("--threads", type=int, default=2, help="threads for building (search: always 1)")
    ap.add_argument("--workdir", default="/tmp", help="where the memory-mapped collection is written")
    ap.add_argument("--gpr-vectors", type=Path)
    ap.add_argument("--gpr-db", type=Path)
    ap.add_argument("--gpr-only", action="store_true", help="skip the synthetic collection")
    ap.add_argument("--out", type=Path, default=Path("out/ann_1m.json"))
    ap.add_argument("--markdown", type=Path, default=Path("out/ann_1m.md"))
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    sections: list[tuple[str, list[ann_bench.Result]]] = []
    plan = ann.plan_index(args.n, 1280)
    log(f"plan for {args.n:,} x 1280: {plan}")
    if not args.gpr_only:
        rows = ann_bench.bench_synthetic(
            args.n, queries=args.queries, workdir=args.workdir, flat_queries=args.flat_queries,
            threads=args.threads, log=log,
        )  # fmt: skip
        sections.append((f"synthetic {args.n:,}", rows))
    gpr = load_gpr(args)
    if gpr is not None:
        sections.append((f"gpr-mini {len(gpr):,} (real)", gpr_rows(gpr, args)))
    env = {
        "started": started,
        "seconds": time.perf_counter() - t0,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_at_end": os.getloadavg(),
        "plan": plan.__dict__,
    }
    payload: dict[str, Any] = {
        "environment": env,
        "sections": {title: [r.__dict__ for r in rs] for title, rs in sections},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, default=str))
    args.markdown.write_text(markdown(sections))
    print(markdown(sections))
    log(f"done in {env['seconds']:.0f}s; load average at the end {env['loadavg_at_end']}")


if __name__ == "__main__":
    main()
