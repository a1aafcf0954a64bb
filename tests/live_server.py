"""A real uvicorn server on loopback in a background thread, configured as ``cbir serve``
configures it (connection limits included), for the tests that need a socket: the
browser, and raw slow clients."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from cbir.index import Index
from cbir.serve import ServeSettings, create_app
from cbir.serve.server import uvicorn_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(index: Index, settings: ServeSettings) -> Iterator[int]:
    """Serve ``index`` on ``settings.port`` until the block ends; yields the port."""
    import uvicorn

    server = uvicorn.Server(uvicorn_config(create_app(index, settings), settings, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield settings.port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
