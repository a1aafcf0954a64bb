"""The Ray side of ``cbir extract --ray``, imported only when ``--ray`` is given.

A thin layer over :func:`cbir.distributed.extraction.extract_with_ray`: check the address,
run, print one summary line. Errors of the distributed extra (missing packages, an
unreachable cluster, a folder of another descriptor) are user errors: a message and the
error's exit status, no traceback.
"""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.markup import escape

from cbir.cli import output
from cbir.cli.options import ExtractionOptions
from cbir.cli.output import progress_enabled
from cbir.models.descriptor import Descriptor

_ADDRESS = re.compile(r"^(auto|local|ray://[^\s/]+:\d+|[A-Za-z0-9_.\-\[\]:]+:\d+)$")


def check_address(address: str) -> str:
    """The ``--ray`` value, or a clear error (an option value swallowed by ``--ray``, say)."""
    if not _ADDRESS.match(address):
        raise typer.BadParameter(
            f"--ray takes auto, local, HOST:PORT or ray://HOST:PORT, not {address!r}",
            param_hint="--ray",
        )
    return address


def extract_on_ray(
    inputs: list[Path],
    out: Path,
    descriptor: Descriptor,
    address: str,
    extraction: ExtractionOptions,
    *,
    cpus_per_worker: float,
    block_rows: int,
) -> None:
    """Run the distributed extraction and print what it did."""
    check_address(address)
    if block_rows < 1 or cpus_per_worker <= 0:
        raise typer.BadParameter("--block-rows and --cpus-per-worker must be positive")
    if out.suffix == ".npy":
        raise typer.BadParameter("with --ray, --out is a folder (of Parquet shards), not a .npy file")
    from cbir.distributed.extraction import extract_with_ray
    from cbir.runtime import DEFAULT_ENGINE

    report = extract_with_ray(
        inputs, out, descriptor, address=address, workers=extraction.workers,
        cpus_per_worker=cpus_per_worker, batch_size=extraction.batch_size, block_rows=block_rows,
        engine=extraction.engine or DEFAULT_ENGINE, max_pixels=extraction.max_pixels,
        calibrate=extraction.calibrate, progress=progress_enabled(extraction.quiet),
    )  # fmt: skip
    output.write(
        f"{report.described} images described, {report.failed} failed in this run "
        f"({report.workers} Ray workers, {report.engine}, {report.images_per_second:.1f} images/s); "
        f"{out}: {report.rows} images, {report.total_failed} failures (manifest.json)"
    )


def import_into_index(
    source: Path,
    db: Path,
    descriptor: Descriptor | None,
    *,
    store: str | None,
    wait: float,
    json_out: bool,
    dirs: list[Path] | None,
) -> None:
    """``cbir index --from SOURCE --db DB``: import, then print what was imported."""
    if dirs:
        raise typer.BadParameter("--from imports precomputed vectors: give no folders (sync them afterwards)")
    from cbir.distributed.importer import import_vectors

    report = import_vectors(source, db, model=descriptor, store=store, wait=wait)
    if json_out:
        output.emit_json(report.to_dict())
        return
    for path, reason in report.skipped[:20]:
        output.note(f"[yellow]skipped[/] {escape(path)}: {escape(reason)}")
    if len(report.skipped) > 20:
        output.note(f"... and {len(report.skipped) - 20} more skipped")
    output.write(
        f"{report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
        f"{len(report.skipped)} skipped; no image described, {report.seconds:.1f}s. {db}"
    )
