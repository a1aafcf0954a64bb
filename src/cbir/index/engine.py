"""The :class:`Index`: a folder that keeps a collection's descriptors in step with its files.

Layout of an index folder (``.cbir`` by default)::

    descriptor.cbir          the descriptor that made every vector (self-contained folder)
    catalog.sqlite           files, hashes, status/errors and the raw float32 vectors
    vectors-<gen>.faiss      FAISS cache of catalogue generation <gen> (rebuildable)
    trained-<key>.faiss      trained empty index, for types that need training
    lock                     flock'ed by the process that writes

The catalogue is the truth and the FAISS file a cache, so the worst a crash can do is
leave a stale cache, which :meth:`Index.open` detects (generation mismatch) and rebuilds.
Extraction commits every batch (rows and vectors in one SQLite transaction), so an
interrupted run loses at most one batch and the next run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from PIL import Image

from cbir.data.datasets import list_images
from cbir.data.decode import DEFAULT_MAX_PIXELS, DecodeError, load_image, to_rgb
from cbir.errors import CbirError
from cbir.extract import DEFAULT_ENGINE, Failure, Runner, iter_extract, make_runner
from cbir.index import vectors as vec
from cbir.index.catalog import Catalog, ImageRecord, to_blob
from cbir.index.duplicates import group_duplicates
from cbir.index.locks import BusyError, FileLock, ReadWriteLock
from cbir.models.descriptor import Descriptor, build_descriptor
from cbir.postprocess import alpha_dba, alpha_qe

DESCRIPTOR_FILE = "descriptor.cbir"
CATALOG_FILE = "catalog.sqlite"
DEFAULT_DB = ".cbir"


class IndexError_(CbirError):  # noqa: N801 - trailing underscore: not the builtin IndexError
    """Base class of the index's errors; the message is meant for the user."""


class DescriptorMismatchError(IndexError_):
    """Vectors or a descriptor that differ from the ones the index was built with."""


class IndexBusyError(IndexError_):
    """Another process is writing to this index."""


class IndexNotTrainedError(IndexError_):
    """The FAISS type needs training and the collection is too small for it."""


class QueryError(IndexError_):
    """The query could not be turned into a vector."""


@dataclass
class Hit:
    """One search result: catalogue id, absolute path as stored, similarity (higher = closer)."""

    id: int
    path: str
    score: float


@dataclass
class SyncReport:
    """What a sync/add did. ``extracted`` counts files run through the model; a rerun on
    unchanged files reports 0."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    extracted: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = [asdict(f) for f in self.failures]
        d["seconds"] = round(self.seconds, 3)
        return d


@dataclass
class _Todo:
    """A file that needs the model: new (``row`` None) or changed (``row`` = its record)."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    row: ImageRecord | None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Content hash: recognises moved/renamed/copied files without the model."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_descriptor(model: str | os.PathLike | Descriptor | None) -> Descriptor:
    """A descriptor from a backbone name, a descriptor file, or a descriptor (default: the
    package's default descriptor)."""
    if isinstance(model, Descriptor):
        return model.eval()
    try:
        return build_descriptor() if model is None else build_descriptor(model)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        raise IndexError_(f"cannot build descriptor {model!r}: {exc}") from exc


