"""Past one machine (issue 13), three parts, each measured side by side in one run:

1. ``extract``: images/s of ``cbir extract --ray`` (Ray Data, the ONNX engine in an actor
   pool) with 1 actor x 2 CPUs and 2 actors x 1 CPU, against the single-machine pipeline
   (:func:`cbir.extract.extract`, ONNX, default decode workers) on the same images, all at
   2 cores, round-robin, ``--repeats`` times, medians and Ray's overhead (time ratio - 1).
   Each Ray run is a whole job (list, stat, actors started, describe, Parquet written) on a
   running local cluster (started once, as a cluster is long-lived); its start-up (seconds
   to the first shard) and running rate (images/s from the first shard to the last) are
   reported apart, with the CPU-seconds every kind of process spent (``ProcessCpu``: the
   driver, the describing actors, other Ray workers, Ray Data's actors, Ray's system
   processes; needs psutil). Beyond train-pool's 2,853 images, ``--images`` adds hard links to its
   files (more paths, the same bytes).
2. ``import``: ``cbir index --from`` of ``--vectors`` synthetic vectors from Parquet into a
   FAISS index (``auto``: the index planned for the final size is built during the import,
   as a user's import builds it; the ``index`` column names it) and into Milvus Lite
   (FLAT), each in a fresh process: wall time, the importer's own peak resident memory and
   that of its process tree (sampled; needs psutil, ``pip install .[bench]``); a child
   that dies (out of memory) is reported as such. The catalogue (SQLite, which keeps every raw vector) is written in
   both, as a real import does.
3. ``search``: Milvus Lite HNSW (M=16, efConstruction=200) at ``--search-n`` vectors: build
   time, single-query latency (median, p99; one client thread) and recall@10 against exact
   search (NumPy brute force) for several ef values.

Synthetic vectors: draws of :mod:`cbir.index.synthetic`, the model fitted to real
default-descriptor vectors of train-pool and rparis-mini (the one ``cbir bench ann
--synthetic`` uses; docs/ann.md), labelled as synthetic in the results. In ``search`` the
queries are held-out draws of the same model, not copies of collection vectors.

Usage (from the project root; timed parts under the shared lock; large files under /tmp,
deleted at the end):
    flock /work/coord/bench.lock .venv/bin/python bench/distributed.py \\
        [--images 480] [--repeats 3] [--vectors 1000000] [--search-n 100000] [--parts extract,import,search] \\
        [--import-stores faiss,milvus]
Writes bench/results/distributed-PARTS.json and .md (one file per set of parts, so parts
run one after another do not overwrite each other).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "bench" / "results"


SYNTHETIC = "draws of the model fitted to real descriptors (cbir.index.synthetic), not real descriptors"


def synthetic_batches(n: int, seed: int, batch: int) -> Iterator[np.ndarray]:
    """``n`` synthetic 1280-d descriptors in batches of about ``batch`` rows (whole clusters)."""
    from cbir.index.synthetic import DescriptorModel

    yield from DescriptorModel.load().batches(n, seed=seed, batch=batch)


# ----------------------------------------------------------------------------------------
# part 1: extraction throughput
# ----------------------------------------------------------------------------------------
def image_files(n: int, work: Path) -> tuple[list[str], str]:
    """``n`` image files: train-pool's, and beyond its 2,853 hard links to them under
    ``work`` (other paths, the same bytes: a job of ``n`` files, without another data set)."""
    from cbir.data.datasets import list_images

    pool = [Path(p) for p in list_images(DATA / "train-pool")]
    paths = [str(p) for p in pool[:n]]
    copy = 0
    while len(paths) < n:
        copy += 1
        folder = work / f"copy{copy}"
        for i, p in enumerate(pool[: n - len(paths)]):
            dest = folder / f"{i:05d}{p.suffix}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, dest)
            paths.append(str(dest))
    source = "train-pool" if copy == 0 else f"train-pool, and {copy} set(s) of hard links to its files"
    return paths, source


def steady_rate(out: Path) -> tuple[float, float]:
    """(seconds from the job's start to its first shard, images/s between the first and the
    last shard written): the job's fixed start-up cost and its running rate, apart."""
    import pyarrow.parquet as pq

    shards = sorted((p.stat().st_mtime, pq.read_metadata(p).num_rows) for p in (out / "embeddings").glob("*.parquet"))
    if len(shards) < 2:
        return float("nan"), float("nan")
    span = shards[-1][0] - shards[0][0]
    return shards[0][0], sum(n for _, n in shards[1:]) / span if span > 0 else float("nan")


