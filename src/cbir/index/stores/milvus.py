"""Milvus as a :class:`~cbir.index.stores.base.VectorStore`: the same index, searched by a
vector database that shards, replicates and serves billions of vectors across machines.

``--store milvus:URI`` (see :func:`parse_store_spec`): ``URI`` is a local ``.db`` file,
run in-process by Milvus Lite (the same engine, one process at a time), or
``http://host:19530`` for a Milvus standalone server or cluster; the code is the same.
The catalogue (SQLite, in the index folder) stays the truth for paths, hashes and raw
vectors; the collection holds ``(id, vector)`` with the catalogue's ids as primary keys.

Durability follows the protocol of :mod:`cbir.index.stores.base` without transactions,
which Milvus does not have: a flush first marks the collection ``pending`` (collection
properties), then deletes, upserts and flushes the segments, then records the generation
and clears the mark. A collection found pending, or at a generation other than the
catalogue's, is repaired by :func:`~cbir.index.stores.base.reconcile`'s id difference.
That is exact for any interrupted state because ids are never reused and a vector under
an id never changes: equal id sets mean equal contents, so a crash costs the difference,
never a rebuild of millions of vectors.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cbir.errors import CbirError
from cbir.index.stores.base import SearchParams, VectorSource

GENERATION = "cbir.generation"
PENDING = "cbir.pending"
DEFAULT_LITE_FILE = "milvus.db"
#: build parameters per Milvus index type; search-time ones (ef, nprobe) come from SearchParams
BUILD_KEYS = {"M", "efConstruction", "nlist", "m", "nbits", "search_list_size"}
INSERT_ROWS = 5_000  # rows per insert call: well under Milvus's 64 MB gRPC message limit at 1280-d
MAX_TOPK = 16_384  # Milvus's limit on k


class MilvusStoreError(CbirError):
    """The Milvus store cannot be reached or does not hold what the index expects."""

    code = "milvus_error"
    http_status = 503


@dataclass(frozen=True)
class MilvusSpec:
    """Where the vectors live: ``uri`` (a Milvus Lite file or a server), the collection,
    and the Milvus index type with its build parameters."""

    uri: str
    collection: str = ""
    index: str = "AUTOINDEX"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def lite(self) -> bool:
        return not self.uri.startswith(("http://", "https://", "tcp://", "unix:"))

    def to_meta(self) -> str:
        opts = ",".join([f"index={self.index}", f"collection={self.collection}"]
                        + [f"{k}={v}" for k, v in sorted(self.params.items())])  # fmt: skip
        return f"milvus:{self.uri}#{opts}"


def parse_store_spec(spec: str, folder: str | os.PathLike | None = None) -> MilvusSpec:
    """``milvus[:URI][#index=HNSW,M=16,collection=NAME]`` -> :class:`MilvusSpec`.

    No URI: a Milvus Lite file inside the index ``folder``. A relative ``.db`` path is made
    absolute (the server and later runs may start elsewhere). No collection: a new random
    name, so several indexes can share one Milvus server.
    """
    body, _, fragment = spec.partition("#")
    if body != "milvus" and not body.startswith("milvus:"):
        raise MilvusStoreError(f"not a Milvus store: {spec!r} (milvus:FILE.db or milvus:http://HOST:19530)")
    uri = body[len("milvus:") :] if body.startswith("milvus:") else ""
    if not uri:
        if folder is None:
            raise MilvusStoreError("milvus: give a URI (milvus:FILE.db or milvus:http://HOST:19530)")
        uri = os.path.join(os.fspath(folder), DEFAULT_LITE_FILE)
    options: dict[str, str] = {}
    for part in filter(None, fragment.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise MilvusStoreError(f"milvus store option {part!r}: write key=value")
        options[key.strip()] = value.strip()
    index = options.pop("index", "AUTOINDEX").upper()
    collection = options.pop("collection", "") or f"cbir_{secrets.token_hex(8)}"
    unknown = set(options) - BUILD_KEYS
    if unknown:
        known = ["index", "collection", *sorted(BUILD_KEYS)]
        raise MilvusStoreError(f"unknown milvus store options {sorted(unknown)}: use {', '.join(known)}")
    params = {k: int(v) if v.isdigit() else v for k, v in options.items()}
    spec_ = MilvusSpec(uri=uri, collection=collection, index=index, params=params)
    if spec_.lite:
        spec_ = MilvusSpec(os.path.abspath(uri), collection, index, params)
    return spec_


def _client(uri: str) -> Any:
    from cbir.distributed.deps import require

    pymilvus = require("pymilvus", "the Milvus store")
    if not uri.startswith(("http://", "https://", "tcp://", "unix:")):
        require("milvus_lite", "a Milvus Lite file store")
    token = os.environ.get("MILVUS_TOKEN", "")  # user:password or an API key, for secured servers
    try:
        return pymilvus.MilvusClient(uri=uri, token=token) if token else pymilvus.MilvusClient(uri=uri)
    except Exception as exc:  # noqa: BLE001 - any connection failure: say where
        hint = ("; a Milvus Lite file serves one process at a time (is another cbir index or cbir serve "
                "using it?): for both at once, use a Milvus server") if not uri.startswith(("http", "tcp")) else ""
        raise MilvusStoreError(f"cannot open Milvus at {_public_uri(uri)}: {exc}{hint}") from exc


class MilvusStore:
    """A :class:`~cbir.index.stores.base.VectorStore` in a Milvus collection (see the module
    docstring). ``identity``: the index's descriptor identity, recorded on the collection so
    that two indexes pointed at one collection by mistake are refused, not mixed."""

    def __init__(
        self,
        spec: MilvusSpec,
        dim: int,
        *,
        identity: str = "",
        readonly: bool = False,
        defaults: SearchParams | None = None,
    ) -> None:
        self.spec = spec
        self.dim = int(dim)
        self.identity = identity
        self.readonly = readonly
        self.defaults = defaults or SearchParams()
        self._client = _client(spec.uri)
        self._staged_add: list[tuple[np.ndarray, np.ndarray]] = []
        self._staged_remove: list[np.ndarray] = []
        self._lock = threading.Lock()  # one writer; searches do not take it
        self._generation = self._stored()[0]
        if self._exists():
            self._load()

    def _load(self) -> None:
        """Load the collection into memory: Milvus searches only loaded collections, and a
        restarted server (or a reopened Lite file) holds them released."""
        state = self._client.get_load_state(self.name).get("state")
        if getattr(state, "name", str(state)) != "Loaded":
            self._client.load_collection(self.name)

    # -- collection and its properties ---------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.collection

    def _exists(self) -> bool:
        return bool(self._client.has_collection(self.name))

    def _stored(self) -> tuple[int, int]:
        """(generation, pending generation) recorded on the collection; (-1, -1) if none."""
        if not self._exists():
            return -1, -1
        props = self._client.describe_collection(self.name).get("properties", {}) or {}
        dim, identity = props.get("cbir.dim"), props.get("cbir.identity")
        if (dim and int(dim) != self.dim) or (identity and self.identity and identity != self.identity):
            raise MilvusStoreError(
                f"Milvus collection {self.name} at {self.spec.uri} holds vectors of another index "
                f"(descriptor {identity}, {dim}-d): give this index its own collection"
            )
        return int(props.get(GENERATION, -1)), int(props.get(PENDING, -1))

    def _set(self, **props: int) -> None:
        self._client.alter_collection_properties(
            self.name, properties={GENERATION if k == "generation" else PENDING: str(v) for k, v in props.items()}
        )

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        index = self._client.prepare_index_params()
        index.add_index("vector", index_type=self.spec.index, metric_type="IP", params=dict(self.spec.params))
        props = {"cbir.dim": str(self.dim), "cbir.identity": self.identity, GENERATION: "-1", PENDING: "-1"}
        self._client.create_collection(self.name, schema=schema, index_params=index,
                                       consistency_level="Strong", properties=props)  # fmt: skip

    def _write_rows(self, ids: np.ndarray, vectors: np.ndarray, *, upsert: bool) -> None:
        write = self._client.upsert if upsert else self._client.insert
        for start in range(0, len(ids), INSERT_ROWS):
            part = slice(start, start + INSERT_ROWS)
            write(self.name, [{"id": int(i), "vector": v} for i, v in zip(ids[part], vectors[part], strict=True)])

    # -- the VectorStore protocol ----------------------------------------------------------
    @property
    def generation(self) -> int:
        return self._generation

    @property
    def min_vectors(self) -> int:
        return 0  # Milvus builds its index types segment by segment, at any size

    def count(self) -> int:
        if not self._exists():
            return 0
        res = self._client.query(self.name, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(res[0]["count(*)"])

    def ids(self) -> np.ndarray:
        if not self._exists():
            return np.zeros(0, np.int64)
        return np.sort(np.fromiter(self._iter_ids(), dtype=np.int64))

    def _iter_ids(self) -> Iterator[int]:
        it = self._client.query_iterator(self.name, batch_size=16_384, filter="", output_fields=["id"])
        try:
            while batch := it.next():
                yield from (int(r["id"]) for r in batch)
        finally:
            it.close()

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors of shape {vectors.shape} for a {self.dim}-d store")
        self._staged_add.append((np.asarray(ids, dtype=np.int64).copy(), vectors.copy()))

    def remove(self, ids: np.ndarray) -> None:
        self._staged_remove.append(np.asarray(ids, dtype=np.int64).copy())

    def discard(self) -> None:
        self._staged_add, self._staged_remove = [], []

    def flush(self, generation: int) -> None:
        if self.readonly:  # a reader never writes the shared collection: the writer keeps it
            self.discard()
            self._generation = generation
            return
        with self._lock:
            if not self._exists():
                self._create()
            adds, removes = self._staged_add, self._staged_remove
            if adds or removes:
                self._set(pending=generation)
                if removes:
                    self._client.delete(self.name, ids=np.unique(np.concatenate(removes)).tolist())
                for ids, vectors in adds:
                    self._write_rows(ids, vectors, upsert=True)  # upsert: a replay never duplicates
                self._client.flush(self.name)
            self._set(generation=generation, pending=-1)
            self.discard()
            self._generation = generation

    def load(self, generation: int) -> bool:
        stored, pending = self._stored()
        if stored == generation and pending < 0:
            self._generation = generation
            return True
        # Interrupted or ahead: the id difference repairs any of these states (see the
        # module docstring), so report a generation that lets reconcile diff, not rebuild.
        self._generation = min(stored, generation)
        return False

    def rebuild(self, source: VectorSource, generation: int) -> None:
        if self.readonly:  # as flush: a reader searches what the writer keeps, never rewrites it
            self.discard()
            self._generation = generation
            return
        with self._lock:
            if self._exists():
                self._client.drop_collection(self.name)
            self._create()
            self._set(pending=generation)
            for ids, vectors in source.chunks(INSERT_ROWS):
                self._write_rows(ids, np.asarray(vectors, np.float32), upsert=False)
            self._client.flush(self.name)
            self._set(generation=generation, pending=-1)
            self.discard()
            self._generation = generation

    def compact(self, source: VectorSource, *, force: bool = False, bulk: bool = False) -> bool:
        """Milvus merges its segments and purges deletions itself; ``force`` asks it now."""
        if force and not self.readonly and self._exists():
            self._client.compact(self.name)
        return False

    def tidy(self) -> None:
        """Nothing to tidy: this store writes no files of its own (Milvus owns its storage)."""

    def search(self, queries: np.ndarray, k: int, params: SearchParams | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        if k <= 0 or not len(q) or not self._exists():
            return scores, ids
        limit = min(k, MAX_TOPK)
        hits = self._client.search(self.name, data=list(q), limit=limit, output_fields=["id"],
                                   search_params=self._search_params(limit, params))  # fmt: skip
        for row, found in enumerate(hits):
            for col, hit in enumerate(found[:limit]):
                ids[row, col] = int(hit["id"])
                scores[row, col] = float(hit["distance"])
        return scores, ids

    def _search_params(self, k: int, params: SearchParams | None) -> dict[str, Any]:
        p = params or SearchParams()
        nprobe = p.nprobe or self.defaults.nprobe
        ef = p.ef_search or self.defaults.ef_search
        out: dict[str, Any] = {}
        if nprobe:
            out["nprobe"] = int(nprobe)
        if ef or self.spec.index.startswith("HNSW"):
            out["ef"] = max(int(ef or 64), k)  # HNSW needs ef >= k
        return {"metric_type": "IP", "params": out}

    def info(self) -> dict[str, Any]:
        return {
            "store": "milvus",
            "uri": _public_uri(self.spec.uri),
            "collection": self.name,
            "index": self.spec.index,
            "params": dict(self.spec.params),
            "vectors": self.count(),
            "generation": self._generation,
        }

    def close(self) -> None:
        self._client.close()


def _public_uri(uri: str) -> str:
    """The URI without credentials (``http://user:pw@host`` -> ``http://host``), for stats."""
    scheme, sep, rest = uri.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else uri


def store_setting(requested: str | None, folder: str | os.PathLike, current: str | None = None) -> str | None:
    """The ``store`` setting to record for ``--store requested`` (None: leave it as it is).

    ``faiss`` is the index folder's own FAISS store (recorded as ""). A Milvus spec that
    names the same place and index type as the current one keeps the current collection
    (a spec without ``collection=`` would otherwise get a new random one)."""
    if requested is None:
        return None
    if requested.strip().lower() == "faiss":
        return "" if current else None
    spec = parse_store_spec(requested.strip(), folder)
    if current:
        now = parse_store_spec(current, folder)
        named = "collection=" in requested
        if (now.uri, now.index, now.params) == (spec.uri, spec.index, spec.params) and (
            not named or now.collection == spec.collection
        ):
            return None
    return spec.to_meta()


def open_store(
    setting: str, dim: int, *, identity: str, readonly: bool, defaults: SearchParams | None = None
) -> MilvusStore:
    """The store an index's ``store`` setting names (the index's ``_make_store`` hook)."""
    return MilvusStore(parse_store_spec(setting), dim, identity=identity, readonly=readonly, defaults=defaults)
