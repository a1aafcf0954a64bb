"""An index's settings, kept in the catalogue's ``meta``: the index type as asked (``auto``
or a FAISS factory string), the memory budget, DBA, and the *plan* the type resolved to.

``auto`` is resolved by :func:`cbir.index.ann.plan_index` from the number of vectors and
the memory budget. The plan records the size it was made for; when the collection has
doubled or halved since, the next write re-plans, and a different index type is built
from the catalogue (the factor 2 keeps re-planning rare and its cost per change constant).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from cbir.index.ann import MemoryBudgetError, plan_index
from cbir.index.catalog import Catalog
from cbir.index.errors import CbirIndexError
from cbir.index.stores.faiss_index import make_index
from cbir.index.stores.registry import DEFAULT_STORE, check_store, store_name
from cbir.models.descriptor import Descriptor, build_descriptor

AUTO = "auto"
DEFAULT_FACTORY = AUTO
DEFAULT_DBA_ALPHA = 3.0


def resolve_descriptor(model: str | os.PathLike | Descriptor | None) -> Descriptor:
    """A descriptor from a backbone name, a descriptor file, or a descriptor (default: the
    package's default descriptor)."""
    if isinstance(model, Descriptor):
        return model.eval()
    try:
        return build_descriptor() if model is None else build_descriptor(model)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        raise CbirIndexError(f"cannot build descriptor {model!r}: {exc}") from exc


def make_plan(factory: str, n: int, dim: int, memory_budget: int | None) -> dict[str, Any]:
    """The plan for ``factory`` at ``n`` vectors: a FAISS factory string with its search
    defaults; ``auto`` asks the planner, anything else is checked by building it."""
    if factory == AUTO:
        try:
            p = plan_index(n, dim, memory_budget)
        except MemoryBudgetError as exc:
            raise CbirIndexError(str(exc)) from exc
        plan = {"factory": p.factory, "nprobe": p.nprobe, "ef_search": p.ef_search, "k_factor": p.k_factor}
        return {**plan, "reason": p.reason, "n": n}
    make_index(dim, factory)  # raises FactoryError (a CbirIndexError) for a bad string
    return {"factory": factory, "reason": "given", "n": n}


class IndexSettings:
    """Typed access to the settings in an open catalogue (read fresh on each access, so a
    change committed by another process is seen)."""

    def __init__(self, catalog: Catalog, dim: int) -> None:
        self.catalog = catalog
        self.dim = dim

    @staticmethod
    def initial(
        descriptor: Descriptor,
        factory: str | None,
        memory_budget: int | None,
        dba: int | None,
        dba_alpha: float | None,
        store: str = "",
    ) -> dict[str, str]:
        """The ``meta`` rows of a new index (validated before anything is written).
        ``store``: "" for the folder's FAISS store, else a vector database's setting
        (:func:`cbir.index.stores.milvus.store_setting`), which indexes by its own rules."""
        if store:
            _check_external(factory, memory_budget)
            factory = "Flat"  # unused by an external store; never re-planned
        factory = factory or DEFAULT_FACTORY
        plan = make_plan(factory, 0, int(descriptor.dim), memory_budget)
        check_store(store_name(store))
        return {
            "identity": descriptor.identity(),
            "descriptor": descriptor.describe_name(),
            "dim": str(descriptor.dim),
            "factory": factory,
            "memory_budget": "" if memory_budget is None else str(int(memory_budget)),
            "plan": json.dumps(plan),
            "dba": str(int(dba or 0)),
            "dba_alpha": str(DEFAULT_DBA_ALPHA if dba_alpha is None else float(dba_alpha)),
            "dba_generation": "0",
            "store": store or DEFAULT_STORE,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    @property
    def factory(self) -> str:
        return self.catalog.get_meta("factory") or DEFAULT_FACTORY

    @property
    def store_name(self) -> str:
        """The vector store's registered name (:mod:`cbir.index.stores.registry`)."""
        return store_name(self.store)

    @property
    def memory_budget(self) -> int | None:
        value = self.catalog.get_meta("memory_budget")
        return int(value) if value else None

    @property
    def plan(self) -> dict[str, Any]:
        """The resolved plan (indexes made before plans existed: their factory as given)."""
        raw = self.catalog.get_meta("plan")
        if raw:
            return json.loads(raw)
        factory = self.factory
        return {"factory": "Flat" if factory == AUTO else factory, "reason": "given", "n": 0}

    @property
    def store(self) -> str:
        """"" for the folder's FAISS store, else the vector database setting."""
        value = self.catalog.get_meta("store") or ""
        return "" if value == DEFAULT_STORE else value

    @property
    def dba(self) -> int:
        return int(self.catalog.get_meta("dba") or 0)

    @property
    def dba_alpha(self) -> float:
        return float(self.catalog.get_meta("dba_alpha") or DEFAULT_DBA_ALPHA)

    @property
    def dba_generation(self) -> int:
        return int(self.catalog.get_meta("dba_generation") or -1)

    def changes(
        self,
        factory: str | None,
        memory_budget: int | None,
        dba: int | None,
        dba_alpha: float | None,
        store: str | None = None,
        folder: str | os.PathLike = ".",
    ) -> dict[str, str]:
        """The ``meta`` rows that opening with these options changes (empty: none). A new
        factory or budget comes with a new plan, validated here; ``store`` (``faiss`` or
        ``milvus:URI``) moves the vectors to another store, rebuilt from the catalogue."""
        out: dict[str, str] = {}
        if store is not None:
            from cbir.index.stores.milvus import store_setting  # optional dependency

            new_store = store_setting(store, folder, self.store)
            if new_store is not None:
                out["store"] = new_store
        if (out.get("store") if "store" in out else self.store) and (factory is not None or memory_budget is not None):
            _check_external(factory, memory_budget)
        if dba is not None and int(dba) != self.dba:
            out["dba"] = str(int(dba))
        if dba_alpha is not None and float(dba_alpha) != self.dba_alpha:
            out["dba_alpha"] = str(float(dba_alpha))
        new_factory = factory if factory is not None and factory != self.factory else None
        new_budget = memory_budget if memory_budget is not None and memory_budget != self.memory_budget else None
        if new_factory is not None or new_budget is not None:
            f = new_factory or self.factory
            budget = new_budget if new_budget is not None else self.memory_budget
            out["factory"] = f
            out["memory_budget"] = "" if budget is None else str(int(budget))
            out["plan"] = json.dumps(make_plan(f, self.catalog.counts()["ok"], self.dim, budget))
        return out

    def needs_rebuild(self, changes: dict[str, str]) -> bool:
        """Whether these changes alter what the store indexes (type, or DBA vectors)."""
        if "dba" in changes or "dba_alpha" in changes or "store" in changes:
            return True
        return "plan" in changes and json.loads(changes["plan"])["factory"] != self.plan["factory"]

    def replan(self, n: int) -> dict[str, str] | None:
        """For an ``auto`` index that has doubled or halved since its plan: the new ``meta``
        rows (None when nothing is due). The caller rebuilds if the type changed."""
        if self.factory != AUTO or self.store:
            return None
        plan = self.plan
        planned = int(plan.get("n", 0))
        if (planned and planned / 2 <= n <= planned * 2) or (not planned and not n):
            return None
        new = make_plan(AUTO, n, self.dim, self.memory_budget)
        return {"plan": json.dumps(new)}


def _check_external(factory: str | None, memory_budget: int | None) -> None:
    """--index and --memory-budget choose a FAISS index; a vector database has its own."""
    if (factory not in (None, AUTO, "Flat")) or memory_budget is not None:
        raise CbirIndexError(
            "--index and --memory-budget choose the FAISS index; with a Milvus store, give its "
            "index type in the store setting instead (e.g. --store 'milvus:FILE.db#index=HNSW,M=16')"
        )
