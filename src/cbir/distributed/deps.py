"""The optional dependencies of working past one machine, imported only when used.

Ray, PyArrow and pymilvus are heavy (Ray alone is ~100 MB and starts a cluster runtime),
and most users never need them: ``pip install cbir`` and ``cbir --help`` must work without
them. Every module of :mod:`cbir.distributed` and the Milvus store imports them through
:func:`require`, so a missing one is one clear error naming the extra that installs it,
never a bare ``ModuleNotFoundError`` from deep inside a command.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from cbir.errors import CbirError

EXTRA = "distributed"

#: module name -> the PyPI package that provides it
PACKAGES = {
    "ray": "ray[data]",
    "ray.data": "ray[data]",
    "pyarrow": "pyarrow",
    "pyarrow.parquet": "pyarrow",
    "pymilvus": "pymilvus",
    "milvus_lite": "milvus-lite",
}


class MissingExtraError(CbirError):
    """An optional dependency of this feature is not installed."""

    code = "missing_dependency"
    http_status = 501


def require(module: str, feature: str = "this feature") -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = PACKAGES.get(module, module.split(".")[0])
        raise MissingExtraError(
            f"{feature} needs {package}, which is not installed: "
            f"pip install 'cbir[{EXTRA}]' (or pip install '{package}')"
        ) from exc
