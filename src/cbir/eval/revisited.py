"""The revisited Oxford/Paris evaluation protocol (Radenovic et al., CVPR 2018).

Written from the published definition (the paper and the revisitop ``compute_map``):

- **Easy**: positives = easy; ignored = junk + hard.
- **Medium**: positives = easy + hard; ignored = junk.
- **Hard**: positives = hard; ignored = junk + easy.
- The original Oxford/Paris protocol (ground truth ``ok``/``junk``): positives = ok,
  ignored = junk.

Ignored images are removed from the ranking (the images behind them move up). AP is
the interpolated (trapezoid) AP: each positive adds ``1/npos`` of recall with the mean of
the precision just before it (at rank i-1, 1 at rank 0) and at it. mP@k is precision at
k with k capped at the rank of the last retrieved positive (so a query with one
positive at rank 2 gets mP@10 = 1/2, not 1/10). Queries with no positive in a setting
are left out of that setting's means and counted. A ranking may be shorter than the
database: positives it does not contain count as never retrieved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: The three settings of the revisited protocol.
SETTINGS = ("easy", "medium", "hard")
#: The k of mP@k reported by the revisited papers.
KAPPAS = (1, 5, 10)


def _ints(values: Any) -> np.ndarray:
    return np.unique(np.asarray(values if values is not None else [], dtype=np.int64).reshape(-1))


def setting_gnd(gnd: Mapping[str, Any], setting: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, ignored) database indices of one query under ``setting``.

    ``setting`` is ``easy``, ``medium`` or ``hard`` for revisited ground truth
    (``easy``/``hard``/``junk``), ``original`` for the original one (``ok``/``junk``).
    """
    junk = _ints(gnd.get("junk"))
    if setting == "original":
        if "ok" not in gnd:
            raise ValueError("the original protocol needs 'ok' positives in the ground truth")
        return _ints(gnd["ok"]), junk
    if "easy" not in gnd and "hard" not in gnd:
        raise ValueError("the revisited protocol needs 'easy'/'hard' positives in the ground truth")
    easy, hard = _ints(gnd.get("easy")), _ints(gnd.get("hard"))
    if setting == "easy":
        return easy, np.union1d(junk, hard)
    if setting == "medium":
        return np.union1d(easy, hard), junk
    if setting == "hard":
        return hard, np.union1d(junk, easy)
    raise ValueError(f"unknown setting {setting!r}: use easy, medium, hard or original")


def positive_positions(
    ranking: np.ndarray, positives: np.ndarray, ignored: np.ndarray
) -> np.ndarray:
    """0-based positions of the retrieved positives once ignored images are removed.

    ``ranking`` is database indices best first, possibly truncated; negative entries
    (padding, as FAISS returns for missing results) are dropped.
    """
    ranking = np.asarray(ranking, dtype=np.int64).reshape(-1)
    ranking = ranking[ranking >= 0]
    pos = np.flatnonzero(np.isin(ranking, positives))
    ign = np.flatnonzero(np.isin(ranking, ignored))
    # a positive moves up by the number of ignored images ranked strictly before it
    return pos - np.searchsorted(ign, pos, side="left")


def interpolated_ap(positions: np.ndarray, n_positives: int) -> float:
    """Trapezoid AP from the sorted 0-based positions of the retrieved positives.

    Positive j (0-based) at position r adds recall ``1/n_positives`` times the mean of
    the precision before it, ``j / r`` (1 when r = 0), and at it, ``(j + 1) / (r + 1)``.
    """
    if n_positives <= 0:
        raise ValueError("AP is undefined without positives")
    r = np.asarray(positions, dtype=np.float64)
    if r.size == 0:
        return 0.0
    j = np.arange(r.size, dtype=np.float64)
    before = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
    at = (j + 1.0) / (r + 1.0)
    return float(np.sum((before + at) / 2.0) / n_positives)


def precision_at_k(positions: np.ndarray, kappas: Sequence[int] = KAPPAS) -> np.ndarray:
    """mP@k of one query: k capped at the (1-based) rank of the last retrieved positive.

    No positive retrieved at all gives 0 for every k.
    """
    ranks = np.asarray(positions, dtype=np.int64) + 1
    out = np.zeros(len(kappas), dtype=np.float64)
    if ranks.size == 0:
        return out
    last = int(ranks.max())
    for i, k in enumerate(kappas):
        kq = min(last, int(k))
        out[i] = np.count_nonzero(ranks <= kq) / kq
    return out


