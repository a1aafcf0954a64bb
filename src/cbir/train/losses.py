"""Losses on tuples (query, positive, K negatives) of L2-normalised descriptors.

- Contrastive (Hadsell et al. 2006, as used by Radenovic et al., TPAMI 2018):
  ``1/2 ||q - p||^2 + sum_n 1/2 max(0, margin - ||q - n||)^2``. Radenovic et al. use a
  margin of 0.7 to 0.85 depending on the network (0.7 in their ResNet/VGG GeM setting).
- Triplet / ranking loss (Gordo et al., IJCV 2017, "End-to-end learning of deep visual
  representations for image retrieval", margin 0.1):
  ``sum_n max(0, margin + ||q - p||^2 - ||q - n||^2)``.

Both return the mean over the tuples of a batch of the per-tuple sums.

- Feature distillation (against forgetting; the "feature-map" / embedding distillation of
  e.g. Wei et al. 2022, "Contrastive learning rivals masked image modeling in fine-tuning via
  feature distillation", in its simplest form): ``mean_i ||f(x_i) - f_0(x_i)||^2``, the
  squared distance between each training image's descriptor under the network being trained
  and under the frozen network it started from.
"""

from __future__ import annotations

import torch

#: Default margins: contrastive as Radenovic et al. 2018, triplet as Gordo et al. 2017.
DEFAULT_MARGINS = {"contrastive": 0.7, "triplet": 0.1}
LOSSES = tuple(DEFAULT_MARGINS)


def _check(
    q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    if (
        q.dim() != 2
        or p.shape != q.shape
        or n.dim() != 3
        or n.shape[0] != q.shape[0]
        or n.shape[2] != q.shape[1]
    ):
        raise ValueError(
            f"expected q, p: B x D and negatives: B x K x D, got {tuple(q.shape)}, "
            f"{tuple(p.shape)}, {tuple(n.shape)}"
        )
    if mask is None:
        return torch.ones(n.shape[:2], dtype=q.dtype, device=q.device)
    return mask.to(q.dtype)


def contrastive_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor,
    margin: float = DEFAULT_MARGINS["contrastive"],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contrastive loss; ``mask`` (B x K) marks which negatives exist."""
    m = _check(q, p, n, mask)
    pos = 0.5 * (q - p).pow(2).sum(dim=1)
    dist_n = (q.unsqueeze(1) - n).pow(2).sum(dim=2).clamp(min=1e-12).sqrt()
    neg = 0.5 * (margin - dist_n).clamp(min=0).pow(2)
    return (pos + (neg * m).sum(dim=1)).mean()


def triplet_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor,
    margin: float = DEFAULT_MARGINS["triplet"],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triplet (ranking) loss with squared distances; ``mask`` (B x K) marks real negatives."""
    m = _check(q, p, n, mask)
    d_pos = (q - p).pow(2).sum(dim=1, keepdim=True)
    d_neg = (q.unsqueeze(1) - n).pow(2).sum(dim=2)
    return ((margin + d_pos - d_neg).clamp(min=0) * m).sum(dim=1).mean()


def unpack_tuples(vecs: torch.Tensor, found: list[int], k: int) -> tuple[torch.Tensor, ...]:
    """Descriptors laid out as :meth:`cbir.train.mining.EpochTuples.images` gives them (per
    tuple: query, positive, ``found[t]`` negatives) -> q, p (B x D), negatives (B x K x D) and
    the mask of real negatives (B x K); missing negatives are the query, masked out."""
    qs, ps, ns, masks = [], [], [], []
    pos = 0
    for n_valid in found:
        qs.append(vecs[pos])
        ps.append(vecs[pos + 1])
        neg = vecs[pos + 2 : pos + 2 + n_valid]
        if n_valid < k:
            neg = torch.cat([neg, vecs[pos : pos + 1].expand(k - n_valid, -1)])
        ns.append(neg)
        masks.append(torch.arange(k, device=vecs.device) < n_valid)
        pos += 2 + n_valid
    return torch.stack(qs), torch.stack(ps), torch.stack(ns), torch.stack(masks)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over images of the squared L2 distance between two N x D descriptor batches."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"expected two N x D batches, got {tuple(student.shape)}, {tuple(teacher.shape)}")
    return (student - teacher.detach()).pow(2).sum(dim=1).mean()


def tuple_loss(name: str, margin: float | None = None):
    """The loss function called ``name`` with its margin bound (default margin if None)."""
    if name not in DEFAULT_MARGINS:
        raise ValueError(f"unknown loss {name!r}: choose from {list(LOSSES)}")
    m = DEFAULT_MARGINS[name] if margin is None else float(margin)
    if m < 0:
        raise ValueError("margin must be non-negative")
    fn = contrastive_loss if name == "contrastive" else triplet_loss

    def loss(
        q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return fn(q, p, n, m, mask)

    return loss
