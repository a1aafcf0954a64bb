"""Feature distillation against forgetting: keep the descriptors of the training images close
to those of the network fine-tuning started from.

Weight averaging (:mod:`cbir.train.interpolation`) trades the gain on the training domains
against the loss elsewhere along one line. Distillation changes the training itself: every
step also pays ``weight * mean ||f(x) - f_0(x)||^2`` over the images of its tuples, ``f_0``
being a frozen copy of the starting network, so the network moves only as far from its
start as the retrieval loss is worth.

The starting network's descriptor of an image never changes, so without augmentation it is
computed once per image and kept (one inference pass over the training images in all, not
one per step); with augmentation each step's crop is new and the teacher sees the same crop.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from cbir.models.descriptor import Descriptor


class Distiller:
    """A frozen copy of the starting network and its descriptors of the training images."""

    def __init__(self, start: Descriptor, weight: float) -> None:
        if weight <= 0:
            raise ValueError("the distillation weight must be positive")
        self.weight = float(weight)
        self.teacher = copy.deepcopy(start).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._kept: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        """How many images' starting descriptors are kept."""
        return len(self._kept)

    @torch.no_grad()
    def targets(self, images: Sequence[int], batch: torch.Tensor, cacheable: bool) -> torch.Tensor:
        """The starting network's descriptors of ``batch`` (N x C x H x W, normalised), whose
        rows are the training images ``images``; kept per image when ``cacheable``."""
        if not cacheable:
            return self.teacher(batch)
        missing = [j for j, i in enumerate(images) if i not in self._kept]
        if missing:
            rows = torch.tensor(missing, device=batch.device)
            vecs = self.teacher(batch.index_select(0, rows))
            for j, v in zip(missing, vecs, strict=True):
                self._kept[images[j]] = v
        return torch.stack([self._kept[i] for i in images])
