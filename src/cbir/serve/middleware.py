"""Request log, request ids and security headers on every response (one ASGI middleware).

It sits outside everything else, so it also sees the framework's errors and turns an
unexpected exception into a JSON 500 naming the request id (traceback in the log only),
and it answers a declared oversize ``Content-Length`` with a JSON 413 before anything
reads the body.
"""

from __future__ import annotations

import logging
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cbir.serve.errors import error_body

log = logging.getLogger("cbir.serve")

#: Content-Security-Policy of every response, the page and the API docs included: only
#: this server's scripts, styles and images (Swagger UI's inline SVG icons are data: URLs).
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


def _printable(text: str, limit: int = 200) -> str:
    """A request path made safe for a log line (no control characters, bounded length)."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class RequestLogAndHeaders:
    """Log one line per request and add a request id and security headers to every response.

    Unexpected exceptions become a JSON 500 naming the request id (traceback in the log
    only). Also answers a request whose declared ``Content-Length`` exceeds ``max_body`` with
    a JSON 413 before anything reads the body.
    """

    def __init__(self, app: ASGIApp, enabled: bool = True, max_body: int | None = None) -> None:
        self.app = app
        self.enabled = enabled
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:12]
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500
        started = False
        path = scope.get("path", "")

        async def send_with_headers(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-request-id", request_id.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", CSP.encode()),
                ]
                message = {**message, "headers": headers}
            await send(message)

        try:
            declared = _declared_length(scope)
            if self.max_body is not None and declared is not None and declared > self.max_body:
                response = JSONResponse(
                    error_body(413, f"request body over the limit of {self.max_body:,} bytes"),
                    413,
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        except Exception:
            # The traceback stays in the server log; the client gets the request id to quote.
            log.exception("request %s failed", request_id)
            if started:
                raise
            response = JSONResponse(
                error_body(500, f"internal error (request id {request_id})", "internal_error"), 500
            )
            await response(scope, receive, send_with_headers)
        finally:
            if self.enabled:
                client = scope.get("client") or ("-", 0)
                log.info(
                    "%s %s %s %d %.1fms id=%s",
                    client[0],
                    scope.get("method", "-"),
                    _printable(path),
                    status,
                    (time.perf_counter() - start) * 1000,
                    request_id,
                )


def _declared_length(scope: Scope) -> int | None:
    """The request's ``Content-Length`` (None when absent or not a number)."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
