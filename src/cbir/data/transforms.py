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

#: Who resizes: Pillow (what every float32 descriptor has always used), or OpenCV. OpenCV
#: interpolates (bilinear, bicubic, Lanczos) where an axis grows and averages areas where it shrinks (its
#: anti-aliased filter): about 6x faster than Pillow's resize on gpr-mini's images, pixels
#: a level or two apart on average. A descriptor's resampler is part of its identity; the
#: int8 engine, whose vectors are already its own, uses "opencv" (docs/performance.md).
RESAMPLERS: tuple[str, ...] = ("pillow", "opencv")
#: Interpolations the opencv resampler offers for a growing axis (names of cv2.INTER_*);
#: a shrinking axis is always area-averaged.
OPENCV_INTERPOLATIONS = {"bilinear": "INTER_LINEAR", "bicubic": "INTER_CUBIC", "lanczos": "INTER_LANCZOS4"}

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
    resampler: str = "pillow"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
        if self.resampler not in RESAMPLERS:
            raise ValueError(f"resampler must be one of {RESAMPLERS}, got {self.resampler!r}")
        if self.resampler == "opencv" and self.interpolation not in OPENCV_INTERPOLATIONS:
            raise ValueError(f"the opencv resampler does {', '.join(OPENCV_INTERPOLATIONS)}, not {self.interpolation}")
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
    def to_array(self, img: Image.Image | np.ndarray) -> np.ndarray:
        """Resize (and crop) to uint8 HxWx3: the cheap form that crosses process boundaries.

        ``img`` is an RGB image or its uint8 H x W x 3 array (what
        :func:`cbir.data.decode.load_pixels` returns): the same pixels either way."""
        size = (img.shape[1], img.shape[0]) if isinstance(img, np.ndarray) else img.size
        tw, th = self.resized_size(*size)
        if (tw, th) == size:
            arr = np.asarray(img, dtype=np.uint8)
        elif self.resampler == "opencv":
            arr = _opencv_resize(np.asarray(img, dtype=np.uint8), (tw, th), self.interpolation)
        else:
            pil = Image.fromarray(img) if isinstance(img, np.ndarray) else img
            arr = np.asarray(pil.resize((tw, th), _INTERPOLATIONS[self.interpolation]), dtype=np.uint8)
        if self.resize == "crop":
            c = self.crop or self.size
            left = max(0, (tw - c) // 2)
            top = max(0, (th - c) // 2)
            arr = arr[top : top + c, left : left + c]  # Pillow's crop of the same box
        return np.ascontiguousarray(arr)

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
        if d["resampler"] == "pillow":  # written only when not Pillow: every older identity stays
            del d["resampler"]
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


def _opencv_resize(arr: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """uint8 H x W x 3 -> uint8 h x w x 3 (``size`` = (w, h)) by OpenCV.

    A shrinking axis is area-averaged (``INTER_AREA``: no aliasing), a growing one
    interpolated (``interpolation``: :data:`OPENCV_INTERPOLATIONS`). Where one axis grows
    and the other shrinks (``squash`` of a long, thin image) each is resized on its own."""
    from cbir.verify import require_cv2  # imported on first use: most commands never resize with it

    cv2 = require_cv2("resizing with OpenCV")
    grow = getattr(cv2, OPENCV_INTERPOLATIONS[interpolation])
    h, w = arr.shape[:2]
    tw, th = size
    if tw <= w and th <= h:
        return cv2.resize(arr, size, interpolation=cv2.INTER_AREA)
    if tw >= w and th >= h:
        return cv2.resize(arr, size, interpolation=grow)
    shrunk = (tw, h) if tw < w else (w, th)
    arr = cv2.resize(arr, shrunk, interpolation=cv2.INTER_AREA)
    return cv2.resize(arr, size, interpolation=grow)

