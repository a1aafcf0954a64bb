"""Near-duplicate groups a user can act on: star groups around greedily chosen centres.

**Why stars, not connected components.** "Similarity >= T" is not transitive: A~B and B~C
says nothing about A and C. Grouping by connected components (union-find) chains
through such links, so a group could hold two images far below T of each other, and a
user who keeps one file per group would delete images that are not copies of it. Here
every member of a group is within T of the group's *first member* (its centre), the
one file the user compares the others against.

**Why centres by neighbour count.** Choosing the fewest centres that cover every
duplicate is set cover (NP-hard); the greedy rule "next centre = the image with the most
not-yet-grouped neighbours" is its classic approximation (within a log factor of the
optimum). It also tends to pick the typical copy of a cluster (the one most others
resemble) rather than an outlier, so fewer images are left in small leftover groups.
Counts are kept current lazily (a heap re-checked on pop); ties go to the lower id, so
the result is deterministic.

**Searched through the index, not a matrix.** Pairs come from the index's own k-nearest
neighbour search, one block of queries at a time, so memory and time grow with n k
rather than n^2 (1M images: no 10^12-entry matrix). A query whose k-th neighbour is
still a candidate is searched again with a larger k, so a large group is not cut at k.
Candidate scores from the store may be approximate (a compressed or DBA-augmented
index); every candidate within ``slack`` of T is therefore rescored exactly on the raw
descriptors before it counts. With an approximate (IVF/HNSW) index a pair the index
does not return is missed: the recall of the index's search applies.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np

# Cosine similarity at or above which two images are near duplicates, for the default
# descriptor (efficientnet-lite0, GeM). Calibrated by bench/duplicates.py on pairs made from
# train-pool (never gpr-mini); the figures and the command: docs/benchmarks/2026-12-03-duplicates.md.
# bench/duplicates_calibration.json records the run this value comes from (a test checks they agree).
DEFAULT_THRESHOLD = 0.8778
# --verify (:class:`Verification`): calibrated in the same run, recorded in the same file.
VERIFY_MIN_INLIERS = 10
VERIFY_FLOOR = 0.4
VERIFY_K = 10

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""(queries m x d, k) -> (scores m x k, ids m x k), best first; id -1 where there is none."""
FetchFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""ids (ascending) -> (ids found, in the same order, and their raw descriptors): ids no longer present are left out."""


@dataclass(frozen=True)
class PairSearch:
    """How candidate pairs are looked up: start with ``k`` neighbours per query, grow
    up to ``max_k`` for a query whose k-th neighbour is still a candidate; ``slack`` is
    how far below T a store's (possibly approximate) score may be and still be rescored."""

    k: int = 32
    max_k: int = 4096
    slack: float = 0.05
    block: int = 1024


