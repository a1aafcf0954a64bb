"""Which vector store an index uses: a name recorded in the catalogue (``meta.store``,
default ``faiss``) and a maker registered under it, so another store (a vector database
for a cluster) plugs in without touching the index."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbir.index.errors import CbirIndexError
from cbir.index.stores.base import SearchParams, VectorStore
from cbir.index.stores.faiss_store import FaissStore

DEFAULT_STORE = "faiss"


@dataclass(frozen=True)
class StoreSpec:
    """What an index tells a store maker."""

    folder: Path  #: the index folder's ``vectors/``: the store's own files, if any
    dim: int
    factory: str  #: the FAISS factory string of the index's plan (others may ignore it)
    defaults: SearchParams  #: the plan's search settings
    readonly: bool
    #: keeps searches out while the store changes in place (the index's write lock)
    exclusive: Callable[[], AbstractContextManager[Any]]
    #: the whole ``meta.store`` setting ("" for the default store; ``milvus:URI#...`` for Milvus)
    setting: str = ""
    #: the descriptor identity of the index (a shared vector database checks it is the right one)
    identity: str = ""


StoreMaker = Callable[[StoreSpec], VectorStore]
_makers: dict[str, StoreMaker] = {}


def register_store(name: str, maker: StoreMaker) -> None:
    """Make ``name`` a store an index can record and open."""
    _makers[name] = maker


def check_store(name: str) -> StoreMaker:
    """The maker registered as ``name`` (a clear error for an unknown name)."""
    maker = _makers.get(name)
    if maker is None:
        known = ", ".join(sorted(_makers))
        raise CbirIndexError(f"unknown vector store {name!r} (known: {known}); is its package installed?")
    return maker


def store_name(setting: str) -> str:
    """The registered name a ``meta.store`` setting refers to: ``milvus:URI#opts`` -> ``milvus``."""
    return setting.partition("#")[0].partition(":")[0].strip().lower() or DEFAULT_STORE


def make_store(name: str, spec: StoreSpec) -> VectorStore:
    return check_store(name)(spec)


def _faiss(spec: StoreSpec) -> VectorStore:
    return FaissStore(spec.folder, spec.dim, spec.factory, readonly=spec.readonly, defaults=spec.defaults,
                      exclusive=spec.exclusive)  # fmt: skip


def _milvus(spec: StoreSpec) -> VectorStore:
    from cbir.index.stores.milvus import open_store  # optional dependency: imported when used

    return open_store(spec.setting, spec.dim, identity=spec.identity, readonly=spec.readonly, defaults=spec.defaults)


register_store(DEFAULT_STORE, _faiss)
register_store("milvus", _milvus)
