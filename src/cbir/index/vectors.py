"""The FAISS side of an index: a rebuildable cache over the catalogue's vectors.

Vectors are L2-normalised, so inner product is cosine similarity. The index type is a
FAISS ``index_factory`` string (Johnson et al., "Billion-scale similarity search with
GPUs", 2019): ``Flat`` (exact, the default), ``HNSW32`` (Malkov & Yashunin 2018),
``IVF1024,PQ32`` (Jegou et al. 2011), ... Types without their own id support are wrapped
in ``IndexIDMap2`` so FAISS ids are catalogue row ids; IVF types take ids natively.

The file ``vectors-<generation>.faiss`` is written atomically (temporary name, fsync,
rename) and names the catalogue generation it reflects; a file for another generation
is stale and the index is rebuilt from the catalogue. For types that need training, the
trained (empty) index is cached as well, so a rebuild re-adds vectors without retraining.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

import faiss
import numpy as np

from cbir.fileio import atomic_write_by_name

DEFAULT_FACTORY = "Flat"
#: Search-time defaults applied to new indexes (FAISS's own are nprobe=1, efSearch=16,
#: which favour speed over recall more than a photo collection wants).
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64
HNSW_EF_CONSTRUCTION = 80

_CACHE_RE = re.compile(r"^vectors-(\d+)\.faiss$")


class FactoryError(ValueError):
    """The factory string is not one FAISS can build for this dimension."""


class NotTrainedError(RuntimeError):
    """The index type needs training on more vectors than the collection has."""


def make_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index for ``factory``, able to take catalogue ids."""
    try:
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise FactoryError(
            f"FAISS cannot build index type {factory!r} for {dim}-d vectors: {msg}"
        ) from exc
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(DEFAULT_NPROBE, ivf.nlist)
    for part in (index, ivf):
        # the factory turns on polysemous training for PQ codes: an annealing step that
        # takes minutes at our dimension and only serves Hamming pre-filtering (unused)
        if part is not None and hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    hnsw = _hnsw(index)
    if hnsw is not None:
        hnsw.hnsw.efSearch = DEFAULT_EF_SEARCH
        hnsw.hnsw.efConstruction = max(hnsw.hnsw.efConstruction, HNSW_EF_CONSTRUCTION)
    if ivf is None and not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap2(index)
    return index


def _hnsw(index: faiss.Index) -> faiss.IndexHNSW | None:
    inner = (
        faiss.downcast_index(index.index)
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2))
        else index
    )
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def min_training_vectors(index: faiss.Index) -> int:
    """The fewest vectors k-means training accepts: one per IVF list and per PQ centroid."""
    if index.is_trained:
        return 0
    need = 1
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        need = max(need, int(ivf.nlist))
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
        if pq is not None:
            need = max(need, int(pq.ksub))
    else:
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
        pq = getattr(inner, "pq", None)
        if pq is not None:
            need = max(need, int(pq.ksub))
    return need


def search_params(
    index: faiss.Index, nprobe: int | None, ef_search: int | None
) -> faiss.SearchParameters | None:
    """Per-call parameters (thread-safe: the shared index is not modified)."""
    if nprobe is not None and faiss.try_extract_index_ivf(index) is not None:
        return faiss.SearchParametersIVF(nprobe=int(nprobe))
    if ef_search is not None and _hnsw(index) is not None:
        return faiss.SearchParametersHNSW(efSearch=int(ef_search))
    return None


def supports_removal(index: faiss.Index) -> bool:
    """HNSW graphs cannot delete nodes; such indexes are rebuilt instead."""
    return _hnsw(index) is None


def factory_key(factory: str) -> str:
    return hashlib.sha1(factory.encode()).hexdigest()[:10]


# -- the cache files ---------------------------------------------------------------------------
def cache_path(folder: Path, generation: int) -> Path:
    return folder / f"vectors-{generation}.faiss"


def trained_path(folder: Path, factory: str) -> Path:
    return folder / f"trained-{factory_key(factory)}.faiss"


def write_index(index: faiss.Index, path: Path) -> None:
    """Write ``index`` to ``path`` atomically, streamed by FAISS's own file writer (no
    serialised copy in memory)."""
    atomic_write_by_name(path, lambda tmp: faiss.write_index(index, tmp))


def read_index(path: Path) -> faiss.Index | None:
    """The index in ``path``, or None when it is missing or unreadable (then: rebuild)."""
    if not path.is_file():
        return None
    try:
        return faiss.read_index(os.fspath(path))
    except RuntimeError:
        return None


def save_cache(index: faiss.Index, folder: Path, generation: int) -> Path:
    """Write the cache for ``generation`` and delete the caches of older generations."""
    path = cache_path(folder, generation)
    write_index(index, path)
    for other in folder.iterdir():
        m = _CACHE_RE.match(other.name)
        if m and int(m.group(1)) != generation:
            with contextlib.suppress(FileNotFoundError):
                other.unlink()
    return path


def build(
    dim: int,
    factory: str,
    ids: np.ndarray,
    vectors: np.ndarray,
    *,
    trained: faiss.Index | None = None,
    train_sample: int = 200_000,
    seed: int = 0,
) -> tuple[faiss.Index, bool]:
    """A filled index; returns (index, trained_now). Untrained types are trained on (a
    sample of) ``vectors``; :class:`NotTrainedError` when there are too few."""
    index = faiss.clone_index(trained) if trained is not None else make_index(dim, factory)
    trained_now = False
    if not index.is_trained:
        need = min_training_vectors(index)
        if len(vectors) < need:
            raise NotTrainedError(
                f"index type {factory!r} needs at least {need} vectors to train, the "
                f"collection has {len(vectors)}: index more images, or use a smaller type "
                "(e.g. 'Flat', or IVF with fewer lists)"
            )
        sample = vectors
        if len(vectors) > train_sample:
            rng = np.random.default_rng(seed)
            sample = vectors[np.sort(rng.choice(len(vectors), train_sample, replace=False))]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        trained_now = True
    if len(ids):
        index.add_with_ids(
            np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64)
        )
    return index, trained_now
