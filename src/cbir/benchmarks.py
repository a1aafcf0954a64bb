"""Benchmarks as library calls: describe a benchmark's images and score them.

The CLI's ``cbir bench ...`` commands and the scripts in ``bench/`` are thin callers
of these functions, so a researcher can run the same thing from a notebook.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from cbir.data.datasets import load_class_folders, load_gpr_collection
from cbir.eval.gpr1200 import GPRResult, evaluate_gpr1200
from cbir.extract import ExtractionResult, extract
from cbir.models.descriptor import Descriptor
from cbir.models.whitening import Whitening, fit_learned_whitening, fit_pca_whitening, pairs_from_labels


@dataclass
class GPRBenchmark:
    result: GPRResult
    extraction: ExtractionResult
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.result.to_dict(),
            "images_per_second": self.extraction.images_per_second,
            "seconds": self.extraction.seconds,
            "images": len(self.files),
            "files": self.files,
            "descriptor": self.extraction.descriptor.get("name"),
        }


def run_gpr1200(root: str | os.PathLike, descriptor: Descriptor, **extract_options: Any) -> GPRBenchmark:
    """Describe a GPR1200-format folder and score it with the GPR1200 protocol.

    Every image must decode: a benchmark with a missing image is not the benchmark, so a
    failure raises instead of silently scoring a smaller set.
    """
    coll = load_gpr_collection(root)
    ext = extract(descriptor, coll.files, **extract_options)
    if ext.failures:
        listing = "; ".join(f"{f.path}: {f.reason}" for f in ext.failures[:5])
        raise RuntimeError(f"{len(ext.failures)} benchmark images failed to decode ({listing})")
    result = evaluate_gpr1200(ext.features, coll.categories, coll.domains)
    return GPRBenchmark(result=result, extraction=ext, files=coll.names)


def learn_whitening(
    root: str | os.PathLike,
    descriptor: Descriptor,
    *,
    kind: str = "pca",
    dim: int | None = None,
    power: float = 1.0,
    **extract_options: Any,
) -> Whitening:
    """Learn whitening on the descriptors of a separate image set.

    ``kind="pca"`` uses every image under ``root``; ``kind="learned"`` (Radenovic's Lw)
    needs class folders ``root/<class>/*`` and uses same-class pairs. The descriptor's
    own whitening, if any, is bypassed: whitening is learned on raw pooled vectors.
    """
    from cbir.data.datasets import list_images

    saved = descriptor.whitening
    descriptor.whitening = None
    try:
        if kind == "learned":
            data = load_class_folders(root, min_per_class=2)
            ext = extract(descriptor, data.files, **extract_options)
            label_of = {os.fspath(f): lab for f, lab in zip(data.files, data.labels, strict=True)}
            labels = np.array([label_of[p] for p in ext.paths])
            q, p = pairs_from_labels(labels)
            return fit_learned_whitening(ext.features, q, p, dim=dim, source=os.fspath(root))
        if kind == "pca":
            ext = extract(descriptor, list_images(root), **extract_options)
            return fit_pca_whitening(ext.features, dim=dim, power=power, source=os.fspath(root))
        raise ValueError(f"unknown whitening kind {kind!r}: use 'pca' or 'learned'")
    finally:
        descriptor.whitening = saved



# ----------------------------------------------------------------------------------------
# revisited Oxford/Paris (Radenovic et al. 2018), R-MAC region whitening, re-ranking
# ----------------------------------------------------------------------------------------
def learn_region_whitening(
    paths: list[str] | list[os.PathLike] | str | os.PathLike,
    descriptor: Descriptor,
    *,
    dim: int | None = None,
    power: float = 1.0,
    max_images: int | None = None,
    seed: int = 0,
    attach: bool = True,
    **extract_options: Any,
) -> Whitening:
    """Learn R-MAC's region-wise PCA-whitening (Gordo et al. 2016) on a separate image set.

    Every L2-normalised regional max-pool of every image (at each of the descriptor's
    scales) is one sample. ``max_images`` draws a seeded random subset of the files, so a
    large training folder costs bounded time. With ``attach`` the whitening is set on the
    descriptor's R-MAC pooling (and the descriptor file then carries it).
    """
    import torch

    from cbir.data.datasets import list_images
    from cbir.extract import iter_extract
    from cbir.models.pooling import RMAC

    pooling = descriptor.pooling
    if not isinstance(pooling, RMAC):
        raise ValueError(f"region whitening needs R-MAC pooling (rmac), not {pooling.name}")
    if isinstance(paths, list):
        files, source = [os.fspath(p) for p in paths], f"{len(paths)} files"
    else:
        files, source = [os.fspath(p) for p in list_images(paths)], os.fspath(paths)
    if max_images is not None and len(files) > max_images:
        pick = np.random.default_rng(seed).choice(len(files), size=max_images, replace=False)
        files = [files[i] for i in sorted(pick)]
    if not files:
        raise ValueError("no training images for the region whitening")

    def regions_runner(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = descriptor.preprocess.normalize(torch.from_numpy(batch))
            parts = [pooling.regions(m) for m in descriptor.feature_maps(x)]
            return torch.cat(parts, dim=1).float().numpy()

    descriptor.eval()
    batches = iter_extract(
        descriptor, files, runner=regions_runner, desc="regions", **extract_options
    )
    chunks = [b.vectors.reshape(-1, b.vectors.shape[-1]) for b in batches if b.indices]
    if not chunks:
        raise ValueError("none of the training images could be decoded")
    regions = np.concatenate(chunks)
    w = fit_pca_whitening(regions, dim=dim, power=power, source=source)
    w.meta.update({"kind": "pca-regions", "images": len(files), "regions": int(len(regions))})
    if attach:
        pooling.set_region_whitening(w)
    return w


@dataclass
class PostProcessing:
    """Re-ranking applied after description, in this order: alpha-DBA on the database,
    alpha-QE of the queries (against the augmented database), then ranking by inner
    product or by diffusion (Iscen et al. 2017). ``k = 0`` disables QE / DBA."""

    qe_k: int = 0
    qe_alpha: float = 3.0
    dba_k: int = 0
    dba_alpha: float = 3.0
    diffusion: bool = False
    diffusion_k: int = 20
    diffusion_kq: int = 10
    diffusion_gamma: float = 3.0
    diffusion_alpha: float = 0.99

    def describe(self) -> str:
        parts = []
        if self.dba_k:
            parts.append(f"alpha-DBA(k={self.dba_k},a={self.dba_alpha:g})")
        if self.qe_k:
            parts.append(f"alpha-QE(k={self.qe_k},a={self.qe_alpha:g})")
        if self.diffusion:
            parts.append(f"diffusion(k={self.diffusion_k},kq={self.diffusion_kq})")
        return " + ".join(parts) or "none"


def rank_revisited(
    queries: np.ndarray, database: np.ndarray, post: PostProcessing | None = None
) -> np.ndarray:
    """Nq x Ndb database indices, best first, after the post-processing ``post``."""
    from cbir.diffusion import Diffusion
    from cbir.eval.revisited import rank_database
    from cbir.postprocess import alpha_dba, expand_queries

    post = post or PostProcessing()
    queries = np.asarray(queries, dtype=np.float32)
    database = np.asarray(database, dtype=np.float32)
    if post.dba_k:
        database = alpha_dba(database, k=post.dba_k, alpha=post.dba_alpha)
    if post.qe_k:
        queries = expand_queries(queries, database, k=post.qe_k, alpha=post.qe_alpha)
    if post.diffusion:
        diffusion = Diffusion.fit(
            database,
            k=post.diffusion_k,
            kq=post.diffusion_kq,
            gamma=post.diffusion_gamma,
            alpha=post.diffusion_alpha,
        )
        return diffusion.rank(queries)
    return rank_database(queries @ database.T)


@dataclass
class RevisitedFeatures:
    """Query and database descriptors of a revisitop dataset, rows in gnd order."""

    queries: np.ndarray
    database: np.ndarray
    cropped_queries: bool
    seconds: float
    descriptor: str


def describe_revisited(
    dataset: Any, descriptor: Descriptor, *, full_query: bool = False, **extract_options: Any
) -> RevisitedFeatures:
    """Describe the database images, and the queries cropped to their ``bbx`` (as the
    protocol prescribes) unless ``full_query``. A file that fails to decode is an error."""
    boxes = None if full_query else dataset.query_boxes
    db = extract(descriptor, dataset.database_paths, desc="database", **extract_options)
    qs = extract(descriptor, dataset.query_paths, boxes=boxes, desc="queries", **extract_options)
    failures = db.failures + qs.failures
    if failures:
        listing = "; ".join(f"{f.path}: {f.reason}" for f in failures[:5])
        raise RuntimeError(f"{len(failures)} benchmark images failed to decode ({listing})")
    seconds = db.seconds + qs.seconds
    name = descriptor.describe_name()
    return RevisitedFeatures(qs.features, db.features, not full_query, seconds, name)


@dataclass
class RevisitedBenchmark:
    result: Any  # cbir.eval.revisited.RevisitedResult
    ranks: np.ndarray
    features: RevisitedFeatures
    post: PostProcessing
    dataset: str

    def to_dict(self) -> dict[str, Any]:
        n_images = len(self.features.queries) + len(self.features.database)
        seconds = self.features.seconds
        return {
            **self.result.to_dict(),
            "dataset": self.dataset,
            "descriptor": self.features.descriptor,
            "post_processing": self.post.describe(),
            "cropped_queries": self.features.cropped_queries,
            "queries": len(self.features.queries),
            "database": len(self.features.database),
            "seconds": seconds,
            "images_per_second": n_images / seconds if seconds > 0 else None,
        }


def run_revisited(
    root: str | os.PathLike,
    descriptor: Descriptor,
    *,
    gnd: str | os.PathLike | None = None,
    full_query: bool = False,
    post: PostProcessing | None = None,
    features: RevisitedFeatures | None = None,
    **extract_options: Any,
) -> RevisitedBenchmark:
    """Describe a revisitop-format dataset and score it (Easy / Medium / Hard).

    Pass ``features`` from :func:`describe_revisited` to score several post-processings
    of the same descriptors without describing the images again.
    """
    from cbir.data.revisited import load_revisited
    from cbir.eval.revisited import evaluate_revisited

    dataset = load_revisited(root, gnd)
    if features is None:
        features = describe_revisited(dataset, descriptor, full_query=full_query, **extract_options)
    post = post or PostProcessing()
    ranks = rank_revisited(features.queries, features.database, post)
    result = evaluate_revisited(ranks, dataset.gnd_dicts())
    return RevisitedBenchmark(result, ranks, features, post, dataset.name)
