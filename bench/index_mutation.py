"""What one change costs an index, and what a sync of an unchanged folder costs.

Part 1 (``--n``, default 1,000,000 vectors of 1280 dimensions, the default descriptor's):
a real index folder (catalogue + FAISS store, Flat) filled with random unit vectors, then

- **new**: ``Index.add`` of ONE image, everything but describing it (the model is replaced
  by the image's precomputed vector): stat, hash, planning against its own records,
  catalogue commit, journal append + fsync, in-memory add, compaction check. Also one
  ``Index.remove`` (a tombstone), and reopening the folder with those changes in the journal;
- **old** (baseline, same run, same data): what the previous design did for the same add,
  the same catalogue commit plus a rewrite of the whole FAISS cache file (``faiss.write_index``
  to a temporary file, fsync, rename);
- one forced compaction (what the journal design pays every few thousand changes).

Part 2 (``--files``, default 100,000): a folder of that many small files named ``*.jpg`` and a
catalogue whose rows match their size and mtime (random vectors: the model is not run on
100,000 images, and the files are not images; a sync that opened one would record a
failure). Timed: ``Index.sync`` of the unchanged folder (files opened counted with an audit
hook, files hashed counted), beside the old design's cost in the same run: hashing every
file (the float mtime of the old catalogue made ~99.5% of files look changed).

Usage (from the project root; 1M x 1280 float32 is 5 GB in memory and ~15 GB on disk, so it
runs under the shared lock and in /tmp, deleted afterwards):

    flock /work/coord/bench.lock .venv/bin/python bench/index_mutation.py

Writes ``bench/results/index_mutation.json`` and ``.md`` (``--out``).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

DIM = 1280
CHUNK = 10_000


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def fill_catalog(db: Path, stats: list[tuple[str, int, int]], rng: np.random.Generator, factory: str = "Flat") -> None:
    """An index folder whose catalogue holds one ``ok`` row per (path, size, mtime_ns),
    with a random unit vector; written through the Catalog API in chunks."""
    from cbir.index import Index
    from cbir.index.catalog import NewRow
    from cbir.models import build_descriptor

    with Index.create(db, model=build_descriptor(), factory=factory) as idx:
        for start in range(0, len(stats), CHUNK):
            part = stats[start : start + CHUNK]
            vecs = unit_rows(rng, len(part))
            rows = [NewRow(p, s, m, os.urandom(32).hex(), vector=v) for (p, s, m), v in zip(part, vecs, strict=True)]
            with idx.catalog.transaction() as tx:
                tx.insert(rows)
                tx.bump_generation()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def fake_model(vector: np.ndarray) -> Callable[..., Any]:
    """Stands in for ``iter_extract``: the image's vector, without running the model."""
    from cbir.extract import Batch

    def extract(descriptor: Any, paths: list[str], **kwargs: Any) -> Any:
        yield Batch(indices=list(range(len(paths))), vectors=np.repeat(vector[None], len(paths), axis=0))

    return extract


