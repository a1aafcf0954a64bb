"""Ranking primitives shared by every protocol: similarities in blocks, ranks of positives.

Ties are broken by database index (lower index first), i.e. exactly the order of
``np.argsort(-scores, kind="stable")``. Fixing the tie rule is what lets the blockwise
evaluation give bit-identical results to a full sort.

The blockwise path never materialises the N x N similarity matrix: it computes a block
of query rows, finds for each row only the items scoring at least as high as its
lowest-scoring positive (the only ones that can affect AP), and sorts those.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

#: Memory budget for one block of similarities, in bytes.
DEFAULT_BLOCK_BYTES = 256 * 1024 * 1024


def block_rows(n_db: int, itemsize: int = 4, budget: int = DEFAULT_BLOCK_BYTES) -> int:
    """How many query rows of similarities fit in ``budget`` bytes."""
    return max(1, min(4096, budget // max(1, n_db * itemsize)))


def similarity_blocks(
    queries: np.ndarray, database: np.ndarray, rows: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first query row, block of inner products) for row blocks of ``queries``."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    database = np.ascontiguousarray(database, dtype=np.float32)
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"incompatible shapes {queries.shape} and {database.shape}")
    rows = rows or block_rows(len(database), itemsize=8)  # the block is float64 first
    # float32 BLAS results depend on the block's shape (gemv for one row, syrk for A @ A.T)
    # and on a column's position, so duplicate vectors would not tie and blocks would not
    # match a full sort; float64 products are exact and the rounding to float32 erases the
    # summation-order differences.
    db_t = database.T.astype(np.float64)
    for start in range(0, len(queries), rows):
        yield start, (queries[start : start + rows].astype(np.float64) @ db_t).astype(np.float32)


def positive_ranks(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """1-based ranks (sorted) of ``positives`` in the descending order of ``scores``.

    Items scoring below every positive cannot change those ranks, so only the items at
    or above the lowest positive score are sorted. Set an item's score to ``-inf`` to
    remove it from the ranking (it then never precedes a positive).
    """
    positives = np.asarray(positives, dtype=np.int64)
    if positives.size == 0:
        return np.zeros(0, dtype=np.int64)
    lowest = scores[positives].min()
    cand = np.flatnonzero(scores >= lowest)
    order = cand[np.lexsort((cand, -scores[cand]))]
    return np.flatnonzero(np.isin(order, positives, assume_unique=True)) + 1


def block_positive_ranks(
    scores: np.ndarray, positives: list[np.ndarray], *, max_candidates: int = 1 << 22
) -> list[np.ndarray]:
    """:func:`positive_ranks` of every row of a block of scores at once (same results).

    Row ``r`` of ``scores`` is ranked and the ranks of ``positives[r]`` are returned. The
    Python loop over rows becomes a handful of array operations on the block: one
    comparison finds every row's candidates (items at or above its lowest positive),
    one ``lexsort`` orders them by (row, descending score, index), which is exactly the
    per-row order of :func:`full_ranking` restricted to the candidates. Rows are taken
    in slices holding at most ``max_candidates`` candidates, which bounds the memory.
    """
    scores = np.asarray(scores)
    b = scores.shape[0]
    if len(positives) != b:
        raise ValueError(f"{len(positives)} positive lists for {b} rows")
    counts = np.array([len(p) for p in positives], dtype=np.int64)
    flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in positives]) if b else None
    rows_of = np.repeat(np.arange(b), counts)
    lowest = np.full(b, np.inf, dtype=scores.dtype)
    has = counts > 0
    if flat is not None and flat.size:
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        lowest[has] = np.minimum.reduceat(scores[rows_of, flat], starts[has])
    is_pos = np.zeros(scores.shape, dtype=bool)
    if flat is not None and flat.size:
        is_pos[rows_of, flat] = True
    candidates = scores >= lowest[:, None]
    per_row = candidates.sum(axis=1)
    out: list[np.ndarray] = []
    r0 = 0
    while r0 < b:
        # as many rows as fit in the candidate budget (at least one)
        total = np.cumsum(per_row[r0:])
        r1 = r0 + max(1, int(np.searchsorted(total, max_candidates, side="right")))
        rows, cols = np.nonzero(candidates[r0:r1])
        order = np.lexsort((cols, -scores[r0:r1][rows, cols], rows))
        rows, cols = rows[order], cols[order]
        first = np.searchsorted(rows, np.arange(r1 - r0))
        rank = np.arange(len(rows)) - first[rows] + 1
        hit = is_pos[r0:r1][rows, cols]
        hit_rows, hit_ranks = rows[hit], rank[hit]
        bounds = np.searchsorted(hit_rows, np.arange(r1 - r0 + 1))
        out.extend(hit_ranks[bounds[i] : bounds[i + 1]] for i in range(r1 - r0))
        r0 = r1
    return out


def average_precision(ranks: np.ndarray, n_positives: int | None = None) -> float:
    """Finite-sum (non-interpolated) AP: mean over positives of precision at their rank.

    ``ranks`` are the sorted 1-based ranks of the positives that were retrieved; positives
    never retrieved count as precision 0 because the sum is divided by ``n_positives``.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    n = len(ranks) if n_positives is None else n_positives
    if n == 0:
        return 0.0
    return float(np.sum(np.arange(1, len(ranks) + 1) / ranks) / n)


def full_ranking(scores: np.ndarray) -> np.ndarray:
    """Database indices best first, ties by index: the reference a full sort gives."""
    return np.argsort(-scores, kind="stable")
