"""The planner behind ``cbir index --index auto``: which FAISS index for this collection.

The choice follows the way autofaiss (Criteo) picks an index: from the number of vectors
and a memory budget, by estimating what each candidate costs in bytes and taking the most
accurate one that fits. It is written for global image descriptors (L2-normalised, a few
hundred to a few thousand dimensions, searched by inner product):

- **Small collections stay exact** (``Flat``): while a full scan reads at most
  :data:`FLAT_MAX_SCAN_BYTES` per query and fits the budget, exact search costs a few tens
  of milliseconds and has nothing to tune.
- **Large collections** get a compressed index with the most exact final ranking the
  budget allows, in this order:

  1. an inverted file with about ``sqrt(n)`` lists (``IVF1024`` at a million) and 4-bit
     fast-scan PQ codes of four dimensions each (``PQ320x4fs``, 160 bytes for 1280-d;
     Jegou et al., "Product quantization for nearest neighbor search", TPAMI 2011; André
     et al., "Quicker ADC", 2019), whose best ``k * k_factor`` candidates are re-ranked on
     the full vectors (``RFlat``) or on half-precision copies (``Refine(SQfp16)``);
  2. where those do not fit, a **graph on 8-bit vectors** (``HNSW32_SQ8``: Malkov &
     Yashunin, "Efficient and robust approximate nearest neighbor search using
     Hierarchical Navigable Small World graphs", TPAMI 2018): its 8-bit codes rank as
     precisely as an 8-bit refinement copy, and a query visits a few thousand vectors
     instead of scanning a share of the lists. It is proposed while its build stays under
     half an hour on two cores (:data:`GRAPH_MAX_BUILD`);
  3. then the inverted file with an 8-bit or 4-bit refinement copy (``Refine(SQ8)``,
     ``Refine(SQ4)``), and last the codes alone.

  At a million 1280-d descriptors and the default 2 GiB this picks ``HNSW32_SQ8``: on
  synthetic descriptors it reached recall@10 0.96 at about 3.5 ms per query, where the
  inverted file's best 0.95 cost 7 ms (docs/benchmarks/2026-12-03-ann-1m.md). No PCA: it
  removes the low-variance axes in which near neighbours differ.

Every plan carries its search defaults (``nprobe``, ``k_factor``) and
:func:`train_sample_size` says how many vectors training needs, so a build trains on a
sample and stays within its time and memory. :func:`estimate_memory` is the byte model
used both here and by ``cbir bench ann`` (which reports the measured figure beside it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from cbir.errors import CbirError

MiB = 1 << 20
GiB = 1 << 30

#: Default memory budget of an index's search structures: 2 GiB holds a million 1280-d
#: descriptors with an 8-bit refinement copy, and fits a laptop beside the model.
DEFAULT_MEMORY_BUDGET = 2 * GiB
#: Exact search while one query scans at most this much (about 52,000 vectors of 1280-d,
#: a few tens of ms per query on one core; see docs/ann.md).
FLAT_MAX_SCAN_BYTES = 256 * MiB
#: Inverted lists per square root of the collection size. FAISS's guideline (4-16) is
#: for lists scanned code by code; fast-scan codes are cheap to scan and k-means on
#: full-dimensional vectors is not, so fewer, longer lists (1,024 at a million).
LISTS_PER_SQRT_N = 1
#: k-means training points per inverted list (FAISS warns below 39).
TRAIN_POINTS_PER_LIST = 40
#: Fewest vectors per k-means centroid for a candidate to be considered at all: an
#: inverted file (or PQ codebook) with fewer training points than this per centroid is
#: trained on noise, so the planner does not propose it (the candidate guard).
MIN_POINTS_PER_LIST = 39
#: Bounds of the training sample (PCA and the refinement's scalar quantiser want a few
#: tens of thousands of points whatever the number of lists; k-means time grows with it).
MIN_TRAIN_SAMPLE = 50_000
MAX_TRAIN_SAMPLE = 300_000
#: Headroom: a plan may use this share of the budget (the rest is query buffers, the
#: allocator's slack and the catalogue).
BUDGET_SHARE = 0.9
#: Candidates re-ranked on the refinement copy per result wanted. Re-ranking is cheap
#: next to the scan (1,280 SQ8 vectors for a top 10, ~0.2 ms more than 640 at a million)
#: and 4-bit codes order close neighbours poorly: on 1M synthetic descriptors at nprobe
#: 128 of 1,024, recall@10 was 0.905 with 32, 0.933 with 64, 0.957 with 128
#: (docs/benchmarks/2026-12-03-ann-1m.md).
DEFAULT_K_FACTOR = 128.0
#: The graph candidate: links per node and the search depth a plan starts with. On 1M
#: synthetic 1280-d descriptors (efConstruction 40), efSearch 96 gave recall@10 0.937,
#: 128 0.960, 160 0.965, at 2.8, 3.1-3.7 and 4.2-4.9 ms per query on one thread.
GRAPH_M = 32
GRAPH_EF_SEARCH = 128
#: The graph candidate, whatever the dimension: HNSW over 8-bit scalar-quantised codes.
GRAPH_FACTORY = f"HNSW{GRAPH_M}_SQ8"
#: Largest ``n * dim`` the graph is proposed for: its build inserts vectors one by one
#: (16 min for 1M x 1280 on two cores, growing a little faster than n), so beyond about
#: 1.5M x 1280 it would not build in 30 min on two cores; the inverted file trains on a
#: sample instead and adds at about 20,000 vectors a second.
GRAPH_MAX_BUILD = 1_500_000 * 1280
#: Share of the inverted lists a query visits. Descriptors' near neighbours straddle
#: cells: on synthetic descriptors at 200k (IVF512, exact vectors in the lists) visiting
#: 1/16 of the lists found 0.96 of the true top 10, 1/8 0.98, 1/4 0.997.
NPROBE_SHARE = 1 / 8

# Bytes per vector of each refinement storage for ``dim`` dimensions, best first.
_REFINEMENTS: tuple[tuple[str, float], ...] = (
    ("RFlat", 4.0),
    ("Refine(SQfp16)", 2.0),
    ("Refine(SQ8)", 1.0),
    ("Refine(SQ4)", 0.5),
)
#: Per-vector cost of the store's map from index positions to catalogue ids (a sorted
#: int64 array beside every index type).
ID_BYTES = 8


class MemoryBudgetError(CbirError, ValueError):
    """No index the planner knows fits the memory budget for this collection."""

    exit_code = 2  # docs/cli.md, "Exit codes"


@dataclass(frozen=True)
class IndexPlan:
    """What ``--index auto`` builds: a FAISS ``index_factory`` string and its search
    defaults (None where the type has no such parameter)."""

    factory: str
    nprobe: int | None = None
    ef_search: int | None = None
    k_factor: float | None = None
    reason: str = ""


def plan_index(n: int, dim: int, memory_budget: int | None = None) -> IndexPlan:
    """The index for ``n`` vectors of ``dim`` dimensions within ``memory_budget`` bytes
    (default :data:`DEFAULT_MEMORY_BUDGET`).

    Exact ``Flat`` while a scan is cheap and fits; above that :func:`ann_plan`.
    Raises :class:`MemoryBudgetError` when not even the smallest candidate fits.
    """
    budget = _check(n, dim, memory_budget)
    scan = n * dim * 4
    if scan <= FLAT_MAX_SCAN_BYTES and estimate_memory("Flat", n, dim) <= budget * BUDGET_SHARE:
        return IndexPlan(
            "Flat",
            reason=f"{n:,} vectors: exact search scans {_mb(scan)} per query "
            f"(at most {_mb(FLAT_MAX_SCAN_BYTES)} stays exact)",
        )
    return ann_plan(n, dim, budget)


def ann_plan(n: int, dim: int, memory_budget: int | None = None) -> IndexPlan:
    """The large-collection plan for ``n`` vectors, whatever their number: the candidate
    of :func:`_ann_candidates` with the most exact final ranking whose estimated memory
    fits the budget. :func:`plan_index` uses it above the exact-search limit; benchmarks
    apply it to small collections too, to measure it on real descriptors."""
    budget = _check(n, dim, memory_budget)
    usable = budget * BUDGET_SHARE
    tried = []
    for factory in _ann_candidates(n, dim):
        need = estimate_memory(factory, n, dim)
        tried.append((factory, need))
        if need <= usable:
            return _ann_plan(factory, n, dim, need, budget)
    smallest = min(tried, key=lambda t: t[1])
    raise MemoryBudgetError(
        f"no index for {n:,} vectors of {dim} dimensions fits a memory budget of "
        f"{_mb(budget)}: the smallest ({smallest[0]}) needs about {_mb(smallest[1])}. "
        "Raise --memory-budget or use a smaller descriptor."
    )


def _ann_candidates(n: int, dim: int) -> list[str]:
    """Every large-collection index, most precise final ranking first (module docstring):
    each inverted-file base with a float refinement, the graph on 8-bit vectors, each base
    with an 8-bit then 4-bit refinement, the bases alone. Within one refinement a base
    with finer codes comes first: a refinement matters more to recall than finer codes."""
    bases = _ann_bases(n, dim)
    floats = [r for r, per_dim in _REFINEMENTS if per_dim >= 2]  # more exact than 8-bit codes
    coarse = [r for r, per_dim in _REFINEMENTS if per_dim < 2]
    out = [f"{b},{r}" for r in floats for b in bases]
    if graph_buildable(n, dim):
        out.append(GRAPH_FACTORY)
    out += [f"{b},{r}" for r in coarse for b in bases]
    return out + bases


def graph_buildable(n: int, dim: int) -> bool:
    """Whether the graph is a candidate: its build, one insertion at a time, stays within
    :data:`GRAPH_MAX_BUILD` (its 8-bit ranges train on any number of vectors)."""
    return n * dim <= GRAPH_MAX_BUILD


def _check(n: int, dim: int, memory_budget: int | None) -> int:
    if n < 0 or dim < 1:
        raise ValueError(f"need n >= 0 and dim >= 1, got n={n}, dim={dim}")
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory budget must be positive, got {budget}")
    return budget


def _ann_bases(n: int, dim: int) -> list[str]:
    """The compressed first stages, most precise first: IVF and 4-bit fast-scan PQ on the
    full dimension with 4, then 8, then 16 dimensions per sub-quantiser. No PCA: on
    descriptors it drops the small-variance axes in which close neighbours differ, and no
    refinement depth gets that back (docs/ann.md). A dimension that is not a multiple of
    16 is padded by a random rotation (``RR``) first, as PQ needs equal sub-vectors.

    Only candidates ``n`` vectors can train are proposed (:func:`trainable`): a collection
    too small for the smallest inverted file gets scalar-quantised codes scanned in full
    (``SQ8``, ``SQ4``), which train on per-dimension ranges alone."""
    padded = -(-dim // 16) * 16
    pre = f"RR{padded}," if padded != dim else ""
    nlist = ivf_lists(n)
    bases = [f"{pre}IVF{nlist},PQ{padded // per}x4fs" for per in (4, 8, 16)]
    return [b for b in bases if trainable(b, n, dim)] or ["SQ8", "SQ4"]


def trainable(factory: str, n: int, dim: int = 1) -> bool:
    """Whether ``n`` vectors are enough to train ``factory``: at least
    :data:`MIN_POINTS_PER_LIST` per inverted list and per PQ centroid (FAISS's k-means
    needs at least one point per centroid and warns below 39)."""
    parts = parse_factory(factory, dim)
    return n >= MIN_POINTS_PER_LIST * max(parts.nlist, parts.pq_centroids)


def _ann_plan(factory: str, n: int, dim: int, need: int, budget: int) -> IndexPlan:
    parts = parse_factory(factory, dim)
    flat_bytes = estimate_memory("Flat", n, dim)
    nprobe = default_nprobe(parts.nlist) if parts.nlist else None
    k_factor = DEFAULT_K_FACTOR if parts.refine_bytes else None
    ef_search = GRAPH_EF_SEARCH if parts.graph else None
    if parts.graph:
        refine = "a graph on 8-bit vectors: no float refinement fits"
    else:
        refine = f"refined on {parts.refine_label}" if parts.refine_bytes else "no refinement fits"
    reason = (
        f"{n:,} vectors x {dim}-d: exact search would need {_mb(flat_bytes)} and scan it all "
        f"per query; this plan needs about {_mb(need)} of the {_mb(budget)} budget "
        f"({refine}); trained on {train_sample_size(factory, n):,} vectors"
    )
    return IndexPlan(factory, nprobe=nprobe, ef_search=ef_search, k_factor=k_factor, reason=reason)


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest
    ``LISTS_PER_SQRT_N * sqrt(n)``, at least 64 and with at least 64 vectors per list on
    average."""
    target = LISTS_PER_SQRT_N * math.sqrt(max(n, 1))
    nlist = 2 ** round(math.log2(max(target, 1.0)))
    while nlist > 64 and n / nlist < 64:
        nlist //= 2
    return max(64, nlist)


