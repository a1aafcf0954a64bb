"""Revisited Oxford/Paris protocol, ground-truth loading, diffusion and re-ranking helpers."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cbir.data.revisited import GroundTruthError, load_gnd, load_revisited, safe_unpickle
from cbir.diffusion import Diffusion, knn_affinity, normalized_affinity
from cbir.eval.revisited import (
    evaluate_revisited,
    evaluate_setting,
    interpolated_ap,
    positive_positions,
    precision_at_k,
    rank_database,
    setting_gnd,
)
from cbir.postprocess import expand_queries, knn


# ----------------------------------------------------------------------------------------
# hand-worked rankings
# ----------------------------------------------------------------------------------------
def test_ignored_first_then_positives_at_3_and_6() -> None:
    # database ids: 9 is junk, 1 and 4 are the two positives; ranks (1-based) 1, 3, 6.
    # After removing the junk the positives sit at 0-based positions 1 and 4:
    # (0/1 + 1/2)/2 * 1/2 + (1/4 + 2/5)/2 * 1/2 = 0.125 + 0.1625 = 0.2875
    ranks = np.array([[9, 0, 1, 2, 3, 4, 5]])
    gnd = [{"easy": [1, 4], "hard": [], "junk": [9]}]
    res = evaluate_revisited(ranks, gnd)
    assert res["easy"].mAP == pytest.approx(0.2875)
    assert res["medium"].mAP == pytest.approx(0.2875)
    # last positive at (junk-free) rank 5: mP@1 = 0, mP@5 = 2/5, mP@10 capped at 5 -> 2/5
    assert res["medium"].mP == pytest.approx({1: 0.0, 5: 0.4, 10: 0.4})


def test_single_positive_at_rank_2() -> None:
    ranks = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    gnd = [{"easy": [1], "hard": [], "junk": []}]
    res = evaluate_revisited(ranks, gnd)
    assert res["easy"].mAP == pytest.approx(0.25)
    assert res["easy"].mP[10] == pytest.approx(0.5)  # k capped at 2, not 1/10
    assert res["easy"].mP[1] == 0.0
    assert res["easy"].mP[5] == pytest.approx(0.5)


def test_first_positive_at_rank_1_counts_precision_one_before_it() -> None:
    assert interpolated_ap(np.array([0]), 1) == pytest.approx(1.0)
    assert interpolated_ap(np.array([0, 2]), 2) == pytest.approx((1 + 1) / 4 + (1 / 2 + 2 / 3) / 4)


def test_each_setting_remaps_easy_hard_junk() -> None:
    # db 0 easy, 1 hard, 2 junk, 3 negative; ranking 3, 2, 1, 0
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}]
    ranks = np.array([[3, 2, 1, 0]])
    pos, ign = setting_gnd(gnd[0], "easy")
    assert pos.tolist() == [0] and ign.tolist() == [1, 2]
    pos, ign = setting_gnd(gnd[0], "medium")
    assert pos.tolist() == [0, 1] and ign.tolist() == [2]
    pos, ign = setting_gnd(gnd[0], "hard")
    assert pos.tolist() == [1] and ign.tolist() == [0, 2]
    res = evaluate_revisited(ranks, gnd)
    assert res["easy"].mAP == pytest.approx(0.25)  # [3, 0]: positive at position 1
    assert res["hard"].mAP == pytest.approx(0.25)  # [3, 1]
    # [3, 1, 0]: positions 1, 2 -> ((0 + 1/2)/2 + (1/2 + 2/3)/2) / 2
    assert res["medium"].mAP == pytest.approx((0.25 + (0.5 + 2 / 3) / 2) / 2)


def test_original_protocol_ok_junk() -> None:
    gnd = [{"ok": [2], "junk": [0]}]
    res = evaluate_revisited(np.array([[0, 1, 2]]), gnd)
    assert list(res.settings) == ["original"]
    assert res["original"].mAP == pytest.approx(0.25)
    with pytest.raises(ValueError, match="original protocol"):
        setting_gnd({"easy": [1]}, "original")


def test_queries_without_positives_are_left_out_and_counted() -> None:
    gnd = [
        {"easy": [0], "hard": [], "junk": []},  # no hard positive
        {"easy": [1], "hard": [2], "junk": []},
    ]
    ranks = np.array([[0, 1, 2], [2, 1, 0]])
    res = evaluate_revisited(ranks, gnd)
    assert res["hard"].without_positives == 1 and res["hard"].evaluated == 1
    assert np.isnan(res["hard"].aps[0])
    assert res["hard"].mAP == pytest.approx(1.0)  # only query 1, hard positive first
    assert res["easy"].aps[1] == pytest.approx(1.0)  # q1: [1, 0] once hard 2 is ignored
    assert res["medium"].aps[1] == pytest.approx(1.0)  # [2, 1] both positive
    # every query empty: NaN means, no crash
    empty = evaluate_setting(ranks, [{"easy": [], "hard": [], "junk": []}] * 2, "medium")
    assert empty.evaluated == 0 and np.isnan(empty.mAP) and np.isnan(empty.mP[1])


def test_truncated_rankings_count_missing_positives_as_not_retrieved() -> None:
    gnd = [{"easy": [0, 7], "hard": [], "junk": []}, {"easy": [5], "hard": [], "junk": []}]
    ranks = np.array([[0, 1], [1, 2]])  # top-2 only
    res = evaluate_revisited(ranks, gnd)
    assert res["easy"].aps[0] == pytest.approx(0.5)  # 1 of 2 positives at rank 1
    assert res["easy"].aps[1] == 0.0
    assert res["easy"].prs[1].tolist() == [0.0, 0.0, 0.0]
    # FAISS-style -1 padding is ignored
    padded = evaluate_revisited(np.array([[0, 1, -1], [1, 2, -1]]), gnd)
    assert padded["easy"].mAP == res["easy"].mAP


def test_precision_at_k_cap() -> None:
    assert precision_at_k(np.array([0, 1, 2]), (1, 5, 10)).tolist() == [1.0, 1.0, 1.0]
    assert precision_at_k(np.array([], dtype=np.int64)).tolist() == [0.0, 0.0, 0.0]
    # positives at ranks 1 and 12: mP@10 is 1/10, not capped (last positive beyond 10)
    assert precision_at_k(np.array([0, 11]), (10,)).tolist() == [0.1]


def _reference_query(ranking: list[int], positives: set[int], ignored: set[int], n: int):
    """A direct transcription of the definition, one image at a time (for cross-checking)."""
    kept = [i for i in ranking if i not in ignored or i in positives]
    ap, hits, ranks_ = 0.0, 0, []
    for r, img in enumerate(kept):
        if img in positives:
            before = 1.0 if r == 0 else hits / r
            hits += 1
            ap += (before + hits / (r + 1)) / 2 / n
            ranks_.append(r + 1)
    prs = []
    for k in (1, 5, 10):
        kq = min(max(ranks_), k) if ranks_ else k
        prs.append(sum(x <= kq for x in ranks_) / kq)
    return ap, prs


def test_matches_a_direct_transcription_on_random_rankings() -> None:
    rng = np.random.default_rng(0)
    n_db, n_q = 60, 25
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)])[:, :45]  # truncated too
    gnd = []
    for _ in range(n_q):
        ids = rng.permutation(n_db)
        a, b, c = rng.integers(0, 8, size=3)
        gnd.append({"easy": ids[:a], "hard": ids[a : a + b], "junk": ids[a + b : a + b + c]})
    res = evaluate_revisited(ranks, gnd)
    for setting in ("easy", "medium", "hard"):
        for i in range(n_q):
            pos, ign = setting_gnd(gnd[i], setting)
            if pos.size == 0:
                assert np.isnan(res[setting].aps[i])
                continue
            ap, prs = _reference_query(
                ranks[i].tolist(), set(pos.tolist()), set(ign.tolist()), pos.size
            )
            assert res[setting].aps[i] == pytest.approx(ap)
            assert res[setting].prs[i] == pytest.approx(prs)


def test_positive_positions_shift_by_ignored_before() -> None:
    assert positive_positions(
        np.array([5, 1, 6, 2, 3]), np.array([2, 3]), np.array([5, 6])
    ).tolist() == [1, 2]


def test_bad_rank_arrays_are_clear_errors() -> None:
    gnd = [{"easy": [0], "hard": [], "junk": []}]
    with pytest.raises(ValueError, match="rows"):
        evaluate_revisited(np.zeros((2, 3), np.int64), gnd)
    with pytest.raises(ValueError, match="integers"):
        evaluate_revisited(np.zeros((1, 3)), gnd)


def test_rank_database_breaks_ties_by_index() -> None:
    scores = np.array([[0.5, 0.9, 0.5, 0.1]])
    assert rank_database(scores).tolist() == [[1, 0, 2, 3]]
    assert rank_database(scores, top=2).tolist() == [[1, 0]]


# ----------------------------------------------------------------------------------------
# ground truth files
# ----------------------------------------------------------------------------------------
def _write_dataset(root: Path, gnd: dict, names: list[str], protocol: int = 4) -> Path:
    from conftest import make_image

    for i, name in enumerate(names):
        make_image(root / "jpg" / f"{name}.jpg", seed=i)
    path = root / f"gnd_{root.name}.pkl"
    path.write_bytes(pickle.dumps(gnd, protocol=protocol))
    return path


def test_loads_revisitop_pickle_with_numpy_arrays(tmp_path: Path) -> None:
    gnd = {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q"],
        "gnd": [
            {
                "bbx": np.array([1.0, 2.0, 30.0, 40.0]),
                "easy": np.array([0]),
                "hard": [2],
                "junk": [],
            }
        ],
    }
    for protocol in (2, 4):
        root = tmp_path / f"ds{protocol}"
        _write_dataset(root, gnd, ["a", "b", "c", "q"], protocol)
        ds = load_revisited(root)
        assert ds.name == f"ds{protocol}" and ds.protocol == "revisited"
        assert ds.query_boxes == [(1.0, 2.0, 30.0, 40.0)]
        assert ds.gnd[0].easy.tolist() == [0] and ds.gnd[0].hard.tolist() == [2]
        assert ds.database_paths[1] == root / "jpg" / "b.jpg"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    with pytest.raises(GroundTruthError, match="refusing to load"):
        safe_unpickle(pickle.dumps({"imlist": [], "x": _Evil()}))
    path = tmp_path / "gnd_x.pkl"
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(GroundTruthError, match="posix.system|os.system|nt.system"):
        load_gnd(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(GroundTruthError, match="not a readable pickle"):
        load_gnd(path)


def test_malformed_ground_truth_is_a_clear_error(tmp_path: Path) -> None:
    cases = [
        ({"imlist": ["a"], "qimlist": ["q"]}, "missing key"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": []}, "1 queries but 0"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "junk": []}]}, "outside"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"junk": []}]}, "neither"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [5, 5, 1, 1], "easy": [0]}]}, "empty"),
    ]
    for i, (obj, message) in enumerate(cases):
        path = tmp_path / f"gnd_{i}.pkl"
        path.write_bytes(pickle.dumps(obj))
        with pytest.raises(GroundTruthError, match=message):
            load_gnd(path)


def test_missing_images_and_gnd_are_reported(tmp_path: Path) -> None:
    gnd = {
        "imlist": ["a", "gone"],
        "qimlist": ["a"],
        "gnd": [{"easy": [0], "hard": [], "junk": []}],
    }
    _write_dataset(tmp_path / "ds", gnd, ["a"])
    with pytest.raises(FileNotFoundError, match="1 images .* missing"):
        load_revisited(tmp_path / "ds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no gnd"):
        load_revisited(tmp_path / "empty")


def test_real_rparis_mini_ground_truth() -> None:
    from conftest import dataset_or_skip

    root = dataset_or_skip("rparis-mini")
    ds = load_revisited(root)
    assert len(ds.imlist) == 238 and len(ds.qimlist) == 12
    assert all(b is not None for b in ds.query_boxes)


# ----------------------------------------------------------------------------------------
# re-ranking
# ----------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _chain_and_distractors() -> tuple[np.ndarray, np.ndarray]:
    """30 points along an arc (one object seen from drifting viewpoints) + 30 distractors
    placed closer to the arc's start than its far end is."""
    t = np.linspace(0, 1.4, 30)
    chain = np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], 1)
    rng = np.random.default_rng(0)
    distract = np.array([np.cos(0.7), 0.0, np.sin(0.7)]) + rng.normal(0, 0.05, (30, 3))
    return _unit(np.concatenate([chain, distract])), _unit(chain[:1])