@dataclass
class SettingResult:
    """One setting's scores (fractions in [0, 1]; NaN per query without positives)."""

    setting: str
    mAP: float
    mP: dict[int, float]
    aps: np.ndarray
    prs: np.ndarray  # Nq x len(kappas)
    evaluated: int
    without_positives: int

    def to_dict(self, percent: bool = True) -> dict[str, Any]:
        scale = 100.0 if percent else 1.0
        return {
            "mAP": self.mAP * scale,
            "mP@k": {str(k): v * scale for k, v in self.mP.items()},
            "queries": self.evaluated,
            "queries_without_positives": self.without_positives,
            "ap": [None if np.isnan(a) else float(a) * scale for a in self.aps],
        }


@dataclass
class RevisitedResult:
    """Scores of every setting, keyed ``easy``/``medium``/``hard`` (or ``original``)."""

    settings: dict[str, SettingResult]
    kappas: tuple[int, ...] = KAPPAS
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, setting: str) -> SettingResult:
        return self.settings[setting]

    def to_dict(self) -> dict[str, Any]:
        """Percent figures, as the revisited papers print them."""
        return {
            "unit": "percent",
            **{name: s.to_dict() for name, s in self.settings.items()},
            **self.meta,
        }


def evaluate_setting(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    setting: str,
    kappas: Sequence[int] = KAPPAS,
) -> SettingResult:
    """Score ``ranks`` (Nq x K database indices, best first) under one setting."""
    ranks = _check_ranks(ranks, len(gnd))
    aps = np.full(len(gnd), np.nan)
    prs = np.full((len(gnd), len(kappas)), np.nan)
    for i, g in enumerate(gnd):
        positives, ignored = setting_gnd(g, setting)
        if positives.size == 0:
            continue
        pos = positive_positions(ranks[i], positives, ignored)
        aps[i] = interpolated_ap(pos, positives.size)
        prs[i] = precision_at_k(pos, kappas)
    valid = ~np.isnan(aps)
    n = int(valid.sum())
    m_ap = float(aps[valid].mean()) if n else float("nan")
    m_p = {
        int(k): (float(prs[valid, j].mean()) if n else float("nan")) for j, k in enumerate(kappas)
    }
    return SettingResult(setting, m_ap, m_p, aps, prs, n, len(gnd) - n)


def evaluate_revisited(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    settings: Sequence[str] | None = None,
    kappas: Sequence[int] = KAPPAS,
) -> RevisitedResult:
    """Score a ranking under every setting of its ground truth.

    ``settings`` defaults to easy/medium/hard for revisited ground truth and to
    ``original`` when the ground truth has ``ok`` lists.
    """
    if settings is None:
        settings = ("original",) if gnd and "ok" in gnd[0] else SETTINGS
    out = {s: evaluate_setting(ranks, gnd, s, kappas) for s in settings}
    return RevisitedResult(out, tuple(int(k) for k in kappas))


def _check_ranks(ranks: np.ndarray, n_queries: int) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(
            f"ranks must be an Nq x K array of database indices, got shape {ranks.shape}"
        )
    if not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be integers (database indices), got {ranks.dtype}")
    if ranks.shape[0] != n_queries:
        raise ValueError(
            f"{ranks.shape[0]} ranking rows but {n_queries} queries in the ground truth"
        )
    return ranks


def rank_database(scores: np.ndarray, top: int | None = None) -> np.ndarray:
    """Nq x Ndb (or Nq x top) database indices by decreasing score, ties by lower index."""
    scores = np.asarray(scores)
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :top] if top is not None else order


__all__ = [
    "KAPPAS",
    "SETTINGS",
    "RevisitedResult",
    "SettingResult",
    "evaluate_revisited",
    "evaluate_setting",
    "interpolated_ap",
    "positive_positions",
    "precision_at_k",
    "rank_database",
    "setting_gnd",
]
