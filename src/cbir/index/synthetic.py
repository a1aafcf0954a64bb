"""Synthetic global descriptors that look like real ones, for benchmarking ANN indexes at
sizes no dataset here reaches (``cbir bench ann --synthetic 1000000``).

Isotropic Gaussian clusters are a poor stand-in for image descriptors: their spectrum is
flat, so a PCA loses half of everything, and every point of a cluster is equally far from
every other, so no compressed code can order them. Real descriptors (EfficientNet-Lite0
GeM, 1280-d, L2-normalised) put half their variance in about 30 of 1280 directions, and
come in clusters (the images of one object, character or landmark) of very different
tightness, inside broader groups (photographs vs drawings).

:class:`DescriptorModel` is a hierarchical Gaussian model of that, fitted to real
descriptors and their class labels (``bench/fit_synthetic.py``):

1. **Domains** (a mixture): k-means of the class means into a few groups; each has a
   weight, a mean, and its own between-class and within-class covariances.
2. **Clusters**: a centre drawn around its domain's mean from the between-class
   covariance; a size drawn from the log-normal fitted to the class sizes; a spread (a
   factor on the within-class covariance) from the log-normal fitted to the classes'
   spreads (some classes are tight, some diffuse).
3. **Images**: the centre plus a draw from the domain's within-class covariance times the
   cluster's spread, then L2-normalised like a real descriptor.

The covariances are kept in the basis of the global principal axes: full (low-rank
factors) on the top :data:`DEFAULT_RANK` axes, where the structure is, and as per-axis
variances on the rest, whose directions are drawn at random (their spectrum is kept,
their orientation carries nothing a benchmark can see). The shipped parameter file is
float16 and about a megabyte. docs/ann.md shows the spectrum and nearest-neighbour
similarities of model draws next to held-out real descriptors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

#: Principal axes on which covariances are kept in full.
DEFAULT_RANK = 256
#: The parameter file shipped with the package (fitted by bench/fit_synthetic.py).
MODEL_FILE = "synthetic_descriptors.npz"
_FORMAT = 1


@dataclass(frozen=True)
class Domain:
    """One group of classes (e.g. photographs of objects; drawings)."""

    weight: float  #: share of images
    mean: np.ndarray  #: (d,) mean descriptor of the domain
    between: np.ndarray  #: (r, kb) factor of the class-centre covariance on the top axes
    within: np.ndarray  #: (r, kw) factor of the within-class covariance on the top axes
    tail_between: np.ndarray  #: (d - r,) standard deviations of class centres on the rest
    tail_within: np.ndarray  #: (d - r,) within-class standard deviations on the rest
    spread: tuple[float, float]  #: log-normal (mu, sigma) of a class's spread factor


@dataclass(frozen=True)
class DescriptorModel:
    """The fitted model: principal axes, domains and cluster sizes (see the module doc)."""

    basis: np.ndarray  #: (d, r) top principal axes of the real descriptors, orthonormal
    domains: tuple[Domain, ...]
    cluster_size: tuple[float, float]  #: log-normal (mu, sigma) of images per cluster
    source: str = ""  #: what it was fitted on
    #: (share, size): the share of the within-class variance around sub-cluster centres
    #: (the rest places the sub-clusters), and their mean size; (1, 1) = none
    substructure: tuple[float, float] = (1.0, 1.0)
    _cache: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the parameters as float16 arrays (a compressed ``.npz``)."""
        arrays: dict[str, np.ndarray] = {"basis": self.basis.astype(np.float16)}
        meta = {
            "format": _FORMAT,
            "source": self.source,
            "cluster_size": list(self.cluster_size),
            "substructure": list(self.substructure),
            "domains": [{"weight": d.weight, "spread": list(d.spread)} for d in self.domains],
        }
        for i, d in enumerate(self.domains):
            for name in ("mean", "between", "within", "tail_between", "tail_within"):
                arrays[f"d{i}_{name}"] = getattr(d, name).astype(np.float16)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    @classmethod
    def load(cls, path: str | Path | None = None) -> DescriptorModel:
        """The model in ``path``, or the one shipped with cbir."""
        if path is None:
            return _shipped()
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path}: unknown synthetic model format {meta.get('format')!r}")
            basis, _ = np.linalg.qr(z["basis"].astype(np.float64))  # float16 -> orthonormal
            domains = tuple(
                Domain(
                    weight=float(dm["weight"]),
                    spread=(float(dm["spread"][0]), float(dm["spread"][1])),
                    **{k: z[f"d{i}_{k}"].astype(np.float32) for k in
                       ("mean", "between", "within", "tail_between", "tail_within")},
                )  # fmt: skip
                for i, dm in enumerate(meta["domains"])
            )
        mu, sigma = meta["cluster_size"]
        share, size = meta.get("substructure", (1.0, 1.0))
        return cls(basis, domains, (float(mu), float(sigma)), meta.get("source", ""), (float(share), float(size)))

    # -- drawing --------------------------------------------------------------------------
    def axes(self) -> np.ndarray:
        """(d, d) orthonormal axes: the fitted top ones, then a fixed random completion for
        the rest, whose variances alone are modelled. Computed once per model (a QR of a
        d x (d - r) matrix)."""
        cached = self._cache.get("axes")
        if cached is None:
            rest = np.random.default_rng(0).standard_normal((self.dim, self.dim - self.rank))
            rest -= self.basis @ (self.basis.T @ rest)
            rest, _ = np.linalg.qr(rest)
            cached = self._cache["axes"] = np.hstack([self.basis, rest]).astype(np.float32)
        return cached

    def cluster_sizes(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Sizes of the clusters of an ``n``-image collection (they sum to ``n``)."""
        mu, sigma = self.cluster_size
        sizes: list[np.ndarray] = []
        total = 0
        while total < n:
            draw = np.maximum(1, np.rint(rng.lognormal(mu, sigma, 1024))).astype(np.int64)
            sizes.append(draw)
            total += int(draw.sum())
        out = np.concatenate(sizes)
        cut = int(np.searchsorted(np.cumsum(out), n))
        out = out[: cut + 1].copy()
        out[-1] -= int(out.sum()) - n
        return out[out > 0]

    def batches(self, n: int, *, seed: int = 0, batch: int = 32_768) -> Iterator[np.ndarray]:
        """``n`` unit vectors (float32, ``dim`` wide) in batches of whole clusters of about
        ``batch`` rows; the same ``seed`` and ``batch`` give the same vectors."""
        rng = np.random.default_rng(seed)
        axes = self.axes()
        sizes = self.cluster_sizes(n, rng)
        ends = np.cumsum(sizes)
        start = 0
        while start < len(sizes):
            # whole clusters up to about `batch` rows (at least one cluster)
            done = int(ends[start - 1]) if start else 0
            stop = max(start + 1, int(np.searchsorted(ends, done + batch, side="right")))
            yield self._draw(sizes[start:stop], axes, rng)
            start = stop

    def _draw(self, sizes: np.ndarray, axes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Images of clusters of ``sizes``: centre + spread * (sub-cluster centre + own
        deviation), normalised."""
        weights = np.array([d.weight for d in self.domains])
        which = rng.choice(len(self.domains), size=len(sizes), p=weights / weights.sum())
        rows = int(sizes.sum())
        coords = np.empty((rows, self.dim), np.float32)
        means = np.empty((rows, self.dim), np.float32)
        owner = np.repeat(np.arange(len(sizes)), sizes)
        share, group = self.substructure
        # each cluster splits into about size/group sub-clusters; members pick one at random
        n_sub = np.maximum(1, np.rint(sizes / group)).astype(np.int64)
        first = np.concatenate([[0], np.cumsum(n_sub)[:-1]])
        sub = first[owner] + (rng.random(rows) * n_sub[owner]).astype(np.int64)
        for g, dom in enumerate(self.domains):
            clusters = np.flatnonzero(which == g)
            if not len(clusters):
                continue
            centre = self._gaussian(rng, len(clusters), dom.between, dom.tail_between)
            spread = np.sqrt(rng.lognormal(dom.spread[0], dom.spread[1], len(clusters))).astype(np.float32)
            pos = np.full(len(sizes), -1)
            pos[clusters] = np.arange(len(clusters))
            members = np.flatnonzero(which[owner] == g)
            k = pos[owner[members]]
            inner = self._gaussian(rng, len(members), dom.within, dom.tail_within) * np.float32(np.sqrt(share))
            if share < 1.0:
                subs, local = np.unique(sub[members], return_inverse=True)
                sub_centre = self._gaussian(rng, len(subs), dom.within, dom.tail_within)
                inner += sub_centre[local] * np.float32(np.sqrt(1.0 - share))
            coords[members] = centre[k] + inner * spread[k, None]
            means[members] = dom.mean
        x = means + coords @ axes.T
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def _gaussian(self, rng: np.random.Generator, n: int, factor: np.ndarray, tail: np.ndarray) -> np.ndarray:
        """``n`` draws, in the axes' coordinates, of the covariance given by ``factor`` on the
        top axes and the standard deviations ``tail`` on the rest."""
        top = _normal(rng, (n, factor.shape[1])) @ factor.T
        return np.hstack([top, _normal(rng, (n, self.dim - self.rank)) * tail])

    def draw_clusters(self, sizes: np.ndarray, *, seed: int = 0) -> np.ndarray:
        """Descriptors of clusters of the given ``sizes`` (to compare with real classes of
        the same sizes), cluster after cluster."""
        rng = np.random.default_rng(seed)
        return self._draw(np.asarray(sizes, dtype=np.int64), self.axes(), rng)

    def sample(self, n: int, *, seed: int = 0) -> np.ndarray:
        """``n`` descriptors in one array (use :meth:`batches` or :func:`write_collection`
        for large ``n``)."""
        if n <= 0:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(list(self.batches(n, seed=seed)))

    def in_dim(self, dim: int | None, seed: int = 0) -> DimensionMap:
        """How draws become ``dim``-dimensional descriptors (see :class:`DimensionMap`)."""
        return DimensionMap(self, self.dim if dim is None else int(dim), seed)


class DimensionMap:
    """Draws of the model in another dimension ``dim``.

    Fewer dimensions: centred on the model's mean and projected on its top ``dim``
    principal axes, then re-normalised (a PCA-reduced descriptor). More: embedded by a
    fixed random isometry, so the geometry (and an index's difficulty) is the model's and
    only the cost per dimension grows; descriptors of a bigger backbone would differ.
    """

    def __init__(self, model: DescriptorModel, dim: int, seed: int = 0) -> None:
        if dim < 1:
            raise ValueError(f"dimension must be positive, got {dim}")
        self.dim = dim
        self._matrix: np.ndarray | None = None
        self._offset: np.ndarray | None = None
        if dim < model.dim:
            weights = np.array([d.weight for d in model.domains])
            centre = sum(w * d.mean for w, d in zip(weights / weights.sum(), model.domains, strict=True))
            self._matrix = model.axes()[:, :dim]
            self._offset = np.asarray(centre, np.float32)
        elif dim > model.dim:
            q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, model.dim)))
            self._matrix = q.T.astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._matrix is None:
            return x
        y = (x - self._offset if self._offset is not None else x) @ self._matrix
        y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return y.astype(np.float32, copy=False)


