"""The ``--index auto`` planner: what it picks, the byte model, search parameters."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.index import ann, ann_bench
from cbir.index.ann import GiB, MemoryBudgetError, estimate_memory, parse_factory, plan_index
from cbir.index.stores.base import SearchParams
from cbir.index.stores.faiss_index import search_parameters

pytestmark = pytest.mark.usefixtures("faiss_one_thread")


def spectrum_data(n: int, d: int, seed: int) -> np.ndarray:
    """Unit vectors with a decaying spectrum (as descriptors have), not isotropic noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32) / np.arange(1, d + 1, dtype=np.float32) ** 0.7
    faiss.normalize_L2(x)
    return x


def test_small_collection_is_exact() -> None:
    plan = plan_index(4_070, 1280)
    assert plan.factory == "Flat"
    assert plan.nprobe is None and plan.k_factor is None
    assert "exact" in plan.reason


def test_flat_limit_is_the_scan_size() -> None:
    n_max = ann.FLAT_MAX_SCAN_BYTES // (1280 * 4)
    assert plan_index(n_max, 1280).factory == "Flat"
    assert plan_index(n_max + 1, 1280).factory != "Flat"
    # the same bytes scanned hold more vectors of a smaller descriptor
    assert plan_index(n_max + 1, 256).factory == "Flat"


def test_million_plan_is_the_graph_within_the_default_budget() -> None:
    """At 1M x 1280 and 2 GiB no float refinement fits: the graph on 8-bit vectors, searched
    at the plan's depth, whose estimate fits the budget, and FAISS builds it."""
    plan = plan_index(1_000_000, 1280)
    parts = parse_factory(plan.factory, 1280)
    assert plan.factory == ann.GRAPH_FACTORY and parts.graph
    assert plan.ef_search == ann.GRAPH_EF_SEARCH and plan.nprobe is None and plan.k_factor is None
    assert "graph" in plan.reason
    assert estimate_memory(plan.factory, 1_000_000, 1280) <= ann.DEFAULT_MEMORY_BUDGET * ann.BUDGET_SHARE
    assert isinstance(faiss.index_factory(1280, plan.factory, faiss.METRIC_INNER_PRODUCT), faiss.IndexHNSW)


def test_budget_orders_the_final_ranking() -> None:
    """More memory buys a more exact final ranking: float refinement copies, then the graph
    on 8-bit vectors, then coarser refinement copies."""
    big = parse_factory(plan_index(1_000_000, 1280, 16 * GiB).factory, 1280)
    half = parse_factory(plan_index(1_000_000, 1280, 3 * GiB).factory, 1280)
    default = parse_factory(plan_index(1_000_000, 1280).factory, 1280)
    small = parse_factory(plan_index(1_000_000, 1280, GiB).factory, 1280)
    assert big.refine_bytes == 4 * 1280 and half.refine_bytes == 2 * 1280
    assert default.graph and not default.refine_bytes
    assert small.nlist and 0 < small.refine_bytes < 1280 and not small.graph


def test_graph_only_while_it_builds_in_time_and_fits() -> None:
    """Past GRAPH_MAX_BUILD (its one-by-one build) or the budget, the inverted file is
    planned even where the graph would otherwise come first."""
    n_max = ann.GRAPH_MAX_BUILD // 1280
    assert ann.graph_buildable(n_max, 1280) and not ann.graph_buildable(n_max + 1, 1280)
    budget = 3 * GiB  # the graph would fit; float refinement copies do not...
    assert estimate_memory(ann.GRAPH_FACTORY, n_max + 1, 1280) <= budget * ann.BUDGET_SHARE
    over = plan_index(n_max + 1, 1280, budget)
    assert not parse_factory(over.factory, 1280).graph and over.nprobe
    # ...and past what the default budget holds, the inverted file with an 8-bit copy
    crowded = plan_index(1_300_000, 1280)
    parts = parse_factory(crowded.factory, 1280)
    assert estimate_memory(ann.GRAPH_FACTORY, 1_300_000, 1280) > ann.DEFAULT_MEMORY_BUDGET * ann.BUDGET_SHARE
    assert parts.nlist and parts.refine_bytes == 1280 and crowded.k_factor


def test_dimension_not_a_multiple_of_16_is_rotated_and_padded() -> None:
    plan = plan_index(1_000_000, 1000, 16 * GiB)  # an inverted file with PQ codes
    assert plan.factory.startswith("RR1008,")
    assert faiss.index_factory(1000, plan.factory, faiss.METRIC_INNER_PRODUCT).d == 1000


def test_budget_too_small_is_a_user_error() -> None:
    with pytest.raises(MemoryBudgetError) as info:
        plan_index(1_000_000, 1280, 16 * ann.MiB)
    assert isinstance(info.value, CbirError)
    assert "--memory-budget" in str(info.value)


@pytest.mark.parametrize("bad", [(-1, 128, None), (10, 0, None), (10, 8, 0)])
def test_bad_arguments(bad: tuple[int, int, int | None]) -> None:
    with pytest.raises(ValueError):
        plan_index(*bad)


