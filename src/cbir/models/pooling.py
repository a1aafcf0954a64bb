"""Global pooling of a B x C x H x W feature map into one B x C vector per image.

A functional core (``gem(x, p)``, ``rmac(x, L)``, ...) does the arithmetic; thin
``nn.Module`` wrappers carry parameters (GeM's p, learnable or fixed) and describe
themselves with :meth:`Pooling.spec` so a descriptor file can rebuild them. Every
function is written with plain tensor ops (a mean over the spatial axes, not
``adaptive_avg_pool2d`` with a computed kernel) so the whole descriptor exports to ONNX.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

EPS = 1e-6


# ----------------------------------------------------------------------------------------
# functional core
# ----------------------------------------------------------------------------------------
def l2n(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """L2-normalise the last axis (a zero vector stays zero instead of becoming NaN)."""
    return x / (x.norm(p=2, dim=-1, keepdim=True) + eps)


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions (Tolias et al. 2016): max over H, W."""
    return x.amax(dim=(-2, -1))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Sum-pooled convolutional features (Babenko & Lempitsky 2015), as the mean over H, W."""
    return x.mean(dim=(-2, -1))


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = EPS) -> torch.Tensor:
    """Generalised mean (Radenovic et al. 2018): (mean x^p)^(1/p) over H, W.

    p = 1 is average pooling, p -> inf approaches max pooling. Activations are clamped
    at ``eps`` because a fractional power of a negative number is undefined.
    """
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def rmac_regions(height: int, width: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """Square regions of R-MAC (Tolias et al. 2016) as (top, left, size_h, size_w).

    At level l (1..L) squares of side 2*min(H, W)/(l+1) are laid out uniformly, with
    one more square along the longer axis chosen so consecutive squares overlap by
    about ``overlap``. Computed from static sizes, so regions are part of the graph.
    """
    side_min = min(height, width)
    if side_min < 1:
        return []
    # number of extra steps along the long side that best matches the wanted overlap
    extra = 0
    long_side = max(height, width)
    if long_side != side_min:
        best = math.inf
        for steps in range(2, 8):
            stride = (long_side - side_min) / (steps - 1)
            ovr = (side_min**2 - side_min * stride) / side_min**2
            if abs(ovr - overlap) < best:
                best, extra = abs(ovr - overlap), steps - 1
    extra_h = extra if height > width else 0
    extra_w = extra if width > height else 0
    regions: list[tuple[int, int, int, int]] = []
    for level in range(1, levels + 1):
        size = max(1, int(2 * side_min / (level + 1)))
        n_h, n_w = level + extra_h, level + extra_w
        tops = _positions(height, size, n_h)
        lefts = _positions(width, size, n_w)
        regions.extend((t, left, size, size) for t in tops for left in lefts)
    return list(dict.fromkeys(regions))


def _positions(extent: int, size: int, count: int) -> list[int]:
    if count <= 1 or extent <= size:
        return [max(0, (extent - size) // 2)]
    step = (extent - size) / (count - 1)
    return [min(extent - size, int(round(i * step))) for i in range(count)]


def regional(x: torch.Tensor, levels: int = 3, pool: str = "max", p: torch.Tensor | float = 3.0) -> torch.Tensor:
    """Per-region descriptors B x R x C (not normalised), max- or GeM-pooled."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    parts = []
    for top, left, rh, rw in rmac_regions(h, w, levels):
        r = x[..., top : top + rh, left : left + rw]
        parts.append(mac(r) if pool == "max" else gem(r, p))
    return torch.stack(parts, dim=1)


def rmac(x: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """R-MAC: L2-normalised regional max-pools, summed (normalise the result yourself)."""
    return l2n(regional(x, levels, "max")).sum(dim=1)


def rgem(x: torch.Tensor, levels: int = 3, p: torch.Tensor | float = 3.0) -> torch.Tensor:
    """Regional GeM: R-MAC's regions with GeM inside each region instead of max."""
    return l2n(regional(x, levels, "gem", p)).sum(dim=1)


# ----------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------
class Pooling(nn.Module):
    """Base class: ``forward`` maps B x C x H x W to B x C; ``spec`` rebuilds it."""

    name = "base"

    def spec(self) -> dict[str, Any]:
        return {"name": self.name}

    def out_dim(self, in_channels: int) -> int:
        """Output size for a C-channel feature map (C unless the pooling projects)."""
        return in_channels

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "name")


class MAC(Pooling):
    name = "mac"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mac(x)


class SPoC(Pooling):
    name = "spoc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spoc(x)


class _WithP(Pooling):
    def __init__(self, p: float = 3.0, learnable: bool = False) -> None:
        super().__init__()
        self.learnable = learnable
        if learnable:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:
            self.register_buffer("p", torch.tensor(float(p)))


class GeM(_WithP):
    """GeM pooling; with ``learnable=True`` p is trained (Radenovic et al.: init 3)."""

    name = "gem"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p)

    def spec(self) -> dict[str, Any]:
        p = round(float(self.p.detach()), 6)
        return {"name": self.name, "p": p, "learnable": self.learnable}