def test_diffusion_follows_the_manifold() -> None:
    db, q = _chain_and_distractors()
    direct = rank_database(q @ db.T)[0]
    diffused = Diffusion.fit(db, k=5, kq=3).rank(q)[0]
    # direct similarity mixes distractors into the top 30; diffusion keeps the whole arc first
    assert set(direct[:30].tolist()) != set(range(30))
    assert set(diffused[:30].tolist()) == set(range(30))
    assert sorted(diffused.tolist()) == list(range(60))


def test_affinity_is_symmetric_and_mutual() -> None:
    db, _ = _chain_and_distractors()
    a = knn_affinity(db, k=4)
    assert (a != a.T).nnz == 0 and a.diagonal().sum() == 0
    assert np.all(np.diff(a.indptr) <= 4)  # a mutual-kNN graph has at most k edges per node
    union = knn_affinity(db, k=4, mutual=False)
    assert union.nnz >= a.nnz
    s = normalized_affinity(a)
    eig = np.linalg.eigvalsh(s.toarray())
    assert eig.max() <= 1 + 1e-9  # so I - alpha S is positive definite for alpha < 1


def test_diffusion_rejects_bad_parameters() -> None:
    db, _ = _chain_and_distractors()
    with pytest.raises(ValueError, match="alpha"):
        Diffusion.fit(db, alpha=1.0)
    with pytest.raises(ValueError, match="at least 1"):
        Diffusion.fit(db, k=0)


def test_knn_and_query_expansion() -> None:
    rng = np.random.default_rng(1)
    db = _unit(rng.normal(size=(40, 8)))
    q = _unit(rng.normal(size=(3, 8)))
    ids, scores = knn(q, db, 5)
    ref = np.argsort(-(q @ db.T), axis=1)[:, :5]
    assert ids.tolist() == ref.tolist()
    assert scores == pytest.approx(np.take_along_axis(q @ db.T, ref, 1), abs=1e-5)
    assert expand_queries(q, db, k=0) == pytest.approx(q, abs=1e-6)
    expanded = expand_queries(q, db, k=1, alpha=0.0)
    assert expanded == pytest.approx(_unit(q + db[ids[:, 0]]), abs=1e-5)
    assert knn(q, db, 100)[0].shape == (3, 40)