def test_memory_estimate_counts_codes_ids_and_refinement() -> None:
    n, d = 100_000, 1280
    assert estimate_memory("Flat", n, d) == n * (4 * d + ann.ID_BYTES)
    centroids, codebooks = 1024 * d * 4, 256 * d * 4
    assert estimate_memory("IVF1024,PQ64", n, d) == pytest.approx(n * (64 + 8 + 8) + centroids + codebooks, rel=0.05)
    with_sq8 = estimate_memory("IVF1024,PQ64,Refine(SQ8)", n, d)
    assert with_sq8 - estimate_memory("IVF1024,PQ64", n, d) == pytest.approx(
        n * d, rel=0.01
    )
    with pytest.raises(ValueError, match="cannot estimate"):
        estimate_memory("LSH", n, d)


def test_memory_estimate_matches_faiss_serialised_size() -> None:
    """The byte model against what FAISS actually stores (its serialised size)."""
    d, n = 32, 3_000
    x = spectrum_data(n, d, 0)
    for factory in ("Flat", "IVF64,PQ16x4fs", "PCAR16,IVF64,PQ8x4fs,Refine(SQ8)", "HNSW16", "HNSW16_SQ8"):
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.add(x)
        stored = faiss.serialize_index(index).nbytes
        estimated = estimate_memory(factory, n, d)
        # the estimate includes the store's position-to-id array
        assert stored * 0.8 <= estimated - ann.ID_BYTES * n <= stored * 1.25, factory


def test_train_sample_size() -> None:
    assert ann.train_sample_size("Flat", 10**6) == 0
    assert ann.train_sample_size("IVF1024,PQ320x4fs", 10**6) == ann.MIN_TRAIN_SAMPLE
    assert ann.train_sample_size("PCAR256,IVF4096,PQ128x4fs", 10**6) == 40 * 4096
    assert ann.train_sample_size("PCAR256,IVF65536,PQ128x4fs", 10**8) == ann.MAX_TRAIN_SAMPLE
    assert ann.train_sample_size("IVF64,PQ16x4fs", 1_000) == 1_000


def test_search_parameters_reach_the_inner_indexes() -> None:
    """nprobe and k_factor change results through the id map, PCA and refinement."""
    d = 32
    x, q = spectrum_data(4_000, d, 1), spectrum_data(100, d, 2)
    _, truth = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexIDMap2(faiss.index_factory(d, "PCAR16,IVF32,PQ8x4fs,RFlat", faiss.METRIC_INNER_PRODUCT))
    index.train(x)
    index.add_with_ids(x, np.arange(len(x), dtype=np.int64))

    def recall(params: faiss.SearchParameters | None) -> float:
        _, got = index.search(q, 10, params=params)
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth, strict=True)]))

    def recall_with(**kw: float) -> float:
        return recall(search_parameters(index, SearchParams(**kw), None))

    low, wide = recall_with(nprobe=1, k_factor=1), recall_with(nprobe=32, k_factor=1)
    refined = recall_with(nprobe=32, k_factor=40)
    assert low < wide < refined
    assert refined > 0.9
    assert recall_with() == recall(None)  # nothing given: the index's own settings


def test_candidate_guard_never_proposes_an_untrainable_index() -> None:
    """Every inverted file the planner proposes has MIN_POINTS_PER_LIST training vectors per
    list and per PQ centroid; below that it falls back to scalar-quantised codes, which
    FAISS trains on that few vectors."""
    for n in (2_000, 2_496, 3_000, 10_000, 60_000, 300_000, 1_000_000):
        for dim in (64, 1000, 1280):
            factory = ann.ann_plan(n, dim, 10 * GiB).factory
            parts = parse_factory(factory, dim)
            assert ann.trainable(factory, n, dim), (n, dim, factory)
            assert parts.nlist == 0 or n >= ann.MIN_POINTS_PER_LIST * parts.nlist, (n, dim, factory)
    assert not ann.trainable("IVF64,PQ16x4fs", 64 * ann.MIN_POINTS_PER_LIST - 1)
    assert not ann.trainable("PQ8", 256 * ann.MIN_POINTS_PER_LIST - 1)
    assert ann.trainable("SQ8", 1) and ann.trainable("IVF64,PQ16x4fs", 64 * ann.MIN_POINTS_PER_LIST)


def test_tiny_collection_over_budget_gets_trainable_codes() -> None:
    """A budget too small for Flat on a collection too small for an inverted file: scalar
    codes (no lists, no nprobe) that FAISS builds from the collection itself."""
    n, d = 500, 64
    budget = estimate_memory("Flat", n, d) // 2
    plan = plan_index(n, d, budget)
    assert plan.factory.split(",")[0] in ("SQ8", "SQ4") and plan.nprobe is None
    assert estimate_memory(plan.factory, n, d) <= budget
    x = spectrum_data(n, d, 5)
    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    _, got = index.search(x[:20], 1)
    assert (got[:, 0] == np.arange(20)).mean() >= 0.9
    assert [c.factory for c in ann_bench.candidates(n, d)] == ["Flat"]
