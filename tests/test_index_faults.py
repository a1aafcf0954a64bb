"""Fault injection: ``cbir index`` killed (SIGKILL) or terminated (SIGTERM) at each named
fault point (:mod:`cbir.index.faults`), two writers racing, and after each: no stray
process, no stale lock, one row per file, every sampled image finds itself at rank 1, and
every stored vector is the index's own descriptor of its file (nothing mixed)."""

from __future__ import annotations

import multiprocessing
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from fault_child import run_cli

from cbir.index import Index
from cbir.index.catalog import Catalog
from cbir.index.locks import FileLock

N_IMAGES = 16
CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["cbir.cli.main", "cbir.index", "fault_child"])

pytestmark = pytest.mark.slow


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for i in range(N_IMAGES):
        make_image(tmp_path / "images" / f"{i:02d}.jpg", seed=7000 + i)
    return tmp_path / "images"


def start(argv: list[object], fault: str | None = None, children: Path | None = None) -> multiprocessing.Process:
    args = ([str(a) for a in argv], fault, str(children) if children else None)
    proc = CTX.Process(target=run_cli, args=args)
    proc.start()
    return proc


def index_args(images: Path, db: Path, *extra: object) -> list[object]:
    return ["index", images, "--db", db, "-j", "2", "-b", "2", "-q", "--engine", "torch", *extra]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return not any(line.startswith("State:") and "Z" in line for line in fh)
    except FileNotFoundError:
        return False


def assert_no_stray_process_and_no_lock(children: Path, db: Path) -> None:
    pids = [int(p) for p in children.read_text().split()] if children.exists() else []
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], "decode workers outlived the killed indexer"
    if (db / "lock").exists():
        with FileLock(db / "lock").hold():  # taken at once: nobody holds it
            pass


def assert_consistent(db: Path, images: Path, *, resume: bool = True) -> dict:
    """Resume (in this process), then check rows, self-retrieval and vector provenance."""
    files = sorted(str(p) for p in images.iterdir())
    with Index.open(db, create=True) as idx:
        report = idx.sync([images], progress=False, workers=0) if resume else None
        stats = idx.stats()
        assert stats["images"] == stats["faiss_vectors"] == len(files) and stats["failures"] == 0
        assert sorted(r.path for r in idx.catalog.records()) == files
        for f in files[::5]:
            assert idx.search(f, k=1)[0].path == f
        ids, stored = idx.catalog.all_vectors(dim=idx.dim)
        paths = idx.catalog.paths_for(ids.tolist())
        fresh = np.stack([idx.describe(paths[int(i)]) for i in ids])
        np.testing.assert_allclose(stored, fresh, atol=1e-4)  # each vector is this descriptor's
    return {"report": report, "stats": stats}


FAULTS = [
    ("extract.batch:kill@3", signal.SIGKILL, ()),
    ("extract.batch:term@2", signal.SIGTERM, ()),
    ("commit.before:kill@2", signal.SIGKILL, ()),
    ("commit.after:term@3", signal.SIGTERM, ()),
    ("journal.write:kill@2", signal.SIGKILL, ()),
    ("base.write:term@2", signal.SIGTERM, ("--compact",)),
    ("compact.base_written:kill@2", signal.SIGKILL, ("--compact",)),
    ("compact.manifest_written:term@2", signal.SIGTERM, ("--compact",)),
    ("create.descriptor_saved:kill", signal.SIGKILL, ()),
]


@pytest.mark.parametrize(("fault", "sig", "extra"), FAULTS, ids=[f[0] for f in FAULTS])
def test_killed_at_a_fault_point_leaves_a_consistent_index(
    fault: str, sig: signal.Signals, extra: tuple, tmp_path: Path, images: Path, tiny_file: Path
) -> None:
    db, children = tmp_path / "db", tmp_path / "children"
    proc = start(index_args(images, db, "--model", tiny_file, *extra), fault, children)
    proc.join(300)
    assert proc.exitcode == -sig, f"expected death by {sig.name} at {fault}, got exit code {proc.exitcode}"
    assert_no_stray_process_and_no_lock(children, db)
    committed = 0
    if (db / "catalog.sqlite").exists():
        cat = Catalog(db / "catalog.sqlite", readonly=True)
        committed = cat.counts()["ok"]
        cat.close()
    result = assert_consistent(db, images)
    assert result["report"].extracted == N_IMAGES - committed  # finished work is not redone
    if fault.startswith("extract.batch"):
        assert children.exists() and children.read_text().split(), "no decode worker was running"


def test_two_writers_racing_on_a_new_folder_never_mix_descriptors(
    tmp_path: Path, images: Path, tiny_file: Path
) -> None:
    db = tmp_path / "db"
    a = start(index_args(images, db, "--model", tiny_file, "--wait", "120"))
    b = start(index_args(images, db, "--model", tiny_file, "--image-size", "48", "--wait", "120"))
    a.join(300)
    b.join(300)
    assert sorted([a.exitcode, b.exitcode]) == [0, 2]  # the loser: "incomparable vectors" (exit 2)
    assert_consistent(db, images, resume=False)


def test_two_writers_racing_on_an_existing_folder(tmp_path: Path, images: Path, tiny_file: Path) -> None:
    db = tmp_path / "db"
    with Index.create(db, model=tiny_file) as idx:
        idx.sync([images], progress=False, workers=0)
    for i in range(6):
        make_image(images / f"new_{i}.jpg", seed=8000 + i)
    (images / "00.jpg").unlink()
    procs = [start(index_args(images, db, "--wait", "120")) for _ in range(2)]
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert_consistent(db, images, resume=False)
