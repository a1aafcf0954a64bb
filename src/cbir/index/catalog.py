"""The SQLite catalogue: one row per file with its durable vector. Every SQL statement of
the package lives in this module (as rclip keeps its one database module), behind typed
methods, so the schema can change in one place.

The catalogue is the index's source of truth. A file's metadata and its float32 vector are
in the same row, so one transaction commits both: a crash (kill -9 included) leaves either
the whole batch or none of it, and the vector store can always be rebuilt from here. A
``generation`` counter in ``meta`` is incremented by each transaction that changes the
indexed vectors; a store says which generation it reflects.

Ids are handed out from ``meta.next_id`` and never reused, even after the newest row is
deleted, so an id that a store tombstoned can never come back meaning another image.
Times are integer nanoseconds end to end: a float round trip would make an unchanged
file look changed (and be read again) on every sync.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cbir.index.errors import CbirIndexError, IndexBusyError, IndexDamagedError

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE roots (path TEXT PRIMARY KEY);
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT,
    vector BLOB,
    augmented BLOB
);
CREATE INDEX images_sha256 ON images (sha256);
CREATE INDEX images_status ON images (status);
"""

_RECORD_COLUMNS = "id, path, size, mtime_ns, sha256, status, error"
_IN_CHUNK = 500  # ids per "IN (...)" (SQLite's host-parameter limit is 999 on old builds)
T = TypeVar("T")


@dataclass
class ImageRecord:
    """One catalogued file. ``status`` is ``'ok'`` (it has a vector) or ``'failed'``."""

    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str
    status: str
    error: str | None = None

    @property
    def mtime(self) -> float:
        """Modification time in seconds (for display; comparisons use ``mtime_ns``)."""
        return self.mtime_ns / 1e9


@dataclass
class NewRow:
    """A row to insert: ``vector`` for an ``ok`` file, ``error`` for a failed one."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    vector: np.ndarray | None = None
    error: str | None = None


def _record(row: Sequence[Any]) -> ImageRecord:
    return ImageRecord(int(row[0]), row[1], int(row[2]), int(row[3]), row[4], row[5], row[6])


def to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def _stack(rows: Sequence[tuple[int, bytes]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vecs = np.empty((len(rows), dim), dtype=np.float32)
    for j, (_, blob) in enumerate(rows):
        v = np.frombuffer(blob, dtype="<f4")
        if v.size != dim:
            raise IndexDamagedError(f"index damaged: row {rows[j][0]} holds {v.size} values, the index {dim}")
        vecs[j] = v
    return ids, vecs


def _chunks(ids: Sequence[int]) -> Iterator[list[int]]:
    ids = [int(i) for i in ids]
    for start in range(0, len(ids), _IN_CHUNK):
        yield ids[start : start + _IN_CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def user_error(exc: sqlite3.Error, path: Path) -> CbirIndexError:
    """The user-facing error for an SQLite failure on the catalogue ``path``."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return IndexBusyError(f"the catalogue {path} is locked by another process: try again, or use --wait")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text or "not a database" in text:
        return IndexDamagedError(
            f"index damaged: {path} is not a readable SQLite database ({text}). Restore it from a "
            f"backup, or move the index folder aside and index the images again into a new one"
        )
    return CbirIndexError(f"cannot use the catalogue {path}: {text}")


def _translated(method: Callable[..., T]) -> Callable[..., T]:
    """Turn SQLite exceptions escaping ``method`` into user-facing index errors."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise user_error(exc, self.path) from exc

    return wrapper


def _translated_iter(method: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    """:func:`_translated` for generator methods (errors surface while iterating)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Iterator[T]:
        try:
            yield from method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise user_error(exc, self.path) from exc

    return wrapper


