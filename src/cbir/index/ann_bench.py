"""``cbir bench ann``: how candidate indexes do on a collection, against exact search.

For each candidate (a FAISS factory string and its search parameters): recall@10 against
exact search, median and p99 latency of single queries on one thread (how a server's
request threads use an index), build time with the threads given (training on the
sample :func:`cbir.index.ann.train_sample_size` says, then adding in chunks), and the
memory the built index holds. The candidates are the plan ``--index auto`` picks for the
collection (``chosen``), the same index at other search settings and without its
refinement (same build), and exact ``Flat`` as the baseline measured in the same run.

Memory is the growth of the process's anonymous resident memory across the build, after
the training sample is freed and the allocator trimmed; vectors read from a memory map
are file pages and do not count. :func:`cbir.index.ann.estimate_memory` is reported too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from cbir.errors import CbirError
from cbir.index import ann
from cbir.index.stores.base import SearchParams
from cbir.index.stores.faiss_index import make_index, search_parameters

K = 10
#: Rows read from the collection at a time while adding and computing exact neighbours.
CHUNK = 65_536
#: Synthetic collections larger than this are written to a memory map, not held in memory.
MEMMAP_ABOVE = 512 << 20

Log = Callable[[str], None]


@dataclass(frozen=True)
class Candidate:
    """One row of the benchmark: an index type and the settings it is searched with."""

    factory: str
    nprobe: int | None = None
    ef_search: int | None = None
    k_factor: float | None = None
    #: "" = the whole index; "base" = its first stage alone, without the refinement
    stage: str = ""
    label: str = ""  #: how the row is described (e.g. "large-collection plan")

    def params(self) -> dict[str, Any]:
        out = {k: v for k, v in (("nprobe", self.nprobe), ("ef_search", self.ef_search),
                                 ("k_factor", self.k_factor)) if v is not None}  # fmt: skip
        if self.stage:
            out["stage"] = self.stage
        return out

    def search_parameters(self, index: faiss.Index) -> faiss.SearchParameters | None:
        """FAISS's per-call parameters for this row's settings, built as the store builds them."""
        return search_parameters(index, SearchParams(self.nprobe, self.ef_search, self.k_factor), None)


@dataclass
class Result:
    """Measured figures of one candidate (``to_json`` gives the documented JSON row)."""

    index: str
    params: dict[str, Any]
    recall_at_10: float
    median_ms: float
    p99_ms: float
    build_s: float
    memory_mb: float
    chosen: bool
    estimated_mb: float = 0.0
    latency_queries: int = 0
    #: median CPU time of this thread per query: the cost without the machine's contention
    median_cpu_ms: float = 0.0
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        keys = ("index", "params", "recall_at_10", "median_ms", "p99_ms", "build_s", "memory_mb", "chosen")
        return {k: asdict(self)[k] for k in keys}


def candidates(n: int, dim: int, memory_budget: int | None = None) -> list[Candidate]:
    """What to measure for ``n`` vectors: Flat, the auto plan at its settings (chosen) and
    around them, and its first stage alone (an inverted file without its refinement). When
    the plan is Flat (a small collection), the large-collection plan for this size is
    measured as well, labelled as such, if the collection can train its inverted file
    (:func:`cbir.index.ann.trainable`); otherwise Flat is measured alone."""
    plan = ann.plan_index(n, dim, memory_budget)
    out = [Candidate("Flat", label="exact (baseline)")]
    label = "auto plan"
    if plan.factory == "Flat":
        plan = ann.ann_plan(n, dim, memory_budget)
        label = "large-collection plan (auto picks Flat at this size)"
        if not ann.parse_factory(plan.factory, dim).nlist:
            return out  # too few vectors for an inverted file: the fallback codes say nothing
    if plan.ef_search:  # a graph: its one search setting, around the plan's
        ef = plan.ef_search
        depths = sorted({ef // 2, ef, ef * 5 // 4, ef * 2})
        return out + [Candidate(plan.factory, ef_search=e, label=label) for e in depths]
    nprobe = plan.nprobe or 1
    nlist = ann.parse_factory(plan.factory, dim).nlist or nprobe
    probes = sorted({max(1, min(nlist, p)) for p in (nprobe // 2, nprobe, nprobe * 2, nprobe * 4)})
    factors = sorted({f for f in (plan.k_factor, (plan.k_factor or 0) / 2, (plan.k_factor or 0) * 2) if f})
    for p in probes:
        for f in factors or [None]:
            out.append(Candidate(plan.factory, nprobe=p, ef_search=plan.ef_search, k_factor=f, label=label))
        if factors:
            out.append(Candidate(plan.factory, nprobe=p, stage="base", label=f"{label}, without refinement"))
    return out


def chosen_candidate(n: int, dim: int, memory_budget: int | None = None) -> Candidate:
    """The candidate ``--index auto`` picks: the plan at its default settings."""
    plan = ann.plan_index(n, dim, memory_budget)
    return Candidate(plan.factory, nprobe=plan.nprobe, ef_search=plan.ef_search, k_factor=plan.k_factor)


# -- measuring ---------------------------------------------------------------------------------
def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Ids of the exact top ``k`` by inner product, reading ``vectors`` (an array or a memory
    map) in chunks: FAISS's ``knn_ground_truth``."""
    _, ids = knn_ground_truth(np.ascontiguousarray(queries, np.float32), _chunks(vectors), k,
                              metric_type=faiss.METRIC_INNER_PRODUCT)  # fmt: skip
    return ids


