"""Weight-space interpolation against forgetting (WiSE-FT: Wortsman et al., CVPR 2022).

Fine-tuning on a small training set moves the network towards that set's domains and
away from the rest: on gpr-mini, +10 points on characters but -5.7 on faces, which the
training data has nothing like. Averaging the weights of the off-the-shelf and the
fine-tuned network, ``(1 - a) * theta_0 + a * theta_1``, keeps most of the gain where the
training data is and most of the original quality elsewhere (the two networks share an
initialisation, so the path between them stays in a low-loss region).

``a`` is chosen on validation data (``alpha="auto"``); that is only meaningful when the
validation set contains domains the training set does not cover (``cbir train --holdout``),
otherwise forgetting is invisible to the choice and ``a = 1`` always looks best.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: Candidates of ``--interpolate auto``: fine enough to matter, few enough to validate.
AUTO_ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def interpolate_state(
    base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * base + alpha * tuned`` for every floating tensor; other entries (e.g.
    BatchNorm's batch counters) are taken from ``tuned``. ``alpha`` 0 and 1 return exact copies
    of the endpoints."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"interpolation weight must be in [0, 1], got {alpha}")
    if base.keys() != tuned.keys():
        missing = sorted(set(base) ^ set(tuned))[:5]
        raise ValueError(f"the two networks differ in their weights: {missing}")
    out = {}
    for k, t in tuned.items():
        b = base[k]
        if b.shape != t.shape:
            raise ValueError(f"{k}: shapes {tuple(b.shape)} and {tuple(t.shape)} differ")
        if not t.is_floating_point() or alpha == 1.0:
            out[k] = t.detach().clone()
        elif alpha == 0.0:
            out[k] = b.detach().clone().to(t.dtype)
        else:
            out[k] = torch.lerp(b.to(t.dtype), t, alpha).detach()
    return out


def parse_interpolate(value: str | float | None) -> float | str | None:
    """``None`` (no interpolation), ``"auto"`` or a weight in [0, 1] (from the CLI's text)."""
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "auto":
            return "auto"
        try:
            value = float(v)
        except ValueError:
            raise ValueError(f"--interpolate takes 'auto' or a weight in [0, 1], not {value!r}") from None
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--interpolate weight must be in [0, 1], got {value}")
    return value


def choose_alpha(
    score: Callable[[float], float | None], alphas: Sequence[float] = AUTO_ALPHAS
) -> tuple[float, dict[float, float]]:
    """The weight with the best ``score`` (validation mAP), ties to the larger weight (more of
    the fine-tuned network), and every candidate's score."""
    scores: dict[float, float] = {}
    for a in alphas:
        s = score(float(a))
        if s is None:
            raise ValueError("--interpolate auto needs validation data")
        scores[float(a)] = float(s)
    best = max(scores, key=lambda a: (scores[a], a))
    return best, scores
