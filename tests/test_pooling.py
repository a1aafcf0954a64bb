"""Pooling values against their direct formulas, R-MAC region geometry, and pooling specs.

References: MAC and R-MAC (Tolias et al., ICLR 2016), SPoC (Babenko & Lempitsky, ICCV
2015), GeM and its multi-scale combination (Radenovic et al., TPAMI 2018).
"""

from __future__ import annotations

import math

import pytest
import torch

from cbir.models.pooling import (
    MAC,
    RMAC,
    GeM,
    RGeM,
    SPoC,
    build_pooling,
    gem,
    l2n,
    mac,
    multiscale_combine,
    parse_pooling,
    rgem,
    rmac,
    rmac_regions,
    spoc,
)


def feature_map(*shape: int, seed: int = 0, low: float = 0.05) -> torch.Tensor:
    """Positive activations (as after a ReLU), float64 so formulas compare tightly."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64) + low


# ---------------------------------------------------------------------------------------
# global poolings
# ---------------------------------------------------------------------------------------
def test_mac_and_spoc_against_loops() -> None:
    x = feature_map(2, 3, 4, 5)
    for b in range(2):
        for c in range(3):
            values = [float(x[b, c, i, j]) for i in range(4) for j in range(5)]
            assert float(mac(x)[b, c]) == max(values)
            assert float(spoc(x)[b, c]) == pytest.approx(sum(values) / 20, rel=1e-12)
    assert torch.equal(MAC()(x), mac(x)) and torch.equal(SPoC()(x), spoc(x))


def test_gem_hand_computed() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    # ((1 + 8 + 27 + 64) / 4) ** (1/3) = 25 ** (1/3)
    assert float(gem(x, 3.0)) == pytest.approx(25 ** (1 / 3), rel=1e-12)
    assert float(GeM(p=3.0).double()(x)) == pytest.approx(25 ** (1 / 3), rel=1e-12)
    # p = 2: root mean square
    assert float(gem(x, 2.0)) == pytest.approx(math.sqrt(30 / 4), rel=1e-12)


def test_gem_p1_is_mean_and_large_p_approaches_max() -> None:
    x = feature_map(2, 4, 5, 6, seed=1)
    torch.testing.assert_close(gem(x, 1.0), spoc(x), rtol=1e-12, atol=0)
    n = 5 * 6
    previous = gem(x, 1.0)
    for p in (2.0, 8.0, 32.0, 128.0):
        g = gem(x, p)
        # power means grow with p and are bounded by max * (1/n)^(1/p) <= gem <= max
        assert torch.all(g >= previous - 1e-12)
        assert torch.all(g <= mac(x) + 1e-12)
        assert torch.all(g >= mac(x) * (1 / n) ** (1 / p) - 1e-12)
        previous = g
    torch.testing.assert_close(gem(x, 128.0), mac(x), rtol=0.03, atol=0)


def test_gem_clamps_negative_activations() -> None:
    # a fractional power of a negative number is undefined: negatives count as eps
    x = torch.tensor([[[[-5.0, 2.0]]]], dtype=torch.float64)
    expected = ((1e-6**3 + 8.0) / 2) ** (1 / 3)
    assert float(gem(x, 3.0)) == pytest.approx(expected, rel=1e-9)
    assert torch.isfinite(gem(-feature_map(1, 2, 3, 3), 3.0)).all()


def test_learnable_gem_p_is_a_trained_parameter() -> None:
    pool = GeM(p=3.0, learnable=True)
    assert pool.p.requires_grad
    assert [n for n, _ in pool.named_parameters()] == ["p"]
    pool(feature_map(1, 3, 4, 4).float()).sum().backward()
    assert pool.p.grad is not None and float(pool.p.grad) != 0.0
    fixed = GeM(p=3.0)
    assert not fixed.p.requires_grad
    assert list(fixed.parameters()) == [] and "p" in dict(fixed.named_buffers())
    assert RGeM(learnable=True).p.requires_grad


# ---------------------------------------------------------------------------------------
# R-MAC regions
# ---------------------------------------------------------------------------------------
def test_rmac_regions_square_hand_worked() -> None:
    # 7 x 7, L = 3: side floor(2*7/(l+1)) = 7, 4, 3 on 1x1, 2x2, 3x3 uniform grids
    expected = [(0, 0, 7, 7)]
    expected += [(t, left, 4, 4) for t in (0, 3) for left in (0, 3)]
    expected += [(t, left, 3, 3) for t in (0, 2, 4) for left in (0, 2, 4)]
    assert rmac_regions(7, 7, levels=3) == expected
    assert rmac_regions(7, 7, levels=1) == [(0, 0, 7, 7)]


def _check_geometry(h: int, w: int, levels: int, extra: int) -> None:
    regions = rmac_regions(h, w, levels)
    short = min(h, w)
    start = 0
    for level in range(1, levels + 1):
        side = int(2 * short / (level + 1))
        along_long = level + extra
        count = level * along_long
        block = regions[start : start + count]
        start += count
        assert all(r[2] == r[3] == side for r in block), (level, block)  # squares
        assert all(0 <= t and t + s <= h and 0 <= c and c + s <= w for t, c, s, _ in block)
        tops = sorted({r[0] for r in block})
        lefts = sorted({r[1] for r in block})
        n_tops, n_lefts = (along_long, level) if h > w else (level, along_long)
        assert len(tops) == n_tops and len(lefts) == n_lefts
        for offsets, extent in ((tops, h), (lefts, w)):
            # uniform layout that touches both borders
            if len(offsets) > 1:
                assert offsets[0] == 0 and offsets[-1] == extent - side
                step = (extent - side) / (len(offsets) - 1)
                assert all(abs(o - i * step) <= 0.5 for i, o in enumerate(offsets))
            else:
                assert offsets == [(extent - side) // 2]
    assert start == len(regions)


@pytest.mark.parametrize(
    ("h", "w", "extra"),
    [
        # long - short = 3, two squares of 5 overlap by 2/5 = 0.4 exactly: one extra
        (5, 8, 1),
        # 7 x 12: overlaps 0.29 (2 squares) or 0.64 (3): 0.29 is closer to 0.4
        (7, 12, 1),
        # 7 x 21: 4 squares overlap by 1/3, the closest to 0.4
        (7, 21, 3),
    ],
)
def test_rmac_regions_non_square(h: int, w: int, extra: int) -> None:
    _check_geometry(h, w, 3, extra)
    # a portrait map gets the transposed layout
    transposed = [(c, t, s, s2) for t, c, s, s2 in rmac_regions(h, w, 3)]
    assert sorted(rmac_regions(w, h, 3)) == sorted(transposed)


def test_rmac_regions_long_side_hand_worked() -> None:
    # 7 x 21, level 1: four 7 x 7 squares at 0, 14/3, 28/3, 14 -> 0, 5, 9, 14
    assert rmac_regions(7, 21, levels=1) == [(0, c, 7, 7) for c in (0, 5, 9, 14)]


def test_rmac_regions_tiny_maps() -> None:
    assert rmac_regions(1, 1, levels=3) == [(0, 0, 1, 1)]  # duplicates removed
    assert rmac_regions(0, 5) == []


# ---------------------------------------------------------------------------------------
# R-MAC and regional GeM values
# ---------------------------------------------------------------------------------------
def test_rmac_is_sum_of_normalised_region_maxima() -> None:
    x = feature_map(2, 6, 7, 10, seed=3)
    expected = torch.zeros(2, 6, dtype=torch.float64)
    for t, c, sh, sw in rmac_regions(7, 10, 3):
        region_max = x[:, :, t : t + sh, c : c + sw].amax(dim=(-2, -1))
        expected += region_max / region_max.norm(dim=1, keepdim=True)
    # l2n adds eps = 1e-6 to the norm, hence the tolerance
    torch.testing.assert_close(rmac(x, 3), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(RMAC(levels=3)(x), expected, rtol=1e-5, atol=0)


def test_rmac_single_channel_counts_regions() -> None:
    # with one positive channel every normalised region max is 1
    x = feature_map(1, 1, 7, 10, seed=4)
    assert float(rmac(x, 3)) == pytest.approx(len(rmac_regions(7, 10, 3)), rel=1e-5)


def test_rgem_is_sum_of_normalised_region_gems() -> None:
    x = feature_map(1, 5, 8, 8, seed=5)
    expected = torch.zeros(1, 5, dtype=torch.float64)
    for t, c, sh, sw in rmac_regions(8, 8, 2):
        r = x[:, :, t : t + sh, c : c + sw]
        v = (r**4).mean(dim=(-2, -1)) ** 0.25
        expected += v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(rgem(x, 2, 4.0), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(RGeM(levels=2, p=4.0).double()(x), expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------
# multi-scale combination and normalisation
# ---------------------------------------------------------------------------------------
def test_multiscale_combine() -> None:
    a = torch.tensor([[1.0, 8.0]], dtype=torch.float64)
    b = torch.tensor([[8.0, 1.0]], dtype=torch.float64)
    assert torch.equal(multiscale_combine([a]), a)
    torch.testing.assert_close(multiscale_combine([a, b], 1.0), (a + b) / 2)
    v = ((1 + 512) / 2) ** (1 / 3)
    expected = torch.tensor([[v, v]], dtype=torch.float64)
    torch.testing.assert_close(multiscale_combine([a, b], 3.0), expected)


def test_l2n_keeps_zero_vectors_finite() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = l2n(x)
    torch.testing.assert_close(out[0], torch.tensor([0.6, 0.8]), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1], torch.zeros(2))


# ---------------------------------------------------------------------------------------
# specs: CLI strings and dicts
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "cls", "attrs"),
    [
        ("gem", GeM, {"learnable": False}),
        ("GeM:p=4", GeM, {"learnable": False}),
        ("gem:learn", GeM, {"learnable": True}),
        ("gem:p=2.5,learnable=true", GeM, {"learnable": True}),
        ("rmac:levels=2", RMAC, {"levels": 2}),
        ("r-mac", RMAC, {"levels": 3}),
        ("rgem:L=2,p=5", RGeM, {"levels": 2}),
        ("avg", SPoC, {}),
        ("mean", SPoC, {}),
        ("max", MAC, {}),
        ("spoc", SPoC, {}),
    ],
)
def test_build_pooling_from_strings(text: str, cls: type, attrs: dict) -> None:
    pool = build_pooling(text)
    assert type(pool) is cls
    for k, v in attrs.items():
        assert getattr(pool, k) == v
    # a spec rebuilds the same pooling (that is what descriptor files rely on)
    assert build_pooling(pool.spec()).spec() == pool.spec()


def test_parse_pooling_values() -> None:
    assert parse_pooling("gem:p=4") == {"name": "gem", "p": 4.0}
    assert parse_pooling(" gem : p = 4 , learn ") == {"name": "gem", "p": 4.0, "learnable": True}
    assert float(build_pooling("gem:p=4").p) == 4.0
    assert parse_pooling("rgem:l=2") == {"name": "rgem", "levels": 2}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("foo", "unknown pooling 'foo'"),
        ("gem:q=1", "unknown pooling option 'q'"),
        ("gem:bogus", "bad pooling option 'bogus'"),
        ("gem:p=abc", "'p'"),
        ("rmac:levels=2.5", "'levels'"),
        ("mac:p=3", "mac"),
        ("spoc:levels=2", "spoc"),
        ("gem:p=0", "positive"),
        ("rmac:levels=0", "at least 1"),
    ],
)
def test_bad_pooling_strings_are_value_errors(text: str, message: str) -> None:
    # the CLI turns ValueError into a clean usage error; anything else is a traceback
    with pytest.raises(ValueError, match=message):
        build_pooling(text)
