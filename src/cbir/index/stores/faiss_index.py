"""FAISS building blocks of the FAISS store: index types from factory strings, search
parameters per call, training sizes, and checksummed index files.

Vectors are L2-normalised, so inner product is cosine similarity. The index type is a
FAISS ``index_factory`` string (Johnson et al., "Billion-scale similarity search with
GPUs", 2019): ``Flat`` (exact), ``HNSW32`` (Malkov & Yashunin 2018), ``IVF1024,PQ32``
(Jegou et al. 2011), ``PCA512,IVF4096,PQ64x4fs,Refine(SQ8)`` and so on. A base index holds
its vectors at positions 0..n-1 (no id map): the store maps positions to catalogue ids
with a sorted array, and tombstones are positions, filtered with a FAISS ``IDSelector``
at search time. That works the same for every type, including those that cannot remove
(HNSW) or take ids (``IndexRefine``).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import xxhash

from cbir.fileio import atomic_open
from cbir.index import faults
from cbir.index.errors import CbirIndexError
from cbir.index.stores.base import SearchParams

#: Search-time defaults of new indexes (FAISS's own, nprobe=1 and efSearch=16, favour
#: speed over recall more than a photo collection wants); a plan's settings override them.
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64
HNSW_EF_CONSTRUCTION = 80
#: Most vectors k-means and PCA are trained on (a sample keeps a rebuild's memory bounded).
MAX_TRAINING_SAMPLE = 200_000


class FactoryError(CbirIndexError):
    """The factory string is not one FAISS can build for this dimension."""


class StoreFileError(Exception):
    """A store file is missing, unreadable, or does not match its recorded checksum."""


def make_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index for ``factory``, with cbir's search defaults."""
    try:
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise FactoryError(f"FAISS cannot build index type {factory!r} for {dim}-d vectors: {msg}") from exc
    for part in _parts(index):
        if isinstance(part, faiss.IndexIVF):
            part.nprobe = min(DEFAULT_NPROBE, part.nlist)
        if hasattr(part, "do_polysemous_training"):
            # the factory turns on polysemous training for PQ codes: an annealing step that
            # takes minutes at our dimension and only serves Hamming pre-filtering (unused)
            part.do_polysemous_training = False
        if isinstance(part, faiss.IndexHNSW):
            part.hnsw.efSearch = DEFAULT_EF_SEARCH
            part.hnsw.efConstruction = max(part.hnsw.efConstruction, HNSW_EF_CONSTRUCTION)
    return index


def _parts(index: faiss.Index) -> list[faiss.Index]:
    """The index and the indexes nested in it (pre-transform, refine base, IVF)."""
    index = faiss.downcast_index(index)
    out = [index]
    if isinstance(index, faiss.IndexPreTransform):
        out += _parts(index.index)
    elif isinstance(index, faiss.IndexRefine):
        out += _parts(index.base_index)
    elif isinstance(index, faiss.IndexIVF):
        out.append(faiss.downcast_index(index.quantizer))
    return out


def min_training_vectors(index: faiss.Index) -> int:
    """The fewest vectors training accepts: one per IVF list, per PQ centroid, per PCA
    output dimension."""
    if index.is_trained:
        return 0
    need = 1
    for part in _parts(index):
        if isinstance(part, faiss.IndexIVF):
            need = max(need, int(part.nlist))
        pq = getattr(part, "pq", None)
        if pq is not None:
            need = max(need, int(pq.ksub))
        if isinstance(part, faiss.IndexPreTransform):
            for i in range(part.chain.size()):
                need = max(need, int(part.chain.at(i).d_out))
    return need


def training_sample_size(index: faiss.Index, n: int) -> int:
    """How many vectors to train on: FAISS's own advice (>= 39 per k-means centroid, at
    most 256 useful) within :data:`MAX_TRAINING_SAMPLE`."""
    centroids = 1
    for part in _parts(index):
        if isinstance(part, faiss.IndexIVF):
            centroids = max(centroids, int(part.nlist))
        pq = getattr(part, "pq", None)
        if pq is not None:
            centroids = max(centroids, int(pq.ksub))
    return int(min(n, max(min_training_vectors(index), min(256 * centroids, MAX_TRAINING_SAMPLE))))


