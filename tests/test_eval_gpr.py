"""GPR1200 protocol and labelled-collection metrics against hand-worked and reference values.

The reference the protocol must match is the official evaluation of Schall et al. 2021
(github.com/Visual-Computing/GPR1200, ``eval/utils.py``): every image is a query against
all images including itself, AP is the finite sum over the whole ranking divided by the
number of positives. The tie rule of this project is "lower database index first", i.e.
``np.argsort(-s, kind="stable")``; the tests below recompute that independently.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cbir.data.datasets import GPR1200_DOMAINS, load_gpr_collection
from cbir.eval import (
    evaluate_gpr1200,
    evaluate_labelled,
    gpr_average_precisions,
    gpr_average_precisions_full_sort,
    summarize_gpr,
)


def unit_angles(degrees: list[float]) -> np.ndarray:
    """2-D unit vectors at the given angles: inner products are cos(angle differences)."""
    rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def reference_aps(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The GPR1200 definition from a full stable argsort, written without the library.

    Scores are float64 inner products rounded to float32: a float32 BLAS product depends
    on the matrix shapes (a duplicate vector need not tie with its original), so only
    scores computed this way make exact agreement a meaningful requirement.
    """
    f64 = features.astype(np.float64)
    sims = (f64 @ f64.T).astype(np.float32)
    out = np.zeros(len(features))
    for q in range(len(features)):
        order = np.argsort(-sims[q], kind="stable")
        hits = labels[order] == labels[q]
        precision_at_rank = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        out[q] = precision_at_rank[hits].sum() / hits.sum()
    return out


