"""Distributed extraction on Ray Data: a file list in, Parquet embeddings out.

The job is one Ray Data pipeline; Ray schedules, retries and moves the data::

    file list (read_text of LIST.txt, or a walked folder)
      -> stat          tasks: size and mtime_ns of each file (cheap, I/O only)
      -> not yet done  drop (path, size, mtime_ns) already in OUT_DIR (resume)
      -> describe      an actor pool: each actor loads the descriptor once (its file is
                       shipped through the object store with the pool), then reads, hashes,
                       decodes and describes its blocks with cbir's own extraction code
      -> ShardSink     each block becomes one Parquet shard, written atomically under a
                       name derived from its rows (see :mod:`cbir.distributed.embeddings`)

Exactly once, also when a worker dies: Ray restarts a killed actor and re-runs the block it
held (``max_restarts``/``max_task_retries``); the re-run writes the same rows under the same
shard name, replacing a shard the dead worker may have finished. An interrupted job keeps
every shard already renamed into place, and the next run describes only the rest.

The vectors are the single-machine ones: each actor runs :func:`cbir.extract.iter_extract`
(same decoding, same resize, same engine) with one thread per CPU it holds.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbir.data.decode import DEFAULT_MAX_PIXELS
from cbir.defaults import BLOCK_ROWS
from cbir.distributed.cluster import cluster_cpus, ray_session
from cbir.distributed.deps import require
from cbir.distributed.embeddings import EmbeddingsError, EmbeddingsFolder, rows_table
from cbir.distributed.stages import shard_sink_class, stat_files
from cbir.models.descriptor import Descriptor
from cbir.runtime import DEFAULT_ENGINE


@dataclass
class DistributedReport:
    """What one run did, and what the folder now holds (from its manifest)."""

    out_dir: str
    described: int
    failed: int
    shards_written: int
    damaged_shards: int
    workers: int
    engine: str
    seconds: float
    rows: int
    total_failed: int

    @property
    def images_per_second(self) -> float:
        n = self.described + self.failed
        return n / self.seconds if self.seconds > 0 else float("nan")


# ----------------------------------------------------------------------------------------
# stages (run on the workers; plain functions of Arrow tables)
# ----------------------------------------------------------------------------------------
class DescribeFiles:
    """The actor of the describe stage: one descriptor and one runner, many blocks."""

    def __init__(
        self,
        files: Any,
        batch_size: int,
        max_pixels: int | None,
        threads: int,
    ) -> None:
        """``files``: an object reference to (descriptor file bytes, ONNX files or None),
        put in the object store once by the driver and fetched once per actor."""
        import ray

        from cbir.runtime import make_runner
        from cbir.runtime.device import auto_lanes

        descriptor_file, onnx_files = ray.get(files)
        self._dir = _actor_folder()
        weakref.finalize(self, shutil.rmtree, self._dir, True)  # at a graceful exit of the actor
        path = Path(self._dir) / "descriptor.cbir"
        path.write_bytes(descriptor_file)
        self.descriptor = Descriptor.load(path)
        if onnx_files:  # the driver's verified export: no export per actor
            for name, data in onnx_files.items():
                (Path(self._dir) / name).write_bytes(data)
            self.runner = make_runner(  # the CPUs it holds, laid out as one machine's cores
                self.descriptor, "onnx", cache_dir=self._dir, threads=threads, lanes=auto_lanes(threads),
                verbose=False,
            )  # fmt: skip
        else:
            import torch

            torch.set_num_threads(threads)
            self.runner = make_runner(self.descriptor, "torch")
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        # decoding too (the node's other CPUs belong to other actors); one thread beside lanes
        self.threads = 1 if self.runner.lanes > 1 else threads

    def __call__(self, batch: Any) -> Any:
        from cbir.extract import iter_extract
        from cbir.index import file_sha256

        paths = batch.column("path").to_pylist()
        sizes = batch.column("size").to_pylist()
        mtimes = batch.column("mtime_ns").to_pylist()
        dim = int(self.descriptor.dim)
        shas: list[str | None] = [None] * len(paths)
        errors: list[str | None] = [None] * len(paths)
        for i, p in enumerate(paths):
            try:
                shas[i] = file_sha256(p) if sizes[i] >= 0 else None
            except OSError as exc:
                shas[i] = None
                errors[i] = f"cannot read: {exc.strerror or exc}"
            if sizes[i] < 0:
                errors[i] = "no such file"
        vectors = np.zeros((len(paths), dim), np.float32)
        todo = [i for i in range(len(paths)) if errors[i] is None]
        for b in iter_extract(
            self.descriptor, [paths[i] for i in todo], runner=self.runner, workers=0, threads=self.threads,
            batch_size=self.batch_size, max_pixels=self.max_pixels, progress=False,
        ):  # fmt: skip
            vectors[[todo[j] for j in b.indices]] = b.vectors
            for j, failure in b.failures:
                errors[todo[j]] = failure.reason
        for i in todo:  # the hash and the vector must come from the same bytes
            if errors[i] is None and _changed(paths[i], sizes[i], mtimes[i]):
                errors[i] = "changed while being described (described again on the next run)"
        return rows_table(dim, paths, sizes, mtimes, shas, vectors, errors)


ACTOR_FOLDER_PREFIX = "cbir-actor-"


def _actor_folder() -> str:
    """A private folder for one actor's descriptor and ONNX files, named after its process.

    A graceful exit removes it; an actor that is killed (SIGKILL, a lost node, a driver that
    dies) runs no clean-up, so each new actor, and the driver at the end of a job, first
    remove the folders of actors whose process is gone. Without that, every killed actor
    left ~40 MB (descriptor and ONNX model) in the node's temp folder.
    """
    sweep_actor_folders(tempfile.gettempdir())
    return tempfile.mkdtemp(prefix=f"{ACTOR_FOLDER_PREFIX}{os.getpid()}-")


def sweep_actor_folders(parent: str | os.PathLike) -> list[str]:
    """Remove the actor folders under ``parent`` whose process no longer exists; returns them.
    Folders of live processes, and names this module did not make, are left alone."""
    removed = []
    with os.scandir(parent) as entries:
        for e in entries:
            if not e.name.startswith(ACTOR_FOLDER_PREFIX) or not e.is_dir(follow_symlinks=False):
                continue
            pid = e.name[len(ACTOR_FOLDER_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(e.path, ignore_errors=True)
                removed.append(e.path)
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):  # no /proc (macOS): kill() said it exists
        return True


def _changed(path: str, size: int, mtime_ns: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return True
    return st.st_size != size or st.st_mtime_ns != mtime_ns


# ----------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------
def _file_list(ray: Any, inputs: Sequence[str | os.PathLike]) -> tuple[Any, str]:
    """A dataset of paths: LIST.txt files read by Ray Data, or folders walked here."""
    from cbir.data.datasets import list_images

    lists = [os.fspath(p) for p in inputs if os.fspath(p).endswith(".txt")]
    others = [p for p in inputs if not os.fspath(p).endswith(".txt")]
    if lists and others:
        raise EmbeddingsError("give either LIST.txt files or image folders, not both")
    if lists:
        for p in lists:
            if not os.path.isfile(p):
                raise EmbeddingsError(f"no such file list: {p}")
        bases = {os.path.dirname(os.path.abspath(p)) for p in lists}
        if len(bases) > 1:
            raise EmbeddingsError("file lists must be in one folder (relative paths are resolved from it)")
        return ray.data.read_text([os.path.abspath(p) for p in lists]), bases.pop()
    paths: list[str] = []
    for p in others:
        try:
            paths.extend(os.path.abspath(f) for f in list_images(p))
        except FileNotFoundError as exc:
            raise EmbeddingsError(str(exc)) from exc
    if not paths:
        raise EmbeddingsError("no images found")
    pa = require("pyarrow")
    return ray.data.from_arrow(pa.table({"text": pa.array(paths, pa.string())})), "/"


def _onnx_files(descriptor: Descriptor, engine: str) -> tuple[dict[str, bytes] | None, str]:
    """The verified ONNX export (exported here once, if not cached), shipped to the actors;
    None and ``torch`` when the ONNX engine cannot serve this descriptor."""
    if engine == "onnx-int8":
        from cbir.runtime import EngineUnavailable

        raise EngineUnavailable("--engine onnx-int8 is not available with --ray yet: use onnx or torch")
    if engine != "onnx":
        return None, "torch"
    from cbir.runtime import EngineUnavailable
    from cbir.runtime.onnx_runner import cached_model

    try:
        path, _ = cached_model(descriptor)
    except EngineUnavailable as exc:
        print(f"onnx engine unavailable for {descriptor.describe_name()}: {exc}; using torch", file=sys.stderr)
        return None, "torch"
    meta = path.with_suffix(".json")
    return {path.name: path.read_bytes(), meta.name: meta.read_bytes()}, "onnx"


def extract_with_ray(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    descriptor: Descriptor,
    *,
    address: str = "auto",
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    batch_size: int = 32,
    block_rows: int = BLOCK_ROWS,
    engine: str = DEFAULT_ENGINE,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> DistributedReport:
    """Describe every image of ``inputs`` (folders or LIST.txt files) on a Ray cluster into
    the embeddings folder ``out_dir``; rows already there (same path, size, mtime) are kept.

    ``workers``: describing actors (default: the cluster's CPUs / ``cpus_per_worker``);
    ``block_rows``: images per Ray block, i.e. per actor call and per Parquet shard.
    """
    from cbir.index.locks import BusyError, FileLock

    start = time.perf_counter()
    folder = EmbeddingsFolder(out_dir)
    folder.root.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(folder.lock_path).hold():
            folder.prepare(descriptor)
            damaged = folder.clean()
            try:
                with ray_session(address) as ray:
                    sink, n_workers, used = _run_pipeline(
                        ray, inputs, folder, descriptor, workers=workers, cpus_per_worker=cpus_per_worker,
                        batch_size=batch_size, block_rows=block_rows, engine=engine, max_pixels=max_pixels,
                        progress=progress,
                    )  # fmt: skip
            finally:  # actors killed during the job, on this node (on others: the next actor there)
                sweep_actor_folders(tempfile.gettempdir())
            seconds = time.perf_counter() - start
            manifest = folder.write_manifest({"engine": used, "workers": n_workers, "seconds": round(seconds, 3)})
    except BusyError as exc:
        raise EmbeddingsError(f"another run is writing to {folder.root}") from exc
    return DistributedReport(
        out_dir=os.fspath(out_dir),
        described=sum(s[1] for s in sink.shards),
        failed=sum(s[2] for s in sink.shards),
        shards_written=len(sink.shards),
        damaged_shards=damaged,
        workers=n_workers,
        engine=used,
        seconds=seconds,
        rows=manifest["rows"],
        total_failed=manifest["failed"],
    )


def _run_pipeline(
    ray: Any, inputs: Sequence[str | os.PathLike], folder: EmbeddingsFolder, descriptor: Descriptor, *,
    workers: int | None, cpus_per_worker: float, batch_size: int, block_rows: int, engine: str,
    max_pixels: int | None, progress: bool,
) -> tuple[Any, int, str]:  # fmt: skip
    """Build and run the Ray Data pipeline; returns (sink, actors, engine used)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress and sys.stderr.isatty()
    ctx.print_on_execution_start = False
    fits = max(1, int(cluster_cpus(ray) // max(cpus_per_worker, 1e-3)))
    n_workers = workers or fits
    onnx_files, used = _onnx_files(descriptor, engine)
    ds, base = _file_list(ray, inputs)
    # Phase 1, materialised before any actor exists: the repartition runs tasks that need a
    # CPU, which a pool holding every CPU would never give back (a deadlock on small clusters).
    todo = (
        ds.map_batches(stat_files, batch_format="pyarrow", fn_kwargs={"done": folder.done_keys(), "base": base},
                       num_cpus=0, concurrency=fits)  # I/O only; capped, or one worker process per block
        .repartition(target_num_rows_per_block=block_rows)  # the unit of work, retry and shard
        .materialize()
    )  # fmt: skip
    sink = shard_sink_class()(os.fspath(folder.shard_dir))
    if todo.count() == 0:  # everything is written: no actor to start, no model to load
        return sink, n_workers, used
    ds = todo.map_batches(
        DescribeFiles,
        fn_constructor_kwargs={
            "files": ray.put((folder.descriptor_path.read_bytes(), onnx_files)),
            "batch_size": batch_size, "max_pixels": max_pixels, "threads": max(1, int(cpus_per_worker)),
        },
        batch_size=block_rows, batch_format="pyarrow", num_cpus=cpus_per_worker,
        compute=ray.data.ActorPoolStrategy(min_size=min(n_workers, fits), max_size=n_workers),
    )  # fmt: skip
    # writes need no CPU of their own, but without a cap Ray starts a worker process per
    # block; the actors bound the write rate anyway
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0}, concurrency=n_workers)
    return sink, n_workers, used