def bench_mutation(n: int, repeats: int, work: Path, factory: str) -> dict[str, Any]:
    from cbir.fileio import atomic_write_by_name
    from cbir.index import Index
    from cbir.index import writer as writer_mod

    rng = np.random.default_rng(0)
    db = work / "db"
    t0 = time.perf_counter()
    files = [(f"/bench/img_{i:07d}.jpg", 100_000, 1_700_000_000_000_000_000 + i) for i in range(n)]
    fill_catalog(db, files, rng, factory)
    fill_s = time.perf_counter() - t0
    open_s, idx = timed(lambda: Index.open(db))  # builds and writes the store's first base
    uploads = work / "uploads"
    uploads.mkdir()
    writer_mod.iter_extract = fake_model(unit_rows(rng, 1)[0])
    add_s, remove_s = [], []
    for r in range(repeats):
        f = uploads / f"up_{r}.jpg"
        f.write_bytes(os.urandom(200_000))  # an upload's bytes (hashed, never decoded here)
        dt, report = timed(lambda f=f: idx.add([f], progress=False))
        assert report.added == 1, report
        add_s.append(dt)
    for r in range(repeats):
        dt, removed = timed(lambda r=r: idx.remove([uploads / f"up_{r}.jpg"]))
        assert removed == 1
        remove_s.append(dt)
    journal = idx.store.info()
    idx.close()
    reopen_s, idx = timed(lambda: Index.open(db))
    base = idx.store._view.base  # what the old design rewrote whole on every change
    old_s = []
    for _ in range(max(1, repeats // 10)):
        path = work / "vectors-old.faiss"
        dt, _ = timed(lambda path=path: atomic_write_by_name(path, lambda tmp: faiss.write_index(base, tmp)))
        old_s.append(dt)
        cache_mb = path.stat().st_size / 2**20
        path.unlink()
    compact_s, _ = timed(idx.compact)
    idx.close()
    add_med, old_med = statistics.median(add_s), statistics.median(old_s)
    # the old design's add = the same commit + the cache rewrite: charge it our add's time too
    return {
        "n": n,
        "dim": DIM,
        "factory": factory,
        "fill_catalog_s": fill_s,
        "first_open_build_s": open_s,
        "add_one_ms": {"median": add_med * 1000, "all": [x * 1000 for x in add_s]},
        "remove_one_ms": {"median": statistics.median(remove_s) * 1000},
        "old_full_rewrite_s": {"median": old_med, "all": old_s, "cache_mb": cache_mb},
        "old_over_new": (old_med + add_med) / add_med,
        "reopen_with_journal_s": reopen_s,
        "journal_after_adds_and_removes": journal,
        "compaction_s": compact_s,
        "compaction_per_change_ms_at_max_pending": compact_s * 1000 / 8192,
    }


def bench_noop_sync(n_files: int, work: Path) -> dict[str, Any]:
    from cbir.index import Index
    from cbir.index import writer as writer_mod
    from cbir.index.sync import file_sha256

    folder = work / "photos"
    stats = []
    for i in range(n_files):
        sub = folder / f"{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        p = sub / f"img_{i:06d}.jpg"
        p.write_bytes(os.urandom(64 + i % 512))
        st = p.stat()
        stats.append((str(p), st.st_size, st.st_mtime_ns))
    fill_catalog(work / "db", stats, np.random.default_rng(1))
    opened: list[str] = []
    watching = [False]
    prefix = str(folder)

    def hook(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and isinstance(args[0], str) and args[0].startswith(prefix):
            opened.append(args[0])

    sys.addaudithook(hook)
    hashed: list[str] = []
    real_hash = writer_mod.file_sha256
    writer_mod.file_sha256 = lambda p: hashed.append(p) or real_hash(p)
    with Index.open(work / "db") as idx:
        times = []
        for _ in range(3):
            watching[0] = True
            dt, report = timed(lambda: idx.sync([folder], progress=False))
            watching[0] = False
            assert report.unchanged == n_files and report.extracted == 0, report
            times.append(dt)
    writer_mod.file_sha256 = real_hash
    hash_s, _ = timed(lambda: [file_sha256(p) for p, _, _ in stats])  # the old design's extra work
    return {
        "files": n_files,
        "noop_sync_s": {"median": statistics.median(times), "all": times},
        "files_opened": len(opened),
        "files_hashed": len(hashed),
        "old_rehash_all_s": hash_s,
        "old_over_new": (hash_s + statistics.median(times)) / statistics.median(times),
    }


def markdown(result: dict[str, Any]) -> str:
    m, s = result.get("mutation"), result.get("noop_sync")
    lines = [f"Command: `{result['command']}`  ", f"Date: {result['date']}, {result['machine']}", ""]
    if m:
        lines += [
            f"**One change to a {m['n']:,}-vector {m['dim']}-d index** ({m['factory']}; describing excluded):",
            "",
            "| operation | new (journal) | old (full cache rewrite) | old / new |",
            "|---|---:|---:|---:|",
            f"| add one image | {m['add_one_ms']['median']:.1f} ms | {m['old_full_rewrite_s']['median']:.2f} s "
            f"+ the commit | {m['old_over_new']:,.0f}x |",
            f"| remove one image | {m['remove_one_ms']['median']:.1f} ms | same rewrite | |",
            "",
            f"Reopening with those changes in the journal: {m['reopen_with_journal_s']:.1f} s (reads and checks the "
            f"{m['old_full_rewrite_s']['cache_mb']:,.0f} MB base). A forced compaction: {m['compaction_s']:.1f} s, "
            f"i.e. {m['compaction_per_change_ms_at_max_pending']:.1f} ms per change when it runs every 8,192 changes.",
            "",
        ]
    if s:
        lines += [
            f"**No-op sync of {s['files']:,} files**: {s['noop_sync_s']['median']:.2f} s (median of 3), "
            f"{s['files_opened']} files opened, {s['files_hashed']} hashed; the old design also hashed every "
            f"file: +{s['old_rehash_all_s']:.1f} s here ({s['old_over_new']:.1f}x).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the index (0: skip part 1)")
    ap.add_argument("--files", type=int, default=100_000, help="files in the no-op sync (0: skip part 2)")
    ap.add_argument("--repeats", type=int, default=20, help="single adds and removes timed")
    ap.add_argument("--factory", default="Flat", help="index type of part 1 (the old design's default: Flat)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="scratch folder (deleted)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/index_mutation.json"))
    args = ap.parse_args()
    result: dict[str, Any] = {
        "command": "python bench/index_mutation.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, FAISS {faiss.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} at start",
    }
    for key, n, fn in (("mutation", args.n, bench_mutation), ("noop_sync", args.files, bench_noop_sync)):
        if not n:
            continue
        work = Path(tempfile.mkdtemp(prefix="cbir-mutation-", dir=args.work))
        try:
            result[key] = bench_mutation(n, args.repeats, work, args.factory) if key == "mutation" else fn(n, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(result[key], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
