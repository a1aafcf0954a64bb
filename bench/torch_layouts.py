"""Why the torch engine keeps one model call on every core (issue 16's torch target).

The ONNX engines describe in lanes on two cores (two one-thread calls side by side,
docs/performance.md); this measures whether the same layout helps torch eager, and
whether the torch engine's in-process decode should use one thread or one per core.
Every method in one run, round-robin, medians of ``--repeats``:

- model only, on random uint8 batches: one call on every core (torch's own threads) vs
  ``cores`` calls at once from a thread pool with ``torch.set_num_threads(1)``;
- end to end on gpr-mini: the naive loop with the tuned allocator (bench/speed.py's
  baseline), and :func:`cbir.extract.extract` with the torch engine, decoding with its
  default threads and with one.

Usage (from the project root; on a shared machine under ``flock /work/coord/bench.lock``)::

    python bench/torch_layouts.py --limit 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import bench_files, naive_loop  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpr", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/gpr-mini"))
    ap.add_argument("--limit", type=int, default=1024, help="gpr-mini images for the end-to-end rows")
    ap.add_argument("--batches", type=int, default=12, help="random batches of 32 for the model-only rows")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from cbir.allocator import tune_allocator
    from cbir.extract import extract
    from cbir.models import build_descriptor
    from cbir.runtime.device import usable_cores
    from cbir.runtime.torch_runner import torch_runner

    tune_allocator()
    cores = usable_cores()
    desc = build_descriptor()
    run = torch_runner(desc)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (32, 224, 224, 3), dtype=np.uint8) for _ in range(args.batches)]
    files = bench_files(args.gpr, args.limit)

    def one_call() -> None:
        torch.set_num_threads(cores)
        for b in batches:
            run(b)

    def lanes() -> None:
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(cores) as pool:
                list(pool.map(run, batches))
        finally:
            torch.set_num_threads(cores)

    model_n = len(batches) * 32
    methods = {
        "model only, one call": (one_call, model_n),
        f"model only, {cores} lanes": (lanes, model_n),
        "naive, tuned malloc": (lambda: naive_loop(desc, files), len(files)),
        "torch engine": (lambda: extract(desc, files, engine="torch", progress=False), len(files)),
        "torch engine, 1 decode thread": (
            lambda: extract(desc, files, engine="torch", progress=False, threads=1), len(files)),
    }  # fmt: skip
    for fn, _ in methods.values():  # warm-up: first-call costs out of the timings
        fn()
    rates: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for name, (fn, n) in methods.items():
            t = time.perf_counter()
            fn()
            rates[name].append(n / (time.perf_counter() - t))
    print(f"{cores} cores, {len(files)} gpr-mini images, {model_n} random images, medians of {args.repeats}")
    for name, r in rates.items():
        print(f"  {name:32s} {statistics.median(r):7.1f} img/s   ({', '.join(f'{x:.1f}' for x in r)})")
    med = {m: statistics.median(r) for m, r in rates.items()}
    print(f"lanes / one call (model only): {med[f'model only, {cores} lanes'] / med['model only, one call']:.2f}x")
    for m in ("torch engine", "torch engine, 1 decode thread"):
        print(f"{m} / naive, tuned malloc: {med[m] / med['naive, tuned malloc']:.2f}x")


if __name__ == "__main__":
    main()
