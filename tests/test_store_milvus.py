"""The Milvus store on Milvus Lite (the real Milvus engine, in-process): the shared store
conformance checks, then what is Milvus's own (its options, interrupted flushes repaired
by id difference, a collection that belongs to another index)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from store_conformance import CHECKS, DIM, assert_same_results, unit

pytest.importorskip("pymilvus", reason="needs the distributed extra: pip install 'cbir[distributed]'")
pytest.importorskip("milvus_lite", reason="needs the distributed extra: pip install 'cbir[distributed]'")

from cbir.index.stores import ArraySource, reconcile  # noqa: E402
from cbir.index.stores.milvus import MilvusStore, MilvusStoreError, parse_store_spec  # noqa: E402


def lite_store(folder: Path, dim: int, **kwargs) -> MilvusStore:
    folder.mkdir(parents=True, exist_ok=True)
    return MilvusStore(parse_store_spec(f"milvus:{folder}/vectors.db#index=FLAT,collection=conformance"), dim, **kwargs)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_milvus_store_conformance(check, tmp_path: Path) -> None:
    check(lite_store, tmp_path / "store")


def test_spec_parsing_and_options(tmp_path: Path) -> None:
    spec = parse_store_spec("milvus", tmp_path)
    assert spec.lite and spec.uri == str(tmp_path / "milvus.db") and spec.collection.startswith("cbir_")
    assert parse_store_spec("milvus#index=FLAT", tmp_path).uri == spec.uri  # options without a URI
    spec = parse_store_spec("milvus:http://user:pw@db.example:19530#index=hnsw,M=16,collection=photos")
    assert not spec.lite and (spec.index, spec.params, spec.collection) == ("HNSW", {"M": 16}, "photos")
    assert parse_store_spec(spec.to_meta()) == spec  # what the catalogue records reads back the same
    for bad in ("qdrant:x", "milvus:x.db#bogus=1", "milvus:x.db#index"):
        with pytest.raises(MilvusStoreError):
            parse_store_spec(bad, tmp_path)


def test_a_collection_of_another_index_is_refused(tmp_path: Path) -> None:
    store = lite_store(tmp_path, DIM, identity="aaaa")
    store.add(np.array([1, 2]), unit(2, seed=1))
    store.flush(1)
    store.close()
    with pytest.raises(MilvusStoreError, match="another index"):
        lite_store(tmp_path, DIM, identity="bbbb")


def test_interrupted_flush_is_repaired_by_id_difference_not_rebuilt(tmp_path: Path) -> None:
    """A flush that died after its deletes and upserts (pending mark still set) is one batch
    ahead; the repair touches only that batch (a rebuild would re-insert all 300)."""
    store = lite_store(tmp_path, DIM)
    ids, x = np.arange(300, dtype=np.int64), unit(300, seed=3)
    store.rebuild(ArraySource(ids, x), 1)
    store._set(pending=2)  # as if killed between the writes and the generation record
    store.remove(ids[:5])
    store.add(np.array([900, 901]), unit(2, seed=4))
    store._client.delete(store.name, ids=ids[:5].tolist())
    store._write_rows(np.array([900, 901]), unit(2, seed=4), upsert=True)
    store.discard()
    store.close()
    again = lite_store(tmp_path, DIM)
    assert again.load(1) is False and again.generation == 1
    rebuilt = []
    again.rebuild = lambda *a, **k: rebuilt.append(a)  # type: ignore[method-assign]
    report = reconcile(again, ArraySource(ids, x), 1)
    assert (report.added, report.removed) == (5, 2) and not rebuilt
    assert again.load(1) and again.count() == 300
    assert_same_results(again, ids, x)
    again.close()