def duplicate_pairs(
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    search: SearchFn,
    fetch: FetchFn,
    threshold: float,
    how: PairSearch = PairSearch(),
) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (a < b, by id) with raw cosine >= ``threshold``: (pairs n x 2, scores).

    ``blocks`` yields (ids, raw descriptors) of the queries, a block at a time; ``search``
    is the index's kNN search and ``fetch`` reads raw descriptors by id (for rescoring).
    """
    pairs: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    floor = threshold - how.slack
    for ids, vectors in blocks:
        if not len(ids):
            continue
        cand = _candidates(np.ascontiguousarray(vectors, np.float32), search, floor, how)
        qrow = np.repeat(np.arange(len(ids)), [len(c) for c in cand])
        other = np.concatenate(cand) if cand else np.zeros(0, np.int64)
        keep = other != ids[qrow]  # not the query itself; a pair found from both sides is merged below
        qrow, other = qrow[keep], other[keep]
        if not len(other):
            continue
        uniq, inverse = np.unique(other, return_inverse=True)
        found, raw = fetch(uniq)  # in the order asked, ids no longer present left out
        if not len(found):
            continue
        pos = np.minimum(np.searchsorted(found, uniq), len(found) - 1)
        at = np.where(found[pos] == uniq, pos, -1)[inverse]
        present = at >= 0
        qrow, other, at = qrow[present], other[present], at[present]
        sims = _rescore(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(raw, np.float32), qrow, at)
        hit = sims >= threshold
        a, b = ids[qrow][hit], other[hit]  # an approximate index may return a pair from one side only
        pairs.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
        scores.append(sims[hit])
    if not pairs:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    p, s = np.concatenate(pairs).astype(np.int64), np.concatenate(scores).astype(np.float32)
    order = np.lexsort((p[:, 1], p[:, 0]))
    p, s = p[order], s[order]
    first = np.ones(len(p), bool)  # a pair found from both sides once
    first[1:] = np.any(p[1:] != p[:-1], axis=1)
    return p[first], s[first]


def _rescore(queries: np.ndarray, raw: np.ndarray, qrow: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Exact cosine of each (queries[qrow], raw[at]): a matrix product per slice of queries
    (BLAS, at most ~16M scores at a time) rather than gathering one row copy per pair.
    ``qrow`` is ascending (pairs come query by query)."""
    sims = np.empty(len(qrow), np.float32)
    step = max(1, (1 << 24) // max(1, len(raw)))
    for start in range(0, len(queries), step):
        lo, hi = np.searchsorted(qrow, [start, start + step])
        if hi > lo:
            product = queries[start : start + step] @ raw.T
            sims[lo:hi] = product[qrow[lo:hi] - start, at[lo:hi]]
    return sims


def _candidates(queries: np.ndarray, search: SearchFn, floor: float, how: PairSearch) -> list[np.ndarray]:
    """For each query, the ids the store scores at >= ``floor``, growing k where needed."""
    out: list[np.ndarray] = [np.zeros(0, np.int64)] * len(queries)
    todo = np.arange(len(queries))
    k = how.k
    while len(todo):
        s, ids = search(queries[todo], k)
        ok = (ids >= 0) & (s >= floor)
        for r, q in enumerate(todo):
            out[q] = ids[r][ok[r]].astype(np.int64)
        full = ok.all(axis=1) & (ids.shape[1] == k)  # all k are candidates: there may be more
        if k >= how.max_k:
            break
        todo, k = todo[full], min(k * 4, how.max_k)
    return out


def star_groups(pairs: np.ndarray, scores: np.ndarray) -> list[list[tuple[int, float]]]:
    """Star groups from duplicate pairs: [(id, similarity to the centre)], centre first (1.0),
    the rest by similarity, best first; largest group first. See the module docstring."""
    nbrs: dict[int, dict[int, float]] = {}
    for (a, b), s in zip(pairs.tolist(), scores.tolist(), strict=True):
        nbrs.setdefault(a, {})[b] = s
        nbrs.setdefault(b, {})[a] = s
    heap = [(-len(v), i) for i, v in nbrs.items()]
    heapq.heapify(heap)
    grouped: set[int] = set()
    groups: list[list[tuple[int, float]]] = []
    while heap:
        neg, i = heapq.heappop(heap)
        if i in grouped:
            continue
        free = [(j, s) for j, s in nbrs[i].items() if j not in grouped]
        if not free:
            continue
        if len(free) < -neg:  # its count went down since it was pushed: re-queue
            heapq.heappush(heap, (-len(free), i))
            continue
        free.sort(key=lambda t: (-t[1], t[0]))
        groups.append([(i, 1.0), *free])
        grouped.add(i)
        grouped.update(j for j, _ in free)
    groups.sort(key=lambda g: (-len(g), g[0][0]))
    return groups


@dataclass(frozen=True)
class Verification:
    """Geometric verification settings of ``cbir duplicates --verify`` (calibrated with the
    threshold, see :data:`DEFAULT_THRESHOLD`): a pair below the threshold still counts when it
    is among the first image's ``k`` nearest neighbours, its cosine is at least ``floor``,
    and local features matched between the two files give at least ``min_inliers`` RANSAC
    inliers (cbir.verify). The threshold alone misses copies that a global descriptor sees
    as merely similar (a small, recompressed or cropped copy, median cosine ~0.87 on the
    benchmark) while same-class distinct images reach 0.8 too; geometry tells them apart."""

    min_inliers: int = VERIFY_MIN_INLIERS
    floor: float = VERIFY_FLOOR
    k: int = VERIFY_K


PairCheck = Callable[[np.ndarray], np.ndarray]
"""pairs (n x 2 ids) -> boolean mask of the pairs that pass a check (e.g. geometric verification)."""


def verified_pairs(
    blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    search: SearchFn,
    fetch: FetchFn,
    threshold: float,
    check: PairCheck,
    verification: Verification = Verification(),
    how: PairSearch = PairSearch(),
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs at >= ``threshold`` (as :func:`duplicate_pairs`), plus pairs between
    ``verification.floor`` and the threshold among each image's ``k`` nearest neighbours
    that pass ``check``. ``blocks`` is called once per pass (the queries are read twice)."""
    sure, sure_s = duplicate_pairs(blocks(), search, fetch, threshold, how)
    near = PairSearch(k=verification.k, max_k=verification.k, slack=how.slack, block=how.block)
    cand, cand_s = duplicate_pairs(blocks(), search, fetch, verification.floor, near)
    below = cand_s < threshold
    cand, cand_s = cand[below], cand_s[below]
    ok = check(cand) if len(cand) else np.zeros(0, bool)
    pairs = np.concatenate([sure, cand[ok]])
    scores = np.concatenate([sure_s, cand_s[ok]])
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    return pairs[order], scores[order]


def array_blocks(vectors: np.ndarray, block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row numbers, rows) of an in-memory matrix, ``block`` rows at a time."""
    for start in range(0, len(vectors), block):
        yield np.arange(start, min(start + block, len(vectors))), vectors[start : start + block]


def group_duplicates(
    vectors: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    how: PairSearch = PairSearch(),
    check: PairCheck | None = None,
    verification: Verification = Verification(),
) -> list[list[tuple[int, float]]]:
    """Star groups of the rows of an in-memory matrix of L2-normalised descriptors
    (exact search on a flat inner-product index): [(row, similarity to the centre)].
    With ``check`` (pairs of rows -> mask), pairs below the threshold may join as in
    :func:`verified_pairs`."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) < 2:
        return []
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)

    def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s, i = flat.search(q, min(k, len(vectors)))
        return s, i.astype(np.int64)

    def fetch(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return ids, vectors[ids]

    if check is None:
        pairs, scores = duplicate_pairs(array_blocks(vectors, how.block), search, fetch, threshold, how)
    else:
        pairs, scores = verified_pairs(
            lambda: array_blocks(vectors, how.block), search, fetch, threshold, check, verification, how
        )
    return star_groups(pairs, scores)
