"""Preprocessing: how a decoded image becomes the tensor a backbone sees.

The policy is data, not code (a :class:`Preprocess` dataclass), because it is part of
what defines a descriptor: it is saved inside descriptor files and compared when an
index checks that two descriptors are the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

ResizePolicy = Literal["keep", "crop", "squash"]
RESIZE_POLICIES: tuple[str, ...] = ("keep", "crop", "squash")

_INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize policy and normalisation.

    - ``keep``: keep the aspect ratio, longest side = ``size`` (the retrieval papers'
      choice: no content is cropped away, feature maps are non-square).
    - ``crop``: shortest side = ``size``, then a centre crop of ``crop`` x ``crop``
      (the ImageNet classification recipe).
    - ``squash``: resize to ``size`` x ``size`` ignoring aspect.
    """

    size: int = 224
    resize: ResizePolicy = "squash"
    crop: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
        if self.size < 1:
            raise ValueError("size must be positive")
        if self.crop is not None and not 1 <= self.crop <= self.size:
            # a crop larger than the short side would pad the image with black borders
            raise ValueError(f"crop must be between 1 and size ({self.size}), got {self.crop}")

    # -- geometry ---------------------------------------------------------------------
    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """Size (w, h) the image is resized to, before any crop."""
        if self.resize == "squash":
            return self.size, self.size
        if self.resize == "keep":
            scale = self.size / max(width, height)
        else:
            scale = self.size / min(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """Size (w, h) of the tensor produced for an image of this size."""
        if self.resize == "crop":
            c = self.crop or self.size
            return c, c
        return self.resized_size(width, height)

    # -- application --------------------------------------------------------------------
    def to_array(self, img: Image.Image) -> np.ndarray:
        """Resize (and crop) to uint8 HxWx3: the cheap form that crosses process boundaries."""
        tw, th = self.resized_size(*img.size)
        if (tw, th) != img.size:
            img = img.resize((tw, th), _INTERPOLATIONS[self.interpolation])
        if self.resize == "crop":
            c = self.crop or self.size
            left = max(0, (tw - c) // 2)
            top = max(0, (th - c) // 2)
            img = img.crop((left, top, left + c, top + c))
        return np.asarray(img, dtype=np.uint8)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 BxHxWx3 -> float32 Bx3xHxW, mean/std normalised."""
        x = batch.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """One image -> normalised 1x3xHxW tensor."""
        return self.normalize(torch.from_numpy(self.to_array(img).copy()).unsqueeze(0))

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        d = dict(d)
        d["mean"] = tuple(d.get("mean", IMAGENET_MEAN))
        d["std"] = tuple(d.get("std", IMAGENET_STD))
        return cls(**d)

    def override(self, **changes: Any) -> Preprocess:
        """Copy with the non-None ``changes`` applied (CLI overrides).

        A new ``size`` without a new ``crop`` keeps the crop ratio (e.g. 256/224), so
        ``--image-size`` means "the input size" whatever the resize policy.
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        if "size" in changes and "crop" not in changes and self.crop:
            changes["crop"] = max(1, round(self.crop * changes["size"] / self.size))
        return replace(self, **changes)