def default_nprobe(nlist: int) -> int:
    """Lists visited per query: :data:`NPROBE_SHARE` of them (at least 8), so the IVF step
    keeps the true neighbours within reach of the refinement (128 of 1,024 at a million)."""
    return max(8, min(nlist, round(nlist * NPROBE_SHARE)))


def train_sample_size(factory: str, n: int) -> int:
    """How many of the ``n`` vectors training ``factory`` should use (0 = no training):
    :data:`TRAIN_POINTS_PER_LIST` per inverted list, within
    [:data:`MIN_TRAIN_SAMPLE`, :data:`MAX_TRAIN_SAMPLE`], never more than ``n``."""
    parts = parse_factory(factory)
    if not parts.trains:
        return 0
    want = max(MIN_TRAIN_SAMPLE, TRAIN_POINTS_PER_LIST * parts.nlist)
    return int(min(n, want, MAX_TRAIN_SAMPLE))


def _mb(nbytes: float) -> str:
    return f"{nbytes / MiB:,.0f} MiB" if nbytes < GiB else f"{nbytes / GiB:.2f} GiB"


# -- the byte model --------------------------------------------------------------------------
@dataclass
class FactoryParts:
    """What a factory string is made of, as far as memory and training are concerned."""

    dim_out: int  #: dimension the codes see (after a PCA/OPQ)
    fixed_bytes: float = 0.0  #: independent of n: matrices, centroids, codebooks
    code_bytes: float = 0.0  #: per vector, in the first stage
    per_vector_bytes: float = 0.0  #: per vector, beyond the code: ids, graph links
    nlist: int = 0
    refine_bytes: float = 0.0  #: per vector, refinement copy
    refine_label: str = ""
    trains: bool = False
    pq_centroids: int = 0  #: centroids of the largest PQ codebook k-means trains
    graph: bool = False  #: an HNSW graph (searched with efSearch)


