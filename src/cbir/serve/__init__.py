"""Serve an index over HTTP: a JSON API and a web page (``cbir serve``).

``create_app(index, settings)`` builds the FastAPI application; :func:`run_server`
(used by the CLI) adds uvicorn, logging and thread-count set-up. Names load on first use,
so the CLI can read the server's settings without importing FastAPI or the index.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "create_app": "cbir.serve.app",
    "ServeConfigError": "cbir.serve.security",
    "ServeSettings": "cbir.serve.settings",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cbir.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = sorted(_LAZY)
