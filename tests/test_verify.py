"""Geometric verification: transformed copies are verified, unrelated images are not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from scenes import scene, transformed

pytest.importorskip("cv2")

from cbir.verify import GeometricVerifier, MissingExtraError, VerifyError, require_cv2  # noqa: E402


@pytest.fixture(scope="module")
def pics(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    a = scene(1)
    a.save(root / "a.jpg", quality=90)
    for v in range(4):
        transformed(a, v).save(root / f"a{v}.jpg", quality=85)
    scene(2).save(root / "b.jpg", quality=90)
    scene(3).save(root / "c.jpg", quality=90)
    return root


@pytest.mark.parametrize("features", ["sift", "orb"])
@pytest.mark.parametrize("model", ["fundamental", "homography"])
def test_copies_verify_and_strangers_do_not(pics: Path, features: str, model: str) -> None:
    v = GeometricVerifier(features, model=model)
    for k in range(4):
        r = v.verify(pics / "a.jpg", pics / f"a{k}.jpg")
        assert r.verified, (k, r)
        assert r.inliers >= v.min_inliers and r.matches >= r.inliers
    for a, b in [("a.jpg", "b.jpg"), ("b.jpg", "c.jpg"), ("a2.jpg", "c.jpg")]:
        r = v.verify(pics / a, pics / b)
        assert not r.verified, (a, b, r)


def test_features_are_cached_per_file(pics: Path) -> None:
    v = GeometricVerifier("orb", cache_size=2)
    f1 = v.describe(pics / "a.jpg")
    assert v.describe(pics / "a.jpg") is f1
    v.describe(pics / "b.jpg")
    v.describe(pics / "c.jpg")
    assert v.describe(pics / "a.jpg") is not f1  # evicted: the cache is bounded


def test_bad_settings_and_unreadable_images_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(VerifyError, match="local features"):
        GeometricVerifier("surf")
    with pytest.raises(VerifyError, match="min-inliers"):
        GeometricVerifier(min_inliers=2)
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(VerifyError, match="cannot verify"):
        GeometricVerifier().describe(bad)


def test_missing_opencv_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    with pytest.raises(MissingExtraError, match=r"cbir\[mine\]"):
        require_cv2()