# ---------------------------------------------------------------------------------------
# hand-worked rankings
# ---------------------------------------------------------------------------------------
def test_self_included_hand_worked() -> None:
    # angles 0, 10, 30, 90 with labels A A B B; see the rankings in the comments
    feats = unit_angles([0, 10, 30, 90])
    labels = np.array([0, 0, 1, 1])
    aps = gpr_average_precisions(feats, labels)
    # q0: 0,1,2,3 -> positives at 1,2 -> 1;  q1: 1,0,2,3 -> 1
    # q2: 2,1,0,3 -> positives {2,3} at ranks 1,4 -> (1/1 + 2/4)/2 = 0.75
    # q3: 3,2,1,0 -> positives at 1,2 -> 1
    np.testing.assert_allclose(aps, [1.0, 1.0, 0.75, 1.0], rtol=0, atol=1e-12)
    assert evaluate_gpr1200(feats, labels).mAP == pytest.approx(3.75 / 4, abs=1e-12)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        # item 1 (negative) and item 2 (positive) tie for query 0: index 1 goes first
        ([0, 1, 0], [(1 + 2 / 3) / 2, 1.0, (1 / 2 + 2 / 3) / 2]),
        # labels swapped: now the positive has the lower index for query 0, but query 1
        # ties with item 2 (a negative of lower rank only by the index rule)
        ([0, 0, 1], [1.0, (1 + 2 / 3) / 2, 1 / 2]),
    ],
)
def test_ties_lower_index_first(labels: list[int], expected: list[float]) -> None:
    # integer vectors: every inner product is exact, so the ties are real ties
    feats = np.array([[1, 0], [0, 1], [0, 1]], dtype=np.float32)
    labels_arr = np.array(labels)
    # under ties the query itself is not necessarily first: query 2 ties with item 1
    aps = gpr_average_precisions(feats, labels_arr)
    np.testing.assert_allclose(aps, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(aps, gpr_average_precisions_full_sort(feats, labels_arr))


def _prescribed_ranking(relevant_ranks: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels where query 0's ranking puts positives exactly at ``relevant_ranks``.

    Item at rank r (1-based) gets inner product 1 - (r-1)/n with the query (a private
    orthogonal axis keeps every vector unit-length), so ranks are strict.
    """
    feats = np.zeros((n, n + 1), dtype=np.float64)
    labels = np.ones(n, dtype=np.int64)
    for r in range(1, n + 1):
        s = 1.0 - (r - 1) / n
        feats[r - 1, 0] = s
        feats[r - 1, r] = np.sqrt(1 - s * s)
        if r in relevant_ranks:
            labels[r - 1] = 0
    return feats.astype(np.float32), labels


def test_query_with_ten_relevant_and_one_ranked_last() -> None:
    ranks = [1, 2, 4, 5, 8, 10, 11, 15, 20, 50]  # rank 1 is the query itself; 50 = last
    feats, labels = _prescribed_ranking(ranks, n=50)
    assert (labels == 0).sum() == 10
    expected = sum((i + 1) / r for i, r in enumerate(ranks)) / 10
    # = (1 + 1 + 3/4 + 4/5 + 5/8 + 6/10 + 7/11 + 8/15 + 9/20 + 10/50) / 10
    assert expected == pytest.approx(0.6594697, abs=1e-7)
    aps = gpr_average_precisions(feats, labels)
    assert aps[0] == pytest.approx(expected, abs=1e-12)
    assert gpr_average_precisions_full_sort(feats, labels)[0] == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------
# per-domain slicing and GPR1000
# ---------------------------------------------------------------------------------------
def test_domains_from_a_subsets_mapping() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    aps = np.array([1.0, 0.5, 0.25, 0.75, 0.1, 0.3, 0.9, 0.7, 0.2, 0.4])
    domains = {"landmarks": (0, 1), "sketch": (2, 2), "faces": (3, 4)}
    res = summarize_gpr(aps, labels, domains)
    assert res.mAP == pytest.approx(aps.mean())
    assert res.domains["landmarks"] == pytest.approx((1.0 + 0.5 + 0.25 + 0.75) / 4)
    assert res.domains["sketch"] == pytest.approx((0.1 + 0.3) / 2)
    assert res.domains["faces"] == pytest.approx((0.9 + 0.7 + 0.2 + 0.4) / 4)
    # GPR1000 = mean of the non-face domain means (not of their queries)
    assert res.gpr1000 == pytest.approx((0.625 + 0.2) / 2)
    out = res.to_dict()
    assert set(out) == {"mAP", "landmarks", "sketch", "faces", "GPR1000"}


def test_default_gpr1200_domains_are_six_ranges_of_200() -> None:
    assert list(GPR1200_DOMAINS.values()) == [(i * 200, i * 200 + 199) for i in range(6)]
    labels = np.repeat(np.arange(1200), 2)
    aps = np.random.default_rng(0).random(len(labels))
    res = summarize_gpr(aps, labels, GPR1200_DOMAINS)
    means = [aps[i * 400 : (i + 1) * 400].mean() for i in range(6)]  # 200 categories x 2 images
    assert list(res.domains) == list(GPR1200_DOMAINS)
    np.testing.assert_allclose(list(res.domains.values()), means, rtol=1e-12)
    assert res.gpr1000 == pytest.approx(np.mean(means[:5]), rel=1e-12)


def test_no_face_domain_means_no_gpr1000() -> None:
    res = summarize_gpr(np.array([1.0, 0.0]), np.array([0, 1]), {"a": (0, 0), "b": (1, 1)})
    assert res.gpr1000 is None
    assert "GPR1000" not in res.to_dict()


def test_gpr_collection_orders_by_integer_category_and_reads_subsets(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ["10_b.jpg", "2_x.jpg", "10_a.jpg", "2_a_b.jpg", "1_z.png"]:
        (images / name).write_bytes(b"")  # listing only: nothing is decoded here
    (images / "notes.txt").write_text("not an image")
    (tmp_path / "subsets.json").write_text(json.dumps({"small": [0, 2], "faces": [3, 10]}))
    coll = load_gpr_collection(tmp_path)
    # integer order (1 < 2 < 10, not "10" < "2"), then name inside a category
    assert coll.names == ["1_z.png", "2_a_b.jpg", "2_x.jpg", "10_a.jpg", "10_b.jpg"]
    assert coll.categories == [1, 2, 2, 10, 10]
    assert coll.domains == {"small": (0, 2), "faces": (3, 10)}


def test_gpr_collection_defaults_to_gpr1200_domains(tmp_path: Path) -> None:
    (tmp_path / "0_a.jpg").write_bytes(b"")
    assert load_gpr_collection(tmp_path).domains == GPR1200_DOMAINS
    (tmp_path / "cat_b.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="cat_b.jpg"):
        load_gpr_collection(tmp_path)


# ---------------------------------------------------------------------------------------
# blockwise == full sort == independent reference
# ---------------------------------------------------------------------------------------
def _random_collection(
    seed: int, n_cat: int = 30, per_cat: int = 10, dim: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_cat), per_cat)
    centres = rng.normal(size=(n_cat, dim))
    feats = centres[labels] + 1.5 * rng.normal(size=(len(labels), dim))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    perm = rng.permutation(len(labels))  # the library must not rely on sorted labels
    return feats[perm].astype(np.float32), labels[perm]


def _with_duplicates(feats: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Overwrite some rows with exact copies of others, inside and across categories."""
    rng = np.random.default_rng(seed)
    out = feats.copy()
    src = rng.choice(len(feats), size=40, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(len(feats)), src), size=40, replace=False)
    out[dst] = out[src]
    # and one vector shared by a whole block of items of different categories
    out[rng.choice(len(feats), size=12, replace=False)] = out[0]
    assert (labels[src] != labels[dst]).any()
    return out


@pytest.mark.parametrize("block_rows", [1, 7, 64, None])
def test_blockwise_equals_full_sort_random(block_rows: int | None) -> None:
    feats, labels = _random_collection(1)
    full = gpr_average_precisions_full_sort(feats, labels)
    blocked = gpr_average_precisions(feats, labels, block_rows=block_rows)
    np.testing.assert_array_equal(blocked, full)
    # and the protocol written out independently (identical arithmetic, so exact)
    np.testing.assert_array_equal(full, reference_aps(feats, labels))
    assert 0.0 < full.mean() < 1.0


@pytest.mark.parametrize("block_rows", [1, 5, 33, None])
def test_blockwise_equals_full_sort_with_duplicate_vectors(block_rows: int | None) -> None:
    feats, labels = _random_collection(2)
    feats = _with_duplicates(feats, labels, seed=3)
    full = gpr_average_precisions_full_sort(feats, labels)
    blocked = gpr_average_precisions(feats, labels, block_rows=block_rows)
    np.testing.assert_array_equal(blocked, full)
    np.testing.assert_array_equal(full, reference_aps(feats, labels))


@pytest.mark.parametrize("block_rows", [1, 16, None])
def test_blockwise_equals_full_sort_with_massive_ties(block_rows: int | None) -> None:
    # entries in {-1, 0, 1}: inner products are small integers, computed exactly, so a
    # large share of every ranking is ties that only the index rule can order
    rng = np.random.default_rng(4)
    feats = rng.integers(-1, 2, size=(200, 4)).astype(np.float32)
    labels = rng.integers(0, 20, size=200)
    full = gpr_average_precisions_full_sort(feats, labels)
    blocked = gpr_average_precisions(feats, labels, block_rows=block_rows)
    np.testing.assert_array_equal(blocked, full)
    np.testing.assert_array_equal(full, reference_aps(feats, labels))


def test_evaluate_gpr1200_matches_reference_with_domains() -> None:
    feats, labels = _random_collection(5, n_cat=12, per_cat=10)
    domains = {"first": (0, 3), "second": (4, 7), "faces": (8, 11)}
    res = evaluate_gpr1200(feats, labels, domains, block_rows=9)
    ref = reference_aps(feats, labels)
    assert res.mAP == float(ref.mean())
    for name, (lo, hi) in domains.items():
        assert res.domains[name] == float(ref[(labels >= lo) & (labels <= hi)].mean())


def test_mismatched_lengths_are_an_error() -> None:
    with pytest.raises(ValueError, match="labels"):
        gpr_average_precisions(np.zeros((3, 2), np.float32), [0, 1])


# ---------------------------------------------------------------------------------------
# labelled collections: query excluded, P@k, R@k
# ---------------------------------------------------------------------------------------
def test_labelled_hand_worked() -> None:
    # 0:0deg A, 1:10deg B, 2:25deg A, 3:90deg B, 4:100deg C (alone: skipped), 5:93deg B
    feats = unit_angles([0, 10, 25, 90, 100, 93])
    labels = [0, 1, 0, 1, 2, 1]
    res = evaluate_labelled(feats, labels, ks=(1, 2))
    # rankings without the query (positives marked *):
    #   q0: 1 2* 3 5 4 -> AP 1/2    q1: 0 2 3* 5* 4 -> AP (1/3+2/4)/2 = 5/12
    #   q2: 1 0* 3 5 4 -> AP 1/2    q3: 5* 4 2 1* 0 -> AP (1+2/4)/2 = 3/4
    #   q5: 3* 4 2 1* 0 -> AP 3/4
    assert res.queries == 5 and res.skipped == 1
    assert res.mAP == pytest.approx((0.5 + 5 / 12 + 0.5 + 0.75 + 0.75) / 5, abs=1e-12)
    assert res.precision[1] == pytest.approx((0 + 0 + 0 + 1 + 1) / 5)
    assert res.precision[2] == pytest.approx((0.5 + 0 + 0.5 + 0.5 + 0.5) / 5)
    assert res.recall[1] == pytest.approx((0 + 0 + 0 + 0.5 + 0.5) / 5)
    assert res.recall[2] == pytest.approx((1 + 0 + 1 + 0.5 + 0.5) / 5)
    d = res.to_dict()
    assert d["P@2"] == res.precision[2] and d["R@1"] == res.recall[1]
    # blocks change nothing
    res_b = evaluate_labelled(feats, labels, ks=(1, 2), block_rows=2)
    assert (res_b.mAP, res_b.precision, res_b.recall) == (res.mAP, res.precision, res.recall)


def test_labelled_query_is_excluded_even_when_a_duplicate_ties_with_it() -> None:
    # item 1 duplicates the query; it must rank first (the query is gone), not second
    feats = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    res = evaluate_labelled(feats, [0, 0, 1, 1], ks=(1,))
    assert res.mAP == 1.0 and res.precision[1] == 1.0 and res.recall[1] == 1.0
