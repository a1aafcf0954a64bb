"""Serve an index over HTTP: a JSON API and a web page (``cbir serve``).

``create_app(index, settings)`` builds the FastAPI application; :func:`run_server`
(used by the CLI) adds uvicorn, logging and thread-count set-up.
"""

from __future__ import annotations

from cbir.serve.app import create_app
from cbir.serve.security import ServeConfigError
from cbir.serve.settings import ServeSettings

__all__ = ["ServeConfigError", "ServeSettings", "create_app"]
