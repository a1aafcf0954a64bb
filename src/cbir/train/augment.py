"""Geometric augmentation of training images: a random crop and a mirror image.

A few thousand training images are seen dozens of times in a CPU fine-tuning run; the
network then learns those exact pixels and validation on unseen classes stalls or falls
after a few epochs. Each image of a tuple therefore gets its own random crop (50-100% of
the area, aspect 3:4 to 4:3) resized back to its input size, and a horizontal flip half
the time: what stays the same across a crop or a mirror image is what the descriptor
should match on. Mining and validation see the plain images.

Randomness comes from torch's global generator, which the trainer seeds per epoch, so a
run (and a resumed run) is reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

#: Share of the image area a crop keeps, and its aspect-ratio range (the ImageNet
#: RandomResizedCrop recipe with a larger minimum: retrieval needs the object in view).
CROP_AREA = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def crop_box(height: int, width: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """A random (top, left, h, w) box of :data:`CROP_AREA` of the area and an aspect
    ratio in :data:`CROP_RATIO`; the whole image if ten tries do not fit."""
    area = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target = area * (CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * u[0])
        ratio = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    return 0, 0, height, width


def augment_array(image: np.ndarray, generator: torch.Generator | None = None) -> np.ndarray:
    """Random crop resized back to the input's size, then a flip with probability 1/2.

    ``image`` is uint8 H x W x 3 (:meth:`cbir.data.transforms.Preprocess.to_array`); the
    result has the same shape and dtype, so batching is unchanged.
    """
    h, w = image.shape[:2]
    top, left, ch, cw = crop_box(h, w, generator)
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)  # cached arrays are read-only
    x = F.resized_crop(x, top, left, ch, cw, [h, w], antialias=True)
    if float(torch.rand(1, generator=generator)) < 0.5:
        x = F.horizontal_flip(x)
    return x.permute(1, 2, 0).contiguous().numpy()