class ProcessCpu:
    """CPU-seconds (user + system) that every process on the machine spent while the block
    ran, by kind: this process (the driver, or the single-machine pipeline), the describing
    actors, other Ray worker processes (tasks: each one started costs the import of Ray),
    Ray Data's own actors, Ray's system processes. Processes are sampled every second from
    a thread, so one that starts and exits between two samples is missed (a lower bound)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.base = {p.pid: self._cpu(p) for p in psutil.process_iter()}
        self.seen: dict[int, tuple[str, float]] = {}
        self._stop = False

    @staticmethod
    def _cpu(p: object) -> float:
        try:
            t = p.cpu_times()  # type: ignore[attr-defined]
            return t.user + t.system
        except Exception:  # noqa: BLE001 - exited
            return 0.0

    def _kind(self, p: object) -> str:
        if p.pid == os.getpid():  # type: ignore[attr-defined]
            return "this process"
        name = " ".join(p.cmdline() or [p.name()])  # type: ignore[attr-defined]
        if "DescribeFiles" in name:
            return "describing actors"
        if name.startswith("ray::_") or "ActorLocationTracker" in name:
            return "Ray Data's actors"
        if name.startswith("ray::"):
            return "other Ray workers"
        return "Ray system processes" if "ray" in name else "other"

    def _sample(self) -> None:
        for p in self._psutil.process_iter():
            try:
                self.seen[p.pid] = (self._kind(p), self._cpu(p))
            except self._psutil.Error:
                pass

    def __enter__(self) -> ProcessCpu:
        import threading

        def loop() -> None:
            while not self._stop:
                self._sample()
                time.sleep(1.0)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()
        self._sample()

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (kind, cpu) in self.seen.items():
            out[kind] = out.get(kind, 0.0) + max(0.0, cpu - self.base.get(pid, 0.0))
        return {k: round(v, 1) for k, v in sorted(out.items()) if k != "other" and v >= 0.05}

    def started(self, kind: str) -> int:
        """Processes of ``kind`` that were not running when the block began."""
        return sum(1 for pid, (k, _) in self.seen.items() if k == kind and pid not in self.base)


def bench_extract(n_images: int, repeats: int, work: Path) -> dict:
    import ray

    from cbir.distributed.extraction import extract_with_ray
    from cbir.extract import extract
    from cbir.models import build_descriptor

    paths, source = image_files(n_images, work)
    listing = work / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    desc = build_descriptor()  # EfficientNet-Lite0, GeM: the default descriptor
    extract(desc, paths[:32], engine="onnx", progress=False)  # export the ONNX model once
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    runs = {
        "single machine (cbir extract)": lambda: extract(desc, paths, engine="onnx", progress=False),
        "ray, 1 actor x 2 CPUs": lambda: extract_with_ray([listing], _fresh(work / "r1"), desc,
                                                          workers=1, cpus_per_worker=2, progress=False),
        "ray, 2 actors x 1 CPU": lambda: extract_with_ray([listing], _fresh(work / "r2"), desc,
                                                          workers=2, cpus_per_worker=1, progress=False),
    }  # fmt: skip
    outs = {"ray, 1 actor x 2 CPUs": work / "r1", "ray, 2 actors x 1 CPU": work / "r2"}
    times: dict[str, list[float]] = {k: [] for k in runs}
    first: dict[str, list[float]] = {k: [] for k in outs}
    steady: dict[str, list[float]] = {k: [] for k in outs}
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            with ProcessCpu() as used:
                t, wall = time.perf_counter(), time.time()
                run()
                times[name].append(time.perf_counter() - t)
            cpu[name].append({**used.by_kind(), "Ray workers started": used.started("other Ray workers")})
            if name in outs:
                t_first, rate = steady_rate(outs[name])
                first[name].append(t_first - wall)
                steady[name].append(rate)
    ray.shutdown()
    base = statistics.median(times["single machine (cbir extract)"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        row = {"method": name, "images": len(paths), "median_s": round(med, 2),
               "images_per_s": round(len(paths) / med, 1), "overhead_vs_single": round(med / base - 1, 3)}  # fmt: skip
        # a Ray job's start-up (to its first shard) and its running rate, apart
        row["to_first_shard_s"] = round(statistics.median(first[name]), 2) if name in outs else ""
        row["running_images_per_s"] = round(statistics.median(steady[name]), 1) if name in outs else ""
        # CPU-seconds by kind of process, median over the repeats
        kinds = sorted({k for c in cpu[name] for k in c})
        row["cpu_s_by_process"] = {k: statistics.median(c.get(k, 0) for c in cpu[name]) for k in kinds}
        rows.append({**row, "runs_s": [round(t, 2) for t in ts]})
    return {"rows": rows, "images_from": source, "descriptor": desc.describe_name(), "cores": 2}


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------------------
# part 2: import of precomputed vectors
# ----------------------------------------------------------------------------------------
def write_parquet(out: Path, n: int, dim: int, shard_rows: int = 50_000) -> None:
    """An embeddings folder of ``n`` synthetic rows, as ``cbir extract --ray`` lays it out."""
    from cbir.distributed.embeddings import EmbeddingsFolder, rows_table, write_shard
    from cbir.models import build_descriptor

    folder = EmbeddingsFolder(out)
    folder.prepare(build_descriptor())
    start = 0
    for x in synthetic_batches(n, seed=0, batch=shard_rows):
        m = len(x)
        if x.shape[1] != dim:
            raise ValueError(f"the synthetic model is {x.shape[1]}-d, not {dim}-d")
        paths = [f"/synthetic/{i:08d}.jpg" for i in range(start, start + m)]
        table = rows_table(dim, paths, [1000] * m, [1] * m, [f"{i:064x}" for i in range(start, start + m)],
                           x, [None] * m)  # fmt: skip
        write_shard(folder.shard_dir, table)
        start += m
    folder.write_manifest({"synthetic": True})


def _import_child(source: str, db: str, store: str) -> None:
    """Run in a fresh process: import, print seconds and its own peak RSS as JSON."""
    from cbir.distributed.importer import import_vectors

    t = time.perf_counter()
    report = import_vectors(source, db, store=store or None)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(peak), "added": report.added}))


def _tree_rss(proc: psutil.Process) -> int:  # noqa: F821 (imported where used)
    """Resident bytes of ``proc`` and its descendants (a store may run a server process of
    its own; pages shared between them are counted once per process)."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between the listing and the read
            pass
    return total


