"""Commands of the search engine: ``index``, ``search`` and ``stats`` (``duplicates``: duplicates_cmds).

A thin layer over :class:`cbir.index.Index`: parse options, call the API, print.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cbir.cli.commands import app
from cbir.cli.options import (
    DescriptorOptions,
    EngineOpt,
    ExtractionOptions,
    descriptor_options,
    extraction_options,
    parse_size,
)
from cbir.errors import CbirError
from cbir.index import DEFAULT_DB, Index

console = Console(stderr=False)
err = Console(stderr=True)

DbOpt = Annotated[Path, typer.Option("--db", help="Index folder (created on first 'cbir index').")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
IndexModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Backbone (efficientnet-lite0/1/2, timm:<name>) or a descriptor file; used when the "
        "index is created (default efficientnet-lite0), checked against it afterwards.",
    ),
]


@contextmanager
def _user_errors() -> Iterator[None]:
    """Index errors are the user's to fix: a message and the error's exit status, no traceback."""
    try:
        yield
    except CbirError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")  # a message may hold [brackets]
        raise typer.Exit(exc.exit_code) from exc
    except (FileNotFoundError, PermissionError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc


def _open(db: Path, **kwargs: Any) -> Index:
    return Index.open(db, **kwargs)


@app.command("index")
@extraction_options()
@descriptor_options(declare={"model": IndexModelOpt}, model=None)
def index_cmd(
    dirs: Annotated[list[Path] | None, typer.Argument(help="Image folders, walked recursively.")] = None,
    db: DbOpt = Path(DEFAULT_DB),
    from_: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Import precomputed vectors instead of describing images: an embeddings folder "
            "(cbir extract --ray) or an .npy from cbir extract (with its manifest). The descriptor "
            "must match the index's.",
        ),
    ] = None,
    factory: Annotated[
        str | None,
        typer.Option(
            "--index",
            help="Index type: auto (default for a new index: exact Flat for small collections, an "
            "ANN index chosen from the size and --memory-budget above that) or a FAISS factory "
            "string (Flat, HNSW32, IVF1024,PQ32, ...). Changing it re-indexes the stored vectors "
            "without reading images.",
        ),
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option("--memory-budget", help="Memory the search index may use, e.g. 2G (for --index auto)."),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="Where the vectors are searched: faiss (default, in the --db folder) or milvus:URI, "
            "a Milvus Lite file (milvus:vectors.db) or server (milvus:http://HOST:19530), with its "
            "index after '#' (milvus:URI#index=HNSW,M=16). Changing it moves the vectors from the "
            "catalogue. See docs/scaling-out.md.",
        ),
    ] = None,
    wait: Annotated[
        float,
        typer.Option("--wait", help="Seconds to wait for another process writing to the index (0: fail at once)."),
    ] = 0.0,
    compact: Annotated[
        bool,
        typer.Option("--compact", help="Fold the journal of changes into a new index file now."),
    ] = False,
    dba: Annotated[
        int | None,
        typer.Option(
            "--dba", help="Database-side augmentation: neighbours added to each vector (0 = off)."
        ),
    ] = None,
    dba_alpha: Annotated[
        float | None, typer.Option("--dba-alpha", help="DBA weight exponent (alpha-DBA).")
    ] = None,
    json_out: JsonOpt = False,
    *,
    describe: DescriptorOptions,
    extraction: ExtractionOptions,
) -> None:
    """Index image folders incrementally: only new and changed files are described,
    deleted ones dropped, moved ones recognised by content."""
    # no descriptor option given: the index's own descriptor (or the default for a new one)
    chosen = describe.model is not None or describe.customised()
    descriptor = describe.build() if chosen else None
    if from_ is not None:
        from cbir.cli.distributed_cmds import import_into_index  # pyarrow only when asked for

        with _user_errors():
            import_into_index(from_, db, descriptor, store=store, wait=wait, json_out=json_out, dirs=dirs)
        return
    if not dirs:
        raise typer.BadParameter("give image folders to index, or --from PRECOMPUTED")
    run = extraction.kwargs(engine=False)
    budget = parse_size(memory_budget)
    with _user_errors():
        with _open(
            db, model=descriptor, factory=factory, memory_budget=budget, dba=dba, dba_alpha=dba_alpha,
            engine=extraction.engine, create=True, wait=wait, store=store, **extraction.engine_options(),
        ) as idx:
            report = idx.sync(dirs, **run)
            if compact:
                idx.compact()
            stats = idx.stats()
    if json_out:
        console.print_json(json.dumps({**report.to_dict(), "images": stats["images"]}))
        return
    for f in report.failures:
        err.print(f"[yellow]failed[/] {f.path}: {f.reason}")
    console.print(
        f"{report.added} added, {report.updated} updated, {report.moved} moved, "
        f"{report.removed} removed, {report.unchanged} unchanged, {report.failed} failed; "
        f"{report.extracted} files described in {report.seconds:.1f}s. "
        f"{db}: {stats['images']} images ({stats['descriptor']}, {stats['index']})"
    )


@app.command("search")
def search_cmd(
    query: Annotated[str, typer.Argument(help="An image file, or the path of an indexed image.")],
    db: DbOpt = Path(DEFAULT_DB),
    k: Annotated[int, typer.Option("--k", "-k", help="Number of results.")] = 20,
    qe: Annotated[
        int, typer.Option("--qe", help="alpha-query expansion with the top K results (0 = off).")
    ] = 0,
    alpha: Annotated[float, typer.Option("--alpha", help="Query-expansion weight exponent.")] = 3.0,
    nprobe: Annotated[
        int | None, typer.Option("--nprobe", help="IVF lists to visit (IVF types).")
    ] = None,
    ef_search: Annotated[
        int | None, typer.Option("--ef-search", help="HNSW search depth (HNSW types).")
    ] = None,
    k_factor: Annotated[
        float | None,
        typer.Option("--k-factor", help="Refinement: candidates re-ranked per result (Refine types)."),
    ] = None,
    exclude_self: Annotated[
        bool, typer.Option("--exclude-self", help="Leave the query's own file out of the results.")
    ] = False,
    engine: EngineOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Find the indexed images most similar to QUERY, best first."""
    if k < 1:
        raise typer.BadParameter("--k must be at least 1")
    with _user_errors():
        with _open(db, readonly=True, engine=engine) as idx:
            hits = idx.search(
                query, k=k, qe=qe, alpha=alpha, nprobe=nprobe, ef_search=ef_search, k_factor=k_factor,
                exclude_self=exclude_self,
            )  # fmt: skip
    if json_out:
        typer.echo(json.dumps({"results": [{"path": h.path, "score": h.score} for h in hits]}))
        return
    table = Table(title=f"{len(hits)} results for {query}")
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("path")
    for rank, h in enumerate(hits, 1):
        table.add_row(str(rank), f"{h.score:.4f}", h.path)
    console.print(table)


@app.command("stats")
def stats_cmd(db: DbOpt = Path(DEFAULT_DB), json_out: JsonOpt = False) -> None:
    """What an index holds: images, failures, descriptor, index type."""
    with _user_errors():
        with _open(db, readonly=True) as idx:
            stats = idx.stats()
            failures = [(r.path, r.error) for r in idx.failures()]
    if json_out:
        typer.echo(json.dumps(stats))
        return
    table = Table(title=f"index {stats['path']}", show_header=False)
    for key, value in stats.items():
        table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    console.print(table)
    for path, reason in failures[:20]:
        err.print(f"[yellow]failed[/] {path}: {reason}")
    if len(failures) > 20:
        err.print(f"... and {len(failures) - 20} more failures")
