"""The synthetic-descriptor model: draws, collections, dimensions, fitting, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cbir.index import synthetic as syn
from cbir.index.synthetic import DescriptorModel, cross_validate, fit_model, write_collection


@pytest.fixture(scope="module")
def model() -> DescriptorModel:
    return DescriptorModel.load()


def two_domain_data(seed: int, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Labelled unit vectors in two far-apart groups of classes (e.g. photos vs drawings),
    each class a tight cloud: a structure one Gaussian for all class centres misses."""
    rng = np.random.default_rng(seed)
    xs, labels = [], []
    for domain in range(2):
        centre = rng.normal(size=dim) * 3
        for c in range(12):
            mean = centre + rng.normal(size=dim) * 0.6
            xs.append(mean + rng.normal(size=(15, dim)) * 0.25)
            labels += [f"{domain}/{c}"] * 15
    x = np.concatenate(xs).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.array(labels)


def test_shipped_model(model: DescriptorModel) -> None:
    assert model.dim == 1280 and 0 < model.rank < model.dim and model.domains
    assert "train-pool" in model.source and "gpr" not in model.source
    axes = model.axes()
    np.testing.assert_allclose(axes.T @ axes, np.eye(model.dim), atol=1e-4)


def test_draws_are_unit_vectors_and_reproducible(model: DescriptorModel) -> None:
    a, b, c = model.sample(500, seed=1), model.sample(500, seed=1), model.sample(500, seed=2)
    assert a.shape == (500, 1280) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    parts = list(model.batches(500, seed=1, batch=64))  # whole clusters of about 64 rows each
    assert len(parts) > 3 and sum(map(len, parts)) == 500


def test_collection_in_a_memory_map_with_held_out_queries(model: DescriptorModel, tmp_path: Path) -> None:
    path = tmp_path / "db.npy"
    db, queries = write_collection(model, 700, queries=30, seed=4, path=path)
    assert db.shape == (700, 1280) and queries.shape == (30, 1280)
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), db)
    mem_db, mem_q = write_collection(model, 700, queries=30, seed=4)
    np.testing.assert_array_equal(mem_db, db)
    np.testing.assert_array_equal(mem_q, queries)
    assert (queries @ db.T).max() < 0.9999  # queries are new draws, not copies of the collection


def test_other_dimensions(model: DescriptorModel) -> None:
    base = model.sample(200, seed=5)
    small = model.in_dim(64)(base)
    assert small.shape == (200, 64)
    np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)
    big = model.in_dim(1536)(base)
    assert big.shape == (200, 1536)
    np.testing.assert_allclose(big @ big.T, base @ base.T, atol=1e-4)  # an isometry: same geometry
    with pytest.raises(ValueError):
        model.in_dim(0)


def test_fit_round_trip_keeps_the_structure(tmp_path: Path) -> None:
    """Fitting draws of a fitted model gives back a model whose draws look the same."""
    x, labels = two_domain_data(0)
    first = fit_model(x, labels, domains=2, rank=16)
    sizes = np.bincount(np.unique(labels, return_inverse=True)[1])
    drawn = first.draw_clusters(sizes, seed=1)
    second = fit_model(drawn, np.repeat(np.arange(len(sizes)), sizes), domains=2, rank=16)
    second.save(tmp_path / "m.npz")
    loaded = DescriptorModel.load(tmp_path / "m.npz")
    assert loaded.substructure == second.substructure and len(loaded.domains) == 2
    again = loaded.draw_clusters(sizes, seed=2)
    real = syn.neighbour_profile(x)
    assert syn.profile_distance(real, syn.neighbour_profile(again)) < 0.1
    shuffled = np.random.default_rng(0).permuted(x, axis=1)  # same values, structure destroyed
    assert syn.profile_distance(real, syn.neighbour_profile(shuffled)) > 0.1


def test_cross_validation_finds_the_domains() -> None:
    x, labels = two_domain_data(1)
    scores = cross_validate(x, labels, [(1, 1.0, 1.0), (2, 1.0, 1.0)])
    assert scores[(2, 1.0, 1.0)] < scores[(1, 1.0, 1.0)]


def test_fit_needs_labels_of_two_classes() -> None:
    x, _ = two_domain_data(2)
    with pytest.raises(ValueError):
        fit_model(x, np.zeros(len(x)))