def _chunks(vectors: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(vectors), CHUNK):
        yield np.ascontiguousarray(vectors[start : start + CHUNK], dtype=np.float32)


def anon_rss() -> int:
    """Anonymous resident memory of this process in bytes (Linux; 0 elsewhere): memory the
    index allocated, not pages of a memory-mapped collection."""
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _trim() -> None:
    """Hand freed heap memory back to the kernel so it is not counted as the index's."""
    gc.collect()
    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


def build(factory: str, vectors: np.ndarray, *, threads: int = 2, seed: int = 0) -> tuple[faiss.Index, float, int]:
    """Build ``factory`` over ``vectors`` as a store would: train on a random sample of
    :func:`~cbir.index.ann.train_sample_size` rows, add in chunks. Returns (index, seconds,
    bytes of memory it holds)."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        _trim()
        before = anon_rss()
        t = time.perf_counter()
        index = make_index(vectors.shape[1], factory)  # what the store builds, same settings
        size = ann.train_sample_size(factory, len(vectors))
        if size:
            rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
            sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
            index.train(sample)
            del sample
        for chunk in _chunks(vectors):
            index.add(chunk)
        seconds = time.perf_counter() - t
        _trim()
        return index, seconds, max(0, anon_rss() - before)
    finally:
        faiss.omp_set_num_threads(previous)


def search_one_by_one(
    index: faiss.Index, queries: np.ndarray, params: Any, k: int = K
) -> tuple[np.ndarray, list[float], list[float]]:
    """Each query alone on one thread, as a server answers them: (ids, wall milliseconds,
    CPU milliseconds of this thread). On a shared machine the wall time includes waiting
    for a core; the CPU time is what the query itself costs."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        ids = np.empty((len(queries), k), np.int64)
        ms, cpu = [], []
        for i in range(len(queries)):
            q = queries[i : i + 1]
            c, t = time.thread_time(), time.perf_counter()
            _, ids[i] = index.search(q, k, params=params)
            ms.append((time.perf_counter() - t) * 1000)
            cpu.append((time.thread_time() - c) * 1000)
        return ids, ms, cpu
    finally:
        faiss.omp_set_num_threads(previous)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the exact top k found in the approximate top k."""
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def percentile(ms: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(ms), q)) if ms else float("nan")


# -- the benchmark -----------------------------------------------------------------------------
def run(
    vectors: np.ndarray,
    queries: np.ndarray,
    cands: list[Candidate],
    *,
    chosen: Candidate | None = None,
    flat_queries: int | None = None,
    threads: int = 2,
    seed: int = 0,
    log: Log | None = None,
) -> list[Result]:
    """Measure every candidate on ``vectors`` (array or memory map) with ``queries``.

    Each factory is built once (``threads`` threads); its rows differ in search settings.
    The exact neighbours come from a batched exact search; Flat's own latency is measured
    on the first ``flat_queries`` queries (all by default: at a million it is about a
    second each).
    """
    say = log or (lambda _msg: None)
    t = time.perf_counter()
    truth = exact_neighbours(vectors, queries)
    say(f"exact neighbours of {len(queries)} queries in {time.perf_counter() - t:.1f}s")
    results: list[Result] = []
    for factory in dict.fromkeys(c.factory for c in cands):
        index, build_s, memory = build(factory, vectors, threads=threads, seed=seed)
        say(f"{factory}: built in {build_s:.1f}s, {memory / ann.MiB:.0f} MiB")
        for cand in (c for c in cands if c.factory == factory):
            nq = min(len(queries), flat_queries) if factory == "Flat" and flat_queries else len(queries)
            target = faiss.downcast_index(index.base_index) if cand.stage == "base" else index
            params = cand.search_parameters(target)
            found, ms, cpu = search_one_by_one(target, queries[:nq], params)
            row = Result(
                index=factory,
                params=cand.params(),
                recall_at_10=recall_at_k(found, truth[:nq]),
                median_ms=percentile(ms, 50),
                p99_ms=percentile(ms, 99),
                build_s=build_s,
                memory_mb=memory / ann.MiB,
                chosen=chosen is not None and _same(cand, chosen),
                estimated_mb=ann.estimate_memory(factory, len(vectors), vectors.shape[1]) / ann.MiB,
                latency_queries=nq,
                median_cpu_ms=percentile(cpu, 50),
                label=cand.label,
            )
            results.append(row)
            say(f"  {row.params}: recall@10 {row.recall_at_10:.4f}, median {row.median_ms:.2f} ms "
                f"(CPU {row.median_cpu_ms:.2f} ms)")  # fmt: skip
        del index
        _trim()
    return results


def _same(a: Candidate, b: Candidate) -> bool:
    return (a.factory, a.nprobe, a.ef_search, a.k_factor, a.stage) == (
        b.factory, b.nprobe, b.ef_search, b.k_factor, b.stage
    )


# -- whole benchmarks --------------------------------------------------------------------------
def bench_vectors(
    vectors: np.ndarray,
    queries: np.ndarray,
    *,
    memory_budget: int | None = None,
    flat_queries: int | None = None,
    threads: int = 2,
    seed: int = 0,
    log: Log | None = None,
) -> list[Result]:
    """The candidates for this collection's size, measured on it (``chosen`` marks what
    ``--index auto`` builds for it)."""
    n, dim = vectors.shape
    return run(
        vectors, queries, candidates(n, dim, memory_budget),
        chosen=chosen_candidate(n, dim, memory_budget), flat_queries=flat_queries,
        threads=threads, seed=seed, log=log,
    )  # fmt: skip


def sample_queries(vectors: np.ndarray, count: int, *, seed: int = 0) -> np.ndarray:
    """``count`` of the collection's own vectors as queries (each finds itself too, as in
    GPR1200's protocol; exact search is held to the same)."""
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), min(count, len(vectors)), replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def bench_synthetic(
    n: int,
    *,
    dim: int | None = None,
    queries: int = 1000,
    workdir: str | None = None,
    **kwargs: Any,
) -> list[Result]:
    """The benchmark on ``n`` synthetic descriptors of the shipped model
    (:mod:`cbir.index.synthetic`), with ``queries`` held-out draws as queries. Above
    :data:`MEMMAP_ABOVE` bytes the collection is written to a memory map in ``workdir``
    (default: the system's temporary folder) and deleted afterwards."""
    from cbir.index.synthetic import DescriptorModel, write_collection

    model = DescriptorModel.load()
    width = model.dim if dim is None else dim
    say = kwargs.get("log") or (lambda _msg: None)
    with _scratch(n * width * 4, workdir) as path:
        t = time.perf_counter()
        db, qs = write_collection(model, n, queries=queries, dim=dim, seed=kwargs.get("seed", 0), path=path)
        say(f"{n:,} synthetic {width}-d descriptors in {time.perf_counter() - t:.1f}s"
            + (f" (memory map {path})" if path else ""))  # fmt: skip
        return bench_vectors(db, qs, **kwargs)


