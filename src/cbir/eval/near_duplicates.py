"""A generated near-duplicate benchmark: labelled image pairs and the scores of a pair rule.

**Positives** are an image and a transformed copy of it, by one *recipe*: a resize, a JPEG
re-encode at low quality, a crop, a colour change, a small rotation, or a combination of
them (what copying, exporting, thumbnailing and light editing do to a photo).
**Negatives** are two distinct images of the same class (the hard case: same object
category, same character, same person). The second image of a negative goes through the
same recipes, so a method cannot tell the pairs apart by compression artefacts or size.

Every transform's parameters are drawn from a seeded generator and recorded with the
pair, so a benchmark run is reproducible and a test can check that a recipe does what it
says. Scoring (:func:`precision_recall`, :func:`threshold_for_precision`) works on any
pair score where higher means "more likely a duplicate".
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

Transform = Callable[[Image.Image, random.Random], tuple[Image.Image, dict[str, Any]]]

MIN_SIDE = 32  # a resize never goes below this (Omniglot drawings are 105 px)


def resize(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict[str, Any]]:
    """Downscale to 35-70% of each side (a thumbnail or a web export)."""
    scale = rng.uniform(0.35, 0.7)
    w, h = (max(MIN_SIDE, round(s * scale)) for s in img.size)
    return img.resize((w, h), Image.Resampling.BICUBIC), {"scale": round(scale, 4), "size": [w, h]}


def jpeg(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict[str, Any]]:
    """Re-encode as JPEG at quality 10-30 (a heavily compressed copy)."""
    quality = rng.randint(10, 30)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out, {"quality": quality}


def crop(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict[str, Any]]:
    """Keep 75-92% of each side at a random offset (a trimmed border)."""
    keep = rng.uniform(0.75, 0.92)
    w, h = img.size
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch)), {"keep": round(keep, 4), "box": [x, y, x + cw, y + ch]}


def colour(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict[str, Any]]:
    """Change brightness, contrast and saturation by 0.6-1.4x each, one of them by at
    least 25% (an edited or differently rendered copy)."""
    factors = [rng.uniform(0.6, 1.4) for _ in range(3)]
    strong = rng.randrange(3)
    if abs(factors[strong] - 1.0) < 0.25:
        factors[strong] = 1.0 + rng.choice((-1, 1)) * rng.uniform(0.25, 0.4)
    out = img.convert("RGB")
    for enhancer, f in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors, strict=True):
        out = enhancer(out).enhance(f)
    names = ("brightness", "contrast", "saturation")
    return out, {n: round(f, 4) for n, f in zip(names, factors, strict=True)}


def rotate(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict[str, Any]]:
    """Rotate by 2-8 degrees either way, then crop to the largest centred box without the
    filled corners (a straightened scan), at the original aspect."""
    angle = rng.choice((-1, 1)) * rng.uniform(2.0, 8.0)
    w, h = img.size
    a = np.radians(abs(angle))
    # the largest centred w x h box scaled by f that fits inside the rotated image
    f = 1.0 / (np.cos(a) + np.sin(a) * max(w / h, h / w))
    cw, ch = max(1, int(w * f)), max(1, int(h * f))
    turned = img.convert("RGB").rotate(angle, resample=Image.Resampling.BICUBIC)
    x, y = (w - cw) // 2, (h - ch) // 2
    return turned.crop((x, y, x + cw, y + ch)), {"angle": round(angle, 4), "size": [cw, ch]}


TRANSFORMS: dict[str, Transform] = {"resize": resize, "jpeg": jpeg, "crop": crop, "colour": colour, "rotate": rotate}

# Single transforms and combinations, used in turn. JPEG goes last in a combination: a
# compressed copy is usually the last step of an edit.
RECIPES: tuple[tuple[str, ...], ...] = (
    ("resize",),
    ("jpeg",),
    ("crop",),
    ("colour",),
    ("rotate",),
    ("resize", "jpeg"),
    ("crop", "colour"),
    ("rotate", "jpeg"),
    ("crop", "resize", "jpeg"),
    ("colour", "rotate", "resize", "jpeg"),
)


def apply_recipe(img: Image.Image, recipe: Sequence[str], rng: random.Random) -> tuple[Image.Image, list[dict]]:
    """``img`` through each transform of ``recipe`` in order; the steps with their parameters."""
    steps = []
    for name in recipe:
        img, params = TRANSFORMS[name](img, rng)
        steps.append({"transform": name, **params})
    return img.convert("RGB"), steps


@dataclass
class Pair:
    """Two image files and whether the second is a transformed copy of the first."""

    a: str
    b: str
    duplicate: bool
    source_b: str  # the file ``b`` was made from (``a`` for a positive)
    recipe: list[str] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)


@functools.cache
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_pairs(classes: Mapping[str, Sequence[Path]], n_pairs: int, out_dir: Path, seed: int = 0) -> list[Pair]:
    """``n_pairs`` positives and ``n_pairs`` negatives from ``classes`` (name -> image files),
    the transformed images written to ``out_dir`` (PNG, or JPEG for a recipe that ends in a
    re-encode, so the file holds exactly the recipe's output). Originals are drawn without
    replacement while they last; recipes are used in turn. A negative's two files differ in
    content (byte-identical files within a class are never paired as distinct)."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    usable = {c: sorted(ps) for c, ps in classes.items() if len(ps) >= 2}
    if not usable:
        raise ValueError("near-duplicate pairs need classes with at least two images")
    pool = [(c, p) for c, ps in sorted(usable.items()) for p in ps]
    rng.shuffle(pool)
    pairs: list[Pair] = []
    for n in range(2 * n_pairs):
        cls, a = pool[(n // 2) % len(pool)]
        positive = n % 2 == 0
        recipe = RECIPES[(n // 2) % len(RECIPES)]
        source = a
        if not positive:
            others = [p for p in usable[cls] if p != a and _digest(p) != _digest(a)]
            if not others:
                continue
            source = rng.choice(others)
        with Image.open(source) as im:
            img, steps = apply_recipe(im.convert("RGB"), recipe, rng)
        ext = ".jpg" if recipe[-1] == "jpeg" else ".png"
        b = out_dir / f"{n:05d}_{'pos' if positive else 'neg'}_{'-'.join(recipe)}{ext}"
        if ext == ".jpg":
            img.save(b, "JPEG", quality=steps[-1]["quality"])
        else:
            img.save(b)
        pairs.append(Pair(str(a), str(b), positive, str(source), list(recipe), steps))
    return pairs


def save_pairs(pairs: Sequence[Pair], path: Path) -> None:
    path.write_text(json.dumps([asdict(p) for p in pairs], indent=1))


def load_pairs(path: Path) -> list[Pair]:
    return [Pair(**d) for d in json.loads(path.read_text())]


def class_images(root: Path, pattern: str, class_of: Callable[[Path], str]) -> dict[str, list[Path]]:
    """Image files under ``root`` matching ``pattern``, grouped by ``class_of(path)``."""
    out: dict[str, list[Path]] = {}
    for p in sorted(root.glob(pattern)):
        out.setdefault(class_of(p), []).append(p)
    return out


@dataclass(frozen=True)
class Scores:
    """Precision and recall of "duplicate if score >= threshold" on labelled pairs."""

    threshold: float
    precision: float
    recall: float
    predicted: int

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def precision_recall(scores: np.ndarray, labels: np.ndarray, threshold: float) -> Scores:
    """Precision (1.0 when nothing is predicted) and recall at ``score >= threshold``."""
    pred = scores >= threshold
    tp = int(np.sum(pred & labels))
    n_pred, n_pos = int(pred.sum()), int(labels.sum())
    return Scores(float(threshold), tp / n_pred if n_pred else 1.0, tp / n_pos if n_pos else 0.0, n_pred)


def threshold_for_precision(scores: np.ndarray, labels: np.ndarray, precision: float) -> float:
    """The lowest threshold (so the highest recall) whose precision on these pairs is at
    least ``precision``; if none reaches it, the lowest one with the best precision."""
    order = np.argsort(-scores, kind="stable")
    s, lab = scores[order], labels[order].astype(np.int64)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # each distinct score's last row
    prec = np.cumsum(lab)[last] / (last + 1)
    t = s[last]  # descending
    ok = np.flatnonzero(prec >= precision)
    if len(ok):
        return float(t[ok[-1]])
    return float(t[np.flatnonzero(prec == prec.max())[-1]])
