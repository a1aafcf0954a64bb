"""The FAISS vector store: an immutable base index, a journal of changes since, compaction.

Files, in the store's folder (``vectors/`` of an index folder)::

    store.json              manifest: factory, base file + checksum, journal, trained file
    base-<gen>.faiss        the base index built at catalogue generation <gen> (+ its ids)
    journal-<gen>.log       additions and removals since that base, one segment per change
    trained-<key>.faiss     the trained empty index, so compaction never retrains

Why this shape: a change costs one journal append (O(change) bytes, fsync'ed) instead of
rewriting the whole index (13 s at a million 1280-d vectors). Added vectors live in a small
exact (flat) *delta* index that is searched beside the base; removed base vectors become
tombstones, positions that an ``IDSelector`` hides at search time, so every FAISS type
(HNSW and ``IndexRefine`` included, which cannot remove in place) handles deletions the
same way. When the delta and tombstones outgrow a share of the base (see
:class:`CompactionPolicy`), compaction writes a new base from the catalogue with the cached
trained index, switches the manifest, and deletes the old files: O(collection), but rarely
enough that its cost per change is a constant.

Every file carries a checksum (xxh3, recorded in the manifest for the base and trained
files; per segment in the journal), checked before FAISS parses a byte of it. Anything
that does not match makes :meth:`FaissStore.load` answer False, and the index repairs the
store from the catalogue.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cbir.fileio import atomic_write_text
from cbir.index import faults
from cbir.index.stores import faiss_index as fx
from cbir.index.stores.base import SearchParams, VectorSource
from cbir.index.stores.journal import HEADER_BYTES, Journal, JournalError, Segment, remove_quietly

MANIFEST = "store.json"
#: Rows per journal segment: bounds the memory of writing and replaying one segment.
SEGMENT_ROWS = 8192
_STRAY = re.compile(r"^(base-\d+\.(faiss|ids)|journal-\d+\.log|trained-\w+\.faiss|\..*\.tmp)$")


@dataclass(frozen=True)
class CompactionPolicy:
    """When the journal is folded into a new base.

    The two kinds of change cost different things. The **delta** (vectors added since the
    base) is searched exactly by every query, so it is capped: compaction is due when it
    exceeds ``min_pending`` and ``share`` of the base, at most ``max_pending`` (2,048
    1280-d vectors are 10 MB scanned per query). Additions alone are folded in by
    extending the base (seconds), so a small cap is cheap. **Tombstones** cost a search
    almost nothing (an ``IDSelector`` skips them), but folding them in rebuilds the base
    (a graph cannot drop a vector: 15 minutes at a million), so they wait until they are
    ``share`` of the base. During one long sync the cap is lifted and the share is
    ``bulk_share``: the base then grows geometrically, so indexing n images writes O(n)
    base bytes in all.
    """

    min_pending: int = 1024
    share: float = 0.25
    max_pending: int = 2048
    bulk_share: float = 1.0

    def due(self, delta: int, base: int, *, bulk: bool = False, tombstones: int = 0) -> bool:
        if bulk:
            return delta + tombstones > max(self.min_pending, self.bulk_share * base)
        if delta > max(self.min_pending, min(self.share * base, self.max_pending)):
            return True
        return self.tombstones_due(tombstones, base)

    def tombstones_due(self, tombstones: int, base: int) -> bool:
        """Whether the removed vectors are enough of the base to rebuild it without them."""
        return tombstones > max(self.min_pending, self.share * base)


#: The policy of stores made without one (tests swap it for a tiny one to exercise compaction).
DEFAULT_POLICY = CompactionPolicy()


@dataclass
class _View:
    """What a search reads: base (positions 0..n-1), their ids, tombstones, the delta.
    Searches take the current view once; writers mutate the delta and tombstones only
    under the exclusive lock, and swap in a whole new view after a rebuild."""

    dim: int
    base: faiss.Index | None = None
    base_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tombs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    selector: Any = None
    delta: faiss.IndexIDMap2 = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.delta is None:
            self.delta = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def delta_ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.delta.id_map).astype(np.int64)

    def apply(self, add_ids: np.ndarray, add_vectors: np.ndarray, remove_ids: np.ndarray) -> None:
        if len(remove_ids):
            rem = np.asarray(remove_ids, dtype=np.int64)
            self.delta.remove_ids(rem)
            if len(self.base_ids):
                pos = np.clip(np.searchsorted(self.base_ids, rem), 0, len(self.base_ids) - 1)
                hit = pos[self.base_ids[pos] == rem]
                if len(hit):
                    self.tombs = np.union1d(self.tombs, hit)
                    batch = faiss.IDSelectorBatch(self.tombs)
                    self.selector = faiss.IDSelectorNot(batch)
                    self.selector._keep = batch
        if len(add_ids):
            self.delta.add_with_ids(fx.as_float32(add_vectors, self.dim), np.asarray(add_ids, np.int64))

    def count(self) -> int:
        return len(self.base_ids) - len(self.tombs) + int(self.delta.ntotal)


def _manifest_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class FaissStore:
    """A :class:`~cbir.index.stores.base.VectorStore` on FAISS (see the module docstring).

    ``exclusive`` returns a context manager that keeps searches out while the delta or
    tombstones change in place (the index passes its write lock); ``readonly`` stores
    never write a file (a reader, or a writer repairing in memory while another process
    holds the lock).
    """

    def __init__(
        self,
        folder: Path,
        dim: int,
        factory: str,
        *,
        readonly: bool = False,
        defaults: SearchParams = SearchParams(),
        policy: CompactionPolicy | None = None,
        exclusive: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        # validate the factory before anything else; training needs do not change after
        self._min_vectors = fx.min_training_vectors(fx.make_index(dim, factory))
        self.folder = Path(folder)
        self.dim = int(dim)
        self.factory = factory
        self.readonly = readonly
        self.defaults = defaults
        self.policy = policy or DEFAULT_POLICY
        self._exclusive = exclusive
        self._view = _View(self.dim)
        self._generation = -1
        self._manifest: dict[str, Any] | None = None
        self._journal: Journal | None = None
        self._offset = 0  # end of the last journal segment applied (0: none read)
        self._staged: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    # -- state ----------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return self._generation

    @property
    def min_vectors(self) -> int:
        return self._min_vectors

    @property
    def trained(self) -> bool:
        """Whether the base exists (types that need training have been trained)."""
        return self._view.base is not None

    def count(self) -> int:
        return self._view.count()

    def ids(self) -> np.ndarray:
        view = self._view
        alive = np.delete(view.base_ids, view.tombs)
        return np.sort(np.concatenate([alive, view.delta_ids()]))

    def info(self) -> dict[str, Any]:
        view = self._view
        files = [self.folder / n for n in self._files()]
        return {
            "store": "faiss",
            "factory": self.factory,
            "type": fx.index_type(view.base) if view.base is not None else None,
            "trained": view.base is not None,
            "vectors": self.count(),
            "base_vectors": len(view.base_ids),
            "journal_vectors": int(view.delta.ntotal),
            "tombstones": len(view.tombs),
            "generation": self._generation,
            "base_generation": ((self._manifest or {}).get("base") or {}).get("generation"),
            "bytes": sum(fx.nbytes(p) for p in files),
        }

    def _files(self) -> list[str]:
        m = self._manifest or {}
        names = [MANIFEST] if m else []
        for key in ("base", "journal", "trained"):
            if m.get(key):
                names.append(m[key]["file"])
        if m.get("base"):
            names.append(m["base"]["ids"])
        return names

    # -- changes --------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        x = fx.as_float32(vectors, self.dim)
        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} ids for {len(x)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one add")
        self._staged.append((ids, x, np.zeros(0, np.int64)))

    def remove(self, ids: np.ndarray) -> None:
        rem = np.asarray(ids, dtype=np.int64).reshape(-1)
        self._staged.append((np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32), rem))

    def discard(self) -> None:
        self._staged.clear()

    def flush(self, generation: int) -> None:
        if generation < self._generation:
            raise ValueError(f"generation {generation} is older than the store's {self._generation}")
        segments = self._segments(generation)
        self._staged.clear()
        if not self.readonly:
            journal = self._journal
            if journal is None or self._manifest is None:
                if self._view.base is not None or len(self._view.tombs):
                    raise RuntimeError("the store holds an unsaved base: rebuild it before writing")
                journal = self._start(None, None, generation, self._view)
            self._offset = journal.append(segments, self._offset)
        with self._exclusive():
            for s in segments:
                self._view.apply(s.add_ids, s.add_vectors, s.remove_ids)
            self._generation = generation

    def _segments(self, generation: int) -> list[Segment]:
        """The staged changes as journal segments of at most :data:`SEGMENT_ROWS` rows."""
        empty_ids = np.zeros(0, np.int64)
        adds = [(i, v) for i, v, _ in self._staged if len(i)]
        removes = [r for _, _, r in self._staged if len(r)]
        rem = np.unique(np.concatenate(removes)) if removes else empty_ids
        ids = np.concatenate([i for i, _ in adds]) if adds else empty_ids
        vecs = np.concatenate([v for _, v in adds]) if adds else np.zeros((0, self.dim), np.float32)
        out = [Segment(generation, ids[:SEGMENT_ROWS], vecs[:SEGMENT_ROWS], rem)]
        for start in range(SEGMENT_ROWS, len(ids), SEGMENT_ROWS):
            out.append(
                Segment(generation, ids[start : start + SEGMENT_ROWS], vecs[start : start + SEGMENT_ROWS], empty_ids)
            )
        return out

    # -- loading --------------------------------------------------------------------------
    def load(self, generation: int) -> bool:
        for _attempt in range(3):  # a compaction elsewhere may delete the files we name
            try:
                return self._load(generation)
            except FileNotFoundError:
                continue
        return self._reset()

    def _load(self, generation: int) -> bool:
        manifest = self._read_manifest()
        if manifest is None:
            return self._reset()
        view, offset = self._view, self._offset
        if manifest != self._manifest or self._generation > generation:  # new base, or roll back
            try:
                view = self._read_base(manifest)
            except fx.StoreFileError:
                return self._reset()
            offset = 0
        journal = Journal(self.folder / manifest["journal"]["file"], self.dim, manifest["journal"]["base_generation"])
        try:
            scan = journal.scan(offset, generation)
        except JournalError:
            return self._reset()
        reached = scan.segments[-1].generation if scan.segments else None
        with self._exclusive():
            for s in scan.segments:
                view.apply(s.add_ids, s.add_vectors, s.remove_ids)
            self._view, self._offset, self._manifest, self._journal = view, scan.end, manifest, journal
            if offset == 0:
                self._generation = manifest["journal"]["base_generation"]
            if reached is not None:
                self._generation = reached
        return self._generation == generation

    def _reset(self) -> bool:
        """Forget everything (nothing durable could be read): an empty store, generation -1."""
        with self._exclusive():
            self._view, self._generation = _View(self.dim), -1
            self._manifest, self._journal, self._offset = None, None, 0
        return False

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.folder / MANIFEST).read_text())
            body = {k: v for k, v in data.items() if k != "checksum"}
        except (OSError, ValueError, AttributeError):
            return None
        if data.get("checksum") != _manifest_digest(body) or body.get("format") != 1:
            return None
        if body.get("dim") != self.dim or body.get("factory") != self.factory:
            return None  # another type or dimension: rebuild
        return body

    def _read_base(self, manifest: dict[str, Any]) -> _View:
        base = manifest.get("base")
        if not base:
            return _View(self.dim)
        ids = fx.read_ids_file(self.folder / base["ids"], base["ids_xxh3"], base["count"])
        index = fx.read_index_file(self.folder / base["file"], base["xxh3"], self.dim)
        if index.ntotal != len(ids):
            raise fx.StoreFileError(f"{base['file']}: {index.ntotal} vectors for {len(ids)} ids")
        return _View(self.dim, base=index, base_ids=ids)

    # -- building -------------------------------------------------------------------------
    def rebuild(self, source: VectorSource, generation: int) -> None:
        """A new base from ``source`` (trained with the cached trained index when there is
        one for this factory), then an empty journal; the old files are deleted."""
        trained = self._trained_index()
        trained_info = None
        if trained is None and source.count() >= self.min_vectors:
            trained = fx.make_index(self.dim, self.factory)
            if not trained.is_trained:
                trained.train(source.sample(fx.training_sample_size(self.factory, trained, source.count())))
                if not self.readonly:
                    trained_info = self._save_trained(trained)
        view = _View(self.dim)
        if trained is None:  # too few vectors to train: everything stays in the delta
            for ids, vecs in source.chunks():
                view.apply(ids, vecs, np.zeros(0, np.int64))
        else:
            view.base = faiss.clone_index(trained)
            view.base_ids = fx.fill(view.base, source.chunks(), source.count(), self.dim)
        if not self.readonly:
            self._start(view.base, view.base_ids, generation, view, trained_info)
            if view.base is not None:  # serve from the file just written: mapped, not copied
                view.base = fx.read_index_file(self.folder / self._manifest["base"]["file"], None, self.dim)
        with self._exclusive():
            self._view, self._generation = view, generation
        self._staged.clear()

    def compact(self, source: VectorSource, *, force: bool = False, bulk: bool = False) -> bool:
        view = self._view
        base = len(view.base_ids)
        untrained = view.base is None and self.min_vectors > 0 and source.count() >= self.min_vectors
        due = self.policy.due(int(view.delta.ntotal), base, bulk=bulk, tombstones=len(view.tombs))
        if not (force or untrained or due):
            return False
        # tombstones leave only through a rebuild: when they are due, or when asked to now
        fold = len(view.tombs) and (force or self.policy.tombstones_due(len(view.tombs), base))
        if fold or not self._extend(source):
            self.rebuild(source, self._generation)
        return True

    def _extend(self, source: VectorSource) -> bool:
        """Compaction by extension: the base file read into memory, the new vectors
        added at its end, written as the new base. Every FAISS type the planner uses adds
        in place once trained, so this is the base a rebuild would make (same positions,
        same codes; a graph gets the same insertions in the same order) at the cost of the
        change plus one write of the file, not a rebuild of the collection: 16 minutes for
        a graph of a million vectors, a minute for an inverted file.

        Removed vectors stay in the extended base as tombstones (a graph cannot drop a
        vector), carried into the new journal; they are folded in by a rebuild once they
        are a share of the base (:class:`CompactionPolicy`). Only when the catalogue's ids
        are exactly the base's live ones followed by the new ones, ascending; else False
        and the caller rebuilds."""
        view, manifest = self._view, self._manifest
        if view.base is None or not view.delta.ntotal or not manifest or self.readonly:
            return False
        new = np.sort(view.delta_ids())
        if len(view.base_ids) and new[0] <= view.base_ids[-1]:
            return False
        live = np.delete(view.base_ids, view.tombs)
        ids = source.ids()
        n = len(live)
        if len(ids) != n + len(new) or not (np.array_equal(ids[:n], live) and np.array_equal(ids[n:], new)):
            return False
        got, vectors = source.fetch(new)
        if not np.array_equal(got, new):
            return False
        entry = manifest["base"]
        base = fx.read_index_file(self.folder / entry["file"], entry["xxh3"], self.dim, mapped=False)
        base.add(fx.as_float32(vectors, self.dim))
        all_ids = np.concatenate([view.base_ids, new])
        grown = _View(self.dim, base=base, base_ids=all_ids)
        grown.apply(np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32), view.base_ids[view.tombs])
        self._start(base, all_ids, self._generation, grown)
        grown.base = fx.read_index_file(self.folder / self._manifest["base"]["file"], None, self.dim)
        with self._exclusive():
            self._view = grown
        self._staged.clear()
        return True

    def _start(
        self,
        base: faiss.Index | None,
        base_ids: np.ndarray | None,
        generation: int,
        view: _View,
        trained_info: dict[str, Any] | None = None,
    ) -> Journal:
        """Write a base (if any) and a journal holding ``view``'s delta, switch the manifest
        to them, delete the files it named before. Returns the new journal."""
        old = set(self._files())
        manifest: dict[str, Any] = {"format": 1, "store": "faiss", "dim": self.dim, "factory": self.factory}
        manifest["trained"] = trained_info or (self._manifest or self._read_manifest() or {}).get("trained")
        manifest["base"] = None
        if base is not None:
            name, ids_name = f"base-{generation}.faiss", f"base-{generation}.ids"
            ids_digest, _ = fx.write_ids_file(self.folder / ids_name, base_ids)
            digest, size = fx.write_index_file(self.folder / name, base)
            manifest["base"] = {"file": name, "ids": ids_name, "generation": generation, "count": len(base_ids),
                                "xxh3": digest, "ids_xxh3": ids_digest, "bytes": size}  # fmt: skip
            faults.point("compact.base_written")
        journal = Journal(self.folder / f"journal-{generation}.log", self.dim, generation)
        journal.create()
        segments = list(_delta_segments(view, generation))
        if len(view.tombs):  # removed ids whose vectors an extended base still holds
            no_vectors = np.zeros((0, self.dim), np.float32)
            segments.append(Segment(generation, np.zeros(0, np.int64), no_vectors, view.base_ids[view.tombs]))
        offset = journal.append(segments, HEADER_BYTES)
        manifest["journal"] = {"file": journal.path.name, "base_generation": generation}
        self._write_manifest(manifest)
        faults.point("compact.manifest_written")
        remove_quietly(*(self.folder / n for n in old - set(self._files())))
        self._journal, self._offset = journal, offset
        return journal

    def _write_manifest(self, body: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / MANIFEST, json.dumps({**body, "checksum": _manifest_digest(body)}, indent=1))
        self._manifest = body

    def _trained_index(self) -> faiss.Index | None:
        """The cached trained empty index for this factory, if its file checks out. Read
        into memory, not mapped: vectors are added to its clones, and FAISS aborts the
        process when an add grows storage that is mapped from a file (a graph's or a
        refinement's 8-bit vectors)."""
        info = (self._manifest or self._read_manifest() or {}).get("trained")
        if not info or info.get("factory") != self.factory:
            return None
        try:
            index = fx.read_index_file(self.folder / info["file"], info["xxh3"], self.dim, mapped=False)
        except (fx.StoreFileError, FileNotFoundError):
            return None
        return index if index.is_trained and index.ntotal == 0 else None

    def _save_trained(self, trained: faiss.Index) -> dict[str, Any]:
        """Write the trained empty index; returns its manifest entry."""
        name = f"trained-{hashlib.sha1(self.factory.encode()).hexdigest()[:10]}.faiss"
        digest, _ = fx.write_index_file(self.folder / name, trained)
        return {"file": name, "factory": self.factory, "xxh3": digest}

    # -- searching ------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, params: SearchParams | None = None) -> tuple[np.ndarray, np.ndarray]:
        view = self._view
        q = fx.as_float32(queries, self.dim)
        p = self._params(params)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        n_base = len(view.base_ids)
        if view.base is not None and n_base:
            sp = fx.search_parameters(view.base, p, view.selector)
            scores, pos = view.base.search(q, min(k, n_base), params=sp)
            ids = np.where(pos >= 0, view.base_ids[np.clip(pos, 0, n_base - 1)], -1)
            parts.append((np.where(pos >= 0, scores, -np.inf), ids))
        if view.delta.ntotal:
            scores, ids = view.delta.search(q, min(k, int(view.delta.ntotal)))
            parts.append((np.where(ids >= 0, scores, -np.inf), ids))
        return _merge(parts, len(q), k)

    def _params(self, params: SearchParams | None) -> SearchParams:
        if params is None:
            return self.defaults
        d = self.defaults
        return replace(
            params,
            nprobe=params.nprobe if params.nprobe is not None else d.nprobe,
            ef_search=params.ef_search if params.ef_search is not None else d.ef_search,
            k_factor=params.k_factor if params.k_factor is not None else d.k_factor,
        )

    # -- housekeeping ---------------------------------------------------------------------
    def tidy(self) -> None:
        """Delete files of interrupted writes that the manifest does not name (the caller
        holds the index's writer lock, so no other writer is producing them)."""
        if self.readonly or not self.folder.is_dir():
            return
        manifest = self._read_manifest()
        keep = {MANIFEST}
        if manifest is not None:
            keep |= {manifest[k]["file"] for k in ("base", "journal", "trained") if manifest.get(k)}
            keep |= {manifest["base"]["ids"]} if manifest.get("base") else set()
        stray = [p for p in self.folder.iterdir() if _STRAY.match(p.name) and p.name not in keep]
        remove_quietly(*stray)

    def close(self) -> None:
        with self._exclusive():
            self._view = _View(self.dim)
        self._staged.clear()


def _delta_segments(view: _View, generation: int) -> Iterator[Segment]:
    """The delta's vectors as journal segments (when a new journal must carry them)."""
    ids = view.delta_ids()
    flat = faiss.downcast_index(view.delta.index)
    vecs = faiss.rev_swig_ptr(flat.get_xb(), len(ids) * view.dim).reshape(len(ids), view.dim)
    for start in range(0, len(ids), SEGMENT_ROWS):
        part = slice(start, start + SEGMENT_ROWS)
        yield Segment(generation, ids[part], vecs[part].copy(), np.zeros(0, np.int64))


def _merge(parts: list[tuple[np.ndarray, np.ndarray]], nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of several (scores, ids) result lists, padded with (-inf, -1)."""
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    ids = np.full((nq, k), -1, dtype=np.int64)
    if not parts:
        return scores, ids
    all_s = np.hstack([s for s, _ in parts]).astype(np.float32)
    all_i = np.hstack([i for _, i in parts])
    order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
    take = min(k, all_s.shape[1])
    scores[:, :take] = np.take_along_axis(all_s, order, axis=1)
    ids[:, :take] = np.take_along_axis(all_i, order, axis=1)
    ids[~np.isfinite(scores)] = -1
    return scores, ids
