"""PCA-whitening (Jegou & Chum, ECCV 2012) and learned whitening (Radenovic et al., TPAMI
2018) checked through the properties that define them, on synthetic descriptors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cbir.models.whitening import (
    Whitening,
    fit_learned_whitening,
    fit_pca_whitening,
    pairs_from_labels,
)


def correlated(n: int = 400, d: int = 12, seed: int = 0) -> np.ndarray:
    """Descriptors with a strongly anisotropic, correlated covariance and a non-zero mean."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.logspace(0, -1, d)
    return rng.normal(size=(n, d)) @ mixing.T + rng.normal(size=d)


def project(w: Whitening, x: np.ndarray) -> np.ndarray:
    """The affine part of the whitening, without the final L2 normalisation."""
    return (x - w.mean.double().numpy()) @ w.projection.double().numpy().T


def covariance(y: np.ndarray) -> np.ndarray:
    yc = y - y.mean(axis=0)
    return yc.T @ yc / (len(y) - 1)


def test_pca_power_one_gives_identity_covariance_on_its_learning_set() -> None:
    x = correlated()
    w = fit_pca_whitening(x, power=1.0)
    assert (w.in_dim, w.out_dim) == (12, 12)
    y = project(w, x)
    # float32 buffers: the identity holds to float32 precision
    np.testing.assert_allclose(covariance(y), np.eye(12), atol=2e-4)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-4)
    assert w.meta["kind"] == "pca" and w.meta["n"] == 400


def test_pca_dimension_reduction_keeps_the_top_variance_axes() -> None:
    x = correlated()
    w = fit_pca_whitening(x, dim=4)
    assert (w.in_dim, w.out_dim) == (12, 4) and w.meta["dim"] == 4
    np.testing.assert_allclose(covariance(project(w, x)), np.eye(4), atol=2e-4)
    # the kept rows span the 4 leading eigenvectors of the covariance
    vals, vecs = np.linalg.eigh(covariance(x))
    top = vecs[:, np.argsort(vals)[::-1][:4]]
    rows = w.projection.double().numpy()
    residual = rows.T - top @ (top.T @ rows.T)
    assert np.abs(residual).max() < 1e-4 * np.abs(rows).max()
    out = w(torch.as_tensor(x[:3], dtype=torch.float32))
    assert out.shape == (3, 4)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3), rtol=1e-5, atol=1e-5)


def test_pca_power_zero_is_a_rotation() -> None:
    x = correlated(n=100)
    w = fit_pca_whitening(x, power=0.0)
    p = w.projection.double().numpy()
    np.testing.assert_allclose(p @ p.T, np.eye(12), atol=1e-5)
    y = project(w, x)
    d_before = np.linalg.norm(x[:, None] - x[None], axis=-1)
    d_after = np.linalg.norm(y[:, None] - y[None], axis=-1)
    np.testing.assert_allclose(d_after, d_before, rtol=1e-5, atol=1e-5)


def test_pca_power_half_square_roots_the_eigenvalues() -> None:
    x = correlated()
    vals = np.sort(np.linalg.eigvalsh(covariance(x)))[::-1]
    y = project(fit_pca_whitening(x, power=0.5), x)
    np.testing.assert_allclose(np.diag(covariance(y)), np.sqrt(vals), rtol=1e-3)


def test_pca_with_fewer_images_than_dimensions_truncates() -> None:
    x = correlated(n=5, d=12)
    w = fit_pca_whitening(x, dim=8)
    assert w.out_dim == 4 and w.meta["dim"] == 4  # n - 1 directions exist
    assert np.isfinite(w.projection.numpy()).all()
    with pytest.raises(ValueError, match="two descriptors"):
        fit_pca_whitening(x[:1])


