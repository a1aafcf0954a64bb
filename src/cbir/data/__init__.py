"""Data: decoding images robustly, preprocessing them, and listing collections.

Names load on first use: :mod:`cbir.data.decode` and :mod:`cbir.data.datasets` need only
Pillow, and a caller of either (the server's settings, ``cbir --help``) should not pay for
torch, which :mod:`cbir.data.transforms` imports.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "GPRCollection": "cbir.data.datasets",
    "LabelledImages": "cbir.data.datasets",
    "gpr_category": "cbir.data.datasets",
    "list_images": "cbir.data.datasets",
    "load_class_folders": "cbir.data.datasets",
    "load_gpr_collection": "cbir.data.datasets",
    "DEFAULT_MAX_PIXELS": "cbir.data.decode",
    "DecodeError": "cbir.data.decode",
    "load_image": "cbir.data.decode",
    "load_pixels": "cbir.data.decode",
    "to_rgb": "cbir.data.decode",
    "Preprocess": "cbir.data.transforms",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cbir.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = sorted(_LAZY)