class Catalog:
    """``catalog.sqlite``: one connection per thread (WAL lets readers run while the single
    writer commits). Use :meth:`create` for a new file and the constructor to open one;
    opening never creates or repairs a table."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        if not self.path.is_file():
            raise IndexDamagedError(f"index damaged: the catalogue {self.path} is missing")
        try:
            self._check_schema()
        except BaseException:
            self.close()
            raise

    @classmethod
    def create(cls, path: str | os.PathLike, meta: dict[str, str]) -> None:
        """Write a new catalogue file with the schema and ``meta`` in one transaction."""
        con = sqlite3.connect(path, isolation_level=None)
        try:
            con.execute("PRAGMA synchronous=FULL")
            con.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
            rows = {"schema": str(SCHEMA_VERSION), "generation": "0", "next_id": "1", **meta}
            con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(rows.items()))
            con.execute("COMMIT")
        finally:
            con.close()

    @_translated
    def _check_schema(self) -> None:
        tables = {r[0] for r in self.con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"meta", "roots", "images"} <= tables:
            raise IndexDamagedError(
                f"index damaged: {self.path} holds no catalogue (empty or truncated file). Restore it "
                "from a backup, or move the index folder aside and index the images again"
            )
        schema = int(self.get_meta("schema") or 0)
        if schema > SCHEMA_VERSION:
            raise CbirIndexError(f"{self.path} was written by a newer cbir (schema {schema}): upgrade cbir")
        if schema < SCHEMA_VERSION and not self.readonly:
            with self.transaction() as tx:  # schema 1 had no next_id: ids continue after the largest
                tx.con.execute(
                    "INSERT OR IGNORE INTO meta (key, value) SELECT 'next_id', COALESCE(MAX(id), 0) + 1 FROM images"
                )
                tx.set_meta({"schema": str(SCHEMA_VERSION)})

    # -- connections ---------------------------------------------------------------------
    @property
    def con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            if self.readonly:
                con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=60)
            else:
                con = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
                con.execute("PRAGMA journal_mode=WAL")
                # FULL: a committed batch survives power loss too, not only a killed process
                con.execute("PRAGMA synchronous=FULL")
            con.isolation_level = None  # explicit BEGIN/COMMIT in transaction()
            self._local.con = con
            with self._all_lock:
                self._all.append(con)
        return con

    def transaction(self) -> _Transaction:
        """``with catalog.transaction() as tx:`` one IMMEDIATE transaction, all or nothing."""
        if self.readonly:
            raise CbirIndexError("index opened read-only")
        return _Transaction(self)

    def close(self) -> None:
        with self._all_lock:
            for con in self._all:
                try:
                    con.close()
                except sqlite3.ProgrammingError:  # closed from another thread already
                    pass
            self._all.clear()
        self._local = threading.local()

    # -- meta ------------------------------------------------------------------------------
    @_translated
    def get_meta(self, key: str) -> str | None:
        row = self.con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    @_translated
    def set_meta(self, values: dict[str, str]) -> None:
        """Set keys that do not change the indexed vectors (no generation change)."""
        with self.transaction() as tx:
            tx.set_meta(values)

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    # -- reads -----------------------------------------------------------------------------
    @_translated
    def roots(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT path FROM roots ORDER BY path")]

    @_translated
    def get(self, id_: int) -> ImageRecord | None:
        row = self.con.execute(f"SELECT {_RECORD_COLUMNS} FROM images WHERE id = ?", (int(id_),)).fetchone()
        return None if row is None else _record(row)

    @_translated
    def by_path(self, path: str) -> ImageRecord | None:
        row = self.con.execute(f"SELECT {_RECORD_COLUMNS} FROM images WHERE path = ?", (path,)).fetchone()
        return None if row is None else _record(row)

    @_translated
    def records(self, status: str | None = None) -> list[ImageRecord]:
        """Every record (or those with ``status``), in id order: one consistent snapshot."""
        if status is None:
            rows = self.con.execute(f"SELECT {_RECORD_COLUMNS} FROM images ORDER BY id").fetchall()
        else:
            sql = f"SELECT {_RECORD_COLUMNS} FROM images WHERE status = ? ORDER BY id"
            rows = self.con.execute(sql, (status,)).fetchall()
        return [_record(r) for r in rows]

    @_translated
    def ids_under(self, path: str) -> list[int]:
        """Ids of ``path`` itself and of everything under it (a folder)."""
        prefix = path.rstrip(os.sep) + os.sep
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        sql = "SELECT id FROM images WHERE path = ? OR path LIKE ? ESCAPE '\\'"
        return [int(r[0]) for r in self.con.execute(sql, (path, like))]

    @_translated
    def ids_with_sha(self, sha: str) -> set[int]:
        return {int(r[0]) for r in self.con.execute("SELECT id FROM images WHERE sha256 = ?", (sha,))}

    @_translated
    def paths_for(self, ids: Iterable[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for chunk in _chunks(list(ids)):
            q = f"SELECT id, path FROM images WHERE id IN ({_marks(len(chunk))})"
            out.update((int(i), p) for i, p in self.con.execute(q, chunk))
        return out

    @_translated
    def counts(self) -> dict[str, int]:
        rows = self.con.execute("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall()
        d = {s: int(n) for s, n in rows}
        return {"ok": d.get("ok", 0), "failed": d.get("failed", 0)}

    @_translated
    def ok_ids(self) -> np.ndarray:
        """Ids of the rows with a vector, ascending."""
        cur = self.con.execute("SELECT id FROM images WHERE status = 'ok' ORDER BY id")
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    @_translated
    def vectors(self, ids: Sequence[int], *, dim: int, augmented: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of those ``ids`` that are ``ok`` rows, in the order given.
        ``augmented`` returns the DBA vector where one is stored (what stores index)."""
        column = "COALESCE(augmented, vector)" if augmented else "vector"
        found: dict[int, bytes] = {}
        for chunk in _chunks(ids):
            q = f"SELECT id, {column} FROM images WHERE status = 'ok' AND id IN ({_marks(len(chunk))})"
            found.update((int(i), b) for i, b in self.con.execute(q, chunk))
        rows = [(int(i), found[int(i)]) for i in ids if int(i) in found]
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return _stack(rows, dim)

    @_translated_iter
    def iter_vectors(
        self, *, dim: int, augmented: bool = False, chunk: int = 20_000
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of every ``ok`` row in id order, ``chunk`` rows at a time: bounded
        memory at any size (one SELECT, so one consistent snapshot)."""
        column = "COALESCE(augmented, vector)" if augmented else "vector"
        cur = self.con.execute(f"SELECT id, {column} FROM images WHERE status = 'ok' ORDER BY id")
        while rows := cur.fetchmany(chunk):
            yield _stack(rows, dim)

    def all_vectors(self, *, dim: int, augmented: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Every ``ok`` row's id and vector, in id order (in memory: small collections)."""
        parts = list(self.iter_vectors(dim=dim, augmented=augmented))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def source(self, dim: int, *, augmented: bool = True) -> CatalogSource:
        """This catalogue as a :class:`~cbir.index.stores.base.VectorSource`."""
        return CatalogSource(self, dim, augmented)


class CatalogSource:
    """The catalogue's ``ok`` vectors as a store's :class:`VectorSource` (what stores
    index: the DBA vector where there is one)."""

    def __init__(self, catalog: Catalog, dim: int, augmented: bool = True) -> None:
        self.catalog, self.dim, self.augmented = catalog, dim, augmented

    def count(self) -> int:
        return self.catalog.counts()["ok"]

    def ids(self) -> np.ndarray:
        return self.catalog.ok_ids()

    def chunks(self, size: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.catalog.iter_vectors(dim=self.dim, augmented=self.augmented, chunk=size)

    def fetch(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        return self.catalog.vectors(ids, dim=self.dim, augmented=self.augmented)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        ids = self.ids()
        if n < len(ids):
            ids = np.sort(np.random.default_rng(seed).choice(ids, n, replace=False))
        return self.fetch(ids.tolist())[1]


class _Transaction:
    """The writes of one transaction (see :meth:`Catalog.transaction`)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.con = catalog.con

    def __enter__(self) -> _Transaction:
        try:
            self.con.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise user_error(exc, self.catalog.path) from exc
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.con.execute("COMMIT" if exc_type is None else "ROLLBACK")
        except sqlite3.Error as err:
            if exc_type is None:
                raise user_error(err, self.catalog.path) from err

    def set_meta(self, values: dict[str, str]) -> None:
        rows = [(k, str(v)) for k, v in values.items()]
        self.con.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", rows)

    def bump_generation(self) -> int:
        """The indexed vectors change in this transaction: the new generation."""
        self.con.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        return int(self.con.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def add_roots(self, roots: Iterable[str]) -> None:
        self.con.executemany("INSERT OR IGNORE INTO roots (path) VALUES (?)", [(r,) for r in roots])

    def remove_root(self, root: str) -> None:
        self.con.execute("DELETE FROM roots WHERE path = ?", (root,))

    def _new_ids(self, n: int) -> list[int]:
        first = int(self.con.execute("SELECT value FROM meta WHERE key = 'next_id'").fetchone()[0])
        self.con.execute("UPDATE meta SET value = ? WHERE key = 'next_id'", (str(first + n),))
        return list(range(first, first + n))

    def insert(self, rows: Sequence[NewRow]) -> list[int]:
        """Insert rows under new ids (never used before); returns the ids in order."""
        ids = self._new_ids(len(rows))
        self.con.executemany(
            "INSERT INTO images (id, path, size, mtime_ns, sha256, status, error, vector) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (i, r.path, r.size, r.mtime_ns, r.sha256, "failed" if r.vector is None else "ok", r.error,
                 None if r.vector is None else to_blob(r.vector))
                for i, r in zip(ids, rows, strict=True)
            ],
        )  # fmt: skip
        return ids

    def copy(self, source_id: int, row: NewRow) -> tuple[int, np.ndarray]:
        """A new row for ``row.path`` with the vectors of ``source_id`` (same content);
        returns (new id, the vector a store indexes for it)."""
        (new_id,) = self._new_ids(1)
        self.con.execute(
            "INSERT INTO images (id, path, size, mtime_ns, sha256, status, vector, augmented) "
            "SELECT ?, ?, ?, ?, ?, 'ok', vector, augmented FROM images WHERE id = ?",
            (new_id, row.path, row.size, row.mtime_ns, row.sha256, int(source_id)),
        )
        blob = self.con.execute("SELECT COALESCE(augmented, vector) FROM images WHERE id = ?", (new_id,)).fetchone()[0]
        return new_id, np.frombuffer(blob, dtype="<f4").astype(np.float32)

    def touch(self, items: Iterable[tuple[int, int, int, str]]) -> None:
        """(id, size, mtime_ns, sha256): the file was touched, its content is the same."""
        sql = "UPDATE images SET size = ?, mtime_ns = ?, sha256 = ? WHERE id = ?"
        self.con.executemany(sql, [(s, m, h, i) for i, s, m, h in items])

    def move(self, items: Iterable[tuple[int, str, int, int]]) -> None:
        """(id, new path, size, mtime_ns): the same content under another name."""
        sql = "UPDATE images SET path = ?, size = ?, mtime_ns = ? WHERE id = ?"
        self.con.executemany(sql, [(p, s, m, i) for i, p, s, m in items])

    def delete(self, ids: Sequence[int]) -> tuple[int, list[int]]:
        """Delete rows; returns (rows deleted, ids among them that had a vector)."""
        n, had_vector = 0, []
        for chunk in _chunks(ids):
            marks = _marks(len(chunk))
            q = f"SELECT id FROM images WHERE status = 'ok' AND id IN ({marks})"
            had_vector += [int(r[0]) for r in self.con.execute(q, chunk)]
            n += self.con.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk).rowcount
        return n, had_vector

    def clear_augmented(self) -> None:
        self.con.execute("UPDATE images SET augmented = NULL WHERE augmented IS NOT NULL")

    def set_augmented(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        self.con.executemany(
            "UPDATE images SET augmented = ? WHERE id = ?",
            [(to_blob(v), int(i)) for i, v in zip(ids, vectors, strict=True)],
        )
