"""Geometric verification of image pairs: local features, ratio test, RANSAC, inlier count.

Two images show the same thing (the same object, scene or a transformed copy) when many of
their local features match *consistently with one geometric transformation*. A global
descriptor only says two images look alike; the inlier count of a RANSAC fit says they
share physical structure, which is why Radenovic et al. (2018) keep only verified pairs as
positives (there via structure-from-motion; here the same idea on a pair: an epipolar or
planar model fitted to ratio-test matches, Philbin et al. 2007 style spatial verification).

Used by ``cbir mine`` (matching pairs without labels) and the duplicate finder. OpenCV is
a dependency of cbir (the int8 engine resizes with it too) but imported only when a
verifier is built, so ``import cbir`` and ``cbir --help`` do not pay its start-up cost; an
environment that removed it gets :class:`MissingExtraError` with the command to restore it.
"""

from __future__ import annotations

import importlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from cbir.errors import CbirError

EXTRA = "mine"
FEATURES = ("sift", "orb")
MODELS = ("homography", "fundamental")
#: Inliers a pair needs by default. Between unrelated images the few ratio-test matches that
#: survive are mostly noise: a homography gathers ~4-7 of them, a fundamental matrix (8 points,
#: a looser model: any point only has to lie near a line) ~10-12, so 15 keeps false pairs out.
DEFAULT_MIN_INLIERS = 15


class MissingExtraError(CbirError):
    """OpenCV is not installed (a dependency of cbir, also installed by the ``mine`` extra)."""

    code = "missing_dependency"
    http_status = 501


class VerifyError(CbirError):
    """An image could not be read for verification, or a setting is invalid."""


