"""Whitening: a learned affine map (shift + projection) applied to L2-normalised descriptors.

Two ways to learn it, both in float64 NumPy on descriptors of a *separate* set of
images (never the evaluation set):

- :func:`fit_pca_whitening`: PCA of the descriptors, eigenvalues raised to ``-power/2``
  (power 1 = full whitening, 0.5 = square-root, 0 = rotation only), truncated to ``dim``
  (Jegou & Chum 2012; the PCA shift + projection of Gordo et al. 2016).
- :func:`fit_learned_whitening`: Radenovic et al. 2018's Lw: whiten by the covariance of
  matching-pair differences, then rotate by PCA of the whitened data.

Either way the result is a :class:`Whitening` module: ``l2n(P (x - m))``, which exports
to ONNX and is saved inside descriptor files.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from cbir.models.pooling import l2n


class Whitening(nn.Module):
    """``x -> l2n((x - mean) @ projection.T)``."""

    def __init__(
        self, mean: np.ndarray | torch.Tensor, projection: np.ndarray | torch.Tensor, meta: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(-1))
        self.register_buffer("projection", torch.as_tensor(np.asarray(projection), dtype=torch.float32))
        if self.projection.shape[1] != self.mean.shape[0]:
            raise ValueError("projection and mean disagree on the input dimension")
        self.meta = dict(meta or {})

    def set_learnable(self, learnable: bool = True) -> Whitening:
        """Make the shift and projection trainable parameters (or fixed buffers again).

        Gordo et al. (2017) train R-MAC's region PCA-whitening end to end as a shift and a
        fully connected layer. Either way the tensors keep their names, so a state dict
        saved from one loads into the other.
        """
        for name in ("mean", "projection"):
            t = getattr(self, name).detach().clone()
            self._buffers.pop(name, None)
            self._parameters.pop(name, None)
            if learnable:
                self.register_parameter(name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)
        return self

    @property
    def in_dim(self) -> int:
        return int(self.projection.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.projection.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2n((x - self.mean) @ self.projection.T)

    def apply_numpy(self, x: np.ndarray) -> np.ndarray:
        """Whiten a float matrix of descriptors (N x D) without going through torch."""
        y = (np.asarray(x, dtype=np.float64) - self.mean.double().numpy()) @ self.projection.double().numpy().T
        y /= np.linalg.norm(y, axis=1, keepdims=True) + 1e-6
        return y.astype(np.float32)

    def spec(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, **self.meta}

    def state(self) -> dict[str, Any]:
        """A self-contained dict (tensors + meta) for descriptor and whitening files."""
        return {
            "mean": self.mean.detach().cpu().clone(),
            "projection": self.projection.detach().cpu().clone(),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Whitening:
        return cls(state["mean"], state["projection"], state.get("meta"))

    def save(self, path: str) -> None:
        from cbir.fileio import atomic_torch_save

        atomic_torch_save({"format": "cbir-whitening", "version": 1, **self.state()}, path)

    @classmethod
    def load(cls, path: str) -> Whitening:
        """Read a file written by :meth:`save`; anything else is a ValueError naming it."""
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # torch raises KeyError, UnpicklingError, ... on junk
            raise ValueError(f"{path} is not a readable cbir whitening file: {exc!r}") from exc
        if not isinstance(obj, dict) or obj.get("format") != "cbir-whitening":
            raise ValueError(f"{path} is not a cbir whitening file")
        return cls.from_state(obj)


def _sym_eig_desc(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vals, vecs = np.linalg.eigh((c + c.T) / 2)
    order = np.argsort(vals)[::-1]
    return vals[order], vecs[:, order]


def fit_pca_whitening(
    x: np.ndarray,
    *,
    dim: int | None = None,
    power: float = 1.0,
    eps: float = 1e-6,
    source: str = "",
) -> Whitening:
    """PCA-whitening learned on descriptors ``x`` (N x D, rows = images).

    Eigenvalues below ``eps`` times the largest are floored there, so directions the
    learning set never varied in are not blown up into noise.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError("need at least two descriptors to learn whitening")
    n, d = x.shape
    dim = min(dim or d, d)
    if dim > n - 1:
        dim_eff = max(1, n - 1)
    else:
        dim_eff = dim
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / max(n - 1, 1)
    vals, vecs = _sym_eig_desc(cov)
    vals = np.maximum(vals, eps * max(vals[0], eps))
    scale = vals[:dim_eff] ** (-power / 2.0)
    projection = (vecs[:, :dim_eff] * scale).T
    meta = {"kind": "pca", "dim": int(dim_eff), "power": float(power), "trained_on": source, "n": int(n)}
    return Whitening(mean, projection, meta)


def fit_learned_whitening(
    x: np.ndarray,
    qidx: np.ndarray,
    pidx: np.ndarray,
    *,
    dim: int | None = None,
    eps: float = 1e-6,
    source: str = "",
) -> Whitening:
    """Radenovic et al.'s supervised whitening from matching pairs (``x[qidx[i]], x[pidx[i]]``).

    Step 1 whitens with the intra-class (matching-pair difference) covariance, so
    variation between views of the same thing is suppressed; step 2 rotates by PCA of
    the whitened data so a truncation to ``dim`` keeps the most discriminative axes.
    """
    x = np.asarray(x, dtype=np.float64)
    qidx = np.asarray(qidx, dtype=np.int64)
    pidx = np.asarray(pidx, dtype=np.int64)
    if len(qidx) == 0 or len(qidx) != len(pidx):
        raise ValueError("learned whitening needs matching query/positive index lists")
    d = x.shape[1]
    dim = min(dim or d, d)
    mean = x[qidx].mean(axis=0)
    diff = x[qidx] - x[pidx]
    s_intra = diff.T @ diff / len(qidx)
    vals, vecs = _sym_eig_desc(s_intra)
    vals = np.maximum(vals, eps * max(vals[0], eps))
    p1 = (vecs * vals**-0.5) @ vecs.T  # S^-1/2, symmetric
    xw = (x[qidx] - mean) @ p1.T
    s_inter = xw.T @ xw / len(qidx)
    _, vecs2 = _sym_eig_desc(s_inter)
    projection = vecs2[:, :dim].T @ p1
    meta = {"kind": "learned", "dim": int(dim), "trained_on": source, "pairs": int(len(qidx))}
    return Whitening(mean, projection, meta)


def pairs_from_labels(
    labels: np.ndarray | list[int], max_pairs: int | None = 100_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """All ordered same-label pairs (i != j), subsampled to ``max_pairs``."""
    labels = np.asarray(labels)
    qs: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        if len(idx) < 2:
            continue
        a, b = np.meshgrid(idx, idx, indexing="ij")
        keep = a != b
        qs.append(a[keep])
        ps.append(b[keep])
    if not qs:
        raise ValueError("no class has two images: cannot form matching pairs")
    q = np.concatenate(qs)
    p = np.concatenate(ps)
    if max_pairs is not None and len(q) > max_pairs:
        sel = np.random.default_rng(seed).choice(len(q), size=max_pairs, replace=False)
        q, p = q[sel], p[sel]
    return q, p
