"""cbir: content-based image retrieval with global descriptors.

The public Python API; the ``cbir`` command and the HTTP server are thin layers over it.

The names below are imported on first use (PEP 562), not with the package: most of them
need PyTorch, which takes seconds and hundreds of MB to import, and a process that only
uses a light module (``cbir.errors``, ``cbir.fileio``, a Ray worker that stats files or
writes Parquet shards) should not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "CbirError": "cbir.errors",
    "DecodeError": "cbir.data",
    "Descriptor": "cbir.models",
    "ExtractionResult": "cbir.extract",
    "Preprocess": "cbir.data",
    "Whitening": "cbir.models",
    "build_descriptor": "cbir.models",
    "evaluate_gpr1200": "cbir.eval",
    "evaluate_labelled": "cbir.eval",
    "extract": "cbir.extract",
    "iter_extract": "cbir.extract",
    "list_images": "cbir.data",
    "load_image": "cbir.data",
}

__all__ = [
    "CbirError",
    "DecodeError",
    "Descriptor",
    "ExtractionResult",
    "Preprocess",
    "Whitening",
    "__version__",
    "build_descriptor",
    "evaluate_gpr1200",
    "evaluate_labelled",
    "extract",
    "iter_extract",
    "list_images",
    "load_image",
]

if TYPE_CHECKING:
    from cbir.data import DecodeError, Preprocess, list_images, load_image
    from cbir.errors import CbirError
    from cbir.eval import evaluate_gpr1200, evaluate_labelled
    from cbir.extract import ExtractionResult, extract, iter_extract
    from cbir.models import Descriptor, Whitening, build_descriptor


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cbir' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