def search_parameters(
    index: faiss.Index, params: SearchParams, selector: faiss.IDSelector | None
) -> faiss.SearchParameters | None:
    """Per-call parameters for ``index`` (thread-safe: the shared index is not modified).
    The selector goes to the index that produces candidates; a refine step re-ranks them."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return search_parameters(index.index, params, selector)
    if isinstance(index, faiss.IndexRefine):
        base = search_parameters(index.base_index, params, selector)
        k_factor = float(params.k_factor if params.k_factor is not None else index.k_factor)
        out = faiss.IndexRefineSearchParameters(k_factor=k_factor)
        if base is not None:
            out.base_index_params = base
        out._keep = (base, selector)  # the C++ side holds raw pointers
        return out
    if isinstance(index, faiss.IndexIVF):
        out = faiss.SearchParametersIVF(nprobe=int(params.nprobe or index.nprobe))
    elif isinstance(index, faiss.IndexHNSW):
        out = faiss.SearchParametersHNSW(efSearch=int(params.ef_search or index.hnsw.efSearch))
    elif selector is None:
        return None
    else:
        out = faiss.SearchParameters()
    if selector is not None:
        out.sel = selector
        out._keep = (selector,)
    return out


# -- checksummed index files ----------------------------------------------------------------
_MAGIC = b"CBIRFAIS"
_HEAD = struct.Struct("<8sIIQ")  # magic, format version, dim, number of ids
_CHUNK = 16 << 20


def write_index_file(path: Path, index: faiss.Index, ids: np.ndarray) -> tuple[str, int]:
    """Write ``ids`` and ``index`` to ``path`` atomically, streamed (no serialised copy in
    memory); returns (xxh3-128 hex digest, bytes) for the manifest."""
    hasher = xxhash.xxh3_128()
    size = 0

    with atomic_open(path, "wb") as fh:

        def write(data: bytes) -> int:
            nonlocal size
            hasher.update(data)
            size += len(data)
            return fh.write(data)

        ids = np.ascontiguousarray(ids, dtype="<i8")
        write(_HEAD.pack(_MAGIC, 1, int(index.d), len(ids)))
        write(ids.tobytes())
        faults.point("base.write")  # a crash here leaves only a temporary file
        faiss.write_index(index, faiss.PyCallbackIOWriter(write))
    return hasher.hexdigest(), size


def file_digest(path: Path) -> tuple[str, int]:
    """(xxh3-128 hex digest, bytes) of a whole file, read in chunks."""
    hasher = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            hasher.update(block)
            size += len(block)
    return hasher.hexdigest(), size


def read_index_file(path: Path, digest: str, dim: int) -> tuple[faiss.Index, np.ndarray]:
    """The (index, ids) in ``path``, after checking the file against ``digest`` first (a
    damaged file never reaches FAISS's parser). :class:`StoreFileError` otherwise."""
    try:
        actual, _ = file_digest(path)
    except OSError as exc:
        raise StoreFileError(f"{path.name}: {exc.strerror or exc}") from exc
    if actual != digest:
        raise StoreFileError(f"{path.name}: checksum mismatch (damaged file)")
    with open(path, "rb") as fh:
        magic, version, d, n = _HEAD.unpack(fh.read(_HEAD.size))
        if magic != _MAGIC or version != 1 or d != dim:
            raise StoreFileError(f"{path.name}: not a {dim}-d cbir FAISS file")
        ids = np.frombuffer(fh.read(8 * n), dtype="<i8").astype(np.int64)
        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(fh.read, _CHUNK))
        except RuntimeError as exc:
            raise StoreFileError(f"{path.name}: {str(exc).strip().splitlines()[-1]}") from exc
    if index.ntotal != len(ids) or index.d != dim:
        raise StoreFileError(f"{path.name}: {index.ntotal} vectors for {len(ids)} ids")
    return index, ids


def index_type(index: faiss.Index) -> str:
    """Short description for stats: the FAISS class names from outside in."""
    return "/".join(type(p).__name__ for p in _parts(index))


def nbytes(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def as_float32(vectors: Any, dim: int) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 ``(n, dim)`` array, checked."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {x.shape}")
    return x
