"""The GPR1200 protocol (Schall et al. 2021) and labelled-collection metrics.

GPR1200: every image is a query against all images *including itself*; the positives
of a query are all images of its category (10 in GPR1200, the query among them); AP is
the finite sum over the full ranking; mAP is the mean over all queries; per-domain mAP
is the mean over the queries whose category lies in the domain's range; GPR1000 is the
mean of the non-face domains. This reproduces the official evaluation script's numbers
(which rounds to 4 decimals) on current NumPy, in bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cbir.eval.ranking import (
    average_precision,
    block_positive_ranks,
    full_ranking,
    positive_ranks,
    similarity_blocks,
)

FACE_DOMAINS = ("faces", "face")


@dataclass
class GPRResult:
    mAP: float
    domains: dict[str, float]
    aps: np.ndarray = field(repr=False)
    gpr1000: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mAP": self.mAP, **self.domains}
        if self.gpr1000 is not None:
            out["GPR1000"] = self.gpr1000
        return out


def _groups(labels: np.ndarray) -> dict[Any, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    uniq, starts = np.unique(labels[order], return_index=True)
    bounds = list(starts[1:]) + [len(labels)]
    return {u: np.sort(order[s:e]) for u, s, e in zip(uniq, starts, bounds, strict=True)}


def gpr_average_precisions(
    features: np.ndarray, labels: np.ndarray | list[int], *, block_rows: int | None = None
) -> np.ndarray:
    """AP of every image queried against all (itself included), computed in blocks."""
    feats = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    if len(feats) != len(labels):
        raise ValueError(f"{len(feats)} descriptors but {len(labels)} labels")
    members = _groups(labels)
    aps = np.zeros(len(feats), dtype=np.float64)
    for start, sims in similarity_blocks(feats, feats, block_rows):
        # ranks of a whole block at once (a partial sort: only the items at or above a
        # row's lowest positive are ordered); AP per row, as the full sort computes it
        pos = [members[labels[q]] for q in range(start, start + sims.shape[0])]
        for r, ranks in enumerate(block_positive_ranks(sims, pos)):
            aps[start + r] = average_precision(ranks, len(pos[r]))
    return aps


def gpr_average_precisions_full_sort(features: np.ndarray, labels: np.ndarray | list[int]) -> np.ndarray:
    """Reference implementation: a full argsort of every row (O(N^2) memory)."""
    feats = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    # the same similarities as the blocks (float64 products rounded to float32, see
    # similarity_blocks), so the two paths differ only in how they rank
    _, sims = next(similarity_blocks(feats, feats, len(feats)))
    aps = np.zeros(len(feats))
    for q in range(len(feats)):
        rel = labels[full_ranking(sims[q])] == labels[q]
        ranks = np.flatnonzero(rel) + 1
        aps[q] = average_precision(ranks, int(rel.sum()))
    return aps


def summarize_gpr(
    aps: np.ndarray, labels: np.ndarray | list[int], domains: dict[str, tuple[int, int]] | None
) -> GPRResult:
    """Overall, per-domain (category ranges, inclusive) and GPR1000 means of per-query APs."""
    labels = np.asarray(labels)
    per_domain: dict[str, float] = {}
    for name, (first, last) in (domains or {}).items():
        sel = (labels >= first) & (labels <= last)
        if sel.any():
            per_domain[name] = float(aps[sel].mean())
    non_face = [v for k, v in per_domain.items() if k.lower() not in FACE_DOMAINS]
    gpr1000 = float(np.mean(non_face)) if non_face and len(non_face) < len(per_domain) else None
    return GPRResult(mAP=float(aps.mean()), domains=per_domain, aps=aps, gpr1000=gpr1000)


def evaluate_gpr1200(
    features: np.ndarray,
    labels: np.ndarray | list[int],
    domains: dict[str, tuple[int, int]] | None = None,
    *,
    block_rows: int | None = None,
) -> GPRResult:
    """The GPR1200 protocol on descriptors whose rows follow ``labels``."""
    aps = gpr_average_precisions(features, labels, block_rows=block_rows)
    return summarize_gpr(aps, labels, domains)


@dataclass
class LabelledResult:
    mAP: float
    precision: dict[int, float]
    recall: dict[int, float]
    queries: int
    skipped: int

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mAP": self.mAP, "queries": self.queries, "skipped_no_positive": self.skipped}
        out.update({f"P@{k}": v for k, v in self.precision.items()})
        out.update({f"R@{k}": v for k, v in self.recall.items()})
        return out


def evaluate_labelled(
    features: np.ndarray,
    labels: np.ndarray | list[int],
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    block_rows: int | None = None,
) -> LabelledResult:
    """Leave-one-out retrieval on a labelled collection: the query is removed from its
    own ranking; queries whose class has no other image are skipped (and counted)."""
    feats = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    members = _groups(labels)
    aps: list[float] = []
    hits = {k: [] for k in ks}
    recalls = {k: [] for k in ks}
    skipped = 0
    for start, sims in similarity_blocks(feats, feats, block_rows):
        for r in range(sims.shape[0]):
            q = start + r
            pos = members[labels[q]]
            pos = pos[pos != q]
            if pos.size == 0:
                skipped += 1
                continue
            row = sims[r].copy()
            row[q] = -np.inf
            ranks = positive_ranks(row, pos)
            aps.append(average_precision(ranks, len(pos)))
            for k in ks:
                found = int(np.sum(ranks <= k))
                hits[k].append(found / k)
                recalls[k].append(found / len(pos))
    mean = lambda v: float(np.mean(v)) if v else 0.0  # noqa: E731
    return LabelledResult(
        mAP=mean(aps),
        precision={k: mean(hits[k]) for k in ks},
        recall={k: mean(recalls[k]) for k in ks},
        queries=len(aps),
        skipped=skipped,
    )
