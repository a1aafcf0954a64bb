"""The index through its Python API: incremental sync, crash consistency of the
cache, exact search vs brute force, QE/DBA vs their formulas, duplicates, threads."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from cbir.index import (
    DescriptorMismatchError,
    Index,
    IndexBusyError,
    IndexError_,
    IndexNotFoundError,
    IndexNotTrainedError,
    QueryError,
)

SYNC = {"progress": False, "workers": 0, "batch_size": 4}


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def index(tmp_path: Path, image_dir: Path, tiny_file: Path):
    idx = Index.create(tmp_path / "db", model=tiny_file)
    report = idx.sync([image_dir], **SYNC)
    assert report.added == 12 and report.extracted == 12
    yield idx
    idx.close()


def stored_matrix(idx: Index, augmented: bool = False) -> tuple[np.ndarray, np.ndarray]:
    return idx.catalog.all_vectors(dim=idx.dim, augmented=augmented)


def test_sync_indexes_every_image_and_each_finds_itself(index: Index, image_dir: Path) -> None:
    files = sorted(str(p) for p in image_dir.rglob("*") if p.is_file())
    stats = index.stats()
    assert stats["images"] == len(files) == stats["faiss_vectors"]
    assert stats["failures"] == 0 and stats["index"] == "Flat" and stats["dim"] == index.dim
    assert stats["roots"] == [str(image_dir)]
    for f in files:
        hits = index.search(f, k=3)
        assert hits[0].path == f and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert index.lookup(f).id == hits[0].id
        assert index.get(hits[0].id).path == f
    assert index.relative_path(image_dir / "sub" / "a.png") == os.path.join("sub", "a.png")


def test_query_by_image_file_bytes_and_pil_matches_stored_vector(
    index: Index, image_dir: Path, tmp_path: Path
) -> None:
    src = image_dir / "img_03.jpg"
    outside = tmp_path / "query.jpg"
    shutil.copyfile(src, outside)  # not indexed: described from the file
    for query in (str(outside), outside.read_bytes(), Image.open(outside)):
        hits = index.search(query, k=2)
        assert hits[0].path == str(src)
        assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    # identical content is the query itself for exclude_self, whatever the form
    assert str(src) not in [
        h.path for h in index.search(outside.read_bytes(), k=5, exclude_self=True)
    ]
    assert str(src) not in [h.path for h in index.search(str(src), k=5, exclude_self=True)]
    with pytest.raises(QueryError):
        index.search(b"not an image", k=3)
    with pytest.raises(QueryError):
        index.search(str(tmp_path / "missing.jpg"), k=3)


def test_rerun_change_delete_move_copy(index: Index, image_dir: Path) -> None:
    again = index.sync([image_dir], **SYNC)
    assert (again.extracted, again.unchanged, again.added) == (0, 12, 0)

    moved_id = index.lookup(image_dir / "img_01.jpg").id
    (image_dir / "img_01.jpg").rename(image_dir / "sub" / "renamed.jpg")
    (image_dir / "img_02.jpg").unlink()
    make_image(image_dir / "img_03.jpg", seed=333)  # new content, same name
    shutil.copyfile(image_dir / "img_04.jpg", image_dir / "copy_of_4.jpg")
    os.utime(image_dir / "img_05.jpg", ns=(10**18, 10**18))  # touched, same content
    r = index.sync([image_dir], **SYNC)
    assert (r.moved, r.removed, r.updated, r.added, r.extracted) == (1, 1, 1, 1, 1)
    assert r.unchanged == 9  # 8 untouched + the touched one
    assert index.lookup(image_dir / "sub" / "renamed.jpg").id == moved_id
    assert index.lookup(image_dir / "img_02.jpg") is None
    paths = {str(p) for p in image_dir.rglob("*") if p.is_file()}
    assert index.stats()["images"] == len(paths) == 12
    ids, vectors = stored_matrix(index)
    for f in paths:
        hits = index.search(f, k=1)
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    # the changed file got a new vector: a query with its new pixels finds it
    assert index.search((image_dir / "img_03.jpg").read_bytes(), k=1)[0].path == str(
        image_dir / "img_03.jpg"
    )
    assert index.sync([image_dir], **SYNC).extracted == 0


def test_failed_files_are_recorded_and_retried_only_when_changed(
    index: Index, image_dir: Path
) -> None:
    bad = image_dir / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    r = index.sync([image_dir], **SYNC)
    assert r.failed == 1 and r.extracted == 1 and r.failures[0].path == str(bad)
    rec = index.lookup(bad)
    assert rec.status == "failed" and rec.error
    assert index.stats()["failures"] == 1 and index.stats()["images"] == 12
    assert index.sync([image_dir], **SYNC).extracted == 0  # not retried
    make_image(bad, seed=77, fmt="JPEG")
    r = index.sync([image_dir], **SYNC)
    assert (r.updated, r.failed, r.extracted) == (1, 0, 1)
    assert index.lookup(bad).status == "ok" and index.stats()["failures"] == 0
    assert index.search(str(bad), k=1)[0].path == str(bad)


def test_add_and_remove(index: Index, image_dir: Path, tmp_path: Path) -> None:
    extra = make_image(tmp_path / "elsewhere" / "new.png", seed=500)
    r = index.add([extra], **SYNC)
    assert r.added == 1 and r.extracted == 1
    assert index.search(str(extra), k=1)[0].path == str(extra)
    assert index.relative_path(extra) == str(extra)  # not under a synced root
    assert index.remove([extra]) == 1
    assert index.remove([index.lookup(image_dir / "img_00.jpg").id]) == 1
    assert index.remove([image_dir / "sub"]) == 2  # a folder removes what is under it
    assert index.remove(["/no/such/file.jpg"]) == 0
    assert index.roots == [str(image_dir)]
    assert index.stats()["images"] == 9
    left = {h.path for h in index.search(str(image_dir / "img_05.jpg"), k=50)}
    assert len(left) == 9 and str(image_dir / "img_00.jpg") not in left
    # a sync brings removed files under its roots back
    assert index.sync([image_dir], **SYNC).added == 3
    assert index.remove(image_dir) == 12 and index.roots == []


def test_exact_search_equals_brute_force(index: Index) -> None:
    ids, x = stored_matrix(index)
    rng = np.random.default_rng(0)
    for q in [
        x[3],
        x[7] + 0.3 * rng.normal(size=x.shape[1]).astype(np.float32),
        rng.normal(size=x.shape[1]),
    ]:
        qn = l2n(np.asarray(q, np.float64))
        sims = x.astype(np.float64) @ qn
        order = np.argsort(-sims, kind="stable")[:5]
        hits = index.search(np.asarray(q, np.float32), k=5)
        assert [h.id for h in hits] == ids[order].tolist()
        np.testing.assert_allclose([h.score for h in hits], sims[order], atol=1e-5)


def test_query_expansion_matches_formula(index: Index) -> None:
    ids, x = stored_matrix(index)
    q = x[5]
    qe, alpha = 3, 3.0
    sims = x @ q
    top = np.argsort(-sims)[:qe]
    expanded = l2n(q + ((sims[top] ** alpha)[:, None] * x[top]).sum(0))
    expected = ids[np.argsort(-(x @ expanded))[:6]]
    hits = index.search(q, k=6, qe=qe, alpha=alpha)
    assert [h.id for h in hits] == expected.tolist()
    np.testing.assert_allclose(hits[0].score, np.max(x @ expanded), atol=1e-5)


def test_dba_indexes_augmented_vectors(tmp_path: Path, image_dir: Path, tiny_file: Path) -> None:
    k, alpha = 2, 3.0
    with Index.create(tmp_path / "db", model=tiny_file, dba=k, dba_alpha=alpha) as idx:
        idx.sync([image_dir], **SYNC)
        ids, x = stored_matrix(idx)  # raw vectors are kept
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        expected = np.empty_like(x)
        for i in range(len(x)):
            nn = np.argsort(-sims[i])[:k]
            expected[i] = l2n(x[i] + ((sims[i, nn] ** alpha)[:, None] * x[nn]).sum(0))
        _, aug = stored_matrix(idx, augmented=True)
        np.testing.assert_allclose(aug, expected, atol=1e-5)
        q = x[4]
        hits = idx.search(q, k=5)
        # the augmented vectors are searched: each hit scores what the formula says, and the
        # hits are the top 5 (up to ties: a random-weight model's scores differ by ~1e-7)
        by_id = dict(zip(ids.tolist(), expected @ q, strict=True))
        np.testing.assert_allclose([h.score for h in hits], [by_id[h.id] for h in hits], atol=1e-5)
        np.testing.assert_allclose([h.score for h in hits], np.sort(expected @ q)[::-1][:5], atol=1e-5)
        # a deletion changes neighbourhoods: everything is re-augmented
        (image_dir / "img_09.jpg").unlink()
        idx.sync([image_dir], **SYNC)
        assert idx.stats()["images"] == 11 and idx.stats()["dba"] == k
        _, aug2 = stored_matrix(idx, augmented=True)
        assert aug2.shape == (11, idx.dim)
    # reopening with dba=0 indexes the raw vectors again, without re-reading images
    with Index.open(tmp_path / "db", dba=0) as idx:
        ids, x = stored_matrix(idx)
        hits = idx.search(x[0], k=1)
        assert hits[0].id == ids[0] and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_mixed_descriptors_are_refused(index: Index, tmp_path: Path) -> None:
    from cbir.models import build_descriptor

    other = build_descriptor("timm:resnet10t", pretrained=False, pooling="gem", image_size=48)
    index.close()
    with pytest.raises(DescriptorMismatchError, match="incomparable"):
        Index.open(tmp_path / "db", model=other)
    with Index.open(tmp_path / "db") as idx:  # no model given: the stored one is used
        assert idx.descriptor.identity() == index.descriptor.identity()
        with pytest.raises(DescriptorMismatchError):
            idx.search(np.ones(idx.dim + 1, np.float32))


def test_folder_is_self_contained_and_readonly_open(
    index: Index, tmp_path: Path, image_dir: Path
) -> None:
    index.close()
    moved = tmp_path / "copied_db"
    shutil.copytree(tmp_path / "db", moved)
    with Index.open(moved, readonly=True) as idx:
        assert idx.stats()["images"] == 12
        assert idx.search(str(image_dir / "img_00.jpg"), k=1)[0].path == str(
            image_dir / "img_00.jpg"
        )
        with pytest.raises(IndexError_, match="read-only"):
            idx.sync([image_dir], **SYNC)
    with pytest.raises(IndexNotFoundError, match="no index"):
        Index.open(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()  # opening never creates


def test_damaged_store_files_are_repaired_from_the_catalogue(
    index: Index, tmp_path: Path, image_dir: Path
) -> None:
    folder = tmp_path / "db"
    index.remove([image_dir / "img_09.jpg"])
    assert index.compact()  # a base file (11 vectors) and an empty journal
    index.add([image_dir / "img_09.jpg"], **SYNC)  # one journal segment
    index.close()
    files = sorted(str(p) for p in image_dir.rglob("*") if p.is_file())

    def check() -> None:
        with Index.open(folder) as idx:
            assert idx.stats()["faiss_vectors"] == idx.stats()["images"] == 12
            for f in files:
                assert idx.search(f, k=1)[0].path == f

    base = next((folder / "vectors").glob("base-*.faiss"))
    data = bytearray(base.read_bytes())
    data[-100] ^= 0x40  # one flipped bit in a vector: FAISS would load it without a word
    base.write_bytes(bytes(data))
    check()  # checksum mismatch: rebuilt from the catalogue
    journal = next((folder / "vectors").glob("journal-*.log"))
    journal.write_bytes(journal.read_bytes()[:-10])  # torn segment: reconciled by ids
    check()
    (folder / "vectors" / "store.json").unlink()
    check()
    assert sorted(p.name for p in (folder / "vectors").iterdir())[-1] == "store.json"


def test_fault_between_journal_and_commit_leaves_a_consistent_index(
    index: Index, tmp_path: Path, image_dir: Path
) -> None:
    from cbir.index import faults

    (image_dir / "img_00.jpg").unlink()
    make_image(image_dir / "late.jpg", seed=901)
    faults.configure("commit.before:raise")
    try:
        with pytest.raises(faults.FaultInjected):
            index.sync([image_dir], **SYNC)
    finally:
        faults.configure(None)
    # the journal got a segment the catalogue never committed: the same handle and a new
    # one both see the catalogue's state, and the next sync completes
    files = sorted(str(p) for p in image_dir.rglob("*") if p.is_file())
    assert index.stats()["faiss_vectors"] == index.stats()["images"]
    index.close()
    with Index.open(tmp_path / "db") as idx:
        assert idx.stats()["faiss_vectors"] == idx.stats()["images"]
        idx.sync([image_dir], **SYNC)
        assert idx.stats()["images"] == idx.stats()["faiss_vectors"] == len(files)
        for f in files:
            assert idx.search(f, k=1)[0].path == f
        assert idx.sync([image_dir], **SYNC).extracted == 0


def test_hnsw_and_ivf_types(tmp_path: Path, image_dir: Path, tiny_file: Path) -> None:
    with Index.create(tmp_path / "hnsw", model=tiny_file, factory="HNSW8") as idx:
        idx.sync([image_dir], **SYNC)
        (image_dir / "img_06.jpg").unlink()  # HNSW cannot delete: rebuilt
        idx.sync([image_dir], **SYNC)
        ids, x = stored_matrix(idx)
        hits = idx.search(x[0], k=20, ef_search=32)
        assert len(hits) == 11 and str(image_dir / "img_06.jpg") not in {h.path for h in hits}
        assert idx.stats()["index"] == "HNSW8"
    with Index.create(tmp_path / "ivf", model=tiny_file, factory="IVF3,Flat") as idx:
        idx.sync([image_dir], **SYNC)
        ids, x = stored_matrix(idx)
        q = x[2] + x[8]
        sims = x @ l2n(q)
        hits = idx.search(q, k=5, nprobe=3)  # all lists visited: exact up to float ties
        np.testing.assert_allclose([h.score for h in hits], np.sort(sims)[::-1][:5], atol=1e-5)
        # the same five as exact search; images whose scores tie with the fifth (the tiny
        # random model makes some near-identical vectors) may come in either order
        fifth = np.sort(sims)[::-1][4]
        got = {h.id for h in hits}
        assert set(ids[sims > fifth + 1e-5].tolist()) <= got <= set(ids[sims >= fifth - 1e-5].tolist())
        assert idx.stats()["trained"] is True
    # switching type on an existing index re-indexes stored vectors, reads no image
    with Index.open(tmp_path / "ivf", factory="Flat") as idx:
        assert idx.stats()["index"] == "Flat"
        assert idx.sync([image_dir], **SYNC).extracted == 0


def test_untrainable_type_is_refused_before_extraction(
    tmp_path: Path, image_dir: Path, tiny_file: Path
) -> None:
    with Index.create(tmp_path / "db", model=tiny_file, factory="IVF64,Flat") as idx:
        with pytest.raises(IndexNotTrainedError, match="at least 64"):
            idx.sync([image_dir], **SYNC)
        assert idx.stats()["images"] == 0
    with pytest.raises(IndexError_, match="FAISS cannot build"):
        Index.create(tmp_path / "bad", model=tiny_file, factory="NoSuchIndex")


def test_second_writer_is_refused(index: Index, tmp_path: Path, image_dir: Path) -> None:
    other = Index.open(tmp_path / "db")
    try:
        with index._flock.hold():  # as if another process were indexing
            with pytest.raises(IndexBusyError, match="another process"):
                other.sync([image_dir], **SYNC)
            assert other.search(str(image_dir / "img_01.jpg"), k=1)  # reading still works
    finally:
        other.close()


def test_searches_run_while_a_writer_commits(index: Index, image_dir: Path, tmp_path: Path) -> None:
    new_dir = tmp_path / "more"
    for i in range(16):
        make_image(new_dir / f"m{i}.jpg", seed=1000 + i)
    errors: list[BaseException] = []
    stop = threading.Event()
    ids0, x0 = stored_matrix(index)

    def reader() -> None:
        try:
            while not stop.is_set():
                hits = index.search(x0[0], k=8)
                assert hits[0].id == ids0[0]
                assert all(os.path.exists(h.path) for h in hits)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        index.add([new_dir], **SYNC)
        index.remove([new_dir / "m0.jpg", new_dir / "m1.jpg"])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert index.stats()["images"] == 12 + 14


#: Points on the Mandelbrot set's boundary whose neighbourhoods look unlike each other.
_SPOTS = [(-0.745, 0.113), (-1.25, 0.02), (0.285, 0.012), (-0.16, 1.035), (-1.77, 0.0), (0.36, 0.1)]


def fractal(seed: int, size: tuple[int, int] = (448, 336)) -> Image.Image:
    """A detailed, photo-sized synthetic image (blobs are too plain for a real descriptor
    to tell apart from each other's copies)."""
    rng = np.random.default_rng(seed)
    cx, cy = _SPOTS[seed % len(_SPOTS)]
    r = rng.uniform(0.02, 0.08)
    m = np.asarray(
        Image.effect_mandelbrot(size, (cx - r, cy - r * 0.75, cx + r, cy + r * 0.75), 255)
    )
    lut = np.cumsum(rng.integers(0, 256, (3, 256)), axis=1) % 256
    return Image.fromarray(np.stack([lut[c][m] for c in range(3)], -1).astype(np.uint8))


@pytest.mark.slow
def test_duplicates_groups_planted_near_copies(tmp_path: Path, lite0_descriptor) -> None:
    """Resized, recompressed and 5%-cropped copies group with their original and with
    nothing else (the real descriptor: random weights cannot tell images apart)."""
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(len(_SPOTS)):
        img = fractal(i)
        w, h = img.size
        img.save(root / f"{i}_orig.png")
        img.resize((w * 6 // 10, h * 6 // 10), Image.Resampling.BICUBIC).save(
            root / f"{i}_small.png"
        )
        img.save(root / f"{i}_q40.jpg", quality=40)
        dx, dy = int(w * 0.05), int(h * 0.05)
        img.crop((dx, dy, w - dx, h - dy)).save(root / f"{i}_crop.png")
    with Index.create(tmp_path / "db", model=lite0_descriptor) as idx:
        idx.sync([root], **SYNC)
        ids, x = stored_matrix(idx)
        paths = idx.catalog.paths_for(ids.tolist())
        group_of = np.array([Path(paths[int(i)]).name.split("_")[0] for i in ids])
        sims = x @ x.T
        same = group_of[:, None] == group_of[None, :]
        lowest_copy = sims[same].min()
        highest_other = sims[~same].max()
        assert lowest_copy > highest_other  # the descriptor separates them at all
        threshold = float((lowest_copy + highest_other) / 2)
        groups = idx.duplicates(threshold)
        assert idx.duplicates(min(1.0, float(lowest_copy) + 1e-3)) != groups  # T matters
    assert len(groups) == len(_SPOTS) and all(len(g) == 4 for g in groups)
    for g in groups:
        assert len({Path(h.path).name.split("_")[0] for h in g}) == 1
        assert g[0].score == 1.0 and all(h.score >= threshold for h in g[1:])
        assert [h.score for h in g[1:]] == sorted((h.score for h in g[1:]), reverse=True)