def require_cv2(feature: str = "geometric verification") -> ModuleType:
    """Import OpenCV or raise :class:`MissingExtraError` naming the extra that installs it."""
    try:
        return importlib.import_module("cv2")
    except ImportError as exc:
        raise MissingExtraError(
            f"{feature} needs OpenCV, which is not installed: "
            f"pip install 'cbir[{EXTRA}]' (or pip install opencv-python-headless)"
        ) from exc


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoint positions (N x 2, pixels of the resized image) and their descriptors."""

    points: np.ndarray
    descriptors: np.ndarray | None
    size: tuple[int, int]  # (width, height) of the image the points live in

    def __len__(self) -> int:
        return len(self.points)


@dataclass(frozen=True)
class PairVerification:
    """The outcome of verifying one pair: tentative matches, RANSAC inliers, the decision."""

    matches: int
    inliers: int
    verified: bool

    @property
    def inlier_ratio(self) -> float:
        return self.inliers / self.matches if self.matches else 0.0


class GeometricVerifier:
    """Verifies image pairs with local features (SIFT or ORB) and a RANSAC model.

    Features are computed once per image (images are resized so the longer side is at most
    ``max_side``: RANSAC needs structure, not pixels) and kept in a bounded LRU cache, as
    a mining run verifies each image against several neighbours. The default model is a
    homography: it is the stricter test (copies, near-duplicates, planar or distant views);
    ``model="fundamental"`` accepts wider 3D viewpoint changes at the price of more chance
    inliers between unrelated images.
    """

    def __init__(
        self,
        features: str = "sift",
        *,
        model: str = "homography",
        min_inliers: int = DEFAULT_MIN_INLIERS,
        ratio: float = 0.8,
        max_side: int = 512,
        max_features: int = 1000,
        ransac_threshold: float = 3.0,
        cache_size: int = 4096,
    ) -> None:
        if features not in FEATURES:
            raise VerifyError(f"unknown local features {features!r}: choose from {list(FEATURES)}")
        if model not in MODELS:
            raise VerifyError(f"unknown geometric model {model!r}: choose from {list(MODELS)}")
        if min_inliers < 4:
            raise VerifyError("min-inliers must be at least 4")
        if not 0 < ratio <= 1:
            raise VerifyError("the ratio test's ratio must be in (0, 1]")
        self.cv2 = require_cv2()
        self.features = features
        self.model = model
        self.min_inliers = int(min_inliers)
        self.ratio = float(ratio)
        self.max_side = int(max_side)
        self.max_features = int(max_features)
        self.ransac_threshold = float(ransac_threshold)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, LocalFeatures] = OrderedDict()
        if features == "sift":
            self._detector = self.cv2.SIFT_create(nfeatures=self.max_features)
            self._matcher = self.cv2.BFMatcher(self.cv2.NORM_L2)
        else:
            self._detector = self.cv2.ORB_create(nfeatures=self.max_features)
            self._matcher = self.cv2.BFMatcher(self.cv2.NORM_HAMMING)

    # -- features ----------------------------------------------------------------------------
    def describe_array(self, gray: np.ndarray) -> LocalFeatures:
        """Local features of a greyscale uint8 image (resized to ``max_side``)."""
        cv2 = self.cv2
        h, w = gray.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        kps, desc = self._detector.detectAndCompute(gray, None)
        pts = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
        return LocalFeatures(pts, desc, (gray.shape[1], gray.shape[0]))

    def describe(self, path: str | os.PathLike) -> LocalFeatures:
        """Local features of an image file (cached)."""
        key = os.fspath(path)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        feats = self.describe_array(_read_gray(key, self.max_side))
        self._cache[key] = feats
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return feats

    # -- matching and RANSAC -----------------------------------------------------------------
    def tentative_matches(self, a: LocalFeatures, b: LocalFeatures) -> tuple[np.ndarray, np.ndarray]:
        """Matched point positions (M x 2 each) passing Lowe's ratio test, one-to-one."""
        empty = np.zeros((0, 2), np.float32)
        if a.descriptors is None or b.descriptors is None or len(a) < 2 or len(b) < 2:
            return empty, empty
        knn = self._matcher.knnMatch(a.descriptors, b.descriptors, k=2)
        best: dict[int, tuple[float, int]] = {}  # train index -> (distance, query index)
        for pair in knn:
            if len(pair) < 2:
                continue
            m, n = pair
            if m.distance < self.ratio * n.distance:
                old = best.get(m.trainIdx)
                if old is None or m.distance < old[0]:
                    best[m.trainIdx] = (m.distance, m.queryIdx)
        if not best:
            return empty, empty
        qi = np.array([q for _, q in best.values()], dtype=np.int64)
        ti = np.array(list(best.keys()), dtype=np.int64)
        return a.points[qi], b.points[ti]

    def count_inliers(self, pa: np.ndarray, pb: np.ndarray) -> int:
        """RANSAC inliers of the geometric model fitted to matched points (0 if too few)."""
        cv2 = self.cv2
        need = 8 if self.model == "fundamental" else 4
        if len(pa) < max(need, 4):
            return 0
        if self.model == "fundamental":
            _, mask = cv2.findFundamentalMat(pa, pb, cv2.FM_RANSAC, self.ransac_threshold, 0.999)
        else:
            _, mask = cv2.findHomography(pa, pb, cv2.RANSAC, self.ransac_threshold)
        return 0 if mask is None else int(np.count_nonzero(mask))

    def verify_features(self, a: LocalFeatures, b: LocalFeatures) -> PairVerification:
        pa, pb = self.tentative_matches(a, b)
        inliers = self.count_inliers(pa, pb)
        return PairVerification(len(pa), inliers, inliers >= self.min_inliers)

    def verify(self, a: str | os.PathLike, b: str | os.PathLike) -> PairVerification:
        """Verify the pair of image files ``a`` and ``b``."""
        return self.verify_features(self.describe(a), self.describe(b))

    def settings(self) -> dict[str, object]:
        """What decides a verification (written beside mined pairs, so a run can be repeated)."""
        return {
            "features": self.features,
            "model": self.model,
            "min_inliers": self.min_inliers,
            "ratio": self.ratio,
            "max_side": self.max_side,
            "max_features": self.max_features,
            "ransac_threshold": self.ransac_threshold,
        }


def _read_gray(path: str, max_side: int) -> np.ndarray:
    """A greyscale uint8 array of an image file, decoded with cbir's own (Pillow) decoder so
    every format and EXIF orientation ``cbir index`` accepts is accepted here too (a JPEG is
    decoded at the smallest DCT scale still at least ``max_side`` on its longer side)."""
    from cbir.data.decode import DecodeError, load_image

    def target(w: int, h: int) -> tuple[int, int]:
        s = min(1.0, max_side / max(w, h))
        return max(1, round(w * s)), max(1, round(h * s))

    try:
        img = load_image(path, target_size=target)
    except DecodeError as exc:
        raise VerifyError(f"cannot verify {path}: {exc}") from exc
    return np.asarray(img.convert("L"), dtype=np.uint8)