def _run_import(src: Path, db: Path, store: str) -> dict:
    """One import in a child process, its process tree's memory sampled twice a second.
    A child that dies (the kernel's OOM killer at 1M, say) gives a row that says so."""
    import psutil

    code = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import distributed as d; " \
           f"d._import_child({str(src)!r}, {str(db)!r}, {store!r})"  # fmt: skip
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=err, text=True)
        ps, peak_tree = psutil.Process(child.pid), 0
        while child.poll() is None:
            try:
                peak_tree = max(peak_tree, _tree_rss(ps))
            except psutil.Error:
                pass
            time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    row = {"peak_tree_rss_mb": round(peak_tree / 2**20)}
    if child.returncode != 0:
        why = "killed by SIGKILL (the OOM killer?)" if child.returncode == -9 else f"exit {child.returncode}"
        tail = stderr.strip().splitlines()[-3:]
        return {**row, "failed": why, "after_s": round(time.perf_counter() - t, 1), "stderr": tail}
    return {**json.loads(stdout.strip().splitlines()[-1]), **row}


#: the FAISS index is the one ``auto`` plans for the size (built during the import, as a
#: user's import builds it); Milvus Lite gets FLAT
IMPORT_STORES = {"faiss": ("faiss (auto)", ""), "milvus": ("milvus lite", "milvus#index=FLAT")}


def _index_built(db: Path) -> str:
    """The index an import left in ``db``: the FAISS plan's factory, or the Milvus store."""
    from cbir.index.catalog import Catalog
    from cbir.index.folder import Layout

    meta = Catalog.peek_meta(Layout(db).catalog, ["plan", "store"])
    if meta.get("store", "").startswith("milvus"):
        return meta["store"]
    return json.loads(meta["plan"])["factory"] if meta.get("plan") else "?"


