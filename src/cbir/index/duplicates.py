"""Near-duplicate groups: connected components of the "similarity >= T" graph.

Exact: every pair is compared (FAISS range search on a flat inner-product index, in
blocks of queries), so no duplicate pair is missed by an approximate index. The cost is
O(n^2 d) multiply-adds, a few seconds for tens of thousands of images on a CPU.
"""

from __future__ import annotations

import faiss
import numpy as np


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def duplicate_pairs(vectors: np.ndarray, threshold: float, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) of rows with inner product >= ``threshold``: (pairs n x 2, scores)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if n < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    flat = faiss.IndexFlatIP(d)
    flat.add(vectors)
    pairs, scores = [], []
    # range_search keeps results strictly greater than the radius; step just below T
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    for start in range(0, n, block):
        lims, dist, labels = flat.range_search(vectors[start : start + block], radius)
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims.astype(np.int64)))
        keep = labels > rows
        pairs.append(np.stack([rows[keep], labels[keep]], axis=1))
        scores.append(dist[keep])
    return np.concatenate(pairs).astype(np.int64), np.concatenate(scores).astype(np.float32)


def group_duplicates(vectors: np.ndarray, threshold: float) -> list[list[tuple[int, float]]]:
    """Groups of row indices whose similarity graph (edges: >= ``threshold``) is connected.

    Largest group first. In each group the first member is the one with most duplicate
    edges (its "centre", ties: lowest row); every member carries its similarity to that
    centre (1.0 for the centre itself), members ordered by it, best first. Through
    chains, a member can be below the threshold to the centre while above it to another.
    """
    pairs, _ = duplicate_pairs(vectors, threshold)
    if not len(pairs):
        return []
    uf = _UnionFind(len(vectors))
    for a, b in pairs:
        uf.union(int(a), int(b))
    degree = np.bincount(pairs.ravel(), minlength=len(vectors))
    members: dict[int, list[int]] = {}
    for i in np.unique(pairs.ravel()):
        members.setdefault(uf.find(int(i)), []).append(int(i))
    groups: list[list[tuple[int, float]]] = []
    for rows in members.values():
        centre = max(rows, key=lambda r: (degree[r], -r))
        sims = vectors[rows] @ vectors[centre]
        ranked = sorted(zip(rows, sims.tolist(), strict=True), key=lambda t: (t[0] != centre, -t[1], t[0]))
        groups.append([(r, 1.0 if r == centre else float(s)) for r, s in ranked])
    groups.sort(key=lambda g: (-len(g), g[0][0]))
    return groups
