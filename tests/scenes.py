"""Made-up scenes with known duplicates and transformed copies, for mining and verification tests.

A scene is random rectangles, ellipses and lines on a noisy background: corners and blobs
that local features (SIFT, ORB) find again after the geometric and photometric changes a
copy goes through (scaling, rotation, cropping, brightness, JPEG). Different seeds share
no structure, so any verified pair between two scenes is a false pair.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance


def scene(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 40, (h, w, 3), dtype=np.uint8) + np.uint8(rng.integers(60, 160))
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        x1, y1 = x0 + int(rng.integers(6, 60)), y0 + int(rng.integers(6, 60))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(2, 6)))
    return img


def transformed(img: Image.Image, variant: int) -> Image.Image:
    """A copy as a person would make one: resized, rotated a little, cropped, re-lit."""
    w, h = img.size
    if variant == 0:  # exact duplicate
        return img.copy()
    if variant == 1:  # scaled down
        return img.resize((int(w * 0.7), int(h * 0.7)), Image.Resampling.LANCZOS)
    if variant == 2:  # cropped and brightened
        return ImageEnhance.Brightness(img.crop((20, 15, w - 25, h - 10))).enhance(1.3)
    if variant == 3:  # rotated
        return img.rotate(12, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=(128, 128, 128))
    raise ValueError(variant)


def write_scene_set(root: Path, n_scenes: int, copies: int, n_singletons: int) -> dict[str, int]:
    """Write ``n_scenes`` scenes with ``copies`` transformed copies each, plus unrelated images,
    under ``root`` with meaningless, shuffled names; returns file name -> true scene id (-1 for
    a singleton)."""
    root.mkdir(parents=True, exist_ok=True)
    truth: dict[str, int] = {}
    items: list[tuple[Image.Image, int]] = []
    for s in range(n_scenes):
        img = scene(1000 + s)
        items.append((img, s))
        items.extend((transformed(img, v % 4 if v % 4 else 1), s) for v in range(copies))
    items.extend((scene(5000 + i), -1) for i in range(n_singletons))
    order = np.random.default_rng(7).permutation(len(items))
    for k, i in enumerate(order):
        img, s = items[i]
        name = f"img_{k:04d}.jpg"
        img.save(root / name, quality=90)
        truth[name] = s
    return truth
