"""Where does the large-collection plan lose recall? A tuning round on synthetic
descriptors (never gpr-mini), run with ``cbir.index.ann_bench.run``.

``ivfflat``: the inverted file with exact vectors in its lists (the IVF step's ceiling at
each nprobe); ``pq``: the planner's codes + SQ8 refinement at several nprobe and k_factor.
Used to set ``cbir.index.ann.NPROBE_SHARE`` and ``DEFAULT_K_FACTOR``
(docs/benchmarks/2026-12-03-ann-1m.md):

    flock /work/coord/bench.lock .venv/bin/python bench/ann_tune.py 200000 ivfflat,pq 512
"""

from __future__ import annotations

import sys
import time

from cbir.index import ann_bench
from cbir.index.ann_bench import Candidate
from cbir.index.synthetic import DescriptorModel, write_collection


def main() -> None:
    n, which = int(sys.argv[1]), sys.argv[2].split(",")
    nlist = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    t = time.time()
    db, queries = write_collection(DescriptorModel.load(), n, queries=300, seed=1)
    print(f"gen {time.time() - t:.0f}s", flush=True)
    cands: list[Candidate] = []
    if "ivfflat" in which:
        cands += [Candidate(f"IVF{nlist},Flat", nprobe=p) for p in (8, 16, 32, 64, 128)]
    if "pq" in which:
        factory = f"IVF{nlist},PQ320x4fs,Refine(SQ8)"
        cands += [Candidate(factory, nprobe=p, k_factor=f) for p in (16, 32, 64) for f in (16, 64)]
    ann_bench.run(db, queries, cands, threads=2, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
