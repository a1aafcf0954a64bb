"""``--index auto``: the plan recorded, re-planned when the collection doubles or halves
(rebuilt from the catalogue, no image read), and the store's compaction inside an index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_image

from cbir.cli.options import parse_size
from cbir.index import Index
from cbir.index import settings as settings_mod
from cbir.index import writer as writer_mod
from cbir.index.ann import IndexPlan
from cbir.index.stores import faiss_store

SYNC = {"progress": False, "workers": 0, "batch_size": 2}


def test_auto_is_the_default_and_small_collections_stay_exact(tmp_path: Path, image_dir: Path, tiny_file: Path) -> None:
    with Index.create(tmp_path / "db", model=tiny_file, memory_budget=1 << 30) as idx:
        idx.sync([image_dir], **SYNC)
        stats = idx.stats()
        assert stats["index_requested"] == "auto" and stats["index"] == "Flat"
        assert "exact search" in stats["index_reason"]
        plan = json.loads(idx.catalog.get_meta("plan"))
        assert plan["n"] == 12 and idx.catalog.get_meta("memory_budget") == str(1 << 30)


def test_replanning_switches_the_type_from_the_catalogue(
    tmp_path: Path, image_dir: Path, tiny_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planner that wants HNSW from 8 vectors and IVF from 20 (the real thresholds are in
    the tens of thousands): growth past 2x re-plans, and the new type is built from the
    stored vectors without describing any image again."""

    def planner(n: int, dim: int, budget: int | None = None) -> IndexPlan:
        if n >= 20:
            return IndexPlan("IVF2,Flat", nprobe=2, reason="test: ivf")
        return IndexPlan("HNSW8", ef_search=40, reason="test: hnsw") if n >= 8 else IndexPlan("Flat", reason="small")

    monkeypatch.setattr(settings_mod, "plan_index", planner)
    with Index.create(tmp_path / "db", model=tiny_file) as idx:
        assert idx.index_factory == "Flat"
        assert idx.sync([image_dir], **SYNC).extracted == 12
        assert idx.index_factory == "HNSW8" and idx.store.defaults.ef_search == 40
        assert idx.search(str(image_dir / "img_03.jpg"), k=1)[0].path == str(image_dir / "img_03.jpg")
        more = tmp_path / "more"
        for i in range(12):
            make_image(more / f"m{i}.jpg", seed=300 + i)
        described = []
        real = writer_mod.iter_extract
        monkeypatch.setattr(
            writer_mod, "iter_extract", lambda d, paths, **kw: described.extend(paths) or real(d, paths, **kw)
        )
        idx.add([more], **SYNC)  # 24 vectors: 2x the planned 12 -> not yet
        assert idx.index_factory == "HNSW8" and len(described) == 12
        idx.add([make_image(more / "m12.jpg", seed=400)], **SYNC)  # 25 > 24: re-planned
        assert idx.index_factory == "IVF2,Flat" and idx.stats()["trained"]
        assert len(described) == 13  # the rebuild read the catalogue, not the images
        for p in [image_dir / "img_00.jpg", more / "m5.jpg"]:
            assert idx.search(str(p), k=1)[0].path == str(p)
        idx.remove([more])  # 12 left: halved -> re-planned back
        assert idx.index_factory == "HNSW8"
    with Index.open(tmp_path / "db") as idx:  # what is on disk is the new type
        assert idx.store.info()["type"].startswith("IndexHNSW") and idx.stats()["faiss_vectors"] == 12


def test_compaction_during_a_long_sync_and_after_removals(
    tmp_path: Path, image_dir: Path, tiny_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        faiss_store, "DEFAULT_POLICY", faiss_store.CompactionPolicy(min_pending=2, share=0.0, max_pending=4)
    )
    with Index.create(tmp_path / "db", model=tiny_file, factory="Flat") as idx:
        idx.sync([image_dir], **SYNC)  # batches of 2: the base grows geometrically
        info = idx.store.info()
        assert info["base_vectors"] >= 10 and info["journal_vectors"] <= 2  # at most min_pending left
        idx.remove([image_dir / "sub", image_dir / "img_00.jpg", image_dir / "img_01.jpg", image_dir / "img_02.jpg"])
        info = idx.store.info()
        assert info["tombstones"] == 0 and info["vectors"] == 7  # >= 3 tombstones > 2: compacted
        files = sorted(p.name for p in (tmp_path / "db" / "vectors").iterdir())
        assert files == sorted(
            [
                "store.json",
                *(f"base-{info['base_generation']}.{ext}" for ext in ("faiss", "ids")),
                f"journal-{info['base_generation']}.log",
            ]
        )
    with Index.open(tmp_path / "db", readonly=True) as idx:
        for p in sorted(image_dir.glob("img_0[3-9].jpg")):
            assert idx.search(str(p), k=1)[0].path == str(p)


def test_memory_budget_sizes() -> None:
    assert parse_size("2G") == 2 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    assert parse_size(None) is None
    with pytest.raises(Exception, match="expected a size"):
        parse_size("lots")


def test_the_store_is_chosen_by_its_registered_name(tmp_path: Path, image_dir: Path, tiny_file: Path) -> None:
    from cbir.index import CbirIndexError
    from cbir.index.stores import FaissStore, register_store

    class Marked(FaissStore):
        pass

    register_store("test-marked", lambda spec: Marked(spec.folder, spec.dim, spec.factory, readonly=spec.readonly))
    with pytest.raises(CbirIndexError, match="unknown vector store 'nope'"):
        Index.create(tmp_path / "bad", model=tiny_file, store="nope")
    assert not (tmp_path / "bad" / "catalog.sqlite").exists()
    with Index.create(tmp_path / "db", model=tiny_file, store="test-marked") as idx:
        idx.sync([image_dir], **SYNC)
        assert isinstance(idx.store, Marked)
    with Index.open(tmp_path / "db", readonly=True) as idx:  # recorded in the catalogue
        assert isinstance(idx.store, Marked) and idx.search(str(image_dir / "img_02.jpg"), k=1)[0].path.endswith(
            "img_02.jpg"
        )
