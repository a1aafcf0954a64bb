"""Vector stores: where an index's vectors are searched (see :mod:`cbir.index.stores.base`).

``FaissStore`` keeps them in the index folder (base file + journal); other stores (a
vector database for a cluster) implement the same :class:`VectorStore` protocol and pass
the same conformance tests (``tests/store_conformance.py``).
"""

from cbir.index.stores.base import (
    ArraySource,
    ReconcileReport,
    SearchParams,
    VectorSource,
    VectorStore,
    reconcile,
)
from cbir.index.stores.faiss_store import CompactionPolicy, FaissStore

__all__ = [
    "ArraySource",
    "CompactionPolicy",
    "FaissStore",
    "ReconcileReport",
    "SearchParams",
    "VectorSource",
    "VectorStore",
    "reconcile",
]
