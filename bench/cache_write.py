"""What one change to an index costs in FAISS-cache writing.

Every mutation of an :class:`cbir.index.Index` (``add``, ``sync``, ``remove``, an upload to
the server) ends by writing the FAISS cache ``vectors-<generation>.faiss`` whole, atomically
(:func:`cbir.index.vectors.save_cache`). This times that write for Flat indexes of N
random unit vectors of the default descriptor's 1280 dimensions, with the current writer
(FAISS writes the temporary file itself) and, as the baseline measured in the same run,
the earlier one (``faiss.serialize_index`` to memory, a ``bytes`` copy, then a write).

Usage (from the project root):

    .venv/bin/python bench/cache_write.py --sizes 10000 100000 --repeats 3

Prints medians and writes ``bench/results/cache_write.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from cbir.fileio import atomic_write_bytes
from cbir.index import vectors as vec

DIM = 1280


def previous_writer(index: faiss.Index, path: Path) -> None:
    """The writer before this benchmark: serialise in memory, copy to bytes, write."""
    atomic_write_bytes(path, faiss.serialize_index(index).tobytes())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("bench/results"), help="where to write")
    ap.add_argument("--out", type=Path, default=Path("bench/results/cache_write.json"))
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        index = vec.make_index(DIM, "Flat")
        x = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
        faiss.normalize_L2(x)
        index.add_with_ids(x, np.arange(n, dtype=np.int64))
        del x
        times: dict[str, list[float]] = {"save_cache": [], "previous": []}
        args.dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            for r in range(args.repeats):  # alternate, so both see the same disk state
                t = time.perf_counter()
                vec.save_cache(index, Path(d), r)
                times["save_cache"].append(time.perf_counter() - t)
                t = time.perf_counter()
                previous_writer(index, Path(d) / "previous.faiss")
                times["previous"].append(time.perf_counter() - t)
            size_mb = (Path(d) / f"vectors-{args.repeats - 1}.faiss").stat().st_size / 2**20
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"n": n, "file_mb": round(size_mb, 1), "median_s": med, "all_s": times})
        print(
            f"N={n:>9,}  file {size_mb:7.1f} MB  save_cache {med['save_cache']:7.3f} s  "
            f"previous writer {med['previous']:7.3f} s  ratio {med['previous'] / med['save_cache']:.2f}x",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python bench/cache_write.py " + " ".join(sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "rows": rows,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
