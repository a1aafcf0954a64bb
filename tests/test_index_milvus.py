"""The index over a Milvus store (Milvus Lite): sync, incremental add and remove, search and
QE equal to the FAISS store, the HTTP server, a move between stores, and kill -9 at the
commit's fault points (the catalogue stays the truth; the collection is repaired from it)."""

from __future__ import annotations

import multiprocessing
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import dataset_or_skip, make_image
from fault_child import run_cli

pytest.importorskip("pymilvus", reason="needs the distributed extra: pip install 'cbir[distributed]'")
pytest.importorskip("milvus_lite", reason="needs the distributed extra: pip install 'cbir[distributed]'")

from cbir.index import Index  # noqa: E402
from cbir.index.stores.milvus import MilvusStore  # noqa: E402

CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["cbir.cli.main", "cbir.index", "fault_child"])


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for i in range(24):
        make_image(tmp_path / "images" / f"{i:02d}.jpg", seed=300 + i)
    return tmp_path / "images"


def milvus(tmp_path: Path) -> str:
    return f"milvus:{tmp_path}/vectors.db#index=FLAT"


def top(idx: Index, query: str, k: int = 10, **kw) -> list[tuple[str, float]]:
    return [(h.path, h.score) for h in idx.search(query, k=k, **kw)]


def assert_same_ranking(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> None:
    """Equal up to ties: same scores rank by rank, and the same paths wherever scores differ
    from their neighbours by more than float noise."""
    np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=1e-4)
    scores = [s for _, s in a]
    for r, ((pa, sa), (pb, _)) in enumerate(zip(a, b, strict=True)):
        tied = any(abs(sa - scores[j]) < 1e-4 for j in (r - 1, r + 1) if 0 <= j < len(scores))
        if not tied:
            assert pa == pb, (r, pa, pb)


def test_sync_add_remove_search_and_qe_match_the_faiss_store(tmp_path, images, tiny_file) -> None:
    with Index.open(tmp_path / "m", model=tiny_file, create=True, store=milvus(tmp_path)) as idx, \
         Index.open(tmp_path / "f", model=tiny_file, create=True) as ref:  # fmt: skip
        assert isinstance(idx.store, MilvusStore) and idx.stats()["index"] == "milvus:FLAT"
        for i in (idx, ref):
            assert i.sync([images], progress=False, workers=0).added == 24
        files = sorted(str(p) for p in images.iterdir())
        for f in files:
            assert idx.search(f, k=1)[0].path == f  # every image finds itself at rank 1
            assert_same_ranking(top(idx, f), top(ref, f))
        assert_same_ranking(top(idx, files[3], qe=3), top(ref, files[3], qe=3))
        for f in files[:3]:  # remove three files, add two: an incremental sync
            Path(f).unlink()
        for i in (24, 25):
            make_image(images / f"{i:02d}.jpg", seed=300 + i)
        for i in (idx, ref):
            report = i.sync([images], progress=False, workers=0)
            assert (report.added, report.removed, report.extracted) == (2, 3, 2)
        assert idx.store.count() == len(idx) == 23
        hits = {h.path for f in files[3:6] for h in idx.search(f, k=23)}
        assert not hits & set(files[:3])
        assert idx.search(str(images / "25.jpg"), k=1)[0].path == str(images / "25.jpg")
        assert idx.remove(str(images / "24.jpg")) == 1 and idx.store.count() == 22


