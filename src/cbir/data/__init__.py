"""Data: decoding images robustly, preprocessing them, and listing collections."""

from cbir.data.datasets import (
    GPRCollection,
    LabelledImages,
    gpr_category,
    list_images,
    load_class_folders,
    load_gpr_collection,
)
from cbir.data.decode import DEFAULT_MAX_PIXELS, DecodeError, load_image, to_rgb
from cbir.data.transforms import Preprocess

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DecodeError",
    "GPRCollection",
    "LabelledImages",
    "Preprocess",
    "gpr_category",
    "list_images",
    "load_class_folders",
    "load_gpr_collection",
    "load_image",
    "to_rgb",
]
