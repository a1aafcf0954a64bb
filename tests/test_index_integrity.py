"""Integrity of an index folder: no silent creation, damage refused with a repair hint,
interrupted creation finished, writers that wait, files that change mid-run, workers that
drop the lock."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from typer.testing import CliRunner

from cbir.cli.commands import app
from cbir.index import Index, IndexBusyError, IndexDamagedError, IndexNotFoundError, faults
from cbir.index import writer as writer_mod
from cbir.index.locks import FileLock

SYNC = {"progress": False, "workers": 0, "batch_size": 4}
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_file(tiny_descriptor, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("desc") / "tiny.cbir"
    tiny_descriptor.save(path)
    return path


@pytest.fixture
def db(tmp_path: Path, image_dir: Path, tiny_file: Path) -> Path:
    with Index.create(tmp_path / "db", model=tiny_file) as idx:
        idx.sync([image_dir], **SYNC)
    return tmp_path / "db"


def cli(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_open_never_creates(tmp_path: Path, image_dir: Path) -> None:
    with pytest.raises(IndexNotFoundError, match="no index in .*typo: create one"):
        Index.open(tmp_path / "typo")
    code, out = cli("search", image_dir / "img_00.jpg", "--db", tmp_path / "typo")
    assert code != 0 and "no index" in out and "Traceback" not in out
    assert not (tmp_path / "typo").exists()


def test_deleted_descriptor_is_refused_not_recreated(db: Path, image_dir: Path, tiny_file: Path) -> None:
    (db / "descriptor.cbir").unlink()
    before = digest(db / "catalog.sqlite")
    with pytest.raises(IndexDamagedError, match="descriptor.cbir is missing.*timm:resnet10t.*mv .* && cbir index"):
        Index.open(db)
    with pytest.raises(IndexDamagedError):
        Index.open(db, create=True)
    code, out = cli("index", image_dir, "--db", db, "-j", "0", "-q")  # the default descriptor would relabel
    assert code != 0 and "index damaged" in out and "Traceback" not in out
    assert digest(db / "catalog.sqlite") == before and not (db / "descriptor.cbir").exists()


@pytest.mark.parametrize("size", [0, 100])
def test_damaged_catalogue_is_a_clear_error_and_keeps_the_descriptor(db: Path, image_dir: Path, size: int) -> None:
    descriptor = digest(db / "descriptor.cbir")
    with open(db / "catalog.sqlite", "r+b") as fh:
        fh.truncate(size)
    for f in db.glob("catalog.sqlite-*"):
        f.unlink()  # WAL files of the old content
    for args in (("index", image_dir, "--db", db, "-j", "0", "-q"), ("search", image_dir / "img_01.jpg", "--db", db)):
        code, out = cli(*args)
        assert code != 0 and "index damaged" in out and "Traceback" not in out, out
    assert digest(db / "descriptor.cbir") == descriptor  # a custom descriptor is never overwritten
    assert (db / "catalog.sqlite").stat().st_size == size


def test_interrupted_creation_is_finished_by_the_next_writer(tmp_path: Path, image_dir: Path, tiny_file: Path) -> None:
    faults.configure("create.descriptor_saved:raise")
    try:
        with pytest.raises(faults.FaultInjected):
            Index.create(tmp_path / "db", model=tiny_file)
    finally:
        faults.configure(None)
    assert (tmp_path / "db" / "descriptor.cbir").exists() and not (tmp_path / "db" / "catalog.sqlite").exists()
    with pytest.raises(IndexNotFoundError, match="being created"):
        Index.open(tmp_path / "db", readonly=True)
    with Index.open(tmp_path / "db", create=True) as idx:
        assert idx.descriptor.describe_name().startswith("timm:resnet10t")
        assert idx.sync([image_dir], **SYNC).added == 12


def test_writer_waits_for_another_writer_or_fails_at_once(db: Path, image_dir: Path, tmp_path: Path) -> None:
    extra = make_image(tmp_path / "extra" / "new.jpg", seed=404)
    holder = Index.open(db)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with holder.writer():  # re-entrant: add() inside the same writer
            holder.add([image_dir / "img_00.jpg"], **SYNC)
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        held.wait(10)
        with Index.open(db) as impatient, pytest.raises(IndexBusyError, match="--wait"):
            impatient.add([extra], **SYNC)
        threading.Timer(0.5, release.set).start()
        start = time.monotonic()
        with Index.open(db, wait=20) as patient:
            assert patient.add([extra], **SYNC).added == 1
        assert time.monotonic() - start >= 0.4
    finally:
        release.set()
        t.join()
        holder.close()
    with Index.open(db, readonly=True) as idx:
        assert idx.search(str(extra), k=1)[0].path == str(extra)


def test_file_rewritten_while_described_gets_the_vector_of_its_bytes(
    tmp_path: Path, image_dir: Path, tiny_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is hashed, then rewritten before the model reads it: what is committed must
    be the hash and the vector of the same bytes (here: the new ones, after a re-run)."""
    target = image_dir / "img_04.jpg"
    real = writer_mod.iter_extract
    rewritten = []

    def racing(descriptor, paths, **kwargs):
        if not rewritten:
            make_image(target, seed=4444)  # after hashing, before describing
            rewritten.append(1)
        return real(descriptor, paths, **kwargs)

    monkeypatch.setattr(writer_mod, "iter_extract", racing)
    with Index.create(tmp_path / "db", model=tiny_file) as idx:
        report = idx.sync([image_dir], **SYNC)
        assert rewritten and report.added == 12 and report.failed == 0
        rec = idx.lookup(target)
        assert rec.sha256 == hashlib.sha256(target.read_bytes()).hexdigest()
        mine = idx.describe(target)
        _, stored = idx.catalog.vectors([rec.id], dim=idx.dim)
        np.testing.assert_allclose(stored[0], mine, atol=1e-4)


def test_decode_workers_drop_the_lock_descriptor(tmp_path: Path) -> None:
    from cbir.extract import _make_pool

    lock = FileLock(tmp_path / "lock")
    with lock.hold():
        fd = lock._fh.fileno()
        pool = _make_pool(1)
        try:
            target = pool.submit(os.readlink, f"/proc/self/fd/{fd}").result(timeout=60)
        finally:
            pool.shutdown()
    assert target == os.devnull  # the worker's copy no longer refers to the lock file
