"""``cbir serve``: the HTTP API and web page over an index folder (see :mod:`cbir.serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cbir.cli.commands import app
from cbir.index import DEFAULT_DB, IndexError_
from cbir.serve.security import ServeConfigError
from cbir.serve.server import resolve_token, run_server
from cbir.serve.settings import (
    DEFAULT_MAX_K,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_UPLOAD_MAX_PIXELS,
    ServeSettings,
    machine_threads,
)

err = Console(stderr=True)


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
    max_k: MaxKOpt = DEFAULT_MAX_K,
    threads: ThreadsOpt = 0,
    root_path: RootPathOpt = "",
    log_level: LogLevelOpt = "info",
) -> None:
    """Serve an index over HTTP: a JSON API (OpenAPI at /docs) and a search page at /."""
    try:
        writes_on, token = resolve_token(db, host, token_file, writes)
    except ServeConfigError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    if token.warning:
        err.print(f"[yellow]warning:[/] {token.warning}")
    if token.generated:
        err.print(
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
        max_k=max_k,
        search_threads=threads if threads > 0 else machine_threads(),
    )
    try:
        run_server(db, settings, root_path=root_path.rstrip("/"), log_level=log_level.lower())
    except (ServeConfigError, IndexError_) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
