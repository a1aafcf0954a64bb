"""Sync planning without a model (pure functions), and a no-op sync that opens no image."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import make_image

from cbir.index import Index
from cbir.index import writer as writer_mod
from cbir.index.catalog import ImageRecord
from cbir.index.sync import FileStat, plan_changes, plan_sync

ROOT = "/photos"


def rec(id_: int, name: str, size: int = 100, mtime_ns: int = 1_700_000_000_123_456_789, sha: str = "") -> ImageRecord:
    return ImageRecord(id_, f"{ROOT}/{name}", size, mtime_ns, sha or f"sha-{name}", "ok")


def stat(name: str, size: int = 100, mtime_ns: int = 1_700_000_000_123_456_789) -> FileStat:
    return FileStat(f"{ROOT}/{name}", size, mtime_ns)


def test_unchanged_files_are_compared_to_the_nanosecond_and_never_hashed() -> None:
    snapshot = [rec(1, "a.jpg"), rec(2, "b.jpg"), rec(3, "c.jpg")]
    walk = [stat("a.jpg"), stat("b.jpg", mtime_ns=1_700_000_000_123_456_790), stat("c.jpg", size=101)]
    plan = plan_sync(walk, snapshot, scope=[ROOT], exists=lambda p: True)
    assert plan.unchanged == 1
    assert [f.path for f, _ in plan.to_hash] == [f"{ROOT}/b.jpg", f"{ROOT}/c.jpg"]  # 1 ns is a change
    assert plan.deletable == set() and plan.gone == []


def test_touch_move_copy_new_and_delete_are_told_apart() -> None:
    snapshot = [rec(1, "kept.jpg"), rec(2, "old_name.jpg", sha="M"), rec(3, "orig.jpg", sha="C"),
                rec(4, "deleted.jpg"), rec(5, "touched.jpg", sha="T"), rec(6, "edited.jpg", sha="E1")]  # fmt: skip
    walk = [stat("kept.jpg"), stat("new_name.jpg"), stat("orig.jpg"), stat("copy.jpg"),
            stat("touched.jpg", mtime_ns=5), stat("edited.jpg", mtime_ns=6), stat("brand_new.jpg")]  # fmt: skip
    plan = plan_sync(walk, snapshot, scope=[ROOT], exists=lambda p: False)
    assert plan.unchanged == 2 and plan.deletable == {2, 4}
    hashes = {"new_name.jpg": "M", "copy.jpg": "C", "touched.jpg": "T", "edited.jpg": "E2", "brand_new.jpg": "N"}
    hashed = [(f, hashes[Path(f.path).name], row) for f, row in plan.to_hash]
    changes, touched = plan_changes(plan, hashed)
    assert touched == 1 and changes.touches == [(5, 100, 5, "T")]
    assert changes.moves == [(2, f"{ROOT}/new_name.jpg", 100, 1_700_000_000_123_456_789)]
    assert [(src, row.path) for src, row in changes.copies] == [(3, f"{ROOT}/copy.jpg")]
    assert changes.deletes == [4]  # the moved record is not deleted
    assert [(t.path, t.row.id if t.row else None) for t in changes.extract] == [
        (f"{ROOT}/edited.jpg", 6),
        (f"{ROOT}/brand_new.jpg", None),
    ]


def test_records_outside_the_synced_roots_are_only_move_sources() -> None:
    snapshot = [rec(1, "x.jpg", sha="X"), ImageRecord(2, "/elsewhere/y.jpg", 1, 1, "Y", "ok"),
                ImageRecord(3, "/elsewhere/gone.jpg", 1, 1, "G", "ok")]  # fmt: skip
    plan = plan_sync([stat("x.jpg"), stat("moved_here.jpg")], snapshot, scope=[ROOT],
                     exists=lambda p: p != "/elsewhere/gone.jpg")  # fmt: skip
    assert plan.deletable == set() and [r.id for r in plan.gone] == [3]
    changes, _ = plan_changes(plan, [(plan.to_hash[0][0], "G", None)])
    assert changes.moves == [(3, f"{ROOT}/moved_here.jpg", 100, 1_700_000_000_123_456_789)]
    assert changes.deletes == [] and changes.extract == []


@pytest.fixture(scope="module")
def tiny_file(tiny_descriptor, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("desc") / "tiny.cbir"
    tiny_descriptor.save(path)
    return path


def test_noop_sync_opens_and_hashes_no_image_file(
    tmp_path: Path, image_dir: Path, tiny_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts, with an audit hook, every file this process opens during a re-sync (Python's
    ``open`` event covers builtins.open, io.open and os.open; workers=0 decodes in-process)."""
    with Index.create(tmp_path / "db", model=tiny_file) as idx:
        idx.sync([image_dir], progress=False, workers=0)
    shutil.copystat(image_dir / "img_03.jpg", image_dir / "img_03.jpg")  # same times: still unchanged
    hashed: list[str] = []
    real_hash = writer_mod.file_sha256
    monkeypatch.setattr(writer_mod, "file_sha256", lambda p: hashed.append(str(p)) or real_hash(p))
    opened: list[str] = []
    watching = [False]

    def hook(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)  # cannot be removed: it only records while `watching`
    with Index.open(tmp_path / "db") as idx:
        watching[0] = True
        try:
            report = idx.sync([image_dir], progress=False, workers=0)
        finally:
            watching[0] = False
    images = [p for p in opened if p.startswith(str(image_dir))]
    assert report.unchanged == 12 and report.extracted == 0
    assert hashed == [] and images == []
    assert opened, "the hook saw nothing at all: it is not counting"
    # and it does count image files when one changed: the proof that it can fail
    make_image(image_dir / "img_05.jpg", seed=55)
    with Index.open(tmp_path / "db") as idx:
        watching[0] = True
        try:
            report = idx.sync([image_dir], progress=False, workers=0)
        finally:
            watching[0] = False
    assert report.updated == 1 and hashed == [str(image_dir / "img_05.jpg")]
    assert str(image_dir / "img_05.jpg") in opened
