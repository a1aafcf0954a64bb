"""``--index auto`` end to end: Flat for a small collection through the CLI, and the
planner's large-collection index built by the FAISS store keeps its recall on synthetic
descriptors; ``cbir bench ann`` on a synthetic set and on an index."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from cbir.cli.commands import app
from cbir.index import ann, ann_bench
from cbir.index.stores import ArraySource, FaissStore, SearchParams
from cbir.index.synthetic import DescriptorModel, write_collection

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("faiss_one_thread")


@pytest.fixture(scope="module")
def tiny_file(tiny_descriptor, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("desc") / "tiny.cbir"
    tiny_descriptor.save(path)
    return path


@pytest.fixture(scope="module")
def collection() -> tuple[np.ndarray, np.ndarray]:
    """3,000 synthetic 1280-d descriptors and 100 held-out queries."""
    return write_collection(DescriptorModel.load(), 3_000, queries=100, seed=3)


def cli(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


def test_cli_index_auto_is_flat_for_a_small_collection(tmp_path: Path, image_dir: Path, tiny_file: Path) -> None:
    db = tmp_path / "db"
    code, out = cli("index", image_dir, "--db", db, "--index", "auto", "--model", tiny_file, "-j", "0", "-q")
    assert code == 0, out
    code, out = cli("stats", "--db", db, "--json")
    assert code == 0, out
    stats = json.loads(out)
    assert stats["index"] == "Flat" and stats["index_requested"] == "auto"


def test_forced_large_plan_builds_the_ann_index_and_keeps_recall(
    tmp_path: Path, collection: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the exact-search limit lowered, the real planner's large-collection index is what
    the store builds, searched with the plan's defaults, and it still finds the neighbours."""
    x, queries = collection
    monkeypatch.setattr(ann, "FLAT_MAX_SCAN_BYTES", 0)
    plan = ann.plan_index(len(x), x.shape[1])
    parts = ann.parse_factory(plan.factory, x.shape[1])
    assert parts.nlist and parts.refine_bytes and plan.nprobe and plan.k_factor
    defaults = SearchParams(nprobe=plan.nprobe, ef_search=plan.ef_search, k_factor=plan.k_factor)
    store = FaissStore(tmp_path / "store", x.shape[1], plan.factory, defaults=defaults)
    store.load(0)
    ids = np.arange(100, 100 + len(x), dtype=np.int64)
    store.rebuild(ArraySource(ids, x), 1)
    assert store.info()["type"].startswith("IndexRefine") and store.trained
    _, found = store.search(queries, 10)
    _, exact = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    recall = ann_bench.recall_at_k(found, ids[exact])
    assert recall >= 0.9
    _, coarse = store.search(queries, 10, SearchParams(nprobe=1, k_factor=1))  # the settings do apply
    assert ann_bench.recall_at_k(coarse, ids[exact]) < recall


def test_bench_rows_mark_the_choice(collection: tuple[np.ndarray, np.ndarray]) -> None:
    """At 3,000 vectors auto is Flat (chosen, exact); the large-collection plan is measured
    beside it, labelled, with and without its refinement."""
    x, queries = collection
    rows = ann_bench.bench_vectors(x, queries[:40], threads=1)
    chosen = [r for r in rows if r.chosen]
    assert len(chosen) == 1 and chosen[0].index == "Flat" and chosen[0].recall_at_10 == 1.0
    ann_rows = [r for r in rows if r.index != "Flat"]
    assert ann_rows and all("large-collection plan" in r.label for r in ann_rows)
    refined = [r for r in ann_rows if "stage" not in r.params]
    base = [r for r in ann_rows if r.params.get("stage") == "base"]
    assert refined and base and max(r.recall_at_10 for r in refined) > max(r.recall_at_10 for r in base)
    assert all(r.memory_mb > 0 and r.build_s > 0 and r.p99_ms >= r.median_ms > 0 for r in rows)


def test_cli_bench_ann_json_on_an_index(tmp_path: Path, image_dir: Path, tiny_file: Path) -> None:
    db = tmp_path / "db"
    assert cli("index", image_dir, "--db", db, "--model", tiny_file, "-j", "0", "-q")[0] == 0
    code, out = cli("bench", "ann", "--db", db, "--queries", "5", "--json")
    assert code == 0, out
    payload = json.loads(out)
    assert list(payload) == ["results"]
    (row,) = payload["results"]  # 12 vectors: too few to train an ANN index, Flat alone
    assert list(row) == ["index", "params", "recall_at_10", "median_ms", "p99_ms", "build_s", "memory_mb", "chosen"]
    assert row["index"] == "Flat" and row["chosen"] is True and row["recall_at_10"] == 1.0


def test_cli_bench_ann_synthetic_table_and_errors() -> None:
    code, out = cli("bench", "ann", "--synthetic", "300", "--dim", "64", "--queries", "10")
    assert code == 0, out
    assert "Flat" in out and "yes" in out
    code, out = cli("bench", "ann", "--synthetic", "300", "--db", "x")
    assert code != 0 and "exactly one" in out


def test_graph_plan_is_what_the_store_builds_and_bench_measures(
    tmp_path: Path, collection: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget that holds the graph on 8-bit vectors but no float refinement copy (as 2 GiB
    does at a million): the store builds an HNSW graph searched at the plan's depth, it
    finds the neighbours, and ``cbir bench ann`` marks that plan as chosen."""
    x, queries = collection
    n, dim = x.shape
    monkeypatch.setattr(ann, "FLAT_MAX_SCAN_BYTES", 0)
    budget = int(ann.estimate_memory(ann.GRAPH_FACTORY, n, dim) / ann.BUDGET_SHARE * 1.05)
    plan = ann.plan_index(n, dim, budget)
    assert plan.factory == ann.GRAPH_FACTORY and plan.ef_search == ann.GRAPH_EF_SEARCH
    defaults = SearchParams(nprobe=plan.nprobe, ef_search=plan.ef_search, k_factor=plan.k_factor)
    store = FaissStore(tmp_path / "store", dim, plan.factory, defaults=defaults)
    store.load(0)
    ids = np.arange(7, 7 + n, dtype=np.int64)
    store.rebuild(ArraySource(ids, x), 1)
    assert store.info()["type"].startswith("IndexHNSW") and store.trained
    _, found = store.search(queries, 10)
    _, exact = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert ann_bench.recall_at_k(found, ids[exact]) >= 0.95
    rows = ann_bench.bench_vectors(x, queries[:30], memory_budget=budget, threads=1)
    chosen = [r for r in rows if r.chosen]
    assert len(chosen) == 1 and chosen[0].index == plan.factory
    assert chosen[0].params == {"ef_search": ann.GRAPH_EF_SEARCH}
    depths = sorted(r.params["ef_search"] for r in rows if r.index == plan.factory)
    assert depths[0] < ann.GRAPH_EF_SEARCH < depths[-1]