_SPLIT = re.compile(r",(?![^()]*\))")


def parse_factory(factory: str, dim: int = 1) -> FactoryParts:
    """Split ``factory`` into the parts the byte model needs. Knows the components the
    planner and ``cbir bench ann`` use (PCA/PCAR/OPQ/RR, IVF, HNSW, Flat, PQ, SQ, RFlat,
    Refine(...)); anything else is a :class:`ValueError` rather than a wrong estimate."""
    parts = FactoryParts(dim_out=dim)
    tokens = [t.strip() for t in _SPLIT.split(factory) if t.strip()]
    for token in tokens:
        if not _apply_token(parts, token, dim):
            raise ValueError(f"cannot estimate the memory of {token!r} in {factory!r}")
    return parts


def _apply_token(p: FactoryParts, token: str, dim: int) -> bool:
    d = p.dim_out
    if m := re.fullmatch(r"(?:PCAR?W?|PCAW?R|RR)(\d+)|OPQ\d+_(\d+)", token):
        out = int(m.group(1) or m.group(2))
        p.fixed_bytes += (d * out + d) * 4
        p.dim_out, p.trains = out, True
    elif m := re.fullmatch(r"OPQ(\d+)", token):
        p.fixed_bytes += d * d * 4
        p.trains = True
    elif m := re.fullmatch(r"IVF(\d+)(?:_HNSW(\d+))?", token):
        p.nlist = int(m.group(1))
        links = int(m.group(2)) * 2 * 4 if m.group(2) else 0
        p.fixed_bytes += p.nlist * (d * 4 + links + 48)
        p.per_vector_bytes += 8  # the id stored beside each code in its list
        p.trains = True
    elif m := re.fullmatch(r"HNSW(\d+)(?:_(.+))?", token):
        p.per_vector_bytes += int(m.group(1)) * 2 * 4 * 1.05 + 16
        p.graph = True
        p.code_bytes += _code_bytes(m.group(2) or "Flat", d, p)
    elif m := re.fullmatch(r"RFlat|Refine\((.+)\)", token):
        inner = m.group(1) or "Flat"
        p.refine_bytes = _code_bytes(inner, dim, p)
        p.refine_label = "full float32 vectors" if inner == "Flat" else f"{inner} vectors"
    else:
        try:
            p.code_bytes += _code_bytes(token, d, p)
        except ValueError:
            return False
        if p.nlist and p.code_bytes:  # fast-scan lists are padded to blocks of 32 codes
            p.fixed_bytes += p.nlist * 16 * p.code_bytes if token.endswith("fs") else 0
    return True


