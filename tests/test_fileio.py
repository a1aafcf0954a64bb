"""Crash-safe writes: a failed write leaves the old file and no temporary behind."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from cbir.fileio import atomic_write_by_name, atomic_write_bytes
from cbir.index.stores import faiss_index as fx


def test_atomic_write_bytes_replaces_or_keeps(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_by_name_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "index.faiss"
    target.write_bytes(b"old")

    def half_then_crash(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_by_name(target, half_then_crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]

    atomic_write_by_name(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]


def test_faiss_index_round_trips_through_the_atomic_writer(tmp_path: Path) -> None:
    index = fx.make_index(8, "Flat")
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    faiss.normalize_L2(x)
    index.add(x)
    path = tmp_path / "base-3.faiss"
    digest, size = fx.write_index_file(path, index)
    assert size == path.stat().st_size and [p.name for p in tmp_path.iterdir()] == ["base-3.faiss"]
    back = fx.read_index_file(path, digest, 8)
    assert back.ntotal == 20
    d0, i0 = index.search(x[:3], 5)
    d1, i1 = back.search(x[:3], 5)
    assert np.array_equal(i0, i1) and np.allclose(d0, d1)
    with pytest.raises(fx.StoreFileError, match="checksum"):
        fx.read_index_file(path, "0" * 32, 8)
