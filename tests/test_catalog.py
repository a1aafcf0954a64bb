"""The catalogue: typed methods, integer times, ids never reused, damage reported clearly."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from cbir.index.catalog import Catalog, NewRow
from cbir.index.errors import CbirIndexError, IndexDamagedError


@pytest.fixture
def catalog(tmp_path: Path):
    Catalog.create(tmp_path / "c.sqlite", {"identity": "x"})
    cat = Catalog(tmp_path / "c.sqlite")
    yield cat
    cat.close()


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=8).astype(np.float32)


def test_mtime_ns_is_kept_exactly(catalog: Catalog) -> None:
    mtime = 1_733_000_000_123_456_789  # float seconds would round this to ...456_768
    with catalog.transaction() as tx:
        (i,) = tx.insert([NewRow("/a.jpg", 10, mtime, "h", vector=vec(0))])
    rec = catalog.get(i)
    assert rec.mtime_ns == mtime and isinstance(rec.mtime_ns, int)
    assert float(mtime / 1e9) * 1e9 != mtime  # why the float round trip had to go


def test_ids_are_never_reused_and_vectors_round_trip(catalog: Catalog) -> None:
    with catalog.transaction() as tx:
        ids = tx.insert([NewRow(f"/{n}.jpg", 1, 1, f"h{n}", vector=vec(n)) for n in range(3)])
        failed = tx.insert([NewRow("/bad.jpg", 1, 1, "hb", error="broken")])
    with catalog.transaction() as tx:
        assert tx.delete([ids[-1], failed[0]]) == (2, [ids[-1]])  # the newest rows go
        (again,) = tx.insert([NewRow("/new.jpg", 1, 1, "hn", vector=vec(9))])
    assert again > failed[0] > ids[-1]
    got_ids, got = catalog.vectors([again, ids[0], 12345], dim=8)
    assert got_ids.tolist() == [again, ids[0]]
    np.testing.assert_array_equal(got, np.stack([vec(9), vec(0)]))
    chunks = list(catalog.iter_vectors(dim=8, chunk=2))
    assert [c[0].tolist() for c in chunks] == [[ids[0], ids[1]], [again]]
    assert catalog.counts() == {"ok": 3, "failed": 0}
    source = catalog.source(8)
    assert source.count() == 3 and source.sample(2, seed=1).shape == (2, 8)
    assert sorted(catalog.ids_under("/")) == sorted([ids[0], ids[1], again])


def test_generation_moves_only_in_committed_transactions(catalog: Catalog) -> None:
    assert catalog.generation == 0
    with pytest.raises(RuntimeError), catalog.transaction() as tx:
        tx.bump_generation()
        raise RuntimeError("rolled back")
    assert catalog.generation == 0
    with catalog.transaction() as tx:
        assert tx.bump_generation() == 1
    assert catalog.generation == 1


def test_damaged_or_foreign_files_are_user_errors(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    Catalog.create(path, {"identity": "x"})
    data = path.read_bytes()
    path.write_bytes(data[:100])  # truncated: no longer an SQLite file
    with pytest.raises(IndexDamagedError, match="index damaged: .* not a readable SQLite database"):
        Catalog(path, readonly=True)
    path.write_bytes(b"")  # SQLite would happily treat an empty file as an empty database
    with pytest.raises(IndexDamagedError, match="holds no catalogue"):
        Catalog(path)
    assert path.stat().st_size == 0  # and nothing was created in it
    with pytest.raises(IndexDamagedError, match="missing"):
        Catalog(tmp_path / "absent.sqlite")


def test_schema_1_catalogue_is_upgraded_with_ids_after_the_largest(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE roots (path TEXT PRIMARY KEY);"
        "CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,"
        " mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, status TEXT NOT NULL, error TEXT, vector BLOB,"
        " augmented BLOB);"
        "INSERT INTO meta VALUES ('schema', '1'), ('generation', '4');"
        "INSERT INTO images VALUES (7, '/a.jpg', 1, 1, 'h', 'ok', NULL, NULL, NULL);"
    )
    con.commit()
    con.close()
    cat = Catalog(path)
    with cat.transaction() as tx:
        assert tx.insert([NewRow("/b.jpg", 1, 1, "h2", vector=vec(1))]) == [8]
    assert cat.get_meta("schema") == "2" and cat.generation == 4
    cat.close()
    (tmp_path / "newer.sqlite").write_bytes(path.read_bytes())
    con = sqlite3.connect(tmp_path / "newer.sqlite")
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    con.commit()
    con.close()
    with pytest.raises(CbirIndexError, match="newer cbir"):
        Catalog(tmp_path / "newer.sqlite")
