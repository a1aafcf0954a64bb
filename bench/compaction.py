"""What compaction costs the FAISS store at a million vectors: a rebuild against extending.

The store folds its journal of changes into a new base now and then (every 8,192 changes at
a million vectors). A rebuild re-adds the whole collection (for the graph ``--index auto``
picks at a million 1280-d vectors, a build of the graph: minutes); when only additions are
pending the store extends its base instead (reads the file, adds the new vectors, writes
it). This measures, on one store in one run:

1. the first build from the collection (``FaissStore.rebuild``: train on the planner's
   sample, add everything, write the base), which is also what a rebuild costs;
2. ``--changes`` additions through the journal (``add`` + ``flush``);
3. the compaction that follows (``compact(force=True)``), which must take the extension
   path: the script fails if the source was read whole.

Synthetic descriptors (:mod:`cbir.index.synthetic`), memory-mapped under ``--workdir`` and
deleted afterwards. Run it alone on the machine:

    .venv/bin/python bench/compaction.py --out /tmp/compaction.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from cbir.index import ann
from cbir.index.stores import ArraySource, FaissStore, SearchParams


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--changes", type=int, default=8_192)
    ap.add_argument("--factory", default=None, help="index type (default: what --index auto picks for --n)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--out", type=Path, default=Path("bench/results/compaction.json"))
    args = ap.parse_args()
    from cbir.index.synthetic import DescriptorModel, write_collection

    faiss.omp_set_num_threads(args.threads)
    plan = ann.plan_index(args.n, 1280)
    factory = args.factory or plan.factory
    total = args.n + args.changes
    with tempfile.TemporaryDirectory(prefix="cbir-compaction-", dir=args.workdir) as tmp:
        x, _ = write_collection(DescriptorModel.load(), total, path=Path(tmp) / "x.npy")
        ids = np.arange(total, dtype=np.int64)
        log(f"{total:,} synthetic vectors; factory {factory}")
        store = FaissStore(Path(tmp) / "store", 1280, factory,
                           defaults=SearchParams(plan.nprobe, plan.ef_search, plan.k_factor))  # fmt: skip
        store.load(0)
        t = time.perf_counter()
        store.rebuild(ArraySource(ids[: args.n], x[: args.n]), 1)
        build_s = time.perf_counter() - t
        log(f"first build (= a rebuild): {build_s:.1f}s")
        t = time.perf_counter()
        store.add(ids[args.n :], np.ascontiguousarray(x[args.n :]))
        store.flush(2)
        journal_s = time.perf_counter() - t
        log(f"{args.changes:,} additions journalled in {journal_s:.2f}s")
        source = ArraySource(ids, x)
        t = time.perf_counter()
        assert store.compact(source, force=True)
        compact_s = time.perf_counter() - t
        assert source.reads == ["fetch"], f"compaction read the whole source: {source.reads}"
        info = store.info()
        assert info["base_vectors"] == total and info["journal_vectors"] == 0, info
        log(f"compaction by extension: {compact_s:.1f}s")
        result = {
            "n": args.n, "changes": args.changes, "factory": factory, "threads": args.threads,
            "rebuild_s": build_s, "journal_s": journal_s, "extend_compaction_s": compact_s,
            "rebuild_over_extend": build_s / compact_s, "base_bytes": info["bytes"],
            "loadavg_at_end": os.getloadavg(), "faiss": faiss.__version__,
        }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
