"""The FAISS store: the shared conformance checks, then what is FAISS's own: tombstones in
every index type, checksums, torn and damaged journals, compaction policy."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from store_conformance import CHECKS, DIM, assert_same_results, unit

from cbir.index.stores import ArraySource, CompactionPolicy, FaissStore, SearchParams, reconcile
from cbir.index.stores import faiss_index as fx
from cbir.index.stores.journal import HEADER_BYTES


def flat_store(folder: Path, dim: int) -> FaissStore:
    return FaissStore(folder, dim, "Flat")


class _AutoCompacting(FaissStore):
    """Flat store that folds each flush into a new base (from its own exact contents)."""

    def flush(self, generation: int) -> None:
        super().flush(generation)
        ids = self.ids()
        if len(ids):
            _, vecs = _contents(self)
            self.compact(ArraySource(ids, vecs), force=True)


def _contents(store: FaissStore) -> tuple[np.ndarray, np.ndarray]:
    ids = store.ids()
    q = np.eye(store.dim, dtype=np.float32)
    # exact Flat: reconstruct each id's vector from its scores against the unit basis
    scores, got = store.search(q, len(ids))
    x = np.zeros((len(ids), store.dim), np.float32)
    for d in range(store.dim):
        x[np.searchsorted(ids, got[d]), d] = scores[d]
    return ids, x


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("make", [flat_store, lambda f, d: _AutoCompacting(f, d, "Flat")], ids=["journal", "base"])
def test_faiss_store_conformance(check, make, tmp_path: Path) -> None:
    check(make, tmp_path / "store")


FACTORIES = ["Flat", "HNSW16", "IVF8,Flat", "IVF8,PQ4x4fs,Refine(Flat)", "PCA16,IVF4,SQ8"]


@pytest.mark.parametrize("factory", FACTORIES)
def test_tombstones_and_additions_in_every_index_type(factory: str, tmp_path: Path) -> None:
    n = 400
    ids = np.arange(1, n + 1, dtype=np.int64) * 2
    x = unit(n, seed=11)
    store = FaissStore(tmp_path, DIM, factory)
    assert store.min_vectors <= n
    store.rebuild(ArraySource(ids, x), 1)
    assert store.trained and store.info()["base_vectors"] == n
    gone = ids[:50]
    store.remove(gone)
    new_ids = np.array([10_001, 10_002], dtype=np.int64)
    new_x = unit(2, seed=12)
    store.add(new_ids, new_x)
    store.flush(2)
    assert store.info()["tombstones"] == 50 and store.info()["journal_vectors"] == 2
    params = SearchParams(nprobe=8, ef_search=128, k_factor=8)
    _, got = store.search(x[:50], 20, params)
    assert not np.isin(got, gone).any()  # a removed vector never comes back
    _, got = store.search(new_x, 1, params)
    assert got[:, 0].tolist() == new_ids.tolist()  # the delta is exact
    _, got = store.search(x[100:140], 1, params)
    assert (got[:, 0] == ids[100:140]).mean() >= 0.9  # approximate types find most
    store.close()
    again = FaissStore(tmp_path, DIM, factory)
    assert again.load(2) and again.count() == n - 50 + 2
    _, got = again.search(x[:50], 20, params)
    assert not np.isin(got, gone).any()


def test_search_params_reach_the_nested_index() -> None:
    index = fx.make_index(DIM, "PCA8,IVF4,PQ4x4fs,Refine(SQ8)")
    sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.array([1], np.int64)))
    p = fx.search_parameters(index, SearchParams(nprobe=3, k_factor=5), sel)
    assert isinstance(p, faiss.IndexRefineSearchParameters) and p.k_factor == 5
    ivf_params = p._keep[0]  # what base_index_params points to
    assert isinstance(ivf_params, faiss.SearchParametersIVF) and ivf_params.nprobe == 3
    assert ivf_params.sel is not None
    assert fx.search_parameters(fx.make_index(DIM, "Flat"), SearchParams(), None) is None
    hnsw = fx.search_parameters(fx.make_index(DIM, "HNSW8"), SearchParams(ef_search=77), None)
    assert hnsw.efSearch == 77


def test_damaged_base_file_is_detected_before_faiss_reads_it(tmp_path: Path) -> None:
    ids, x = np.arange(100, dtype=np.int64), unit(100, seed=13)
    store = FaissStore(tmp_path, DIM, "Flat")
    store.rebuild(ArraySource(ids, x), 4)
    base = next(tmp_path.glob("base-*.faiss"))
    data = bytearray(base.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit: still a loadable FAISS file
    base.write_bytes(bytes(data))
    again = FaissStore(tmp_path, DIM, "Flat")
    assert again.load(4) is False and again.count() == 0
    again.rebuild(ArraySource(ids, x), 4)
    assert_same_results(again, ids, x)


def test_torn_tail_is_dropped_and_corrupt_segment_reconciled(tmp_path: Path) -> None:
    store = FaissStore(tmp_path, DIM, "Flat")
    store.load(0)
    ids, x = np.arange(30, dtype=np.int64), unit(30, seed=14)
    for gen in range(1, 4):  # three segments of ten vectors
        store.add(ids[(gen - 1) * 10 : gen * 10], x[(gen - 1) * 10 : gen * 10])
        store.flush(gen)
    journal = next(tmp_path.glob("journal-*.log"))
    size = journal.stat().st_size
    seg = (size - HEADER_BYTES) // 3
    with open(journal, "ab") as fh:  # a half-written fourth segment (killed mid-write)
        fh.write(journal.read_bytes()[HEADER_BYTES : HEADER_BYTES + seg // 2])
    again = FaissStore(tmp_path, DIM, "Flat")
    assert again.load(3) and again.count() == 30
    again.add(np.array([100]), unit(1, seed=15))
    again.flush(4)  # written over the torn tail
    assert journal.stat().st_size == size + 20 + 8 + 4 * DIM + 8  # header, id, vector, checksum
    # a flipped byte in the second segment: the store stops before it and says so
    data = bytearray(journal.read_bytes())
    data[HEADER_BYTES + seg + seg // 2] ^= 0x01
    journal.write_bytes(bytes(data))
    third = FaissStore(tmp_path, DIM, "Flat")
    assert third.load(4) is False and third.count() == 10
    truth = ArraySource(np.append(ids, 100), np.vstack([x, unit(1, seed=15)]))
    assert reconcile(third, truth, 4).added == 21
    fourth = FaissStore(tmp_path, DIM, "Flat")
    assert fourth.load(4) and fourth.count() == 31


def test_manifest_damage_or_other_factory_means_rebuild(tmp_path: Path) -> None:
    store = FaissStore(tmp_path, DIM, "Flat")
    store.rebuild(ArraySource(np.arange(10), unit(10, seed=16)), 1)
    assert not FaissStore(tmp_path, DIM, "HNSW8").load(1)  # built for another type
    manifest = tmp_path / "store.json"
    manifest.write_text(manifest.read_text().replace('"count": 10', '"count": 11'))
    assert not FaissStore(tmp_path, DIM, "Flat").load(1)


def test_trained_index_is_cached_and_reused_by_compaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, x = np.arange(300, dtype=np.int64), unit(300, seed=17)
    store = FaissStore(tmp_path, DIM, "IVF8,Flat")
    store.rebuild(ArraySource(ids, x), 1)
    assert len(list(tmp_path.glob("trained-*.faiss"))) == 1
    trained = []
    monkeypatch.setattr(faiss.Index, "train", lambda self, *a: trained.append(1))
    again = FaissStore(tmp_path, DIM, "IVF8,Flat")
    assert again.load(1)
    again.remove(ids[:10])
    again.flush(2)
    assert again.compact(ArraySource(ids[10:], x[10:]), force=True)
    assert trained == [] and again.info()["tombstones"] == 0 and again.count() == 290
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["store.json", "base-2.faiss", "base-2.ids", "journal-2.log", next(tmp_path.glob("trained-*")).name]
    )


def test_compaction_policy() -> None:
    p = CompactionPolicy(min_pending=1024, share=0.25, max_pending=2048, bulk_share=1.0)
    assert not p.due(1000, 0) and p.due(1025, 0)
    assert not p.due(1500, 6_000) and p.due(1501, 6_000)
    assert not p.due(2048, 1_000_000) and p.due(2049, 1_000_000)  # capped: every query scans the delta
    # tombstones cost searches little and a rebuild much: a share of the base, no cap
    assert not p.due(0, 1_000_000, tombstones=250_000) and p.due(0, 1_000_000, tombstones=250_001)
    assert not p.due(2000, 1_000_000, tombstones=200_000)
    assert not p.due(900_000, 1_000_000, bulk=True) and p.due(1_000_001, 1_000_000, bulk=True)


def test_tidy_removes_leftovers_of_interrupted_writes(tmp_path: Path) -> None:
    store = FaissStore(tmp_path, DIM, "Flat")
    store.rebuild(ArraySource(np.arange(5), unit(5, seed=18)), 3)
    for name in ("base-9.faiss", "base-9.ids", "journal-9.log", ".base-10.faiss.abc.tmp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "unrelated.txt").write_text("kept")
    store.tidy()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "base-3.faiss",
        "base-3.ids",
        "journal-3.log",
        "store.json",
        "unrelated.txt",
    ]


@pytest.mark.parametrize("factory", ["Flat", "HNSW16_SQ8", "IVF8,PQ4x4fs,Refine(Flat)"])
def test_compaction_of_additions_extends_the_base(tmp_path: Path, factory: str) -> None:
    """Additions alone are folded in by adding them to the base (the source's new vectors
    fetched, the collection not re-read) and give what a rebuild gives; after a removal
    the base is rebuilt from the source."""
    ids, x = np.arange(400, dtype=np.int64), unit(400, seed=21)
    store = FaissStore(tmp_path / "s", DIM, factory)
    store.rebuild(ArraySource(ids[:300], x[:300]), 1)
    store.add(ids[300:], x[300:])
    store.flush(2)
    source = ArraySource(ids, x)
    assert store.compact(source, force=True)
    assert source.reads == ["fetch"]  # the extension ran, not a rebuild
    info = store.info()
    assert (info["base_vectors"], info["journal_vectors"], info["tombstones"]) == (400, 0, 0)
    reopened = FaissStore(tmp_path / "s", DIM, factory)
    assert reopened.load(2) and reopened.info()["base_vectors"] == 400
    q = x[::7]
    _, got = reopened.search(q, 5)
    assert (got[:, 0] == ids[::7]).mean() >= 0.95
    if factory != "HNSW16_SQ8":  # a rebuild with the same trained index answers the same
        store.rebuild(ArraySource(ids, x), 2)
        np.testing.assert_array_equal(got, store.search(q, 5)[1])
    # removals and additions, the delta due: extended again, the removed vectors carried as
    # tombstones (too few to be due themselves)
    policy = CompactionPolicy(min_pending=10, share=0.25, max_pending=15)
    reopened = FaissStore(tmp_path / "s", DIM, factory, policy=policy)
    assert reopened.load(2)
    more, xm = np.arange(400, 420, dtype=np.int64), unit(20, seed=22)
    reopened.remove(ids[:5])
    reopened.add(more, xm)
    reopened.flush(3)
    now = ArraySource(np.concatenate([ids[5:], more]), np.vstack([x[5:], xm]))
    assert reopened.compact(now) and now.reads == ["fetch"]
    assert (reopened.info()["base_vectors"], reopened.info()["tombstones"]) == (420, 5)
    again = FaissStore(tmp_path / "s", DIM, factory)
    assert again.load(3) and again.info()["tombstones"] == 5 and again.count() == 415
    _, got = again.search(x[:5], 10)
    assert not set(got.ravel()) & set(ids[:5].tolist())  # removed stays removed after reopening
    # asked to compact now with tombstones pending: rebuilt from the source, the tombstones gone
    again.remove(ids[5:10])
    again.flush(4)
    after = ArraySource(np.concatenate([ids[10:], more]), np.vstack([x[10:], xm]))
    assert again.compact(after, force=True)
    assert after.reads and after.reads[0] == "chunks" and again.info()["tombstones"] == 0
    assert again.count() == 410
