"""Benchmark of the index types and of incremental re-indexing.

Part 1 (synthetic): clustered, L2-normalised descriptors of the default descriptor's
dimension (1280, EfficientNet-Lite0 + GeM), 100,000 and 1,000,000 vectors. For Flat
(exact), IVF-PQ and HNSW, as the index builds them (:mod:`cbir.index.stores.faiss_index`): build
time, memory, single-query latency (median, p99) and recall@10 against exact search.

Part 2 (gpr-mini): index a copy of ``../shared/datasets/gpr-mini`` once with the default
descriptor, then time ``Index.sync`` on the unchanged copy (it must describe nothing).

Usage (from the project root; ``nice`` because the machine is shared):

    nice -n 5 .venv/bin/python bench/index_bench.py --sizes 100000 1000000 \
        --gpr ../shared/datasets/gpr-mini

Prints a table and writes ``bench/results/index_bench.json``. Timings on a shared machine
are noisy: compare ratios within one run (latency is also given relative to Flat's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cbir.index.stores import SearchParams
from cbir.index.stores import faiss_index as fx

DIM = 1280
K = 10


def rss_bytes() -> int:
    """Resident memory of this process (Linux), to measure what an index adds."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def clustered(n: int, centres: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    """``n`` unit vectors scattered around random cluster centres (images of the same
    object/scene form such clusters in descriptor space)."""
    which = rng.integers(0, len(centres), n)
    x = centres[which] + rng.normal(
        0.0, spread / np.sqrt(centres.shape[1]), (n, centres.shape[1])
    ).astype(np.float32)
    faiss.normalize_L2(x)
    return x


def fill_flat(
    n: int, centres: np.ndarray, seed: int, spread: float, chunk: int = 50_000
) -> faiss.IndexFlatIP:
    """Generate the collection straight into a flat index: the only copy of the data."""
    rng = np.random.default_rng(seed)
    flat = faiss.IndexFlatIP(centres.shape[1])
    for start in range(0, n, chunk):
        flat.add(clustered(min(chunk, n - start), centres, rng, spread))
    return flat


def flat_view(flat: faiss.IndexFlatIP) -> np.ndarray:
    """The flat index's vectors as a numpy view (no copy)."""
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def latencies(index: faiss.Index, queries: np.ndarray, params: Any = None) -> list[float]:
    """One query per call, as a server answers them (milliseconds)."""
    out = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], K, params=params)
        out.append((time.perf_counter() - t) * 1000)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the exact top-10 that the approximate top-10 contains."""
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def summarise(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {
        "median_ms": statistics.median(s),
        "p99_ms": s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))],
    }


def bench_size(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed)
    centres = rng.normal(size=(args.clusters, DIM)).astype(np.float32)
    faiss.normalize_L2(centres)
    queries = clustered(args.queries, centres, np.random.default_rng(args.seed + 1), args.spread)
    rows: list[dict[str, Any]] = []

    before = rss_bytes()
    t = time.perf_counter()
    flat = fill_flat(n, centres, args.seed + 2, args.spread)
    build_flat = time.perf_counter() - t  # includes generating the data
    mem_flat = rss_bytes() - before
    data = flat_view(flat)
    t = time.perf_counter()
    _, truth = flat.search(queries, K)  # batched: the ground truth
    print(
        f"[{n}] exact ground truth for {len(queries)} queries in {time.perf_counter() - t:.1f}s",
        flush=True,
    )
    n_lat = min(len(queries), args.flat_latency_queries if n > 200_000 else len(queries))
    lat_flat = summarise(latencies(flat, queries[:n_lat]))
    rows.append(
        {
            "n": n,
            "index": "Flat",
            "params": "",
            "build_s": build_flat,
            "memory_bytes": mem_flat,
            "recall@10": 1.0,
            **lat_flat,
            "latency_queries": n_lat,
        }
    )
    print(json.dumps(rows[-1]), flush=True)

    for factory in args.factories:
        if factory.startswith("HNSW") and n > args.hnsw_max:
            rows.append(
                {
                    "n": n,
                    "index": factory,
                    "skipped": f"HNSW build not run above {args.hnsw_max} vectors "
                    "(too slow on this machine; see the build rate at smaller n)",
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            continue
        before = rss_bytes()
        t = time.perf_counter()
        index = fx.make_index(DIM, factory)
        if not index.is_trained:
            sample = data[
                np.sort(
                    np.random.default_rng(0).choice(n, min(n, args.train_sample), replace=False)
                )
            ]
            index.train(sample)
            del sample
        train_s = time.perf_counter() - t
        for start in range(0, n, 100_000):  # positions = ids (the store maps them to catalogue ids)
            index.add(data[start : start + 100_000])
        build_s = time.perf_counter() - t
        mem = rss_bytes() - before
        ivf = faiss.try_extract_index_ivf(index)
        settings = (
            [("nprobe", p) for p in args.nprobe]
            if ivf is not None
            else [("efSearch", e) for e in args.ef_search]
        )
        for name, value in settings:
            setting = SearchParams(nprobe=value) if name == "nprobe" else SearchParams(ef_search=value)
            params = fx.search_parameters(index, setting, None)
            _, found = index.search(queries, K, params=params)
            lat = summarise(latencies(index, queries, params))
            rows.append(
                {
                    "n": n,
                    "index": factory,
                    "params": f"{name}={value}",
                    "build_s": build_s,
                    "train_s": train_s,
                    "memory_bytes": mem,
                    "recall@10": recall_at_k(found, truth),
                    **lat,
                    "latency_vs_flat": lat["median_ms"] / lat_flat["median_ms"],
                    "latency_queries": len(queries),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        del index
    del data, flat
    return rows


def bench_reindex(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Index a copy of a folder, then re-sync it unchanged."""
    from cbir.index import Index

    work = Path(tempfile.mkdtemp(prefix="cbir-reindex-"))
    try:
        src = root / "images" if (root / "images").is_dir() else root
        shutil.copytree(src, work / "images")
        n_files = sum(1 for _ in (work / "images").iterdir())
        with Index.open(work / "db") as idx:
            t = time.perf_counter()
            first = idx.sync([work / "images"], progress=False)
            first_s = time.perf_counter() - t
            t = time.perf_counter()
            second = idx.sync([work / "images"], progress=False)
            second_s = time.perf_counter() - t
            descriptor = idx.stats()["descriptor"]
        t = time.perf_counter()
        with Index.open(work / "db") as idx:  # a new process would pay this too
            third = idx.sync([work / "images"], progress=False)
        reopen_s = time.perf_counter() - t
        return {
            "files": n_files,
            "descriptor": descriptor,
            "first_index_s": first_s,
            "first_extracted": first.extracted,
            "unchanged_rerun_s": second_s,
            "unchanged_rerun_extracted": second.extracted,
            "reopen_and_rerun_s": reopen_s,
            "reopen_rerun_extracted": third.extracted,
            "rerun_vs_first": second_s / first_s,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--factories", nargs="*", default=["IVF256,PQ64", "HNSW32"])
    ap.add_argument("--nprobe", type=int, nargs="*", default=[8, 16, 64])
    ap.add_argument("--ef-search", type=int, nargs="*", default=[32, 64, 128])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument(
        "--flat-latency-queries",
        type=int,
        default=50,
        help="single-query Flat timings above 200k vectors",
    )
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument(
        "--spread", type=float, default=0.6, help="noise norm relative to the centre's (1.0)"
    )
    ap.add_argument(
        "--train-sample", type=int, default=10_000, help="vectors for k-means (>= 39 x nlist)"
    )
    ap.add_argument(
        "--hnsw-max", type=int, default=200_000, help="skip HNSW builds above this many vectors"
    )
    ap.add_argument(
        "--gpr", type=Path, default=None, help="gpr-mini folder for the incremental re-index timing"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/index_bench.json"))
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="FAISS (OpenMP) threads; 1 = one query per core, as a server's request threads do",
    )
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)

    result: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "faiss": faiss.__version__,
            "omp_threads": faiss.omp_get_max_threads(),
        },
        "dim": DIM,
        "k": K,
        "synthetic": [],
    }
    for n in args.sizes:
        result["synthetic"].extend(bench_size(n, args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    if args.gpr is not None:
        result["reindex"] = bench_reindex(args.gpr, args)
        print(json.dumps(result["reindex"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))

    print(
        f"\n{'n':>9} {'index':<14} {'params':<12} {'build s':>8} {'memory MB':>10} "
        f"{'recall@10':>9} "
        f"{'median ms':>9} {'p99 ms':>8}"
    )
    for r in result["synthetic"]:
        if "skipped" in r:
            print(f"{r['n']:>9} {r['index']:<14} skipped: {r['skipped']}")
            continue
        print(
            f"{r['n']:>9} {r['index']:<14} {r['params']:<12} {r['build_s']:>8.1f} "
            f"{r['memory_bytes'] / 2**20:>10.0f} "
            f"{r['recall@10']:>9.3f} {r['median_ms']:>9.2f} {r['p99_ms']:>8.2f}"
        )
    if "reindex" in result:
        r = result["reindex"]
        print(
            f"\ngpr-mini copy ({r['files']} files, {r['descriptor']}): "
            f"first index {r['first_index_s']:.1f}s, "
            f"unchanged re-run {r['unchanged_rerun_s']:.2f}s "
            f"({r['unchanged_rerun_extracted']} described), "
            f"re-open + re-run {r['reopen_and_rerun_s']:.2f}s"
        )
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