def test_server_searches_adds_and_removes_over_milvus(tmp_path, images, tiny_file) -> None:
    from fastapi.testclient import TestClient

    from cbir.serve import ServeSettings, create_app

    settings = ServeSettings(token="t" * 32, writes=True, upload_dir=tmp_path / "uploads",
                             max_upload_bytes=500_000, max_pixels=1_000_000, search_threads=2,
                             refresh_seconds=0)  # fmt: skip
    auth = {"Authorization": f"Bearer {'t' * 32}"}
    with Index.open(tmp_path / "m", model=tiny_file, create=True, store=milvus(tmp_path)) as idx:
        idx.sync([images], progress=False, workers=0)
        with TestClient(create_app(idx, settings), raise_server_exceptions=False) as client:
            data = (images / "05.jpg").read_bytes()
            r = client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": "3"})
            assert r.status_code == 200 and r.json()["results"][0]["path"] == "05.jpg"
            new = make_image(tmp_path / "new.png", seed=999).read_bytes()
            r = client.post("/images", files={"image": ("n.png", new, "image/png")}, headers=auth)
            assert r.status_code == 201, r.text
            added = r.json()["id"]
            assert idx.store.count() == 25
            r = client.post("/search", files={"image": ("q.png", new, "image/png")}, data={"k": "1"})
            assert r.json()["results"][0]["id"] == added
            assert client.delete(f"/images/{added}", headers=auth).status_code == 200
            assert idx.store.count() == 24


def test_an_index_moves_to_milvus_and_back_without_reading_images(tmp_path, images, tiny_file) -> None:
    db = tmp_path / "db"
    with Index.open(db, model=tiny_file, create=True) as idx:
        idx.sync([images], progress=False, workers=0)
        before = top(idx, str(images / "07.jpg"))
    with Index.open(db, store=milvus(tmp_path)) as idx:
        assert isinstance(idx.store, MilvusStore) and idx.store.count() == 24
        assert_same_ranking(top(idx, str(images / "07.jpg")), before)
        assert idx.sync([images], progress=False, workers=0).extracted == 0
    with Index.open(db, readonly=True) as idx:  # the setting is recorded
        assert isinstance(idx.store, MilvusStore)
    with Index.open(db, store="faiss") as idx:
        assert not isinstance(idx.store, MilvusStore) and idx.store.count() == 24
        assert_same_ranking(top(idx, str(images / "07.jpg")), before)


@pytest.mark.parametrize("fault", ["commit.before:kill@2", "commit.after:kill@2"])
def test_kill_9_during_a_sync_then_reopen(fault, tmp_path, images, tiny_file) -> None:
    """SIGKILL with the collection one batch ahead of the catalogue (commit.before) or in step
    with it (commit.after): reopening repairs it; rows = files, each image finds itself."""
    db = tmp_path / "db"
    argv = ["index", str(images), "--db", str(db), "--store", milvus(tmp_path), "--model", str(tiny_file),
            "-j", "0", "-b", "4", "-q", "--engine", "torch"]  # fmt: skip
    proc = CTX.Process(target=run_cli, args=(argv, fault, None))
    proc.start()
    proc.join(300)
    assert proc.exitcode == -signal.SIGKILL
    with Index.open(db) as idx:
        assert isinstance(idx.store, MilvusStore)
        assert idx.store.count() == len(idx) and set(idx.store.ids().tolist()) == set(idx.catalog.ok_ids().tolist())
        committed = len(idx)
        assert idx.sync([images], progress=False, workers=0).extracted == 24 - committed
        assert idx.store.count() == len(idx) == 24
        for f in sorted(images.iterdir())[::4]:
            assert idx.search(str(f), k=1)[0].path == str(f)


@pytest.mark.dataset
def test_gpr_mini_top10_equals_the_faiss_store(tmp_path, tiny_file) -> None:
    """Same vectors, two stores: the FAISS Flat index and a Milvus FLAT collection give the same
    top-10 (up to ties) on gpr-mini. The model is not the point: the tiny descriptor."""
    root = dataset_or_skip("gpr-mini")
    images = root / "images" if (root / "images").is_dir() else root
    db = tmp_path / "db"
    with Index.open(db, model=tiny_file, create=True, factory="Flat") as idx:
        idx.sync([images], progress=False, workers=2)
        queries = [r.path for r in idx.catalog.records()][::20]
        faiss_top = {q: top(idx, q) for q in queries}
    shutil.copytree(db, tmp_path / "db2")
    with Index.open(tmp_path / "db2", store=milvus(tmp_path)) as idx:
        assert isinstance(idx.store, MilvusStore) and idx.store.count() == len(idx) > 1000
        for q in queries:
            assert_same_ranking(top(idx, q), faiss_top[q])