def _code_bytes(token: str, d: int, p: FactoryParts) -> float:
    """Bytes per vector of a storage component; adds its codebooks to ``p.fixed_bytes``."""
    if token == "Flat":
        return 4.0 * d
    if m := re.fullmatch(r"SQ(4|6|8|fp16|bf16)", token):
        bits = {"4": 4, "6": 6, "8": 8, "fp16": 16, "bf16": 16}[m.group(1)]
        p.fixed_bytes += 2 * d * 4
        p.trains = p.trains or bits < 16
        return math.ceil(d * bits / 8)
    if m := re.fullmatch(r"PQ(\d+)(?:x(\d+))?(fs)?", token):
        sub, bits = int(m.group(1)), int(m.group(2) or 8)
        p.fixed_bytes += (1 << bits) * d * 4
        p.trains = True
        p.pq_centroids = max(p.pq_centroids, 1 << bits)
        return math.ceil(sub * bits / 8)
    raise ValueError(token)


def estimate_memory(factory: str, n: int, dim: int) -> int:
    """Bytes an index built from ``factory`` holds for ``n`` vectors of ``dim`` dimensions:
    codes, ids, graph links, refinement copy, matrices and codebooks, and the store's
    position-to-id array. A model, not a measurement: ``cbir bench ann`` prints both."""
    parts = parse_factory(factory, dim)
    per_vector = parts.code_bytes + parts.per_vector_bytes + parts.refine_bytes + ID_BYTES
    return int(math.ceil(parts.fixed_bytes + n * per_vector))
