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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import xxhash

from cbir.fileio import atomic_open, atomic_write_bytes
from cbir.index import faults
from cbir.index.errors import CbirIndexError
from cbir.index.stores.base import SearchParams

#: Search-time defaults of new indexes (FAISS's own, nprobe=1 and efSearch=16, favour
#: speed over recall more than a photo collection wants); a plan's settings override them.
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64
#: Candidate-list depth while inserting into an HNSW graph (FAISS's default). The graph
#: ``--index auto`` picks at a million vectors builds in 16 min on two cores with it and
#: reaches recall@10 0.96 at efSearch 128; twice the depth would double the build.
HNSW_EF_CONSTRUCTION = 40
#: Most vectors k-means and PCA are trained on (a sample keeps a rebuild's memory bounded).
MAX_TRAINING_SAMPLE = 200_000


class FactoryError(CbirIndexError):
    """The factory string is not one FAISS can build for this dimension."""

    exit_code = 2  # docs/cli.md, "Exit codes"


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
            part.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
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


def training_sample_size(factory: str, index: faiss.Index, n: int) -> int:
    """How many of ``n`` vectors to train ``index`` on: the planner's rule
    (:func:`cbir.index.ann.train_sample_size`, so a plan's stated sample is the one used);
    for a factory string it cannot parse, FAISS's advice (>= 39 points per k-means
    centroid, 256 useful) within :data:`MAX_TRAINING_SAMPLE`."""
    from cbir.index.ann import train_sample_size

    need = min_training_vectors(index)
    try:
        want = train_sample_size(factory, n)
    except ValueError:
        centroids = max([1] + [int(p.nlist) for p in _parts(index) if isinstance(p, faiss.IndexIVF)])
        want = min(256 * max(centroids, 256), MAX_TRAINING_SAMPLE)
    return int(min(n, max(need, want)))


def search_parameters(
    index: faiss.Index, params: SearchParams, selector: faiss.IDSelector | None
) -> faiss.SearchParameters | None:
    """Per-call parameters for ``index`` (thread-safe: the shared index is not modified).
    The selector goes to the index that produces candidates; a refine step re-ranks them."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2)):
        return search_parameters(index.index, params, selector)  # they pass params through
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


def fill(index: faiss.Index, chunks: Iterable[tuple[np.ndarray, np.ndarray]], n: int, dim: int) -> np.ndarray:
    """Add every chunk's vectors to the empty trained ``index`` at positions 0..n-1 and
    return the ids in that order. A plain flat index is filled in place after one resize
    of its storage: FAISS's ``add`` grows a vector by doubling, which at a million 1280-d
    vectors copies gigabytes and holds up to twice the index while it does."""
    flat = faiss.downcast_index(index)
    in_place = type(flat) in (faiss.IndexFlatIP, faiss.IndexFlat) and flat.ntotal == 0 and n > 0
    if in_place:
        flat.codes.resize(n * flat.code_size)
        store = faiss.rev_swig_ptr(flat.codes.data(), n * flat.code_size).view(np.float32).reshape(n, dim)
    parts, done = [], 0
    for ids, vecs in chunks:
        x = as_float32(vecs, dim)
        if in_place and done + len(x) <= n:
            store[done : done + len(x)] = x
            flat.ntotal = done + len(x)
        else:
            index.add(x)  # more rows than counted (cannot happen under the writer lock): still correct
        parts.append(np.asarray(ids, np.int64))
        done += len(x)
    if in_place and done < n:  # fewer rows than counted
        flat.codes.resize(done * flat.code_size)
        flat.ntotal = done
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# -- checksummed index files ----------------------------------------------------------------
_CHUNK = 16 << 20


def write_index_file(path: Path, index: faiss.Index) -> tuple[str, int]:
    """Write ``index`` to ``path`` atomically, streamed by FAISS (no serialised copy in
    memory); returns (xxh3-128 hex digest, bytes) for the manifest."""
    hasher = xxhash.xxh3_128()
    size = 0
    with atomic_open(path, "wb") as fh:

        def write(data: bytes) -> int:
            nonlocal size
            hasher.update(data)
            size += len(data)
            if size > _CHUNK and size - len(data) <= _CHUNK:
                faults.point("base.write")  # a crash here leaves only a temporary file
            return fh.write(data)

        faiss.write_index(index, faiss.PyCallbackIOWriter(write))
        if size <= _CHUNK:
            faults.point("base.write")
    return hasher.hexdigest(), size


def write_ids_file(path: Path, ids: np.ndarray) -> tuple[str, int]:
    """The catalogue id of each base position (little-endian int64), atomically."""
    data = np.ascontiguousarray(ids, dtype="<i8").tobytes()
    atomic_write_bytes(path, data)
    return xxhash.xxh3_128_hexdigest(data), len(data)


def file_digest(path: Path) -> tuple[str, int]:
    """(xxh3-128 hex digest, bytes) of a whole file, read in chunks."""
    hasher = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            hasher.update(block)
            size += len(block)
    return hasher.hexdigest(), size


def _check(path: Path, digest: str) -> None:
    try:
        actual, _ = file_digest(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreFileError(f"{path.name}: {exc.strerror or exc}") from exc
    if actual != digest:
        raise StoreFileError(f"{path.name}: checksum mismatch (damaged file)")


def read_index_file(path: Path, digest: str | None, dim: int, *, mapped: bool = True) -> faiss.Index:
    """The index in ``path``, checked against ``digest`` first (a damaged file never
    reaches FAISS's parser; None: a file this process has written or checked).

    Flat storage (``Flat``, ``SQ``, a refinement's full vectors, HNSW's vectors) is
    memory-mapped, not copied: the base file is immutable, so its pages are shared with
    the page cache and can be dropped under memory pressure instead of swapping.
    ``mapped=False`` reads a private copy, which vectors can be added to."""
    if digest is not None:
        _check(path, digest)
    try:
        index = faiss.read_index(os.fspath(path), faiss.IO_FLAG_MMAP_IFC if mapped else 0)
    except RuntimeError as exc:
        raise StoreFileError(f"{path.name}: {str(exc).strip().splitlines()[-1]}") from exc
    if index.d != dim:
        raise StoreFileError(f"{path.name}: {index.d}-d vectors, expected {dim}")
    return index


def read_ids_file(path: Path, digest: str, n: int) -> np.ndarray:
    """The ids file of a base of ``n`` vectors, checked against ``digest``."""
    data = path.read_bytes()
    if xxhash.xxh3_128_hexdigest(data) != digest or len(data) != 8 * n:
        raise StoreFileError(f"{path.name}: checksum mismatch (damaged file)")
    return np.frombuffer(data, dtype="<i8").astype(np.int64)


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