def write_collection(
    model: DescriptorModel,
    n: int,
    *,
    queries: int = 0,
    dim: int | None = None,
    seed: int = 0,
    path: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic collection of ``n`` descriptors and ``queries`` further draws of the same
    process held out as queries (pictures of things the collection holds, not copies of
    its images). With ``path`` the collection is written to a float32 memory map there
    (``n * dim * 4`` bytes) instead of memory. Returns (collection, queries)."""
    mapper = model.in_dim(dim, seed)
    total = n + queries
    held = np.zeros(total, dtype=bool)
    held[np.random.default_rng([seed, 1]).choice(total, size=queries, replace=False)] = True
    if path is not None:
        db = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, mapper.dim))
    else:
        db = np.empty((n, mapper.dim), np.float32)
    out_q = np.empty((queries, mapper.dim), np.float32)
    row = nq = nd = 0
    for x in model.batches(total, seed=seed):
        x = mapper(x)
        mask = held[row : row + len(x)]
        db[nd : nd + int((~mask).sum())] = x[~mask]
        out_q[nq : nq + int(mask.sum())] = x[mask]
        nd, nq, row = nd + int((~mask).sum()), nq + int(mask.sum()), row + len(x)
    if isinstance(db, np.memmap):
        db.flush()
    return db, out_q


@functools.cache
def _shipped() -> DescriptorModel:
    """The model shipped with cbir, loaded once per process (its axes are then computed once)."""
    with resources.as_file(resources.files("cbir.index") / MODEL_FILE) as path:
        return DescriptorModel.load(path)


def _normal(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


# -- fitting ---------------------------------------------------------------------------------
def fit_model(
    vectors: np.ndarray,
    labels: np.ndarray,
    *,
    domains: int = 1,
    substructure: tuple[float, float] = (1.0, 1.0),
    rank: int = DEFAULT_RANK,
    seed: int = 0,
    source: str = "",
) -> DescriptorModel:
    """Fit the model to real L2-normalised ``vectors`` whose ``labels`` name their class (the
    images of one object, character, landmark). ``domains`` groups the classes by k-means
    of their means; ``substructure`` is (share, size) of :class:`DescriptorModel`. Both are
    what no closed form gives: :func:`cross_validate` picks them."""
    x = np.asarray(vectors, dtype=np.float64)
    classes, inverse, sizes = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    if len(classes) < 2 or x.ndim != 2 or len(x) != len(inverse):
        raise ValueError("need a 2-d array of vectors and one label per vector, of 2 classes or more")
    rank = min(rank, x.shape[1])
    centred = x - x.mean(0)
    eigval, eigvec = np.linalg.eigh(centred.T @ centred / (len(x) - 1))
    axes = eigvec[:, np.argsort(eigval)[::-1]]
    means = np.zeros((len(classes), x.shape[1]))
    np.add.at(means, inverse, x)
    means /= sizes[:, None]
    group = _group_classes(means, domains, seed)
    fitted = tuple(
        _fit_domain(x, inverse, means, sizes, np.flatnonzero(group == g), axes, rank)
        for g in np.unique(group)
    )
    log_sizes = np.log(sizes)
    size = (float(log_sizes.mean()), float(log_sizes.std()))
    return DescriptorModel(axes[:, :rank].copy(), fitted, size, source, substructure)


def _group_classes(means: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Domain of each class: k-means of the class means (FAISS's, already a dependency)."""
    if k <= 1 or len(means) <= k:
        return np.zeros(len(means), dtype=np.int64)
    import faiss

    km = faiss.Kmeans(means.shape[1], k, niter=50, nredo=5, seed=seed, verbose=False)
    km.cp.min_points_per_centroid = 1  # a few dozen classes: no "too few points" warning
    km.train(np.ascontiguousarray(means, dtype=np.float32))
    return km.index.search(np.ascontiguousarray(means, dtype=np.float32), 1)[1][:, 0]


def _fit_domain(
    x: np.ndarray,
    inverse: np.ndarray,
    means: np.ndarray,
    sizes: np.ndarray,
    members: np.ndarray,
    axes: np.ndarray,
    rank: int,
) -> Domain:
    """Between- and within-class covariances of one domain, in the principal axes."""
    w = sizes[members].astype(np.float64)
    centre = (means[members] * w[:, None]).sum(0) / w.sum()
    offsets = (means[members] - centre) @ axes
    between = (offsets * w[:, None]).T @ offsets / w.sum()
    rows = np.isin(inverse, members)
    resid = (x[rows] - means[inverse[rows]]) @ axes
    dof = max(1, int(rows.sum()) - len(members))
    within = resid.T @ resid / dof
    per_class = np.bincount(inverse[rows], weights=(resid**2).sum(1), minlength=len(means))[members]
    usable = sizes[members] > 1
    spread = per_class[usable] / (sizes[members][usable] - 1) / max(np.trace(within), 1e-30)
    log_spread = np.log(np.maximum(spread, 1e-12)) if usable.any() else np.zeros(1)
    f32 = np.float32
    return Domain(
        weight=float(w.sum()),
        mean=centre.astype(f32),
        between=_factor(between[:rank, :rank]).astype(f32),
        within=_factor(within[:rank, :rank]).astype(f32),
        tail_between=np.sqrt(np.clip(np.diag(between)[rank:], 0, None)).astype(f32),
        tail_within=np.sqrt(np.clip(np.diag(within)[rank:], 0, None)).astype(f32),
        spread=(float(log_spread.mean()), float(log_spread.std())),
    )


def _factor(cov: np.ndarray) -> np.ndarray:
    """F with F @ F.T = cov (negative eigenvalues of an estimate clipped), zero columns
    dropped: between-class covariances have at most (classes - 1) directions."""
    val, vec = np.linalg.eigh((cov + cov.T) / 2)
    keep = val > max(val.max(), 0) * 1e-9
    if not keep.any():
        return np.zeros((len(cov), 1))
    return vec[:, keep] * np.sqrt(val[keep])


def neighbour_profile(x: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
    """Cosine similarity of each vector to its 1st and ``k``-th nearest other vector, and
    of random pairs: the statistics an ANN index's difficulty depends on."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    top = -np.partition(-sims, k - 1, axis=1)[:, :k]
    top.sort(axis=1)
    iu = np.triu_indices(len(x), 1)
    return {"nn1": top[:, -1], f"nn{k}": top[:, 0], "pairs": sims[iu]}


def profile_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Mean absolute difference of the deciles of two :func:`neighbour_profile` results."""
    qs = np.linspace(0.1, 0.9, 9)
    return float(np.mean([np.abs(np.quantile(a[key], qs) - np.quantile(b[key], qs)).mean() for key in a]))


def cross_validate(
    vectors: np.ndarray, labels: np.ndarray, settings: list[tuple[int, float, float]], *, seed: int = 0
) -> dict[tuple[int, float, float], float]:
    """How well each (domains, share, size) setting predicts unseen classes: fit on half of
    the classes, draw clusters of the other half's sizes, compare their
    :func:`neighbour_profile` with the real ones (both halves in turn; lower is better)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    half = np.random.default_rng(seed).permutation(len(classes)) < len(classes) // 2
    folds = [np.isin(labels, classes[half]), np.isin(labels, classes[~half])]
    real = [neighbour_profile(vectors[rows]) for rows in folds]
    scores = {}
    for domains in sorted({d for d, _, _ in settings}):
        # the sub-cluster setting only changes the draws: one fit per domain count and fold
        fits = [fit_model(vectors[rows], labels[rows], domains=domains, seed=seed) for rows in folds]
        for setting in (st for st in settings if st[0] == domains):
            dist = []
            for model, test_rows, truth in zip(fits, folds[::-1], real[::-1], strict=True):
                model = dataclasses.replace(model, substructure=setting[1:])
                _, test_sizes = np.unique(labels[test_rows], return_counts=True)
                dist.append(profile_distance(truth, neighbour_profile(model.draw_clusters(test_sizes, seed=seed))))
            scores[setting] = float(np.mean(dist))
    return scores
