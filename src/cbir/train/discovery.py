"""Training pairs without labels (Radenovic, Tolias & Chum, TPAMI 2018, Sec. 3.1-3.2).

The paper never asks anyone to label images: it retrieves candidate matches with an
off-the-shelf descriptor, keeps only the pairs that structure-from-motion verifies (they
share 3D points) and calls each connected group of verified images a "3D model", i.e. a
cluster. Positives are verified pairs; hard negatives come from other clusters.

Here the same pipeline on any folder of images:

1. describe every image with an off-the-shelf descriptor and take each image's ``k``
   nearest neighbours (cosine similarity) as candidate pairs;
2. verify each candidate geometrically (:mod:`cbir.verify`: local features, ratio test,
   RANSAC; a pair needs ``min_inliers`` inliers);
3. clusters = connected components of the verified graph.

The output is the ``query,positive,cluster`` CSV that ``cbir train`` reads; its miner then
draws every query's hard negatives from *other* clusters only, re-mined each epoch with
the current network (:func:`cbir.train.mining.mine_epoch`). Only the images' pixels are
read: file and folder names never decide anything, so the layout of the folder is free.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir.errors import CbirError
from cbir.eval.ranking import similarity_blocks
from cbir.fileio import atomic_write_text

#: Neighbours per image taken as candidates: verification is the expensive step (~10 ms a
#: pair with SIFT on a CPU), and true matches sit at the top of an off-the-shelf ranking.
DEFAULT_NEIGHBOURS = 5


class MiningError(CbirError):
    """Mining cannot run (no images, too few, nothing verified)."""


@dataclass
class MiningResult:
    """Verified pairs, their clusters and what it took to find them."""

    files: list[Path]
    pairs: np.ndarray  # P x 2 indices into files (i < j), verified
    inliers: np.ndarray  # P
    clusters: np.ndarray  # one cluster id per file, -1 for an image in no verified pair
    tried: int
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        return int(self.clusters.max()) + 1 if len(self.clusters) and self.clusters.max() >= 0 else 0

    def report(self) -> dict[str, Any]:
        """Pairs tried, verified, clusters, time: what ``cbir mine`` prints and writes."""
        sizes = np.bincount(self.clusters[self.clusters >= 0]) if self.n_clusters else np.zeros(0, int)
        return {
            "images": len(self.files),
            "pairs_tried": int(self.tried),
            "pairs_verified": int(len(self.pairs)),
            "clusters": self.n_clusters,
            "images_in_clusters": int((self.clusters >= 0).sum()),
            "largest_cluster": int(sizes.max()) if sizes.size else 0,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "settings": self.settings,
        }

    def csv_rows(self, base: Path) -> list[tuple[str, str, int]]:
        """``query,positive,cluster`` rows, both directions of every pair (each end can be a
        query), paths relative to ``base`` (the CSV's folder) where possible."""
        rows = []
        for (i, j), _ in zip(self.pairs, self.inliers, strict=True):
            a, b = _relative(self.files[i], base), _relative(self.files[j], base)
            c = int(self.clusters[i])
            rows.append((a, b, c))
            rows.append((b, a, c))
        return rows

    def write_csv(self, out: str | os.PathLike) -> Path:
        """Write the pairs CSV (with a header) that ``cbir train`` reads."""
        out = Path(out)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["query", "positive", "cluster"])
        w.writerows(self.csv_rows(out.resolve().parent))
        atomic_write_text(out, buf.getvalue())
        return out


def knn_candidates(vectors: np.ndarray, k: int) -> np.ndarray:
    """Unordered candidate pairs (i < j): each image with its ``k`` most similar others.

    Rows of ``vectors`` are L2-normalised, so the dot product is the cosine similarity.
    Pairs are deduplicated (j among i's neighbours and i among j's gives one pair) and
    sorted, so the result is a pure function of the descriptors.
    """
    if k < 1:
        raise MiningError("neighbours must be at least 1")
    n = len(vectors)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((0, 2), np.int64)
    found = []
    for start, sims in similarity_blocks(vectors, vectors):
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # an image is not its own candidate
        nn = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        i = np.repeat(start + rows, k)
        found.append(np.stack([i, nn.ravel()], axis=1))
    pairs = np.sort(np.concatenate(found), axis=1)
    return np.unique(pairs, axis=0).astype(np.int64)


