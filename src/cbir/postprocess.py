"""Descriptor post-processing on the nearest-neighbour graph: alpha-QE and alpha-DBA.

Both come from Radenovic et al. 2018 (TPAMI), Sec. 5: the new vector is the query (or
database vector) plus its top-k neighbours weighted by ``similarity ** alpha``, then
L2-normalised. alpha = 0 is plain average QE (Chum et al. 2007) / DBA (Arandjelovic &
Zisserman 2012); larger alpha trusts close neighbours more.
"""

from __future__ import annotations

import numpy as np


def _l2n(x: np.ndarray) -> np.ndarray:
    return (x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)).astype(np.float32)


def weighted_neighbour_sum(
    vectors: np.ndarray,
    neighbour_ids: np.ndarray,
    neighbour_scores: np.ndarray,
    database: np.ndarray,
    k: int,
    alpha: float,
    *,
    include_self: bool = True,
) -> np.ndarray:
    """``l2n(v + sum_{i<k} max(s_i, 0)^alpha * x_{n_i})`` for every row.

    ``neighbour_ids``/``neighbour_scores`` are each row's ranking (best first; ``-1``
    ids, as FAISS returns for missing results, are ignored). With
    ``include_self=False`` the row's own vector is not added (use it when the row's own
    vector already is the first neighbour, as in DBA over the database itself).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if k <= 0:
        return _l2n(vectors)
    ids = np.asarray(neighbour_ids)[:, :k]
    scores = np.asarray(neighbour_scores, dtype=np.float32)[:, :k]
    valid = ids >= 0
    weights = np.where(valid, np.maximum(scores, 0.0) ** alpha if alpha != 0 else 1.0, 0.0).astype(np.float32)
    gathered = np.asarray(database, dtype=np.float32)[np.where(valid, ids, 0)]  # n x k x d
    out = np.einsum("nk,nkd->nd", weights, gathered)
    if include_self:
        out += vectors
    return _l2n(out)


def alpha_qe(
    queries: np.ndarray,
    database: np.ndarray,
    neighbour_ids: np.ndarray,
    neighbour_scores: np.ndarray,
    k: int = 2,
    alpha: float = 3.0,
) -> np.ndarray:
    """alpha-weighted query expansion: queries re-formed from their top-k results."""
    return weighted_neighbour_sum(queries, neighbour_ids, neighbour_scores, database, k, alpha, include_self=True)


def alpha_dba(database: np.ndarray, k: int = 2, alpha: float = 3.0, block: int = 4096) -> np.ndarray:
    """alpha-weighted database-side augmentation: every database vector is replaced by
    itself plus its k nearest *other* database vectors (exact search, blockwise)."""
    database = np.asarray(database, dtype=np.float32)
    n = len(database)
    if k <= 0 or n == 0:
        return database.copy()
    kk = min(k + 1, n)
    ids = np.zeros((n, kk), dtype=np.int64)
    scores = np.zeros((n, kk), dtype=np.float32)
    for start in range(0, n, block):
        sims = database[start : start + block] @ database.T
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        top_scores = np.take_along_axis(sims, top, axis=1)
        order = np.lexsort((top, -top_scores), axis=1)
        ids[start : start + block] = np.take_along_axis(top, order, axis=1)
        scores[start : start + block] = np.take_along_axis(top_scores, order, axis=1)
    # drop each row's own entry wherever it landed, keep the k best others
    own = ids == np.arange(n)[:, None]
    ids = np.where(own, -1, ids)
    order = np.argsort(own, axis=1, kind="stable")  # own entry last
    ids = np.take_along_axis(ids, order, axis=1)[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)[:, :k]
    return weighted_neighbour_sum(database, ids, scores, database, k, alpha, include_self=True)


def knn(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product k-NN with FAISS: (ids, scores), each Nq x min(k, Ndb), best first."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    database = np.ascontiguousarray(database, dtype=np.float32)
    k = min(int(k), len(database))
    if k <= 0 or len(queries) == 0:
        return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
    scores, ids = faiss.knn(queries, database, k, metric=faiss.METRIC_INNER_PRODUCT)
    return ids.astype(np.int64), scores.astype(np.float32)


def expand_queries(
    queries: np.ndarray, database: np.ndarray, k: int = 2, alpha: float = 3.0
) -> np.ndarray:
    """alpha-QE in one call: search the database, then re-form each query from its top k."""
    if k <= 0:
        return _l2n(np.asarray(queries, dtype=np.float32))
    ids, scores = knn(queries, database, k)
    return alpha_qe(queries, database, ids, scores, k=k, alpha=alpha)