class RMAC(Pooling):
    """R-MAC (Tolias et al. 2016); with a region whitening, Gordo et al. 2016's version.

    Gordo et al. ("Deep Image Retrieval", ECCV 2016) L2-normalise each regional max-pool,
    PCA-whiten it (a shift and projection learned on region vectors of a separate image
    set, shared by all regions), L2-normalise again, then sum. Whitening each region
    before summing is what lets distinctive regions outvote repeated background.
    The whitening is a buffer of this module, so it travels inside the descriptor file;
    ``region_whitening`` in the spec only carries its shape and provenance.
    """

    name = "rmac"

    def __init__(self, levels: int = 3, region_whitening: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.levels = levels
        self.region_whitening: nn.Module | None = None
        if region_whitening is not None:
            from cbir.models.whitening import Whitening  # whitening imports this module

            meta = {k: v for k, v in region_whitening.items() if k not in ("in_dim", "out_dim")}
            d_in, d_out = int(region_whitening["in_dim"]), int(region_whitening["out_dim"])
            self.region_whitening = Whitening(torch.zeros(d_in), torch.zeros(d_out, d_in), meta)

    def set_region_whitening(self, whitening: nn.Module | None) -> None:
        """Attach (or remove, with None) a whitening learned on :meth:`regions` vectors."""
        self.region_whitening = whitening

    def regions(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised regional max-pools, B x R x C: what the region whitening is fit on."""
        return l2n(regional(x, self.levels, "max"))

    def out_dim(self, in_channels: int) -> int:
        return self.region_whitening.out_dim if self.region_whitening is not None else in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.region_whitening is None:
            return rmac(x, self.levels)
        return self.region_whitening(self.regions(x)).sum(dim=1)

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "levels": self.levels}
        if self.region_whitening is not None:
            out["region_whitening"] = self.region_whitening.spec()
        return out


class RGeM(_WithP):
    name = "rgem"

    def __init__(self, levels: int = 3, p: float = 3.0, learnable: bool = False) -> None:
        super().__init__(p, learnable)
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rgem(x, self.levels, self.p)

    def spec(self) -> dict[str, Any]:
        p = round(float(self.p.detach()), 6)
        return {"name": self.name, "levels": self.levels, "p": p, "learnable": self.learnable}


POOLINGS: dict[str, type[Pooling]] = {c.name: c for c in (MAC, SPoC, GeM, RMAC, RGeM)}
#: Aliases accepted on the command line.
_ALIASES = {"avg": "spoc", "mean": "spoc", "max": "mac", "r-mac": "rmac", "r-gem": "rgem"}


def build_pooling(spec: str | dict[str, Any]) -> Pooling:
    """Build a pooling from a dict spec or a CLI string such as ``gem``, ``gem:p=4``,
    ``gem:learn`` or ``rmac:levels=3``. Parsed field by field, never evaluated."""
    if isinstance(spec, str):
        spec = parse_pooling(spec)
    spec = dict(spec)
    name = str(spec.pop("name")).lower()
    return _build(_ALIASES.get(name, name), spec)


def _build(name: str, kwargs: dict[str, Any]) -> Pooling:
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; choose from {sorted(POOLINGS)} or {sorted(_ALIASES)}")
    if "p" in kwargs and not float(kwargs["p"]) > 0:
        raise ValueError(f"pooling {name!r}: p must be positive, got {kwargs['p']}")
    if "levels" in kwargs and int(kwargs["levels"]) < 1:
        raise ValueError(f"pooling {name!r}: levels must be at least 1, got {kwargs['levels']}")
    try:
        return POOLINGS[name](**kwargs)
    except TypeError as exc:  # an option this pooling does not take, e.g. mac:p=3
        raise ValueError(f"pooling {name!r} does not take options {sorted(kwargs)}") from exc


def parse_pooling(text: str) -> dict[str, Any]:
    """``"gem:p=4,learn"`` -> ``{"name": "gem", "p": 4.0, "learnable": True}``."""
    name, _, rest = text.strip().partition(":")
    name = _ALIASES.get(name.strip().lower(), name.strip().lower())
    out: dict[str, Any] = {"name": name}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq:
            if key in ("learn", "learnable"):
                out["learnable"] = True
                continue
            raise ValueError(f"bad pooling option {item!r} in {text!r}")
        try:
            if key == "p":
                out["p"] = float(value)
            elif key in ("levels", "l"):
                out["levels"] = int(value)
        except ValueError:
            bad = value.strip()
            raise ValueError(f"bad value {bad!r} for pooling option {key!r} in {text!r}") from None
        if key in ("p", "levels", "l"):
            continue
        if key == "learnable":
            out["learnable"] = value.strip().lower() in ("1", "true", "yes")
        else:
            raise ValueError(f"unknown pooling option {key!r} in {text!r}")
    return out


def multiscale_combine(vectors: list[torch.Tensor], power: float = 1.0) -> torch.Tensor:
    """Generalised mean of per-scale descriptors (Radenovic et al. use the GeM p)."""
    if len(vectors) == 1:
        return vectors[0]
    stacked = torch.stack(vectors, dim=0)
    if power == 1.0:
        return stacked.mean(dim=0)
    return stacked.clamp(min=0).pow(power).mean(dim=0).pow(1.0 / power)


__all__ = [
    "GeM",
    "MAC",
    "POOLINGS",
    "Pooling",
    "RGeM",
    "RMAC",
    "SPoC",
    "build_pooling",
    "gem",
    "l2n",
    "mac",
    "multiscale_combine",
    "parse_pooling",
    "regional",
    "rgem",
    "rmac",
    "rmac_regions",
    "spoc",
]
