"""uvicorn's HTTP/1.1 protocol with the limits it lacks: request timeouts and a connection cap.

uvicorn closes idle keep-alive connections, but a client that has sent one byte of a
request is never timed out: 200 "slowloris" connections trickling a header line every
few seconds stay open for good, and each holds a file descriptor. This subclass of its
h11 protocol adds, per connection:

* a **header deadline**: the request line and headers must be complete within
  ``header_timeout`` seconds of the connection (or, on a kept-alive connection, of the
  next request's first byte), whatever trickles in meanwhile;
* a **body deadline**: ``body_timeout`` seconds plus one second per ``body_min_rate``
  bytes received (Apache mod_reqtimeout's rule), so a slow but steady upload finishes
  and a trickle does not;
* a **connection cap**: past ``max_connections`` open connections a new one is answered
  503 and closed at once.

A client that misses a deadline gets a 408 (if no response has started) and the
connection is closed; the app sees a disconnect. Written by hand because no maintained
ASGI server offers these (hypercorn has none either); it relies only on uvicorn's
protocol methods ``connection_made``, ``data_received`` and ``on_response_complete``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("cbir.serve")

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: 16\r\n\r\nrequest timeout\n"
)
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\nretry-after: 5\r\ncontent-length: 24\r\n\r\ntoo many connections now\n"
)


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection deadlines (seconds, bytes/s) and the cap on open connections."""

    header_timeout: float
    body_timeout: float
    body_min_rate: float
    max_connections: int


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with :class:`ConnectionLimits` (see the module docstring).

    uvicorn instantiates the class it is given, so the limits are a class attribute:
    :func:`limited_protocol` makes a subclass that carries them.
    """

    limits: ConnectionLimits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = ""  # "headers", "body" or "" (no request in progress)
        self._phase_start = 0.0
        self._body_bytes = 0
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("connection refused: %d open, limit %d", len(self.connections) - 1, self.limits.max_connections)
            self._close_with(_BUSY_RESPONSE)
            return
        self._start("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._phase and self.conn.their_state is h11.IDLE:
            self._start("headers")  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        state = self.conn.their_state
        if self._phase == "headers" and state is not h11.IDLE:
            if state is h11.SEND_BODY:
                self._start("body")
            else:
                self._finish()
        elif self._phase == "body":
            self._body_bytes += len(data)
            if state is not h11.SEND_BODY:
                self._finish()

    # -- deadlines ---------------------------------------------------------------------------
    def _start(self, phase: str) -> None:
        self._cancel()
        self._phase = phase
        self._phase_start = self.loop.time()
        self._body_bytes = 0
        timeout = self.limits.header_timeout if phase == "headers" else self.limits.body_timeout
        self._deadline = self.loop.call_later(timeout, self._check)

    def _finish(self) -> None:
        self._cancel()
        self._phase = ""

    def _cancel(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _check(self) -> None:
        """Timer callback: close the connection, or re-arm while the body keeps its rate."""
        self._deadline = None
        if self.transport.is_closing() or not self._phase:
            return
        if self._phase == "body":
            allowed = self.limits.body_timeout + self._body_bytes / self.limits.body_min_rate
            remaining = self._phase_start + allowed - self.loop.time()
            if remaining > 0:
                self._deadline = self.loop.call_later(remaining, self._check)
                return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        log.warning("%s: request %s not received in time: connection closed", client, self._phase)
        started = self.cycle is not None and self.cycle.response_started
        self._phase = ""
        self._close_with(None if started else _TIMEOUT_RESPONSE)

    def _close_with(self, response: bytes | None) -> None:
        if response is not None:
            self.transport.write(response)
        self.transport.close()


def limited_protocol(limits: ConnectionLimits) -> type[LimitedH11Protocol]:
    """A :class:`LimitedH11Protocol` subclass with ``limits``, for ``uvicorn.Config(http=...)``."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits})
