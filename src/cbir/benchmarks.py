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