def bench_index(
    db: str | os.PathLike, *, queries: int = 1000, workdir: str | None = None, **kwargs: Any
) -> list[Result]:
    """The benchmark on the vectors an index holds (``cbir index --db``), with ``queries``
    of them as queries. Large collections are copied to a memory map in ``workdir``
    (deleted afterwards) rather than held in memory twice."""
    with _catalog(db) as (catalog, dim):
        n = catalog.counts()["ok"]
        if n == 0:
            raise CbirError(f"the index in {db} holds no vectors to measure")
        with _scratch(n * dim * 4, workdir) as path:
            vectors = _read_vectors(catalog, dim, n, path)
            sample = sample_queries(vectors, queries, seed=kwargs.get("seed", 0))
            return bench_vectors(vectors, sample, **kwargs)


def index_vectors(db: str | os.PathLike) -> np.ndarray:
    """All the vectors the index in ``db`` holds, in memory, in id order (for collections
    that fit, such as gpr-mini; :func:`bench_index` memory-maps large ones)."""
    with _catalog(db) as (catalog, dim):
        return _read_vectors(catalog, dim, catalog.counts()["ok"], None)


@contextlib.contextmanager
def _catalog(db: str | os.PathLike) -> Iterator[tuple[Any, int]]:
    """The index's catalogue, read-only, and its vectors' dimension (no model is loaded)."""
    from cbir.index import folder
    from cbir.index.catalog import Catalog

    layout = folder.Layout(Path(db))
    folder.check_openable(layout, readonly=True)
    catalog = Catalog(layout.catalog, readonly=True)
    try:
        yield catalog, int(catalog.get_meta("dim") or 0)
    finally:
        catalog.close()


def _read_vectors(catalog: Any, dim: int, n: int, path: Path | None) -> np.ndarray:
    """The vectors the index's store holds (DBA-augmented where stored), in id order, into
    memory or the memory map at ``path``."""
    if path is None:
        out = np.empty((n, dim), np.float32)
    else:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    row = 0
    for _, chunk in catalog.iter_vectors(dim=dim, augmented=True):
        out[row : row + len(chunk)] = chunk
        row += len(chunk)
    return out[:row]


@contextlib.contextmanager
def _scratch(nbytes: int, workdir: str | None) -> Iterator[Path | None]:
    """A path for a memory-mapped collection of ``nbytes`` (None: small, keep it in memory),
    removed afterwards."""
    if nbytes <= MEMMAP_ABOVE:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="cbir-ann-", dir=workdir) as tmp:
        yield Path(tmp) / "collection.npy"
