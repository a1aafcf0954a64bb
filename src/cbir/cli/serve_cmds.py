"""``cbir serve``: the HTTP API and web page over an index folder (see :mod:`cbir.serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cbir.cli import output
from cbir.cli.commands import app
from cbir.defaults import DEFAULT_DB
from cbir.serve.settings import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_DECODE_BYTES,
    DEFAULT_MAX_K,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_UPLOAD_MAX_PIXELS,
    ServeSettings,
    machine_threads,
)

DbOpt = Annotated[Path, typer.Option("--db", help="Index folder (made with 'cbir index').")]
HostOpt = Annotated[
    str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only).")
]
PortOpt = Annotated[int, typer.Option("--port", help="TCP port.")]
TokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--token-file", help="File holding the bearer token for POST/DELETE /images (enables them)."
    ),
]
WritesOpt = Annotated[
    bool | None,
    typer.Option(
        "--writes/--read-only",
        help="Enable or disable the write endpoints (default: on when --token-file is given).",
    ),
]
UploadDirOpt = Annotated[
    Path | None,
    typer.Option("--upload-dir", help="Where POST /images stores files (default: DB/uploads)."),
]
MaxUploadOpt = Annotated[
    float, typer.Option("--max-upload-mb", help="Largest accepted upload in MB (413 past it).")
]
MaxPixelsOpt = Annotated[
    int,
    typer.Option("--max-pixels", help="Decompression-bomb limit: most pixels an upload may have."),
]
MaxDecodeOpt = Annotated[
    float,
    typer.Option(
        "--max-decode-mb", help="Most memory one image decode may take, judged from its header (422 past it)."
    ),
]
MaxConnectionsOpt = Annotated[
    int, typer.Option("--max-connections", help="Most open connections; more are answered 503 and closed.")
]
HeaderTimeoutOpt = Annotated[
    float, typer.Option("--header-timeout", help="Seconds a client has to send a request's headers (slowloris).")
]
BodyTimeoutOpt = Annotated[
    float,
    typer.Option("--body-timeout", help="Seconds a request body may take, plus one per 32 KB received."),
]
MaxKOpt = Annotated[int, typer.Option("--max-k", help="Most results one search may ask for.")]
ThreadsOpt = Annotated[
    int, typer.Option("--threads", help="Concurrent searches (default: one per core).")
]
RootPathOpt = Annotated[
    str,
    typer.Option(
        "--root-path", help="URL prefix when a reverse proxy serves the app under a sub-path."
    ),
]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]


@app.command("serve")
def serve_cmd(
    db: DbOpt = Path(DEFAULT_DB),
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    token_file: TokenFileOpt = None,
    writes: WritesOpt = None,
    upload_dir: UploadDirOpt = None,
    max_upload_mb: MaxUploadOpt = DEFAULT_MAX_UPLOAD_BYTES / 2**20,
    max_pixels: MaxPixelsOpt = DEFAULT_UPLOAD_MAX_PIXELS,
    max_decode_mb: MaxDecodeOpt = DEFAULT_MAX_DECODE_BYTES / 2**20,
    max_connections: MaxConnectionsOpt = DEFAULT_MAX_CONNECTIONS,
    header_timeout: HeaderTimeoutOpt = DEFAULT_HEADER_TIMEOUT,
    body_timeout: BodyTimeoutOpt = DEFAULT_BODY_TIMEOUT,
    max_k: MaxKOpt = DEFAULT_MAX_K,
    threads: ThreadsOpt = 0,
    root_path: RootPathOpt = "",
    log_level: LogLevelOpt = "info",
) -> None:
    """Serve an index over HTTP: a JSON API (OpenAPI at /docs) and a search page at /."""
    from cbir.serve.server import resolve_token, run_server  # FastAPI and the index: only to serve

    writes_on, token = resolve_token(db, host, token_file, writes)
    if token.warning:
        output.note(f"[yellow]warning:[/] {token.warning}")
    if token.generated:
        output.note(
            f"write token generated in {token.path} (send it as 'Authorization: Bearer <token>')"
        )
    settings = ServeSettings(
        host=host,
        port=port,
        token=token.token,
        writes=writes_on,
        upload_dir=(upload_dir or db / "uploads") if writes_on else None,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_pixels=max_pixels,
        max_decode_bytes=int(max_decode_mb * 2**20),
        max_connections=max_connections,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_k=max_k,
        search_threads=threads if threads > 0 else machine_threads(),
    )
    run_server(db, settings, root_path=root_path.rstrip("/"), log_level=log_level.lower())
