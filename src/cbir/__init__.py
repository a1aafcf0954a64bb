"""cbir: content-based image retrieval with global descriptors.

The public Python API is :mod:`cbir.api`, re-exported here; the ``cbir`` command and the
HTTP server call the same functions. Names are loaded on first use (module ``__getattr__``),
so ``import cbir`` and ``cbir --help`` do not import torch, FAISS or ONNX Runtime.

>>> import cbir
>>> with cbir.create_index(".cbir") as idx:        # doctest: +SKIP
...     idx.sync(["photos/"])
...     hits = idx.search("photos/cat.jpg", k=10)
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from cbir.errors import CbirError, InputError, UsageError

__version__ = "0.1.0"

#: public name -> module that defines it (imported on first access)
_LAZY = {
    **{name: "cbir.api" for name in (
        "bench_gpr1200", "bench_revisited", "build_descriptor", "create_index", "extract", "find_duplicates",
        "fine_tune", "index_folders", "index_stats", "list_images", "open_index", "region_whitening", "search",
        "whitening",
    )},  # fmt: skip
    "Index": "cbir.index",
    "Hit": "cbir.index",
    "SyncReport": "cbir.index",
    "IndexBusyError": "cbir.index.errors",
    "IndexDamagedError": "cbir.index.errors",
    "IndexNotFoundError": "cbir.index.errors",
    "DescriptorMismatchError": "cbir.index.errors",
    "QueryError": "cbir.index.errors",
    "DecodeError": "cbir.data.decode",
    "load_image": "cbir.data",
    "load_pixels": "cbir.data",
    "Preprocess": "cbir.data",
    "evaluate_gpr1200": "cbir.eval",
    "evaluate_labelled": "cbir.eval",
    "ExtractionResult": "cbir.extract",
    "iter_extract": "cbir.extract",
    "Descriptor": "cbir.models",
    "Whitening": "cbir.models",
    "TrainConfig": "cbir.train",
}


class _Package(types.ModuleType):
    """``cbir.extract`` is both a submodule and the facade's function. Python binds a submodule
    to its package's attribute when the submodule is imported, which would replace the function
    by the module; the package refuses that rebinding for the facade's names (the module stays
    importable as ``cbir.extract`` through ``sys.modules``, as ``from cbir.extract import ...``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == "cbir.api":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cbir' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["CbirError", "InputError", "UsageError", "__version__", *_LAZY]
