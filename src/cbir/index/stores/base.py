"""The seam between an index and the place its vectors are searched: :class:`VectorStore`.

The catalogue (:mod:`cbir.index.catalog`) is the truth: it holds every file's row and its
float32 vector, and a ``generation`` counter that each committed change of the indexed
vectors increments. A vector store is a searchable copy of the catalogue's vectors that
says which generation it reflects. The index drives every store the same way:

1. ``add``/``remove`` stage one committed batch's changes (ids are catalogue ids, never
   reused, so a removed id never comes back);
2. ``flush(generation)`` makes them durable and visible, labelled with the catalogue
   generation they produce. The index flushes *before* the catalogue commits (write-ahead),
   so after a crash a store is at the catalogue's generation or one batch ahead of it;
3. on opening, ``load(generation)`` brings the store to the catalogue's generation. A store
   that cannot reach exactly that state (damaged files, a batch the catalogue never
   committed that it cannot undo) answers False, and the index repairs it with
   :func:`reconcile` (an id diff: cost proportional to the difference) or, failing that,
   ``rebuild``.

Stores search by inner product on L2-normalised vectors (cosine similarity). The FAISS
store (:mod:`cbir.index.stores.faiss_store`) is the first implementation; others (a
vector database for a cluster) plug in here and run ``tests/store_conformance.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class SearchParams:
    """Per-call search settings; ``None`` keeps the store's default (set at build time from
    the index plan). Each applies only to index types that have the setting."""

    nprobe: int | None = None  #: IVF lists visited
    ef_search: int | None = None  #: HNSW candidate-list depth
    k_factor: float | None = None  #: refine step: candidates re-ranked = k_factor * k


class VectorSource(Protocol):
    """What a store (re)builds from: the catalogue's ``ok`` vectors (one snapshot)."""

    dim: int

    def count(self) -> int:
        """Number of vectors."""
        ...

    def ids(self) -> np.ndarray:
        """All ids, ascending (int64)."""
        ...

    def chunks(self, size: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) in ascending id order, ``size`` rows at a time (bounded memory)."""
        ...

    def fetch(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of these ids (those that exist), in the order given."""
        ...

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` vectors drawn without replacement (all of them when there are fewer)."""
        ...


@runtime_checkable
class VectorStore(Protocol):
    """A searchable, durable copy of the catalogue's vectors (see the module docstring).

    Thread safety: ``search`` may run in several threads at once and alongside
    ``compact``; the other methods are called by one writer at a time, which the index
    guarantees (its own read-write lock and the folder's writer lock).
    """

    dim: int

    @property
    def generation(self) -> int:
        """Catalogue generation of the durable state this store holds (-1: none)."""
        ...

    @property
    def min_vectors(self) -> int:
        """Fewest vectors this store's index type can be built with (training); 0 if any."""
        ...

    def count(self) -> int:
        """Number of searchable vectors."""
        ...

    def ids(self) -> np.ndarray:
        """Every searchable id, ascending (int64)."""
        ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Stage new vectors (float32, L2-normalised, ``(n, dim)``) under new ids."""
        ...

    def remove(self, ids: np.ndarray) -> None:
        """Stage removals; ids the store does not hold are ignored."""
        ...

    def flush(self, generation: int) -> None:
        """Make the staged changes durable and searchable as catalogue ``generation``
        (>= :attr:`generation`); with nothing staged it records the generation only."""
        ...

    def discard(self) -> None:
        """Forget staged changes that were not flushed (the catalogue did not commit)."""
        ...

    def load(self, generation: int) -> bool:
        """Bring the searchable state to catalogue ``generation`` from durable storage.
        True when it holds exactly that generation afterwards; False when it cannot
        (then the caller reconciles or rebuilds). Cheap when little changed."""
        ...

    def rebuild(self, source: VectorSource, generation: int) -> None:
        """Replace everything with ``source`` (trains if the index type needs it)."""
        ...

    def compact(self, source: VectorSource, *, force: bool = False, bulk: bool = False) -> bool:
        """Housekeeping after a committed change: fold accumulated changes into a fresh
        base when they outgrow their share (``bulk``: in the middle of a long sync, where
        a larger share is fine), or now with ``force``. ``source`` holds the catalogue at
        :attr:`generation`. Returns True if it compacted; stores that keep themselves
        compact return False."""
        ...

    def tidy(self) -> None:
        """Delete leftovers of interrupted writes (the caller holds the writer lock)."""
        ...

    def search(self, queries: np.ndarray, k: int, params: SearchParams | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each ``(len(queries), k)``, best first; missing slots have id -1
        and score -inf."""
        ...

    def info(self) -> dict[str, Any]:
        """What the store holds, for ``cbir stats`` (JSON-serialisable)."""
        ...

    def close(self) -> None:
        """Release memory and files; the durable state stays."""
        ...


@dataclass
class ReconcileReport:
    """What :func:`reconcile` changed."""

    added: int = 0
    removed: int = 0  #: -1 when the store was rebuilt (everything replaced)


def reconcile(
    store: VectorStore,
    source: VectorSource,
    generation: int,
    *,
    max_share: float = 0.25,
    chunk: int = 20_000,
) -> ReconcileReport:
    """Make ``store`` hold exactly ``source``'s ids, by difference: ids it lacks are added
    (their vectors fetched from ``source``), ids it has in excess removed, then flushed as
    ``generation``. Its cost is reading both id lists plus the changed vectors, so a store
    one batch away from the catalogue is repaired without rebuilding.

    Vectors under an id are never rewritten (ids are not reused), so equal id sets mean
    equal contents. A store whose durable state is *newer* than ``generation`` (it folded
    a change the catalogue never committed into its base) cannot go back: it is rebuilt;
    so is one that differs in more than ``max_share`` of the vectors (or 1,024, whichever
    is more), where building afresh is cheaper than replaying the difference.
    """
    if store.generation > generation:
        store.discard()
        store.rebuild(source, generation)
        return ReconcileReport(added=source.count(), removed=-1)
    want = source.ids()
    have = store.ids()
    missing = np.setdiff1d(want, have, assume_unique=True)
    extra = np.setdiff1d(have, want, assume_unique=True)
    if len(missing) + len(extra) > max(1024, max_share * len(want)):
        store.discard()
        store.rebuild(source, generation)
        return ReconcileReport(added=len(want), removed=-1)
    if len(extra):
        store.remove(extra)
    for start in range(0, len(missing), chunk):
        ids, vectors = source.fetch(missing[start : start + chunk].tolist())
        if len(ids):
            store.add(ids, vectors)
    store.flush(generation)
    return ReconcileReport(added=len(missing), removed=len(extra))


class ArraySource:
    """A :class:`VectorSource` over arrays in memory (tests, benchmarks, imports).

    ``reads`` records each full read (``"chunks"``) and each fetch by id (``"fetch"``), so
    a caller can tell a store's rebuild from its extension."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
        self._ids = np.asarray(ids, dtype=np.int64)[order]
        self._vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32)[order])
        self.dim = int(self._vectors.shape[1]) if self._vectors.ndim == 2 else 0
        self.reads: list[str] = []

    def count(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        return self._ids.copy()

    def chunks(self, size: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self.reads.append("chunks")
        for start in range(0, len(self._ids), size):
            yield self._ids[start : start + size], self._vectors[start : start + size]

    def fetch(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        self.reads.append("fetch")
        wanted = np.asarray(list(ids), dtype=np.int64)
        pos = np.searchsorted(self._ids, wanted)
        pos = np.clip(pos, 0, max(len(self._ids) - 1, 0))
        found = (self._ids[pos] == wanted) if len(self._ids) else np.zeros(len(wanted), bool)
        return wanted[found], self._vectors[pos[found]]

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        if n >= len(self._ids):
            return self._vectors.copy()
        rows = np.sort(np.random.default_rng(seed).choice(len(self._ids), n, replace=False))
        return self._vectors[rows]