def bench_import(n: int, work: Path, stores: list[str]) -> dict:
    dim = 1280
    src = work / "embeddings"
    t = time.perf_counter()
    write_parquet(src, n, dim)
    gen = time.perf_counter() - t
    rows = []
    for key in stores:
        name, store = IMPORT_STORES[key]
        db = work / f"db-{key}"  # the Milvus Lite file goes inside it (milvus.db)
        res = _run_import(src, db, store)
        size = sum(p.stat().st_size for p in db.rglob("*") if p.is_file())
        row = {"store": name, "vectors": n, "index": _index_built(db), **res, "index_folder_gb": round(size / 1e9, 2)}
        if "seconds" in res:
            row["rows_per_s"] = round(n / res["seconds"])
        print(json.dumps(row), flush=True)
        rows.append(row)
        shutil.rmtree(db, ignore_errors=True)
    parquet_gb = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) / 1e9
    return {"rows": rows, "dim": dim, "parquet_gb": round(parquet_gb, 2), "parquet_write_s": round(gen, 1),
            "vectors": SYNTHETIC}  # fmt: skip


# ----------------------------------------------------------------------------------------
# part 3: Milvus search latency and recall
# ----------------------------------------------------------------------------------------
def bench_search(n: int, work: Path, n_queries: int = 200, dim: int = 1280) -> dict:
    from cbir.index.stores import ArraySource, SearchParams
    from cbir.index.stores.milvus import MilvusStore, parse_store_spec
    from cbir.index.synthetic import DescriptorModel, write_collection

    db, q = write_collection(DescriptorModel.load(), n, queries=n_queries, dim=dim, seed=7)
    exact = np.argsort(-(q @ db.T), axis=1)[:, :10]
    spec = parse_store_spec(f"milvus:{work}/search.db#index=HNSW,M=16,efConstruction=200,collection=bench")
    store = MilvusStore(spec, dim)
    t = time.perf_counter()
    store.rebuild(ArraySource(np.arange(n, dtype=np.int64), db), 1)
    store._client.describe_index(store.name, "vector")  # the index is built by then
    build = time.perf_counter() - t
    rows = []
    for ef in (16, 64, 128, 256):
        params = SearchParams(ef_search=ef)
        store.search(q[:5], 10, params)  # warm
        lat, found = [], []
        for i in range(n_queries):
            t = time.perf_counter()
            _, ids = store.search(q[i : i + 1], 10, params)
            lat.append((time.perf_counter() - t) * 1e3)
            found.append(ids[0])
        recall = float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)]))
        rows.append({"index": "HNSW M=16 efConstruction=200", "ef": ef, "recall_at_10": round(recall, 4),
                     "median_ms": round(statistics.median(lat), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2)})
    t = time.perf_counter()
    for i in range(n_queries):
        np.argsort(-(q[i] @ db.T))[:10]
    exact_ms = (time.perf_counter() - t) * 1e3 / n_queries
    store.close()
    return {"rows": rows, "vectors": n, "dim": dim, "queries": n_queries, "build_s": round(build, 1),
            "exact_numpy_ms_per_query": round(exact_ms, 2),
            "data": SYNTHETIC}  # fmt: skip


# ----------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    out = [f"# Scaling out: measured {results['date']} on {results['machine']}", ""]
    for part, res in results["parts"].items():
        rows = res["rows"]
        cols = list(dict.fromkeys(k for r in rows for k in r))  # a failed row has other keys
        out += [f"## {part}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
        notes = {k: v for k, v in res.items() if k != "rows"}
        out += ["", ", ".join(f"{k}: {v}" for k, v in notes.items()), ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--search-n", type=int, default=100_000)
    ap.add_argument("--parts", default="extract,import,search")
    ap.add_argument("--import-stores", default="faiss,milvus", help="stores the import part fills, in order")
    ap.add_argument("--out", type=Path, help="default: bench/results/distributed-PARTS.json")
    args = ap.parse_args()
    args.out = args.out or RESULTS / f"distributed-{args.parts.replace(',', '-')}.json"
    work = Path(tempfile.mkdtemp(prefix="cbir-bench-dist-", dir="/tmp"))
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores",
               "command": " ".join(sys.argv), "parts": {}}  # fmt: skip
    try:
        parts = args.parts.split(",")
        if "extract" in parts:
            results["parts"]["extraction throughput"] = bench_extract(args.images, args.repeats, work)
        if "import" in parts:
            results["parts"]["import from Parquet"] = bench_import(args.vectors, work, args.import_stores.split(","))
        if "search" in parts:
            results["parts"]["Milvus Lite search"] = bench_search(args.search_n, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