def test_learned_whitening_whitens_matching_pair_differences() -> None:
    rng = np.random.default_rng(1)
    d, n_cls, per = 10, 60, 4
    centres = rng.normal(size=(n_cls, d)) * 3
    # intra-class variation is strongly anisotropic: that is what Lw must undo
    noise_axes = rng.normal(size=(d, d)) * np.logspace(0, -1.5, d)
    labels = np.repeat(np.arange(n_cls), per)
    x = centres[labels] + rng.normal(size=(len(labels), d)) @ noise_axes.T
    q, p = pairs_from_labels(labels)
    w = fit_learned_whitening(x, q, p)
    assert (w.in_dim, w.out_dim) == (d, d) and w.meta["kind"] == "learned"
    proj = w.projection.double().numpy()
    diff = x[q] - x[p]
    # step 1: the intra-pair difference covariance becomes the identity
    np.testing.assert_allclose((diff @ proj.T).T @ (diff @ proj.T) / len(q), np.eye(d), atol=1e-4)
    # step 2: the whitened data is decorrelated, variances in decreasing order
    y = project(w, x[q])
    cov = y.T @ y / len(q)
    off = cov - np.diag(np.diag(cov))
    assert np.abs(off).max() < 1e-4 * np.abs(cov).max()
    assert np.all(np.diff(np.diag(cov)) <= 1e-6 * np.abs(cov).max())
    # truncation keeps the leading rows of the same projection
    w3 = fit_learned_whitening(x, q, p, dim=3)
    assert w3.out_dim == 3
    leading = w.projection.numpy()[:3]
    np.testing.assert_allclose(w3.projection.numpy(), leading, rtol=1e-5, atol=1e-6)


def test_learned_whitening_needs_pairs() -> None:
    with pytest.raises(ValueError, match="index lists"):
        fit_learned_whitening(np.zeros((3, 2)), np.array([], dtype=int), np.array([], dtype=int))


def test_pairs_from_labels() -> None:
    q, p = pairs_from_labels([0, 0, 0, 1, 2, 2], max_pairs=None)
    pairs = set(zip(q.tolist(), p.tolist(), strict=True))
    assert pairs == {(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (4, 5), (5, 4)}
    q2, p2 = pairs_from_labels([0, 0, 0, 1, 2, 2], max_pairs=3, seed=0)
    assert len(q2) == 3 and set(zip(q2.tolist(), p2.tolist(), strict=True)) <= pairs
    with pytest.raises(ValueError, match="two images"):
        pairs_from_labels([0, 1, 2])


def test_save_load_round_trip(tmp_path: Path) -> None:
    x = correlated()
    w = fit_pca_whitening(x, dim=6, power=0.8, source="somewhere")
    path = tmp_path / "w.pt"
    w.save(str(path))
    back = Whitening.load(str(path))
    assert torch.equal(back.mean, w.mean) and torch.equal(back.projection, w.projection)
    assert back.meta == w.meta and back.spec() == w.spec()
    xt = torch.as_tensor(x[:5], dtype=torch.float32)
    assert torch.equal(back(xt), w(xt))
    np.testing.assert_allclose(back.apply_numpy(x[:5]), w(xt).numpy(), atol=1e-5)
    # a file of another kind is refused with a message, not unpickled blindly
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a cbir whitening file"):
        Whitening.load(str(tmp_path / "other.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk\n")
    with pytest.raises(ValueError, match="not a readable cbir whitening file"):
        Whitening.load(str(tmp_path / "junk.pt"))


def test_mismatched_mean_and_projection() -> None:
    with pytest.raises(ValueError, match="disagree"):
        Whitening(np.zeros(3), np.zeros((2, 4)))


def test_pca_floors_degenerate_directions() -> None:
    # a constant coordinate has zero variance: whitening must not divide by zero there
    x = correlated(n=50)
    x[:, 5] = 0.3
    w = fit_pca_whitening(x)
    y = project(w, x)
    assert np.isfinite(w.projection.numpy()).all() and np.isfinite(y).all()
    np.testing.assert_allclose(covariance(y)[:11, :11], np.eye(11), atol=2e-4)
