"""``cbir bench ann``: candidate ANN indexes measured on a collection (a thin layer over
:mod:`cbir.index.ann_bench`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from cbir.cli import output
from cbir.cli.commands import bench_app
from cbir.cli.options import parse_size


@bench_app.command("ann")
def bench_ann_cmd(
    db: Annotated[Path | None, typer.Option("--db", help="Measure on this index's own vectors.")] = None,
    synthetic: Annotated[
        int | None,
        typer.Option("--synthetic", help="Measure on N synthetic descriptors drawn from a model of real ones."),
    ] = None,
    dim: Annotated[int | None, typer.Option("--dim", help="Dimension of the synthetic descriptors.")] = None,
    queries: Annotated[int, typer.Option("--queries", help="Queries (sampled or held-out draws).")] = 1000,
    memory_budget: Annotated[
        str | None, typer.Option("--memory-budget", help="Memory the index may use, e.g. 2G (as for --index auto).")
    ] = None,
    flat_queries: Annotated[
        int | None, typer.Option("--flat-queries", help="Time exact search on this many queries only (default all).")
    ] = None,
    threads: Annotated[int, typer.Option("--threads", help="Threads for building (searches use one).")] = 2,
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="Folder for the memory map of a large synthetic collection.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic draws and samples.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
) -> None:
    """Recall@10 against exact search, single-query latency (one thread), build time and
    memory of the candidate indexes for a collection; 'chosen' marks what --index auto picks."""
    if (db is None) == (synthetic is None):
        raise typer.BadParameter("give exactly one of --db PATH or --synthetic N")
    if synthetic is not None and synthetic < 1 or queries < 1 or threads < 1:
        raise typer.BadParameter("--synthetic, --queries and --threads must be positive")
    if db is not None and dim is not None:
        raise typer.BadParameter("--dim applies to --synthetic only")
    from cbir.index import ann_bench

    log = _progress() if sys.stderr.isatty() else None
    options = {"memory_budget": parse_size(memory_budget), "flat_queries": flat_queries,
               "threads": threads, "seed": seed, "log": log}  # fmt: skip
    if synthetic is not None:
        results = ann_bench.bench_synthetic(
            synthetic, dim=dim, queries=queries, workdir=str(workdir) if workdir else None, **options
        )
    else:
        results = ann_bench.bench_index(db, queries=queries, workdir=str(workdir) if workdir else None, **options)
    if json_out:
        output.emit_json({"results": [r.to_json() for r in results]})
        return
    _table(results)


def _progress() -> Callable[[str], None]:
    """Progress lines on stderr (only called when it is a terminal)."""
    from rich.console import Console

    console = Console(stderr=True)
    return lambda msg: console.log(msg, markup=False, highlight=False)


def _table(results: list) -> None:
    from rich.table import Table

    table = Table(title="ANN candidates (recall against exact search; latency: one query, one thread)")
    for name in ("index", "params", "recall@10", "median ms", "p99 ms", "build s", "memory MiB", "chosen"):
        table.add_column(name, justify="left" if name in ("index", "params") else "right")
    for r in results:
        params = ", ".join(f"{k}={v}" for k, v in r.params.items()) or "exact"
        table.add_row(
            r.index, params, f"{r.recall_at_10:.4f}", f"{r.median_ms:.2f}", f"{r.p99_ms:.2f}",
            f"{r.build_s:.1f}", f"{r.memory_mb:,.0f}", "yes" if r.chosen else "",
        )  # fmt: skip
    output.show(table)  # unwrapped and uncoloured when stdout is not a terminal