def _abspath(p: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(p))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class Index:
    """A persistent, incrementally updated image index. Use :meth:`open`.

    Thread-safe: any number of threads may :meth:`search` while one thread adds or
    removes; a search sees the index either before or after each committed batch.
    """

    def __init__(
        self, folder: Path, catalog: Catalog, descriptor: Descriptor, *, readonly: bool, engine: str
    ) -> None:
        self.folder = folder
        self.catalog = catalog
        self.descriptor = descriptor
        self.readonly = readonly
        self.engine = engine
        self.dim = int(descriptor.dim)
        self._rw = ReadWriteLock()
        self._writer = threading.RLock()
        self._flock = FileLock(folder / "lock")
        self._runner: Runner | None = None
        self._runner_lock = threading.Lock()
        self._faiss: faiss.Index | None = None
        self._faiss_generation = -1
        self._trained = False
        self._needs_rebuild = False  # set when an index type could not apply a change in place
        self._closed = False

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike = DEFAULT_DB,
        *,
        model: str | os.PathLike | Descriptor | None = None,
        factory: str | None = None,
        create: bool = True,
        readonly: bool = False,
        dba: int | None = None,
        dba_alpha: float | None = None,
        engine: str = DEFAULT_ENGINE,
    ) -> Index:
        """Open (or create) the index folder ``path``.

        On creation ``model`` (backbone name, descriptor file or :class:`Descriptor`;
        default: the default descriptor) is saved into the folder, ``factory`` (FAISS
        string, default ``Flat``) and ``dba`` (neighbours for database-side augmentation,
        0 = off) are recorded. Opening an existing index with a different ``model``
        raises :class:`DescriptorMismatchError`; a different ``factory`` or ``dba``
        re-indexes the stored vectors (no image is read again).
        """
        folder = Path(path)
        catalog_path = folder / CATALOG_FILE
        desc_path = folder / DESCRIPTOR_FILE
        exists = catalog_path.is_file() and desc_path.is_file()
        catalog: Catalog | None = None
        try:
            if exists:
                catalog = Catalog(catalog_path, readonly=readonly)
                exists = catalog.get_meta("identity") is not None
                if not exists and readonly:
                    raise IndexError_(f"{folder} holds no complete index")
            if not exists:
                if readonly or not create:
                    raise IndexError_(
                        f"no index in {folder}: create one with 'cbir index DIR --db {folder}'"
                    )
                descriptor = resolve_descriptor(model)
                factory = factory or vec.DEFAULT_FACTORY
                vec.make_index(descriptor.dim, factory)  # validate before writing anything
                folder.mkdir(parents=True, exist_ok=True)
                descriptor.save(desc_path)
                catalog = catalog or Catalog(catalog_path)
                catalog.set_meta(
                    {
                        "identity": descriptor.identity(),
                        "descriptor": descriptor.describe_name(),
                        "dim": str(descriptor.dim),
                        "factory": factory,
                        "dba": str(int(dba or 0)),
                        "dba_alpha": str(3.0 if dba_alpha is None else float(dba_alpha)),
                        "dba_generation": "0",
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                )
                index = cls(folder, catalog, descriptor, readonly=False, engine=engine)
            else:
                assert catalog is not None
                try:
                    descriptor = Descriptor.load(desc_path)
                except ValueError as exc:
                    raise IndexError_(f"{desc_path}: {exc}") from exc
                stored = catalog.get_meta("identity")
                if descriptor.identity() != stored:
                    raise IndexError_(
                        f"{desc_path} does not match the catalogue "
                        f"(identity {descriptor.identity()} "
                        f"vs {stored}): the folder was modified by hand"
                    )
                if model is not None:
                    wanted = resolve_descriptor(model)
                    if wanted.identity() != stored:
                        raise DescriptorMismatchError(
                            f"the index in {folder} was built with descriptor "
                            f"{catalog.get_meta('descriptor')} (identity {stored}); "
                            f"{wanted.describe_name()} (identity {wanted.identity()}) "
                            "makes incomparable vectors: use another --db, "
                            "or leave out the model options"
                        )
                index = cls(folder, catalog, descriptor, readonly=readonly, engine=engine)
                changes: dict[str, str] = {}
                if factory is not None and factory != catalog.get_meta("factory"):
                    vec.make_index(descriptor.dim, factory)
                    changes["factory"] = factory
                if dba is not None and int(dba) != int(catalog.get_meta("dba") or 0):
                    changes["dba"] = str(int(dba))
                if dba_alpha is not None and float(dba_alpha) != float(
                    catalog.get_meta("dba_alpha") or 3.0
                ):
                    changes["dba_alpha"] = str(float(dba_alpha))
                if changes:
                    if readonly:
                        raise IndexError_(
                            f"cannot change {', '.join(changes)} of an index opened read-only"
                        )
                    with index._flock.hold(), catalog.write() as con:
                        if "dba" in changes or "dba_alpha" in changes:
                            # augmented vectors are stale: drop them (raw ones are kept);
                            # a dba > 0 recomputes them when the cache is rebuilt below
                            con.execute("UPDATE images SET augmented = NULL")
                            changes["dba_generation"] = "-1"
                            Catalog.bump_generation(con)
                        catalog.set_meta(changes, con=con)
            if not index.readonly:
                index._clean_temporaries()
            index._load_or_rebuild()
            return index
        except vec.FactoryError as exc:
            if catalog is not None:
                catalog.close()
            raise IndexError_(str(exc)) from exc
        except BusyError as exc:
            if catalog is not None:
                catalog.close()
            raise IndexBusyError(str(exc)) from exc
        except BaseException:
            if catalog is not None:
                catalog.close()
            raise

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the catalogue connections (the FAISS cache is already on disk)."""
        if self._closed:
            return
        with self._writer, self._rw.write():
            self._closed = True
            self._faiss = None
            self.catalog.close()

    # -- metadata ------------------------------------------------------------------------------
    @property
    def factory(self) -> str:
        return self.catalog.get_meta("factory") or vec.DEFAULT_FACTORY

    @property
    def dba(self) -> int:
        return int(self.catalog.get_meta("dba") or 0)

    @property
    def dba_alpha(self) -> float:
        return float(self.catalog.get_meta("dba_alpha") or 3.0)

    @property
    def roots(self) -> list[str]:
        """Folders recorded by :meth:`sync` (absolute)."""
        return self.catalog.roots()

    def get(self, id_: int) -> ImageRecord | None:
        """The catalogue record of ``id_`` (None if there is none)."""
        return self.catalog.get(id_)

    def lookup(self, path: str | os.PathLike) -> ImageRecord | None:
        """The catalogue record of a file path (made absolute), or None."""
        return self.catalog.by_path(_abspath(path))

    def __len__(self) -> int:
        return self.catalog.counts()["ok"]

    def relative_path(self, path: str | os.PathLike) -> str:
        """``path`` relative to the (innermost) indexed root holding it; unchanged if none."""
        p = _abspath(path)
        roots = [r for r in self.roots if _under(p, r)]
        if not roots:
            return os.fspath(path)
        return os.path.relpath(p, max(roots, key=len))

    def stats(self) -> dict[str, Any]:
        counts = self.catalog.counts()
        with self._rw.read():
            ntotal = int(self._faiss.ntotal) if self._faiss is not None and self._trained else 0
        size = sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())
        return {
            "images": counts["ok"],
            "failures": counts["failed"],
            "descriptor": self.catalog.get_meta("descriptor"),
            "identity": self.catalog.get_meta("identity"),
            "index": self.factory,
            "dim": self.dim,
            "roots": self.roots,
            "dba": self.dba,
            "trained": self._trained,
            "faiss_vectors": ntotal,
            "generation": self.catalog.generation,
            "path": os.path.abspath(self.folder),
            "bytes": size,
        }

    def failures(self) -> list[ImageRecord]:
        return [r for r in self.catalog.records() if r.status == "failed"]

    # -- the FAISS cache -----------------------------------------------------------------------
    def _clean_temporaries(self) -> None:
        for p in self.folder.glob(".*.tmp"):  # left by a write killed half-way (fileio.atomic_open)
            with contextlib.suppress(OSError):
                p.unlink()

    def _load_or_rebuild(self) -> None:
        gen = self.catalog.generation
        index = vec.read_index(vec.cache_path(self.folder, gen))
        counts = self.catalog.counts()
        if (
            index is not None
            and index.is_trained
            and index.ntotal == counts["ok"]
            and self._cache_matches(index)
        ):
            with self._rw.write():
                self._faiss, self._faiss_generation, self._trained = index, gen, True
            return
        stale_dba = self.dba and int(self.catalog.get_meta("dba_generation") or -1) != gen
        if not self.readonly:
            try:
                with self._writer, self._flock.hold():
                    if stale_dba:
                        self._refresh_dba()
                    else:
                        self._rebuild(save=True, strict=False)
                return
            except BusyError:
                pass  # another process is writing: build in memory, it will save the cache
        self._rebuild(save=False, strict=False)

    def _cache_matches(self, index: faiss.Index) -> bool:
        try:
            expected = vec.make_index(self.dim, self.factory)
        except vec.FactoryError:
            return False
        return type(index) is type(expected) and index.d == self.dim

    def _rebuild(self, *, save: bool, strict: bool) -> None:
        """Fill a fresh FAISS index from the catalogue (trains when needed)."""
        factory = self.factory
        ids, vectors = self.catalog.all_vectors(dim=self.dim, augmented=True)
        gen = self.catalog.generation
        trained = vec.read_index(vec.trained_path(self.folder, factory))
        if trained is not None and (
            trained.d != self.dim or not trained.is_trained or trained.ntotal
        ):
            trained = None
        try:
            index, trained_now = vec.build(self.dim, factory, ids, vectors, trained=trained)
        except vec.NotTrainedError as exc:
            if strict:
                raise IndexNotTrainedError(str(exc)) from exc
            with self._rw.write():
                self._faiss, self._faiss_generation, self._trained = (
                    vec.make_index(self.dim, factory),
                    gen,
                    False,
                )
            return
        if trained_now and save:
            empty = faiss.clone_index(index)
            empty.reset()
            vec.write_index(empty, vec.trained_path(self.folder, factory))
        with self._rw.write():
            self._faiss, self._faiss_generation, self._trained = index, gen, True
        if save:
            vec.save_cache(index, self.folder, gen)

    def _save_cache(self) -> None:
        with self._rw.read():
            index, gen, trained = self._faiss, self._faiss_generation, self._trained
        if index is None or not trained or gen != self.catalog.generation:
            return
        if vec.cache_path(self.folder, gen).is_file():
            return  # nothing changed since it was written (e.g. a sync that found no change)
        vec.save_cache(index, self.folder, gen)

    def refresh(self) -> bool:
        """Pick up changes another process committed (e.g. ``cbir index`` while a server
        runs); returns True when the index was reloaded."""
        gen = self.catalog.generation
        if gen == self._faiss_generation:
            return False
        with self._writer:
            if not vec.cache_path(self.folder, gen).is_file() and self._other_writer_active():
                return False  # mid-run elsewhere: wait for its cache instead of rebuilding
            self._load_or_rebuild()
        return True

    def _other_writer_active(self) -> bool:
        try:
            with self._flock.hold():
                return False
        except BusyError:
            return True
        except OSError:  # read-only folder: cannot tell
            return False

    # -- writing -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _mutating(self) -> Iterator[None]:
        if self.readonly:
            raise IndexError_("index opened read-only")
        if self._closed:
            raise IndexError_("index is closed")
        with self._writer:
            try:
                with self._flock.hold():
                    if self.catalog.generation != self._faiss_generation:  # another process wrote
                        self._load_or_rebuild()
                    yield
            except BusyError as exc:
                raise IndexBusyError(str(exc)) from exc

    def _apply_faiss(
        self, add_ids: Sequence[int], add_vectors: np.ndarray | None, remove_ids: Sequence[int]
    ) -> bool:
        """Mirror one committed change into FAISS (caller holds the write lock). Returns
        False when the index type cannot do it in place (then: rebuild)."""
        index = self._faiss
        if index is None or not self._trained:
            return True  # nothing to mirror until trained; the rebuild adds everything
        if len(remove_ids):
            if not vec.supports_removal(index):
                return False
            index.remove_ids(np.asarray(remove_ids, dtype=np.int64))
        if len(add_ids):
            assert add_vectors is not None
            index.add_with_ids(
                np.ascontiguousarray(add_vectors, dtype=np.float32),
                np.asarray(add_ids, dtype=np.int64),
            )
        return True

    def sync(
        self,
        dirs: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        progress: bool = True,
        batch_size: int = 32,
        workers: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> SyncReport:
        """Make the index mirror the image files under ``dirs``: extract new and changed
        files, drop deleted ones, follow moved/renamed ones by content hash."""
        if isinstance(dirs, (str, os.PathLike)):
            dirs = [dirs]
        roots = [_abspath(d) for d in dirs]
        for r in roots:
            if not os.path.isdir(r):
                raise IndexError_(f"no such folder: {r}")
        start = time.perf_counter()
        with self._mutating():
            files: set[str] = set()
            for r in roots:
                files.update(_abspath(p) for p in list_images(r))
            with self.catalog.write() as con:
                con.executemany(
                    "INSERT OR IGNORE INTO roots (path) VALUES (?)", [(r,) for r in roots]
                )
            report = self._update(
                sorted(files),
                scope=roots,
                progress=progress,
                batch_size=batch_size,
                workers=workers,
                max_pixels=max_pixels,
            )
        report.seconds = time.perf_counter() - start
        return report

    def add(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        progress: bool = True,
        batch_size: int = 32,
        workers: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> SyncReport:
        """Add or refresh these files (folders are walked); nothing else is removed."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        files: set[str] = set()
        for p in paths:
            ap = _abspath(p)
            if os.path.isdir(ap):
                files.update(_abspath(q) for q in list_images(ap))
            elif os.path.isfile(ap):
                files.add(ap)
            else:
                raise IndexError_(f"no such file: {ap}")
        start = time.perf_counter()
        with self._mutating():
            report = self._update(
                sorted(files),
                scope=[],
                progress=progress,
                batch_size=batch_size,
                workers=workers,
                max_pixels=max_pixels,
            )
        report.seconds = time.perf_counter() - start
        return report

    def remove(
        self, paths_or_ids: Iterable[str | os.PathLike | int] | str | os.PathLike | int
    ) -> int:
        """Remove files (by path; a folder removes everything under it, and stops being a
        synced root) or catalogue ids. Returns how many records were removed."""
        if isinstance(paths_or_ids, (str, os.PathLike, int, np.integer)):
            paths_or_ids = [paths_or_ids]
        with self._mutating():
            ids: set[int] = set()
            roots = set(self.roots)  # one query, not one per item
            for item in paths_or_ids:
                if isinstance(item, (int, np.integer)):
                    ids.add(int(item))
                    continue
                p = _abspath(item)
                if p in roots:
                    with self.catalog.write() as con:
                        con.execute("DELETE FROM roots WHERE path = ?", (p,))
                rows = self.catalog.con.execute(
                    "SELECT id FROM images WHERE path = ? OR path LIKE ? ESCAPE '\\'",
                    (p, _like_prefix(p.rstrip(os.sep) + os.sep)),
                ).fetchall()
                ids.update(int(r[0]) for r in rows)
            if not ids:
                return 0
            removed = self._commit_removals(sorted(ids))
            self._finish()
            return removed

    def _commit_removals(self, ids: Sequence[int]) -> int:
        with self._rw.write():
            with self.catalog.write() as con:
                ok = [
                    int(r[0])
                    for r in _select_in(
                        con, "SELECT id FROM images WHERE status = 'ok' AND id IN ", ids
                    )
                ]
                n = 0
                for start in range(0, len(ids), 500):
                    chunk = list(ids[start : start + 500])
                    n += con.execute(
                        f"DELETE FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk
                    ).rowcount
                if ok:
                    Catalog.bump_generation(con)
            if ok:
                self._faiss_generation = self.catalog.generation
                if not self._apply_faiss([], None, ok):
                    self._needs_rebuild = True
        return n

    def _update(
        self,
        files: list[str],
        *,
        scope: list[str],
        progress: bool,
        batch_size: int,
        workers: int | None,
        max_pixels: int | None,
    ) -> SyncReport:
        """Plan (stat, hash) then apply: metadata-only changes first, then extraction."""
        report = SyncReport()
        self._needs_rebuild = False
        existing = {r.path: r for r in self.catalog.records()}
        seen = set(files)
        # rows whose file is gone: deleted if under a synced root, or the source of a move
        gone = [
            r
            for p, r in existing.items()
            if p not in seen and (any(_under(p, s) for s in scope) or not os.path.exists(p))
        ]
        move_sources: dict[str, list[ImageRecord]] = {}
        for r in gone:
            move_sources.setdefault(r.sha256, []).append(r)
        deletable = {r.id for r in gone if any(_under(r.path, s) for s in scope)}

        to_hash: list[tuple[str, os.stat_result, ImageRecord | None]] = []
        for f in files:
            try:
                st = os.stat(f)
            except OSError:
                continue  # vanished since the walk
            row = existing.get(f)
            if row is not None and row.size == st.st_size and row.mtime_ns == st.st_mtime_ns:
                report.unchanged += 1
            else:
                to_hash.append((f, st, row))

        touches: list[
            tuple[int, int, str, int]
        ] = []  # (size, mtime_ns, sha, id): content unchanged
        moves: list[tuple[str, int, int, int]] = []  # (new path, size, mtime_ns, id)
        copies: list[tuple[_Todo, ImageRecord]] = []  # new path, same content as an indexed file
        todo: list[_Todo] = []
        by_sha: dict[str, ImageRecord] | None = None
        for f, st, row in _progress_iter(to_hash, "hashing", progress):
            try:
                sha = file_sha256(f)
            except OSError as exc:
                report.failures.append(Failure(f, f"cannot read file: {exc.strerror or exc}"))
                report.failed += 1
                continue
            if row is not None and row.sha256 == sha:
                touches.append((st.st_size, st.st_mtime_ns, sha, row.id))
                report.unchanged += 1
                continue
            item = _Todo(f, st.st_size, st.st_mtime_ns, sha, row)
            if row is None and move_sources.get(sha):
                src = move_sources[sha].pop(0)
                deletable.discard(src.id)
                moves.append((f, st.st_size, st.st_mtime_ns, src.id))
                report.moved += 1
                continue
            if row is None:
                if by_sha is None:
                    by_sha = {
                        r.sha256: r
                        for r in existing.values()
                        if r.status == "ok" and r.id not in deletable
                    }
                src = by_sha.get(sha)
                if src is not None:
                    copies.append((item, src))
                    continue
            todo.append(item)

        # training needs enough vectors: refuse before spending time on the model
        if not self._trained:
            need = vec.min_training_vectors(vec.make_index(self.dim, self.factory))
            expected = self.catalog.counts()["ok"] - len(deletable) + len(todo) + len(copies)
            if expected < need:
                raise IndexNotTrainedError(
                    f"index type {self.factory!r} needs at least {need} vectors to train, "
                    f"this collection would have {expected}: index more images, "
                    "or choose a smaller type (e.g. 'Flat')"
                )

        # 1. changes that need no model: one transaction
        if touches or moves or copies or deletable:
            with self._rw.write():
                added_ids: list[int] = []
                add_vecs: list[np.ndarray] = []
                with self.catalog.write() as con:
                    con.executemany(
                        "UPDATE images SET size = ?, mtime_ns = ?, sha256 = ? WHERE id = ?", touches
                    )
                    con.executemany(
                        "UPDATE images SET path = ?, size = ?, mtime_ns = ? WHERE id = ?", moves
                    )
                    removed_ok = [
                        int(r[0])
                        for r in _select_in(
                            con,
                            "SELECT id FROM images WHERE status = 'ok' AND id IN ",
                            sorted(deletable),
                        )
                    ]
                    for start in range(0, len(deletable), 500):
                        chunk = sorted(deletable)[start : start + 500]
                        report.removed += con.execute(
                            f"DELETE FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk
                        ).rowcount
                    for item, src in copies:
                        blob, aug = con.execute(
                            "SELECT vector, augmented FROM images WHERE id = ?", (src.id,)
                        ).fetchone()
                        cur = con.execute(
                            "INSERT INTO images (path, size, mtime_ns, sha256, status, vector, "
                            "augmented) VALUES (?, ?, ?, ?, 'ok', ?, ?)",
                            (item.path, item.size, item.mtime_ns, item.sha256, blob, aug),
                        )
                        added_ids.append(int(cur.lastrowid))
                        add_vecs.append(
                            np.frombuffer(aug if aug is not None else blob, dtype="<f4")
                        )
                        report.added += 1
                    if removed_ok or added_ids:
                        Catalog.bump_generation(con)
                if removed_ok or added_ids:
                    self._faiss_generation = self.catalog.generation
                    if not self._apply_faiss(
                        added_ids, np.stack(add_vecs) if add_vecs else None, removed_ok
                    ):
                        self._needs_rebuild = True

        # 2. the model, one committed batch at a time
        if todo:
            batches = iter_extract(
                self.descriptor,
                [t.path for t in todo],
                batch_size=batch_size,
                workers=workers,
                max_pixels=max_pixels,
                engine=self.engine,
                progress=progress,
                desc="indexing",
            )
            for batch in batches:
                self._commit_batch(todo, batch.indices, batch.vectors, batch.failures, report)
        self._finish()
        return report

    def _commit_batch(
        self,
        todo: list[_Todo],
        indices: list[int],
        vectors: np.ndarray,
        failures: list[tuple[int, Failure]],
        report: SyncReport,
    ) -> None:
        """Rows + vectors of one extraction batch in one transaction, then FAISS."""
        if vectors.ndim != 2 or (len(indices) and vectors.shape[1] != self.dim):
            raise DescriptorMismatchError(
                f"extraction produced {vectors.shape} vectors for a {self.dim}-d index"
            )
        vectors = _l2n(vectors)
        with self._rw.write():
            new_ids: list[int] = []
            stale: list[int] = []
            with self.catalog.write() as con:
                for i, v in zip(indices, vectors, strict=True):
                    t = todo[i]
                    if t.row is None:
                        cur = con.execute(
                            "INSERT INTO images (path, size, mtime_ns, sha256, status, vector) "
                            "VALUES (?, ?, ?, ?, 'ok', ?)",
                            (t.path, t.size, t.mtime_ns, t.sha256, to_blob(v)),
                        )
                        new_ids.append(int(cur.lastrowid))
                        report.added += 1
                    else:
                        con.execute(
                            "UPDATE images SET size = ?, mtime_ns = ?, sha256 = ?, status = 'ok', "
                            "error = NULL, "
                            "vector = ?, augmented = NULL WHERE id = ?",
                            (t.size, t.mtime_ns, t.sha256, to_blob(v), t.row.id),
                        )
                        if t.row.status == "ok":
                            stale.append(t.row.id)
                        new_ids.append(t.row.id)
                        report.updated += 1
                for i, failure in failures:
                    t = todo[i]
                    if t.row is None:
                        con.execute(
                            "INSERT INTO images (path, size, mtime_ns, sha256, status, error) "
                            "VALUES (?, ?, ?, ?, 'failed', ?)",
                            (t.path, t.size, t.mtime_ns, t.sha256, failure.reason),
                        )
                    else:
                        con.execute(
                            "UPDATE images SET size = ?, mtime_ns = ?, sha256 = ?, "
                            "status = 'failed', error = ?, "
                            "vector = NULL, augmented = NULL WHERE id = ?",
                            (t.size, t.mtime_ns, t.sha256, failure.reason, t.row.id),
                        )
                        if t.row.status == "ok":
                            stale.append(t.row.id)
                    report.failed += 1
                    report.failures.append(failure)
                if new_ids or stale:
                    Catalog.bump_generation(con)
            report.extracted += len(indices) + len(failures)
            if new_ids or stale:
                self._faiss_generation = self.catalog.generation
                if not self._apply_faiss(new_ids, vectors, stale):
                    self._needs_rebuild = True

    def _finish(self) -> None:
        """After a mutation: train if due, refresh DBA, rebuild if needed, save the cache."""
        gen = self.catalog.generation
        if self.dba and int(self.catalog.get_meta("dba_generation") or -1) != gen:
            self._refresh_dba()
        elif (
            not self._trained
            or self._needs_rebuild
            or self._faiss_generation != gen
        ):
            self._rebuild(save=True, strict=True)
        else:
            self._save_cache()
        self._needs_rebuild = False

    def _refresh_dba(self) -> None:
        """Database-side augmentation (Arandjelovic & Zisserman 2012; alpha-weighted as in
        Radenovic et al. 2018): the FAISS index holds each vector plus its ``dba``
        nearest neighbours; raw vectors stay in the catalogue. Neighbourhoods change
        when the collection does, so every change recomputes all of them (exact,
        O(n^2) - meant for collections up to about 10^5 images)."""
        ids, raw = self.catalog.all_vectors(dim=self.dim)
        aug = alpha_dba(raw, k=self.dba, alpha=self.dba_alpha) if len(raw) else raw
        with self.catalog.write() as con:
            con.executemany(
                "UPDATE images SET augmented = ? WHERE id = ?",
                [(to_blob(a), int(i)) for i, a in zip(ids, aug, strict=True)],
            )
            Catalog.bump_generation(con)
            gen = int(con.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
            self.catalog.set_meta({"dba_generation": str(gen)}, con=con)
        self._rebuild(save=True, strict=True)

    # -- searching ---------------------------------------------------------------------------
    def _get_runner(self) -> Runner:
        with self._runner_lock:
            if self._runner is None:
                self._runner = make_runner(self.descriptor, self.engine)
            return self._runner

    def describe(self, image: Image.Image | bytes | str | os.PathLike) -> np.ndarray:
        """The descriptor of one image (PIL image, encoded bytes or a file), decoded and
        resized exactly as indexing does, so an indexed file describes to its own vector."""
        pre = self.descriptor.preprocess
        try:
            if isinstance(image, Image.Image):
                img = to_rgb(image)
            else:
                img = load_image(image, target_size=pre.resized_size)
        except DecodeError as exc:
            raise QueryError(f"cannot read the query image: {exc.reason}") from exc
        arr = pre.to_array(img)
        out = self._get_runner()(arr[None])
        return _l2n(np.asarray(out, dtype=np.float32))[0]

    def _query(self, query: Any) -> tuple[np.ndarray, set[int]]:
        """(vector, ids that are the query itself)."""
        if isinstance(query, np.ndarray):
            q = np.asarray(query, dtype=np.float32).reshape(-1)
            if q.size != self.dim:
                raise DescriptorMismatchError(
                    f"query vector has {q.size} values, this index holds {self.dim}-d vectors"
                )
            return _l2n(q[None])[0], set()
        if isinstance(query, (bytes, bytearray, memoryview)):
            data = bytes(query)
            sha = hashlib.sha256(data).hexdigest()
            return self.describe(data), self._ids_with_sha(sha)
        if isinstance(query, Image.Image):
            return self.describe(query), set()
        if isinstance(query, (str, os.PathLike)):
            p = _abspath(query)
            rec = self.catalog.by_path(p)
            if rec is not None and rec.status == "ok":
                ids, v = next(self.catalog.vectors([rec.id], dim=self.dim))
                return v[0].copy(), {rec.id} | self._ids_with_sha(rec.sha256)
            if not os.path.isfile(p):
                raise QueryError(f"{query}: neither an indexed path nor an image file")
            return self.describe(p), self._ids_with_sha(file_sha256(p))
        if isinstance(query, io.IOBase):
            return self._query(query.read())
        raise QueryError(f"unsupported query type {type(query).__name__}")

    def _ids_with_sha(self, sha: str) -> set[int]:
        rows = self.catalog.con.execute("SELECT id FROM images WHERE sha256 = ?", (sha,)).fetchall()
        return {int(r[0]) for r in rows}

    def search(
        self,
        query: Image.Image | np.ndarray | bytes | str | os.PathLike,
        k: int = 20,
        *,
        qe: int = 0,
        alpha: float = 3.0,
        nprobe: int | None = None,
        ef_search: int | None = None,
        exclude_self: bool = False,
    ) -> list[Hit]:
        """The ``k`` most similar indexed images, best first.

        ``query``: a PIL image, encoded image bytes, a descriptor vector, or a path (an
        indexed path uses its stored vector, else the file is read). ``qe`` > 0 applies
        alpha-query expansion (Radenovic et al. 2018): the query is re-formed from
        itself and its top ``qe`` results weighted by ``similarity ** alpha``, then
        searched again. ``exclude_self`` drops the query's own file (by catalogue
        entry or identical content) from the results. ``nprobe``/``ef_search`` tune
        IVF/HNSW types for this call only.
        """
        if k <= 0:
            return []
        q, own = self._query(query)
        excluded = own if exclude_self else set()
        with self._rw.read():
            index = self._faiss
            if self._closed or index is None:
                raise IndexError_("index is closed")
            if not self._trained:
                raise IndexNotTrainedError(
                    f"index type {self.factory!r} is not trained yet: index more images"
                )
            params = vec.search_params(index, nprobe, ef_search)
            depth = k + len(excluded)
            ids, scores = self._faiss_search(index, q, max(depth, qe + len(excluded)), params)
            if qe > 0:
                nn = [i for i in ids if i not in excluded][:qe]
                if nn:
                    got_ids, db = next(self.catalog.vectors(nn, dim=self.dim, augmented=True))
                    sims = db @ q
                    q = alpha_qe(
                        q[None],
                        db,
                        np.arange(len(got_ids))[None],
                        sims[None],
                        k=len(got_ids),
                        alpha=alpha,
                    )[0]
                    ids, scores = self._faiss_search(index, q, depth, params)
            keep = [(i, s) for i, s in zip(ids, scores, strict=True) if i not in excluded][:k]
            paths = self.catalog.paths_for([i for i, _ in keep])
        return [Hit(id=i, path=paths[i], score=float(s)) for i, s in keep if i in paths]

    def _faiss_search(
        self, index: faiss.Index, q: np.ndarray, depth: int, params: Any
    ) -> tuple[list[int], list[float]]:
        depth = max(1, min(depth, int(index.ntotal)))
        if index.ntotal == 0:
            return [], []
        scores, ids = index.search(
            np.ascontiguousarray(q[None], dtype=np.float32), depth, params=params
        )
        valid = ids[0] >= 0
        return [int(i) for i in ids[0][valid]], [float(s) for s in scores[0][valid]]

    def duplicates(self, threshold: float) -> list[list[Hit]]:
        """Groups of near-duplicate images (cosine similarity >= ``threshold`` on the raw
        descriptors, exact), as connected components, largest group first; see
        :func:`cbir.index.duplicates.group_duplicates` for the order inside a group."""
        if not -1.0 <= threshold <= 1.0:
            raise IndexError_("threshold is a cosine similarity: between -1 and 1 (e.g. 0.95)")
        with self._rw.read():  # one consistent snapshot (a single SELECT)
            ids, vectors = self.catalog.all_vectors(dim=self.dim)
        groups = group_duplicates(vectors, threshold)  # O(n^2): outside the lock
        with self._rw.read():
            paths = self.catalog.paths_for([int(ids[r]) for g in groups for r, _ in g])
        out = []
        for g in groups:  # a file removed meanwhile is left out
            hits = [Hit(int(ids[r]), paths[int(ids[r])], s) for r, s in g if int(ids[r]) in paths]
            if len(hits) > 1:
                out.append(hits)
        return out


def _l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)).astype(np.float32)


def _select_in(con: Any, sql: str, ids: Sequence[int]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    ids = list(ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        out.extend(con.execute(f"{sql}({','.join('?' * len(chunk))})", chunk).fetchall())
    return out


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _progress_iter(items: list[Any], desc: str, enabled: bool) -> Iterator[Any]:
    if len(items) < 200:  # not worth a bar
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(
        items, desc=desc, unit="file", disable=not enabled, leave=False, dynamic_ncols=True
    )