def connected_clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Cluster id of each of ``n`` images: connected components of the graph of ``pairs``,
    numbered 0.. in order of their first image; -1 for an image in no pair."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    out = -np.ones(n, dtype=np.int64)
    if len(pairs) == 0:
        return out
    pairs = np.asarray(pairs, dtype=np.int64)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    linked = np.zeros(n, dtype=bool)
    linked[pairs.ravel()] = True
    renumber: dict[int, int] = {}
    for i in np.flatnonzero(linked):
        out[i] = renumber.setdefault(int(comp[i]), len(renumber))
    return out


def mine_pairs(
    files: Sequence[str | os.PathLike],
    vectors: np.ndarray,
    verify: Callable[[Path, Path], Any],
    *,
    neighbours: int = DEFAULT_NEIGHBOURS,
    settings: dict[str, Any] | None = None,
    progress: bool = False,
) -> MiningResult:
    """Candidates from the k-NN graph of ``vectors``, each checked by ``verify(a, b)`` (which
    returns an object with ``verified`` and ``inliers``, e.g.
    :meth:`cbir.verify.GeometricVerifier.verify`), clustered by connected components."""
    files = [Path(f) for f in files]
    if len(files) != len(vectors):
        raise MiningError(f"{len(files)} files but {len(vectors)} descriptors")
    if len(files) < 2:
        raise MiningError("mining needs at least two images")
    t0 = time.perf_counter()
    cands = knn_candidates(np.asarray(vectors, dtype=np.float32), neighbours)
    t_knn = time.perf_counter() - t0
    keep, inliers = [], []
    from tqdm.auto import tqdm

    for i, j in tqdm(cands, desc="verifying", unit="pair", disable=not progress, leave=False):
        r = verify(files[i], files[j])
        if r.verified:
            keep.append((i, j))
            inliers.append(r.inliers)
    t_verify = time.perf_counter() - t0 - t_knn
    pairs = np.array(keep, dtype=np.int64).reshape(-1, 2)
    return MiningResult(
        files=files,
        pairs=pairs,
        inliers=np.array(inliers, dtype=np.int64),
        clusters=connected_clusters(len(files), pairs),
        tried=len(cands),
        seconds={"knn": t_knn, "verify": t_verify},
        settings={"neighbours": neighbours, **(settings or {})},
    )


def mine_folder(
    folder: str | os.PathLike,
    *,
    model: str | None = None,
    features: str = "sift",
    geometry: str = "homography",
    min_inliers: int | None = None,
    neighbours: int = DEFAULT_NEIGHBOURS,
    workers: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> MiningResult:
    """Mine verified pairs from every image under ``folder`` (any layout).

    ``model`` is the off-the-shelf descriptor that proposes candidates (cbir's default
    backbone when ``None``). Images that fail to decode are left out and logged.
    """
    from cbir.data.datasets import list_images
    from cbir.extract import default_workers, extract
    from cbir.models import build_descriptor
    from cbir.models.backbones import DEFAULT_BACKBONE
    from cbir.verify import DEFAULT_MIN_INLIERS, GeometricVerifier

    log = log or (lambda m: None)
    verifier = GeometricVerifier(
        features, model=geometry, min_inliers=DEFAULT_MIN_INLIERS if min_inliers is None else min_inliers
    )
    try:
        files = list_images(folder)
    except FileNotFoundError as exc:
        raise MiningError(str(exc)) from exc
    if len(files) < 2:
        raise MiningError(f"{folder}: mining needs at least two images, found {len(files)}")
    desc = build_descriptor(model or DEFAULT_BACKBONE)
    t0 = time.perf_counter()
    ext = extract(desc, files, workers=workers or default_workers(), progress=progress)
    t_describe = time.perf_counter() - t0
    for f in ext.failures:
        log(f"skipped {f.path}: {f.reason}")
    log(f"described {len(ext.paths)} images with {desc.describe_name()} in {t_describe:.0f}s")
    result = mine_pairs(
        ext.paths,
        ext.features,
        verifier.verify,
        neighbours=neighbours,
        settings={"descriptor": desc.describe_name(), **verifier.settings()},
        progress=progress,
    )
    result.seconds = {"describe": t_describe, **result.seconds}
    return result


def _relative(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(os.path.abspath(path), base)  # abspath: a symlink keeps its own name
    except ValueError:  # another drive (Windows)
        return os.path.abspath(path)
