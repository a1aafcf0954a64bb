"""Conformance checks every :class:`cbir.index.stores.VectorStore` must pass.

Each check is a plain function ``check_xxx(make_store, folder)``: ``make_store(folder, dim)``
opens the store kept in ``folder`` (a second call on the same folder must see what the first
made durable, as a new process would). A store's own test module runs all of them::

    from store_conformance import CHECKS

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_my_store(check, tmp_path):
        check(lambda folder, dim: MyStore(folder, dim), tmp_path)

The stores under test must search exactly (a flat index): the checks compare with brute
force. Approximate index types are tested separately, for recall.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from cbir.index.stores import ArraySource, SearchParams, VectorStore, reconcile

StoreFactory = Callable[[Path, int], VectorStore]
DIM = 16


def unit(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(ids: np.ndarray, x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    sims = q @ x.T
    return ids[np.argsort(-sims, axis=1, kind="stable")[:, :k]]


def assert_same_results(store: VectorStore, ids: np.ndarray, x: np.ndarray, k: int = 5) -> None:
    """Search results equal brute force over (ids, x), for stored and fresh queries."""
    q = np.vstack([x[: min(len(x), 8)], unit(4, seed=999)])
    scores, got = store.search(q, k)
    assert got.shape == scores.shape == (len(q), k)
    assert got.dtype == np.int64
    want = brute_force(ids, x, q, min(k, len(ids)))
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    expected = np.take_along_axis(q @ x.T, np.argsort(-(q @ x.T), axis=1)[:, : want.shape[1]], axis=1)
    np.testing.assert_allclose(scores[:, : want.shape[1]], expected, atol=1e-4)


def filled(
    make_store: StoreFactory, folder: Path, n: int = 60, generation: int = 1
) -> tuple[VectorStore, np.ndarray, np.ndarray]:
    store = make_store(folder, DIM)
    store.load(0)
    ids = np.arange(10, 10 + 3 * n, 3, dtype=np.int64)
    x = unit(n, seed=1)
    store.add(ids, x)
    store.flush(generation)
    return store, ids, x


# -- the checks ---------------------------------------------------------------------------------
def check_protocol_and_empty_store(make_store: StoreFactory, folder: Path) -> None:
    store = make_store(folder, DIM)
    assert isinstance(store, VectorStore)
    store.load(0)
    assert store.count() == 0 and len(store.ids()) == 0
    scores, ids = store.search(unit(2, seed=5), 3)
    assert ids.shape == (2, 3) and (ids == -1).all() and np.isneginf(scores).all()
    assert isinstance(store.info(), dict)
    store.close()


def check_add_flush_search_is_exact(make_store: StoreFactory, folder: Path) -> None:
    store, ids, x = filled(make_store, folder)
    assert store.generation == 1 and store.count() == len(ids)
    np.testing.assert_array_equal(store.ids(), ids)
    assert_same_results(store, ids, x)
    scores, got = store.search(x[7:8], 1)
    assert got[0, 0] == ids[7] and abs(scores[0, 0] - 1.0) < 1e-4
    store.close()


def check_staged_changes_are_invisible_until_flush_and_discardable(make_store: StoreFactory, folder: Path) -> None:
    store, ids, x = filled(make_store, folder)
    extra = unit(3, seed=2)
    store.add(np.array([5000, 5001, 5002]), extra)
    store.remove(ids[:2])
    assert store.count() == len(ids)  # staged only
    store.discard()
    store.flush(2)
    assert store.generation == 2 and store.count() == len(ids)
    np.testing.assert_array_equal(store.ids(), ids)
    store.close()


def check_remove_hides_vectors_and_ignores_unknown_ids(make_store: StoreFactory, folder: Path) -> None:
    store, ids, x = filled(make_store, folder)
    gone = ids[[0, 5, 6, 30]]
    store.remove(np.concatenate([gone, [999_999]]))
    store.flush(2)
    keep = ~np.isin(ids, gone)
    assert store.count() == keep.sum()
    np.testing.assert_array_equal(store.ids(), ids[keep])
    _, got = store.search(x[[0, 5, 6, 30]], 10)
    assert not np.isin(got, gone).any()
    assert_same_results(store, ids[keep], x[keep])
    store.close()


def check_add_after_remove_and_many_small_changes(make_store: StoreFactory, folder: Path) -> None:
    store, ids, x = filled(make_store, folder, n=20)
    all_ids, all_x = list(ids), list(x)
    rng = np.random.default_rng(3)
    next_id = 10_000
    for gen in range(2, 22):
        new = unit(2, seed=100 + gen)
        store.add(np.array([next_id, next_id + 1]), new)
        all_ids += [next_id, next_id + 1]
        all_x += list(new)
        next_id += 2
        victim = int(rng.integers(len(all_ids)))
        store.remove(np.array([all_ids[victim]]))
        del all_ids[victim], all_x[victim]
        store.flush(gen)
    order = np.argsort(all_ids)
    want_ids, want_x = np.array(all_ids)[order], np.array(all_x)[order]
    np.testing.assert_array_equal(store.ids(), want_ids)
    assert_same_results(store, want_ids, want_x)
    store.close()
    again = make_store(folder, DIM)
    assert again.load(21) and again.generation == 21
    np.testing.assert_array_equal(again.ids(), want_ids)
    assert_same_results(again, want_ids, want_x)
    again.close()


def check_reopen_sees_durable_state(make_store: StoreFactory, folder: Path) -> None:
    store, ids, x = filled(make_store, folder, generation=3)
    store.remove(ids[:4])
    store.flush(4)
    store.close()
    again = make_store(folder, DIM)
    assert again.load(4) is True and again.generation == 4
    np.testing.assert_array_equal(again.ids(), ids[4:])
    assert_same_results(again, ids[4:], x[4:])
    again.close()


def check_unreachable_generation_is_reported_and_reconciled(make_store: StoreFactory, folder: Path) -> None:
    store, ids, x = filled(make_store, folder, generation=2)
    store.close()
    again = make_store(folder, DIM)
    assert again.load(5) is False  # the catalogue moved on without this store
    truth = ArraySource(np.concatenate([ids[10:], [7000, 7001]]), np.vstack([x[10:], unit(2, seed=4)]))
    report = reconcile(again, truth, 5)
    assert (report.added, report.removed) == (2, 10)
    assert again.generation == 5
    np.testing.assert_array_equal(again.ids(), truth.ids())
    assert_same_results(again, *next(truth.chunks(10_000)))
    again.close()


def check_flush_the_catalogue_never_committed_is_undone(make_store: StoreFactory, folder: Path) -> None:
    """Write-ahead: a store flushed generation 2 but the catalogue stayed at 1 (killed
    before its commit). Loading generation 1 must give generation 1's contents, either
    directly (True) or after reconcile."""
    store, ids, x = filled(make_store, folder, generation=1)
    store.add(np.array([9000, 9001]), unit(2, seed=6))
    store.remove(ids[:3])
    store.flush(2)
    store.close()
    again = make_store(folder, DIM)
    if not again.load(1):
        reconcile(again, ArraySource(ids, x), 1)
    np.testing.assert_array_equal(again.ids(), ids)
    assert_same_results(again, ids, x)
    again.add(np.array([9100]), unit(1, seed=7))  # and it carries on from there
    again.flush(2)
    again.close()
    third = make_store(folder, DIM)
    assert third.load(2)
    np.testing.assert_array_equal(third.ids(), np.sort(np.concatenate([ids, [9100]])))
    third.close()


def check_rebuild_replaces_everything(make_store: StoreFactory, folder: Path) -> None:
    store, ids, x = filled(make_store, folder)
    new_ids = np.arange(500, 540, dtype=np.int64)
    new_x = unit(40, seed=8)
    store.rebuild(ArraySource(new_ids, new_x), 9)
    assert store.generation == 9 and store.count() == 40
    np.testing.assert_array_equal(store.ids(), new_ids)
    assert_same_results(store, new_ids, new_x)
    store.close()
    again = make_store(folder, DIM)
    assert again.load(9)
    assert_same_results(again, new_ids, new_x)
    again.close()


def check_compact_keeps_contents(make_store: StoreFactory, folder: Path) -> None:
    store, ids, x = filled(make_store, folder)
    store.remove(ids[::2])
    store.add(np.array([8000, 8001, 8002]), unit(3, seed=9))
    store.flush(2)
    want_ids = np.concatenate([ids[1::2], [8000, 8001, 8002]])
    want_x = np.vstack([x[1::2], unit(3, seed=9)])
    store.compact(ArraySource(want_ids, want_x), force=True)
    assert store.generation == 2
    np.testing.assert_array_equal(store.ids(), want_ids)
    assert_same_results(store, want_ids, want_x)
    store.add(np.array([8100]), unit(1, seed=10))
    store.flush(3)
    store.close()
    again = make_store(folder, DIM)
    assert again.load(3) and again.count() == len(want_ids) + 1
    again.close()


def check_search_shapes_params_and_k_beyond_count(make_store: StoreFactory, folder: Path) -> None:
    store, ids, x = filled(make_store, folder, n=6)
    scores, got = store.search(x[:3], 10, SearchParams(nprobe=4, ef_search=32, k_factor=2.0))
    assert got.shape == (3, 10)
    assert (got[:, :6] >= 0).all() and (got[:, 6:] == -1).all() and np.isneginf(scores[:, 6:]).all()
    assert (np.diff(scores[:, :6], axis=1) <= 1e-6).all()  # best first
    assert sorted(got[0, :6].tolist()) == ids.tolist()
    store.close()


CHECKS = [
    check_protocol_and_empty_store,
    check_add_flush_search_is_exact,
    check_staged_changes_are_invisible_until_flush_and_discardable,
    check_remove_hides_vectors_and_ignores_unknown_ids,
    check_add_after_remove_and_many_small_changes,
    check_reopen_sees_durable_state,
    check_unreachable_generation_is_reported_and_reconciled,
    check_flush_the_catalogue_never_committed_is_undone,
    check_rebuild_replaces_everything,
    check_compact_keeps_contents,
    check_search_shapes_params_and_k_beyond_count,
]
