"""The SQLite catalogue: one row per file, with its durable descriptor vector.

The catalogue is the index's source of truth. A file's metadata and its float32 vector
live in the same row, so one transaction commits both: a crash (kill -9 included)
leaves either the whole batch or none of it, and the FAISS file (a cache, see
:mod:`cbir.index.vectors`) can always be rebuilt from here. A ``generation`` counter in
``meta`` is bumped in every transaction that changes the indexed vectors; the FAISS
cache records the generation it reflects, which is how a stale cache is detected.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS roots (path TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS images (
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
CREATE INDEX IF NOT EXISTS images_sha256 ON images (sha256);
CREATE INDEX IF NOT EXISTS images_status ON images (status);
"""


@dataclass
class ImageRecord:
    """One catalogued file. ``status`` is ``'ok'`` (it has a vector) or ``'failed'``."""

    id: int
    path: str
    size: int
    mtime: float
    sha256: str
    status: str
    error: str | None = None

    @property
    def mtime_ns(self) -> int:
        return int(round(self.mtime * 1e9))


_RECORD_COLUMNS = "id, path, size, mtime_ns, sha256, status, error"


def _record(row: Sequence[Any]) -> ImageRecord:
    return ImageRecord(
        id=int(row[0]),
        path=row[1],
        size=int(row[2]),
        mtime=row[3] / 1e9,
        sha256=row[4],
        status=row[5],
        error=row[6],
    )


def to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def from_blob(blob: bytes, dim: int) -> np.ndarray:
    v = np.frombuffer(blob, dtype="<f4")
    if v.size != dim:
        raise ValueError(f"stored vector has {v.size} values, the index expects {dim}")
    return v


class Catalog:
    """Thread-aware access to ``catalog.sqlite``: one connection per thread (WAL mode lets
    readers run while the single writer commits)."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        if not readonly:
            self.con.executescript(_SCHEMA)  # idempotent (IF NOT EXISTS); commits itself
            if self.get_meta("schema") is None:
                self.set_meta({"schema": str(SCHEMA_VERSION), "generation": "0"})
        elif not self.path.exists():
            raise FileNotFoundError(f"no catalogue at {self.path}")
        schema = int(self.get_meta("schema") or 0)
        if schema > SCHEMA_VERSION:
            raise ValueError(f"{self.path} was written by a newer cbir (schema {schema})")

    # -- connections ---------------------------------------------------------------------
    @property
    def con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            if self.readonly:
                uri = f"file:{self.path}?mode=ro"
                con = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=60)
            else:
                con = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
                con.execute("PRAGMA journal_mode=WAL")
                # FULL: a committed batch survives power loss too, not only a killed process
                con.execute("PRAGMA synchronous=FULL")
            con.isolation_level = None  # explicit BEGIN/COMMIT below
            self._local.con = con
            with self._all_lock:
                self._all.append(con)
        return con

    def write(self) -> _Transaction:
        """``with catalog.write() as con:`` one IMMEDIATE transaction (all or nothing)."""
        if self.readonly:
            raise PermissionError("index opened read-only")
        return _Transaction(self.con)

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
    def get_meta(self, key: str) -> str | None:
        row = self.con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, values: dict[str, str], con: sqlite3.Connection | None = None) -> None:
        rows = [(k, str(v)) for k, v in values.items()]
        if con is not None:
            con.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", rows)
            return
        with self.write() as c:
            c.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", rows)

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    @staticmethod
    def bump_generation(con: sqlite3.Connection) -> None:
        con.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    # -- roots -----------------------------------------------------------------------------
    def roots(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT path FROM roots ORDER BY path")]

    # -- records ---------------------------------------------------------------------------
    def get(self, id_: int) -> ImageRecord | None:
        row = self.con.execute(
            f"SELECT {_RECORD_COLUMNS} FROM images WHERE id = ?", (int(id_),)
        ).fetchone()
        return None if row is None else _record(row)

    def by_path(self, path: str) -> ImageRecord | None:
        row = self.con.execute(
            f"SELECT {_RECORD_COLUMNS} FROM images WHERE path = ?", (path,)
        ).fetchone()
        return None if row is None else _record(row)

    def records(self) -> Iterator[ImageRecord]:
        for row in self.con.execute(f"SELECT {_RECORD_COLUMNS} FROM images ORDER BY id"):
            yield _record(row)

    def paths_for(self, ids: Iterable[int]) -> dict[int, str]:
        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            q = f"SELECT id, path FROM images WHERE id IN ({','.join('?' * len(chunk))})"
            out.update((int(i), p) for i, p in self.con.execute(q, chunk))
        return out

    def counts(self) -> dict[str, int]:
        rows = self.con.execute("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall()
        d = {s: int(n) for s, n in rows}
        return {"ok": d.get("ok", 0), "failed": d.get("failed", 0)}

    def vectors(
        self,
        ids: Sequence[int] | None = None,
        *,
        dim: int,
        augmented: bool = False,
        chunk: int = 20000,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids, vectors) chunks of the ``ok`` rows (all, or ``ids`` in that order).

        ``augmented=True`` returns the DBA vector where one is stored (what the FAISS
        index holds), else the raw vector.
        """
        column = "COALESCE(augmented, vector)" if augmented else "vector"
        if ids is None:
            cur = self.con.execute(
                f"SELECT id, {column} FROM images WHERE status = 'ok' ORDER BY id"
            )
            while True:
                rows = cur.fetchmany(chunk)
                if not rows:
                    return
                yield _stack(rows, dim)
        else:
            ids = [int(i) for i in ids]
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                marks = ",".join("?" * len(part))
                q = f"SELECT id, {column} FROM images WHERE status = 'ok' AND id IN ({marks})"
                found = {int(i): b for i, b in self.con.execute(q, part)}
                rows = [(i, found[i]) for i in part if i in found]
                if rows:
                    yield _stack(rows, dim)

    def all_vectors(self, *, dim: int, augmented: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Every ``ok`` row's id and vector, in id order."""
        ids, vecs = [], []
        for i, v in self.vectors(dim=dim, augmented=augmented):
            ids.append(i)
            vecs.append(v)
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return np.concatenate(ids), np.concatenate(vecs)


def _stack(rows: list[tuple[int, bytes]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vecs = np.empty((len(rows), dim), dtype=np.float32)
    for j, (_, blob) in enumerate(rows):
        vecs[j] = from_blob(blob, dim)
    return ids, vecs


class _Transaction:
    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con

    def __enter__(self) -> sqlite3.Connection:
        self.con.execute("BEGIN IMMEDIATE")
        return self.con

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.con.execute("COMMIT")
        else:
            self.con.execute("ROLLBACK")
