"""Commands of the search engine: ``index``, ``search`` and ``stats`` (``duplicates``: duplicates_cmds).

A thin layer over :mod:`cbir.api`: parse options, call the facade, print through
:mod:`cbir.cli.output`. Errors are mapped to messages and exit codes in :mod:`cbir.cli.main`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cbir.cli import output
from cbir.cli.commands import app
from cbir.cli.options import (
    DescriptorOptions,
    EngineOpt,
    ExcludeOpt,
    ExtractionOptions,
    IncludeHiddenOpt,
    descriptor_options,
    extraction_options,
    parse_size,
)
from cbir.defaults import DEFAULT_ALPHA, DEFAULT_DB

DbOpt = Annotated[Path, typer.Option("--db", help="Index folder (created by 'cbir index').")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout (the same as --format json).")]
FormatOpt = Annotated[
    str,
    typer.Option("--format", metavar="table|json|paths", help="Output: a table, JSON, or one whole path a line."),
]
IndexModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Backbone (efficientnet-lite0/1/2, timm:<name>) or a descriptor file; used when the "
        "index is created (default efficientnet-lite0), checked against it afterwards.",
    ),
]


def hit_rows(hits: Any) -> list[dict[str, Any]]:
    """Search hits as JSON rows."""
    return [{"id": h.id, "path": h.path, "score": round(float(h.score), 6)} for h in hits]


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
    exclude: ExcludeOpt = None,
    include_hidden: IncludeHiddenOpt = False,
    json_out: JsonOpt = False,
    *,
    describe: DescriptorOptions,
    extraction: ExtractionOptions,
) -> None:
    """Index image folders incrementally: only new and changed files are described,
    deleted ones dropped, moved ones recognised by content.

    Hidden folders (.*), @eaDir and .thumbnails are skipped unless --include-hidden; --exclude
    and --include-hidden are remembered by the index for later runs."""
    from cbir import api

    # no descriptor option given: the index's own descriptor (or the default for a new one)
    chosen = describe.model is not None or describe.customised()
    descriptor = describe.build() if chosen else None
    if from_ is not None:
        from cbir.cli.distributed_cmds import import_into_index  # pyarrow only when asked for

        import_into_index(from_, db, descriptor, store=store, wait=wait, json_out=json_out, dirs=dirs)
        return
    if not dirs:
        raise typer.BadParameter("give image folders to index, or --from PRECOMPUTED")
    report, stats = api.index_folders(
        dirs, db, model=descriptor, factory=factory, memory_budget=parse_size(memory_budget), dba=dba,
        dba_alpha=dba_alpha, wait=wait, store=store, compact=compact, engine=extraction.engine,
        exclude=exclude if exclude else None, include_hidden=True if include_hidden else None,
        **extraction.kwargs(engine=False), **extraction.engine_options(),
    )  # fmt: skip
    for f in report.failures:  # each failure once, on stderr; `cbir stats --json` keeps them
        output.warn_failure(f.path, f.reason)
    if json_out:
        output.emit_json({**report.to_dict(), "images": stats["images"]})
        return
    output.write(
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
    qe: Annotated[int, typer.Option("--qe", help="alpha-query expansion with the top K results (0 = off).")] = 0,
    qe_alpha: Annotated[float, typer.Option("--qe-alpha", help="Query-expansion weight exponent.")] = DEFAULT_ALPHA,
    nprobe: Annotated[int | None, typer.Option("--nprobe", help="IVF lists to visit (IVF types).")] = None,
    ef_search: Annotated[int | None, typer.Option("--ef-search", help="HNSW search depth (HNSW types).")] = None,
    k_factor: Annotated[
        float | None,
        typer.Option("--k-factor", help="Refinement: candidates re-ranked per result (Refine types)."),
    ] = None,
    exclude_self: Annotated[
        bool, typer.Option("--exclude-self", help="Leave the query's own file out of the results.")
    ] = False,
    engine: EngineOpt = None,
    fmt: FormatOpt = "table",
    json_out: JsonOpt = False,
) -> None:
    """Find the indexed images most similar to QUERY, best first."""
    from cbir import api

    fmt = output.check_format(fmt, json_out)
    hits = api.search(
        db, query, k=k, qe=qe, qe_alpha=qe_alpha, engine=engine, nprobe=nprobe, ef_search=ef_search,
        k_factor=k_factor, exclude_self=exclude_self,
    )  # fmt: skip
    if fmt == "json":
        output.emit_json({"query": query, "results": hit_rows(hits)})
    elif fmt == "paths":
        output.write_lines(h.path for h in hits)
    else:
        rows = [(rank, f"{h.score:.4f}", h.path) for rank, h in enumerate(hits, 1)]
        output.show(output.table(["#", "score", "path"], rows, title=f"{len(hits)} results for {query}",
                                 right=["#", "score"]))  # fmt: skip


@app.command("stats")
def stats_cmd(db: DbOpt = Path(DEFAULT_DB), fmt: FormatOpt = "table", json_out: JsonOpt = False) -> None:
    """What an index holds: images, failures (with their reasons), descriptor, index type."""
    from cbir import api

    fmt = output.check_format(fmt, json_out)
    stats = api.index_stats(db)
    failures = stats["failures"]
    if fmt == "json":
        output.emit_json(stats)
        return
    if fmt == "paths":  # the failed files, one a line (what to look at)
        output.write_lines(f["path"] for f in failures)
        return
    rows = [(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
            for key, value in stats.items() if key != "failures"]  # fmt: skip
    rows.append(("failures", str(len(failures))))
    output.show(output.table(["", ""], rows, title=f"index {stats['path']}"))
    for f in failures[:20]:
        output.warn_failure(f["path"], f["reason"])
    if len(failures) > 20:
        output.note(f"... and {len(failures) - 20} more failures (cbir stats --format paths lists them all)")
