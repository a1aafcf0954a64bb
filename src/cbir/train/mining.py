"""Hard-negative mining (Radenovic, Tolias & Chum, TPAMI 2018, "Fine-tuning CNN image
retrieval with no human annotation", Sec. 3.3).

Before every epoch the *current* network describes a random pool of images; each query's
negatives are its nearest pool images whose class differs from the query's, keeping at
most one image per class so the negatives of a tuple show different things rather than
many views of one confusing class. Easy negatives give a zero loss with a margin-based
loss, so mining is what makes the gradient useful.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cbir.eval.ranking import similarity_blocks
from cbir.train.data import TrainData, TrainDataError

#: Describes images given their indices into a :class:`TrainData` (rows L2-normalised).
Embedder = Callable[[np.ndarray], np.ndarray]


def nearest_other_class(
    query_vecs: np.ndarray,
    query_labels: np.ndarray,
    pool_vecs: np.ndarray,
    pool_labels: np.ndarray,
    k: int,
) -> np.ndarray:
    """For each query, the pool positions of its ``k`` most similar images of other classes,
    at most one per class, most similar first (Q x k; -1 where fewer exist).

    Ties are broken by pool position, so the result is a pure function of the inputs.
    """
    query_labels = np.asarray(query_labels)
    pool_labels = np.asarray(pool_labels)
    if len(query_vecs) != len(query_labels) or len(pool_vecs) != len(pool_labels):
        raise ValueError("descriptors and labels disagree in length")
    if k < 1:
        raise ValueError("k must be at least 1")
    out = -np.ones((len(query_vecs), k), dtype=np.int64)
    if len(pool_vecs) == 0 or len(query_vecs) == 0:
        return out
    for start, sims in similarity_blocks(query_vecs, pool_vecs):
        order = np.argsort(-sims, axis=1, kind="stable")
        ranked_labels = pool_labels[order]
        for r in range(sims.shape[0]):
            q = start + r
            ok = ranked_labels[r] != query_labels[q]
            cand = order[r][ok]
            cand_labels = ranked_labels[r][ok]
            # first (= most similar) occurrence of each class, kept in rank order
            _, first = np.unique(cand_labels, return_index=True)
            picks = cand[np.sort(first)][:k]
            out[q, : len(picks)] = picks
    return out


@dataclass
class EpochTuples:
    """The training tuples of one epoch: query, positive and negatives (indices into the data)."""

    queries: np.ndarray  # Q
    positives: np.ndarray  # Q
    negatives: np.ndarray  # Q x K (-1 = none found)
    mean_negative_similarity: float

    def __len__(self) -> int:
        return len(self.queries)

    def images(self, rows: np.ndarray) -> list[int]:
        """The images of tuples ``rows`` in the order the loss reads them: for each tuple its
        query, its positive, then its negatives (only those found)."""
        out: list[int] = []
        for r in rows:
            out.extend([int(self.queries[r]), int(self.positives[r]), *(int(n) for n in self.negatives[r] if n >= 0)])
        return out


SAMPLINGS = ("image", "class")


def sample_queries(
    data: TrainData, n: int, rng: np.random.Generator, sampling: str = "image"
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random queries and a positive for each.

    ``sampling="image"`` draws query images uniformly (without replacement while
    possible), as Radenovic et al. do, so a class is trained on in proportion to its size.
    ``"class"`` draws a class uniformly (every class once before any twice), then one of its
    images: small classes, and domains made of small classes, are not crowded out by big ones.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}: choose from {list(SAMPLINGS)}")
    cands = data.query_candidates()
    if cands.size == 0:
        raise TrainDataError("no image has a positive: every class needs at least two images")
    if n <= 0:
        raise ValueError("the number of tuples must be positive")
    if sampling == "image":
        queries = rng.choice(cands, size=n, replace=n > cands.size)
    else:
        cand_labels = data.labels[cands]
        classes = np.unique(cand_labels)
        by_class = {int(c): cands[cand_labels == c] for c in classes}
        rounds = -(-n // len(classes))  # whole rounds over the classes, each round shuffled
        drawn = np.concatenate([rng.permutation(classes) for _ in range(rounds)])[:n]
        queries = np.array([rng.choice(by_class[int(c)]) for c in drawn], dtype=np.int64)
    positives = np.array([data.sample_positive(int(q), rng) for q in queries], dtype=np.int64)
    return queries.astype(np.int64), positives


def mine_epoch(
    data: TrainData,
    embed: Embedder,
    *,
    n_tuples: int,
    n_negatives: int,
    pool_size: int,
    rng: np.random.Generator,
    sampling: str = "image",
) -> EpochTuples:
    """Draw this epoch's queries and positives, describe them and a random pool with the
    current model (``embed``) and pick each query's hard negatives from the pool."""
    queries, positives = sample_queries(data, n_tuples, rng, sampling)
    pool = np.sort(rng.choice(len(data), size=min(pool_size, len(data)), replace=False))
    uq, q_inverse = np.unique(queries, return_inverse=True)
    need = np.union1d(uq, pool)
    vecs = np.asarray(embed(need), dtype=np.float32)
    row = np.full(len(data), -1, dtype=np.int64)
    row[need] = np.arange(len(need))
    picks = nearest_other_class(
        vecs[row[uq]], data.labels[uq], vecs[row[pool]], data.labels[pool], n_negatives
    )
    negatives = np.where(picks >= 0, pool[np.maximum(picks, 0)], -1)[q_inverse]
    qi, ki = np.nonzero(negatives >= 0)
    sims = np.sum(vecs[row[queries[qi]]] * vecs[row[negatives[qi, ki]]], axis=1)
    mean_sim = float(sims.mean()) if sims.size else float("nan")
    return EpochTuples(
        queries=queries, positives=positives, negatives=negatives, mean_negative_similarity=mean_sim
    )
