"""The :class:`Index`: a folder that keeps a collection's descriptors in step with its files.

A facade over four parts, each with one job: the folder's files and their integrity
(:mod:`cbir.index.folder`), the catalogue that owns every SQL statement
(:mod:`cbir.index.catalog`), a vector store that searches (:mod:`cbir.index.stores`), and
the sync planning and commit protocol (:mod:`cbir.index.sync`, :mod:`cbir.index.writer`).
The catalogue is the truth; the store is repaired from it whenever it does not reflect the
catalogue's generation (after a crash, or damage found by its checksums).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cbir.data.decode import DEFAULT_MAX_PIXELS
from cbir.index import folder as fl
from cbir.index import opening
from cbir.index.catalog import Catalog, ImageRecord
from cbir.index.duplicates import (
    DEFAULT_THRESHOLD,
    PairCheck,
    PairSearch,
    Verification,
    duplicate_pairs,
    star_groups,
    verified_pairs,
)
from cbir.index.errors import CbirIndexError, DescriptorMismatchError, IndexBusyError
from cbir.index.locks import BusyError, FileLock, ReadWriteLock
from cbir.index.query import Query, QueryResolver
from cbir.index.removal import KEEP_RULES, DuplicateGroup, FileFacts, pixel_count, plan_removal
from cbir.index.settings import IndexSettings, resolve_descriptor
from cbir.index.stores import SearchParams, StoreSpec, VectorStore, make_store
from cbir.index.stores.registry import DEFAULT_STORE, check_store, store_name
from cbir.index.sync import FileStat, under, walk
from cbir.index.writer import IndexWriter, RunOptions, SyncReport, timed
from cbir.models.descriptor import Descriptor
from cbir.postprocess import alpha_qe
from cbir.runtime import DEFAULT_ENGINE, EngineMismatch, engine_for, for_engine


@dataclass
class Hit:
    """One search result: catalogue id, absolute path as stored, similarity (higher = closer)."""

    id: int
    path: str
    score: float


class Index:
    """A persistent, incrementally updated image index. Use :meth:`open` or :meth:`create`.

    Thread-safe: any number of threads may :meth:`search` while one thread adds or
    removes; a search sees the index either before or after each committed batch.
    """

    def __init__(
        self, layout: fl.Layout, catalog: Catalog, descriptor: Descriptor, *, readonly: bool, engine: str, wait: float,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        self.layout = layout
        self.folder = layout.folder
        self.catalog = catalog
        self.descriptor = descriptor
        self.readonly = readonly
        self.engine = engine
        #: ``device`` and ``calibrate`` for the engine's runner (see cbir.runtime.make_runner)
        self.engine_options: dict[str, Any] = dict(engine_options or {})
        self.dim = int(descriptor.dim)
        self.settings = IndexSettings(catalog, self.dim)
        self._wait = wait
        self._rw = ReadWriteLock()
        self._writer = threading.RLock()
        self._flock = FileLock(layout.lock)
        self._closed = False
        self._detached = False  # the store was repaired in memory only (another writer held the lock)
        self._queries = QueryResolver(catalog, descriptor, engine, self.engine_options)
        self._writes = IndexWriter(self)
        self.store: VectorStore = self._make_store()

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike = fl.DEFAULT_DB,
        *,
        model: str | os.PathLike | Descriptor | None = None,
        factory: str | None = None,
        memory_budget: int | None = None,
        dba: int | None = None,
        dba_alpha: float | None = None,
        engine: str | None = None,
        wait: float = 0.0,
        exist_ok: bool = False,
        store: str | None = None,
        device: str = "auto",
        calibrate: str | os.PathLike | None = None,
    ) -> Index:
        """Create an index in ``path`` (a new or empty folder): ``model`` (backbone name,
        descriptor file or :class:`Descriptor`; default: the default descriptor) is saved
        into it; ``factory`` (``auto`` by default: chosen from the collection's size and
        ``memory_budget`` bytes, see :mod:`cbir.index.ann`; or a FAISS factory string) and
        ``dba`` are recorded. The folder is locked and re-checked before anything is
        written; a folder holding part of an index is refused as damaged. ``exist_ok``:
        open an existing index instead of failing. ``store``: ``faiss`` (default, in the
        folder) or a registered vector database's setting such as ``milvus:URI`` (see
        :mod:`cbir.index.stores.registry` and :mod:`cbir.index.stores.milvus`)."""
        layout = fl.Layout(Path(path))
        # the identity records the engine's numerics: an int8 index never takes fp32 vectors
        descriptor = for_engine(resolve_descriptor(model), engine or DEFAULT_ENGINE, calibrate)
        meta = IndexSettings.initial(descriptor, factory, memory_budget, dba, dba_alpha,
                                     store=_store_setting(store, layout.folder))  # fmt: skip
        new = opening.create_folder(layout, descriptor, meta, wait=wait, exist_ok=exist_ok)
        return cls.open(path, model=None if new else model, factory=None if new else factory,
                        memory_budget=None if new else memory_budget, dba=None if new else dba,
                        dba_alpha=None if new else dba_alpha, engine=engine, wait=wait,
                        store=None if new else store, device=device, calibrate=calibrate)  # fmt: skip

    @classmethod
    def open(
        cls,
        path: str | os.PathLike = fl.DEFAULT_DB,
        *,
        model: str | os.PathLike | Descriptor | None = None,
        factory: str | None = None,
        memory_budget: int | None = None,
        create: bool = False,
        readonly: bool = False,
        dba: int | None = None,
        dba_alpha: float | None = None,
        engine: str | None = None,
        wait: float = 0.0,
        store: str | None = None,
        device: str = "auto",
        calibrate: str | os.PathLike | None = None,
    ) -> Index:
        """Open the index in ``path``; with ``create=True`` create it if the folder has none
        (see :meth:`create`). ``model`` is checked against the stored descriptor
        (:class:`DescriptorMismatchError` if it differs); a different ``factory``,
        ``memory_budget`` or ``dba`` re-indexes the stored vectors (no image is read
        again); so does a different ``store`` (moved into it from the catalogue). ``wait``:
        seconds to wait for another writer before failing."""
        layout = fl.Layout(Path(path))
        if create and not readonly and layout.state() in ("absent", "interrupted"):
            return cls.create(path, model=model, factory=factory, memory_budget=memory_budget, dba=dba,
                              dba_alpha=dba_alpha, engine=engine, wait=wait, exist_ok=True, store=store,
                              device=device, calibrate=calibrate)  # fmt: skip
        if model is not None:  # compared with the stored descriptor as the engine would make it
            model = for_engine(resolve_descriptor(model), engine or DEFAULT_ENGINE, calibrate)
        catalog, descriptor = opening.open_catalog(layout, model, readonly=readonly, wait=wait)
        try:
            try:
                engine = engine_for(descriptor, engine)  # None: the engine that made the vectors
            except EngineMismatch as exc:
                raise DescriptorMismatchError(f"the index in {layout.folder}: {exc}") from exc
            options = {"device": device, "calibrate": calibrate}
            index = cls(layout, catalog, descriptor, readonly=readonly, engine=engine, wait=wait,
                        engine_options=options)
            changes = index.settings.changes(factory, memory_budget, dba, dba_alpha, store, layout.folder)
            if changes:
                if readonly:
                    raise CbirIndexError(f"cannot change {', '.join(changes)} of an index opened read-only")
                with index.writer(wait):
                    index._apply_settings(changes)
            else:
                index._attach_store(locked=False)
            return index
        except BaseException:
            catalog.close()
            raise

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the catalogue and the store (everything durable is already on disk)."""
        if self._closed:
            return
        with self._writer, self._rw.write():
            self._closed = True
            self.store.close()
            self.catalog.close()

    # -- the store -------------------------------------------------------------------------
    def _make_store(self) -> VectorStore:
        plan = self.settings.plan
        defaults = SearchParams(plan.get("nprobe"), plan.get("ef_search"), plan.get("k_factor"))
        spec = StoreSpec(self.layout.store, self.dim, plan["factory"], defaults, self.readonly, self._rw.write,
                         setting=self.settings.store, identity=self.catalog.get_meta("identity") or "")  # fmt: skip
        return make_store(self.settings.store_name, spec)

    def _swap_store(self) -> None:
        """A store object for the settings as they read now (another index type)."""
        with self._rw.write():
            old, self.store = self.store, self._make_store()
        old.close()

    def _apply_settings(self, changes: dict[str, str]) -> None:
        """New settings (the caller holds the writer lock): rebuild the store from the
        catalogue if they change what it indexes, else just record them."""
        if self.settings.needs_rebuild(changes):
            self._writes.rebuild_all(changes)
        else:
            self.catalog.set_meta(changes)

    def _attach_store(self, *, locked: bool) -> None:
        """Bring the store to the catalogue's generation (see :meth:`IndexWriter.attach_store`)."""
        self._writes.attach_store(locked=locked)

    def _replan(self) -> bool:
        """Re-plan an ``auto`` index whose size doubled or halved since its plan; True if
        that switched the index type (the store was then rebuilt)."""
        changes = self.settings.replan(self.store.count())
        if not changes:
            return False
        rebuild = self.settings.needs_rebuild(changes)
        self._apply_settings(changes)
        return rebuild

    # -- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, wait: float = 0.0) -> Iterator[Index]:
        """Hold the cross-process writer lock for the block (re-entrant), so that several
        calls (e.g. writing an uploaded file, then :meth:`add`) run as one writer; waits up
        to ``wait`` seconds for another process to finish (:class:`IndexBusyError` after)."""
        if self.readonly:
            raise CbirIndexError("index opened read-only")
        if self._closed:
            raise CbirIndexError("index is closed")
        with self._writer:
            first = not self._flock.held
            try:
                with self._flock.hold(wait):
                    if first:
                        self._catch_up()
                    yield self
            except BusyError as exc:
                raise IndexBusyError(str(exc)) from exc

    def _catch_up(self) -> None:
        """On taking the lock: tidy leftovers, pick up other processes' commits."""
        fl.clean_temporaries(self.layout)
        if self._detached or self.store.generation != self.catalog.generation:
            self._detached = False
            self.store.readonly = False
            self._attach_store(locked=True)
        self.store.tidy()

    def sync(
        self,
        dirs: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        progress: bool = False,
        batch_size: int = 32,
        workers: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        exclude: Sequence[str] | None = None,
        include_hidden: bool | None = None,
    ) -> SyncReport:
        """Make the index mirror the image files under ``dirs``: describe new and changed
        files, drop deleted ones, follow moved/renamed ones by content hash. Files whose
        size and mtime are unchanged are not opened. ``progress``: draw a bar (off by default:
        a library call should not write to the terminal; the CLI turns it on for a person).

        ``exclude`` (glob patterns) and ``include_hidden`` choose which files are walked (see
        :func:`cbir.data.datasets.list_images`). They are recorded in the catalogue, and a later
        sync that gives neither walks by the recorded rule: otherwise a plain re-run would
        index, then a run with the rule drop, the same files over and over."""
        roots = [os.path.abspath(os.fspath(d)) for d in ([dirs] if isinstance(dirs, (str, os.PathLike)) else dirs)]
        for r in roots:
            if not os.path.isdir(r):
                raise CbirIndexError(f"no such folder: {r}")
        start = time.perf_counter()
        with self.writer(self._wait):
            rule = self._walk_rule(exclude, include_hidden)
            with self.catalog.transaction() as tx:
                tx.add_roots(roots)
                tx.set_meta({"walk_exclude": json.dumps(rule[0]), "walk_include_hidden": str(int(rule[1]))})
            files = walk(roots, exclude=rule[0], include_hidden=rule[1])
            report = self._writes.run(files, roots, RunOptions(progress, batch_size, workers, max_pixels))
        return timed(report, start)

    def _walk_rule(self, exclude: Sequence[str] | None, include_hidden: bool | None) -> tuple[list[str], bool]:
        """The folder-walk rule to use: the one given, else the one recorded by the last sync."""
        recorded_exclude = json.loads(self.catalog.get_meta("walk_exclude") or "[]")
        recorded_hidden = (self.catalog.get_meta("walk_include_hidden") or "0") == "1"
        return (
            list(exclude) if exclude is not None else recorded_exclude,
            include_hidden if include_hidden is not None else recorded_hidden,
        )

    def add(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        progress: bool = False,
        batch_size: int = 32,
        workers: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> SyncReport:
        """Add or refresh these files (folders are walked); nothing else is removed."""
        files: dict[str, FileStat] = {}
        for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
            ap = os.path.abspath(os.fspath(p))
            if os.path.isdir(ap):
                exclude, hidden = self._walk_rule(None, None)
                files.update((f.path, f) for f in walk([ap], exclude=exclude, include_hidden=hidden))
            elif os.path.isfile(ap):
                files[ap] = FileStat.of(ap)
            else:
                raise CbirIndexError(f"no such file: {ap}")
        start = time.perf_counter()
        with self.writer(self._wait):
            report = self._writes.run(files.values(), [], RunOptions(progress, batch_size, workers, max_pixels))
        return timed(report, start)

    def remove(self, paths_or_ids: Iterable[str | os.PathLike | int] | str | os.PathLike | int) -> int:
        """Remove files (by path; a folder removes everything under it, and stops being a
        synced root) or catalogue ids. Returns how many records were removed."""
        items = [paths_or_ids] if isinstance(paths_or_ids, (str, os.PathLike, int)) else list(paths_or_ids)
        with self.writer(self._wait):
            ids: set[int] = set()
            roots = set(self.roots)
            for item in items:
                if not isinstance(item, (str, os.PathLike)):
                    ids.add(int(item))
                    continue
                p = os.path.abspath(os.fspath(item))
                if p in roots:
                    with self.catalog.transaction() as tx:
                        tx.remove_root(p)
                ids.update(self.catalog.ids_under(p))
            return self._writes.remove_ids(sorted(ids)) if ids else 0

    def compact(self) -> bool:
        """Fold the store's journal into a new base now (normally automatic)."""
        with self.writer(self._wait):
            return self.store.compact(self.catalog.source(self.dim), force=True)

    def refresh(self) -> bool:
        """Pick up changes another process committed (e.g. ``cbir index`` while a server
        runs); returns True when something changed. Cheap: replays new journal segments."""
        if self.catalog.generation == self.store.generation:
            return False
        with self._writer:
            self._attach_store(locked=self._flock.held)
        return True

    # -- reading ---------------------------------------------------------------------------
    @property
    def factory(self) -> str:
        """The index type as asked (``auto`` or a FAISS factory string)."""
        return self.settings.factory

    @property
    def index_factory(self) -> str:
        """The FAISS factory string in use (what ``auto`` resolved to)."""
        return self.settings.plan["factory"]

    @property
    def dba(self) -> int:
        return self.settings.dba

    @property
    def dba_alpha(self) -> float:
        return self.settings.dba_alpha

    @property
    def roots(self) -> list[str]:
        """Folders recorded by :meth:`sync` (absolute)."""
        return self.catalog.roots()

    def get(self, id_: int) -> ImageRecord | None:
        """The catalogue record of ``id_`` (None if there is none)."""
        return self.catalog.get(id_)

    def lookup(self, path: str | os.PathLike) -> ImageRecord | None:
        """The catalogue record of a file path (made absolute), or None."""
        return self.catalog.by_path(os.path.abspath(os.fspath(path)))

    def __len__(self) -> int:
        return self.catalog.counts()["ok"]

    def relative_path(self, path: str | os.PathLike) -> str:
        """``path`` relative to the (innermost) indexed root holding it; unchanged if none."""
        p = os.path.abspath(os.fspath(path))
        roots = [r for r in self.roots if under(p, r)]
        return os.path.relpath(p, max(roots, key=len)) if roots else os.fspath(path)

    def stats(self) -> dict[str, Any]:
        counts = self.catalog.counts()
        store = self.store.info()
        plan = self.settings.plan
        return {
            "images": counts["ok"],
            "failures": counts["failed"],
            "descriptor": self.catalog.get_meta("descriptor"),
            "identity": self.catalog.get_meta("identity"),
            "index": f"milvus:{store.get('index')}" if self.settings.store else plan["factory"],
            "index_requested": self.factory,
            "index_reason": plan.get("reason", "given"),
            "dim": self.dim,
            "roots": self.roots,
            "dba": self.dba,
            "trained": bool(store.get("trained", True)),
            "faiss_vectors": self.store.count(),
            "generation": self.catalog.generation,
            "store": store,
            "path": os.path.abspath(self.folder),
            "bytes": sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file()),
        }

    def failures(self) -> list[ImageRecord]:
        return self.catalog.records(status="failed")

    def describe(self, image: Image.Image | bytes | str | os.PathLike) -> Any:
        """The unit descriptor of one image, decoded and resized exactly as indexing does."""
        return self._queries.describe(image)

    def search(
        self,
        query: Query,
        k: int = 20,
        *,
        qe: int = 0,
        alpha: float = 3.0,
        nprobe: int | None = None,
        ef_search: int | None = None,
        k_factor: float | None = None,
        exclude_self: bool = False,
    ) -> list[Hit]:
        """The ``k`` most similar indexed images, best first.

        ``query``: a PIL image, encoded image bytes, a descriptor vector, or a path (an
        indexed path uses its stored vector, else the file is read). ``qe`` > 0 applies
        alpha-query expansion (Radenovic et al. 2018): the query is re-formed from itself
        and its top ``qe`` results weighted by ``similarity ** alpha``, then searched again.
        ``exclude_self`` drops the query's own file (by catalogue entry or identical
        content). ``nprobe``/``ef_search``/``k_factor`` tune IVF/HNSW/refine types for this
        call only.
        """
        if k <= 0:
            return []
        q, own = self._queries.resolve(query)
        excluded = own if exclude_self else set()
        params = SearchParams(nprobe, ef_search, k_factor)
        with self._rw.read():
            if self._closed:
                raise CbirIndexError("index is closed")
            depth = k + len(excluded)
            found = self._search(q, max(depth, qe + len(excluded)), params)
            if qe > 0:
                nn = [i for i, _ in found if i not in excluded][:qe]
                if nn:
                    got, db = self.catalog.vectors(nn, dim=self.dim, augmented=True)
                    sims = db @ q
                    q = alpha_qe(q[None], db, [list(range(len(got)))], sims[None], k=len(got), alpha=alpha)[0]
                    found = self._search(q, depth, params)
            keep = [(i, s) for i, s in found if i not in excluded][:k]
            paths = self.catalog.paths_for([i for i, _ in keep])
        return [Hit(id=i, path=paths[i], score=s) for i, s in keep if i in paths]

    def _search(self, q: Any, depth: int, params: SearchParams) -> list[tuple[int, float]]:
        scores, ids = self.store.search(q[None], max(1, depth), params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def duplicates(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        how: PairSearch = PairSearch(),
        verify: Verification | None = None,
    ) -> list[list[Hit]]:
        """Star groups of near-duplicate images, largest first: every member's raw-descriptor
        cosine to the group's first member (its centre, score 1.0) is >= ``threshold``; the
        others follow by similarity. Pairs come from this index's kNN search in blocks (no
        n x n matrix); see :mod:`cbir.index.duplicates` for how groups and centres are chosen.
        ``verify`` also admits pairs below the threshold that pass geometric verification
        (:class:`cbir.index.duplicates.Verification`; OpenCV's SIFT + RANSAC): those
        members' scores are then below ``threshold``."""
        if not -1.0 <= threshold <= 1.0:
            raise CbirIndexError("threshold is a cosine similarity: between -1 and 1 (e.g. 0.95)")
        with self._rw.read():
            ids = self.catalog.ok_ids()

        def blocks() -> Iterator[tuple[Any, Any]]:
            for start in range(0, len(ids), how.block):
                with self._rw.read():  # a block at a time: writers are not held off for the whole scan
                    block = self.catalog.vectors(ids[start : start + how.block].tolist(), dim=self.dim)
                yield block  # outside the lock: the consumer takes it again to search

        def search(q: Any, k: int) -> tuple[Any, Any]:
            with self._rw.read():
                if self._closed:
                    raise CbirIndexError("index is closed")
                return self.store.search(q, k)

        def fetch(want: Any) -> tuple[Any, Any]:
            with self._rw.read():
                return self.catalog.vectors(want.tolist(), dim=self.dim)

        if verify is None:
            pairs, scores = duplicate_pairs(blocks(), search, fetch, threshold, how)
        else:
            check = self._geometric_check(verify)
            pairs, scores = verified_pairs(blocks, search, fetch, threshold, check, verify, how)
        groups = star_groups(pairs, scores)
        with self._rw.read():
            paths = self.catalog.paths_for([i for g in groups for i, _ in g])
        out = []
        for g in groups:  # a file removed meanwhile is left out; a group needs its centre
            if g[0][0] not in paths:
                continue
            hits = [Hit(i, paths[i], s) for i, s in g if i in paths]
            if len(hits) > 1:
                out.append(hits)
        return out

    def _geometric_check(self, verify: Verification) -> PairCheck:
        """Pairs of ids -> which pass cbir.verify's local-feature RANSAC test (a file that
        cannot be read, or is gone, does not pass)."""
        from cbir.verify import GeometricVerifier, VerifyError

        verifier = GeometricVerifier(min_inliers=verify.min_inliers)

        def check(pairs: Any) -> Any:
            with self._rw.read():
                paths = self.catalog.paths_for(pairs.ravel().tolist())
            ok = []
            for a, b in pairs.tolist():
                try:
                    ok.append(a in paths and b in paths and verifier.verify(paths[a], paths[b]).verified)
                except VerifyError:
                    ok.append(False)
            return np.array(ok, dtype=bool)

        return check

    def duplicate_plan(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        keep: str = "first",
        how: PairSearch = PairSearch(),
        verify: Verification | None = None,
    ) -> list[DuplicateGroup]:
        """:meth:`duplicates` with the member to keep in each group chosen by ``keep``
        (``first``, ``largest``, ``oldest``: :mod:`cbir.index.removal`) and the rest to remove."""
        if keep not in KEEP_RULES:
            raise CbirIndexError(f"unknown keep rule {keep!r}: one of {', '.join(KEEP_RULES)}")
        groups = self.duplicates(threshold, how, verify)
        cache: dict[int, FileFacts] = {}

        def facts(m: Hit) -> FileFacts:
            if m.id not in cache:
                with self._rw.read():
                    rec = self.catalog.get(m.id)
                size, mtime = (rec.size, rec.mtime_ns) if rec else (0, 0)
                cache[m.id] = FileFacts(pixel_count(m.path) if keep == "largest" else 0, size, mtime)
            return cache[m.id]

        return plan_removal(groups, keep, facts)


def _store_setting(store: str | None, folder: Path) -> str:
    """The ``store`` setting of a new index: "" (FAISS in the folder) or a vector database's."""
    if store is None or store_name(store) == DEFAULT_STORE:
        return ""
    if store_name(store) != "milvus":
        check_store(store_name(store))  # another registered store: its name is its setting
        return store.strip()
    from cbir.index.stores.milvus import store_setting  # optional dependency

    return store_setting(store, folder) or ""
