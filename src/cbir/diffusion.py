"""Diffusion re-ranking on the k-NN graph of the database (Iscen et al., CVPR 2017).

"Efficient Diffusion on Region Manifolds" ranks database items by how strongly a query
diffuses to them along the manifold the database samples, rather than by direct
similarity, so an image reachable through a chain of close views ranks high even when
it looks little like the query itself. With global descriptors (one node per image):

1. Offline: affinity ``A_ij = max(x_i . x_j, 0) ** gamma`` between *reciprocal* k-NN
   (i in j's k-NN and j in i's), symmetric normalisation ``S = D^-1/2 A D^-1/2``.
2. Online: the query's ``k_q`` nearest database items give the sparse vector
   ``y_i = max(q . x_i, 0) ** gamma``; solve ``(I - alpha S) f = y`` with conjugate
   gradient (the matrix is symmetric positive definite for alpha < 1) and rank by ``f``.

gamma = 3 and alpha = 0.99 are the paper's values. The paper builds its graph with tens
of neighbours on collections of thousands of images; on small collections k must stay
below the number of images per object, hence the smaller defaults here.
Items the diffusion never reaches (f = 0) keep the order of their direct similarity,
after every reached item.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import cg

from cbir.defaults import DIFFUSION_K, DIFFUSION_KQ
from cbir.postprocess import knn

#: Defaults: gamma and alpha from Iscen et al. 2017; k and k_q sized for small collections.
DEFAULT_K = DIFFUSION_K
DEFAULT_KQ = DIFFUSION_KQ
DEFAULT_GAMMA = 3.0
DEFAULT_ALPHA = 0.99


def knn_affinity(
    database: np.ndarray, k: int = DEFAULT_K, gamma: float = DEFAULT_GAMMA, mutual: bool = True
) -> sparse.csr_matrix:
    """Sparse symmetric affinity of the database's k-NN graph (self-loops excluded).

    ``mutual=True`` keeps an edge only between reciprocal neighbours (the paper's
    choice: it drops hub edges); ``False`` keeps an edge if either end lists the other.
    """
    database = np.asarray(database, dtype=np.float32)
    n = len(database)
    if n == 0:
        return sparse.csr_matrix((0, 0))
    ids, scores = knn(database, database, min(k + 1, n))
    rows = np.repeat(np.arange(n), ids.shape[1])
    cols = ids.reshape(-1)
    vals = np.maximum(scores.reshape(-1).astype(np.float64), 0.0) ** gamma
    keep = (cols != rows) & (cols >= 0) & (vals > 0)
    # k nearest *other* items: drop the self entry, then cap each row at k
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    rank_in_row = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
    cap = rank_in_row < k
    a = sparse.csr_matrix((vals[cap], (rows[cap], cols[cap])), shape=(n, n))
    return a.minimum(a.T).tocsr() if mutual else a.maximum(a.T).tocsr()


def normalized_affinity(a: sparse.spmatrix) -> sparse.csr_matrix:
    """``D^-1/2 A D^-1/2`` (isolated nodes keep an empty row)."""
    deg = np.asarray(a.sum(axis=1)).reshape(-1)
    inv = np.zeros_like(deg)
    inv[deg > 0] = deg[deg > 0] ** -0.5
    d = sparse.diags(inv)
    return (d @ a @ d).tocsr()


@dataclass
class Diffusion:
    """A fitted diffusion: the database, its system matrix ``I - alpha S``, query settings."""

    database: np.ndarray
    system: sparse.csr_matrix
    kq: int = DEFAULT_KQ
    gamma: float = DEFAULT_GAMMA
    tol: float = 1e-6
    maxiter: int = 20

    @classmethod
    def fit(
        cls,
        database: np.ndarray,
        *,
        k: int = DEFAULT_K,
        kq: int = DEFAULT_KQ,
        gamma: float = DEFAULT_GAMMA,
        alpha: float = DEFAULT_ALPHA,
        mutual: bool = True,
        tol: float = 1e-6,
        maxiter: int = 20,
    ) -> Diffusion:
        """Build the database graph once; :meth:`scores` then serves any number of queries.

        ``maxiter = 20`` follows the paper's observation that a few tens of CG
        iterations suffice for ranking.
        """
        if not 0 < alpha < 1:
            raise ValueError(
                "diffusion alpha must be in (0, 1) for the system to be positive definite"
            )
        if k < 1 or kq < 1:
            raise ValueError("diffusion k and kq must be at least 1")
        database = np.ascontiguousarray(database, dtype=np.float32)
        s = normalized_affinity(knn_affinity(database, k, gamma, mutual))
        system = (sparse.identity(len(database), format="csr") - alpha * s).tocsr()
        return cls(database, system, kq=kq, gamma=gamma, tol=tol, maxiter=maxiter)

    def query_vectors(self, queries: np.ndarray) -> np.ndarray:
        """The sparse initial states ``y`` (Nq x Ndb, dense here: one row per query)."""
        ids, scores = knn(queries, self.database, self.kq)
        y = np.zeros((len(queries), len(self.database)), dtype=np.float64)
        np.put_along_axis(y, ids, np.maximum(scores.astype(np.float64), 0.0) ** self.gamma, axis=1)
        return y

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Diffusion scores ``f`` (Nq x Ndb): one conjugate-gradient solve per query."""
        y = self.query_vectors(np.asarray(queries, dtype=np.float32))
        out = np.zeros_like(y)
        for i, yi in enumerate(y):
            if not yi.any():
                continue
            out[i], _ = cg(self.system, yi, rtol=self.tol, maxiter=self.maxiter)
        return out

    def rank(self, queries: np.ndarray) -> np.ndarray:
        """Nq x Ndb database indices: by diffusion score, then direct similarity, then index."""
        queries = np.asarray(queries, dtype=np.float32)
        f = self.scores(queries)
        direct = queries @ self.database.T
        n = len(self.database)
        idx = np.arange(n)
        return (
            np.stack([np.lexsort((idx, -direct[i], -f[i])) for i in range(len(queries))])
            if len(queries)
            else np.zeros((0, n), np.int64)
        )


def diffusion_rank(
    queries: np.ndarray, database: np.ndarray, **options: float | int | bool
) -> np.ndarray:
    """One-shot :meth:`Diffusion.fit` + :meth:`Diffusion.rank`."""
    return Diffusion.fit(database, **options).rank(queries)  # type: ignore[arg-type]


__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_GAMMA",
    "DEFAULT_K",
    "DEFAULT_KQ",
    "Diffusion",
    "diffusion_rank",
    "knn_affinity",
    "normalized_affinity",
]
