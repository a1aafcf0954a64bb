"""Distributed extraction on Ray Data: a file list in, Parquet embeddings out.

The job is one Ray Data pipeline with one stage; Ray schedules, retries and moves the data::

    file list      read_text of LIST.txt files, or a folder walked by the driver and put
                   in the object store in blocks
      -> describe  an actor pool: each actor gets the descriptor file, the ONNX export and
                   the keys of the rows already written once (shipped through the object
                   store with the pool); for each block it stats the files, drops those
                   already written (same path, size, mtime_ns: the resume), reads, hashes,
                   decodes and describes the rest with cbir's own extraction code, and
                   writes them as one Parquet shard, atomically, under a name derived from
                   its rows (see :mod:`cbir.distributed.embeddings`)
      -> driver    collects one (shard, described, failed) row per block

One stage, not a stat stage, the actors and a write stage: every stage of its own starts
Ray worker processes of its own on each job, and on a small node their start-up was most
of Ray's overhead; the vectors also never leave the actor that made them.

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
from cbir.distributed.embeddings import (
    EmbeddingsError,
    EmbeddingsFolder,
    contains,
    key_digests,
    rows_table,
    write_shard,
)
from cbir.models.descriptor import Descriptor
from cbir.runtime import DEFAULT_ENGINE, for_engine


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
# the describing actor: everything a block needs, in one process
# ----------------------------------------------------------------------------------------
def stat_rows(lines: list[str], base: str) -> tuple[list[str], list[int], list[int]]:
    """Absolute paths (relative lines resolved from ``base``), sizes and mtime_ns; -1 for a
    missing file, which is then reported, not skipped."""
    paths, sizes, mtimes = [], [], []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        path = os.path.abspath(os.path.join(base, line))
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        paths.append(path)
        sizes.append(size)
        mtimes.append(mtime)
    return paths, sizes, mtimes


class DescribeFiles:
    """The actor of the job's one stage: for each block of listed paths it stats them, drops
    the rows already written, hashes, decodes and describes the rest, and writes them as one
    shard. Doing all of it here starts no Ray worker process besides the actors (each one
    imports Ray and pyarrow: about 2 CPU-seconds, which a 2-core node pays in wall time),
    and moves no vectors through the object store."""

    def __init__(
        self,
        shipped: Any,
        base: str,
        shard_dir: str,
        batch_size: int,
        max_pixels: int | None,
        threads: int,
    ) -> None:
        """``shipped``: an object reference to (descriptor file bytes, engine, its ONNX files
        or None, sorted key digests of the rows already written), put in the object store
        once by the driver and fetched once per actor. The model loads on the first block
        with work, so a re-run of a finished job loads none."""
        import ray

        self._descriptor_file, self._engine, self._onnx_files, self._done = ray.get(shipped)
        self.base, self.shard_dir = base, shard_dir
        self.batch_size, self.max_pixels, self.cpus = batch_size, max_pixels, threads
        self.runner: Any = None

    def load(self) -> None:
        """The descriptor and its runner, laid out for the CPUs this actor holds."""
        from cbir.runtime import make_runner
        from cbir.runtime.device import auto_lanes

        self._dir = _actor_folder()
        weakref.finalize(self, shutil.rmtree, self._dir, True)  # at a graceful exit of the actor
        path = Path(self._dir) / "descriptor.cbir"
        path.write_bytes(self._descriptor_file)
        self.descriptor = Descriptor.load(path)
        if self._onnx_files:  # the driver's verified export (and int8 graph): none per actor
            for name, data in self._onnx_files.items():
                (Path(self._dir) / name).write_bytes(data)
            self.runner = make_runner(  # the CPUs it holds, laid out as one machine's cores
                self.descriptor, self._engine, cache_dir=self._dir, threads=self.cpus, lanes=auto_lanes(self.cpus),
                verbose=False,
            )  # fmt: skip
        else:
            import torch

            torch.set_num_threads(self.cpus)
            self.runner = make_runner(self.descriptor, "torch")
        # decoding too (the node's other CPUs belong to other actors); one thread beside lanes
        self.threads = 1 if self.runner.lanes > 1 else self.cpus

    def __call__(self, batch: Any) -> Any:
        """One block of listed paths in; one row (shard name, described, failed) out, or
        none when every path of the block is already written."""
        pa = require("pyarrow")
        paths, sizes, mtimes = stat_rows(batch.column(0).to_pylist(), self.base)
        keep = ~contains(self._done, key_digests(paths, sizes, mtimes))
        todo = [i for i in range(len(paths)) if keep[i]]
        if not todo:
            return pa.table({"shard": pa.array([], pa.string()), "described": pa.array([], pa.int64()),
                             "failed": pa.array([], pa.int64())})  # fmt: skip
        if self.runner is None:
            self.load()
        table = self.describe([paths[i] for i in todo], [sizes[i] for i in todo], [mtimes[i] for i in todo])
        described = table.column("error").null_count  # no error: described
        name = write_shard(self.shard_dir, table)
        return pa.table({"shard": [name], "described": [described], "failed": [table.num_rows - described]})

    def describe(self, paths: list[str], sizes: list[int], mtimes: list[int]) -> Any:
        """The shard's rows: each file's hash and vector, or the reason it has none."""
        from cbir.extract import iter_extract
        from cbir.index import file_sha256

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
def plan_blocks(rows: int, block_rows: int, actors: int) -> int:
    """How many blocks ``rows`` listed paths are cut into: at most ``block_rows`` each, and a
    multiple of ``actors``, so that equal blocks give every actor the same number and the
    job does not end with one actor working through a last block while the others idle
    (on 2 actors and 23 blocks of 1,024 images, ~13 s of one core)."""
    blocks = max(1, -(-rows // block_rows))
    return max(1, min(rows, -(-blocks // actors) * actors))


def _file_list(ray: Any, inputs: Sequence[str | os.PathLike], block_rows: int, actors: int) -> tuple[Any, str]:
    """A dataset of paths in :func:`plan_blocks` blocks: LIST.txt files read by Ray Data, or
    folders walked here and put in the object store (Ray starts no task for them)."""
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
        # blocks of about block_rows lines (Ray splits what each read task reads), so every
        # actor gets work; reading is I/O: a CPU of its own would wait for the actors
        blocks = plan_blocks(sum(_count_lines(p) for p in lists), block_rows, actors)
        ds = ray.data.read_text([os.path.abspath(p) for p in lists], num_cpus=0, override_num_blocks=blocks)
        return ds, bases.pop()
    paths: list[str] = []
    for p in others:
        try:
            paths.extend(os.path.abspath(f) for f in list_images(p))
        except FileNotFoundError as exc:
            raise EmbeddingsError(str(exc)) from exc
    if not paths:
        raise EmbeddingsError("no images found")
    pa = require("pyarrow")
    cuts = np.linspace(0, len(paths), plan_blocks(len(paths), block_rows, actors) + 1).round().astype(int)
    blocks = [pa.table({"text": pa.array(paths[a:b], pa.string())}) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return ray.data.from_arrow(blocks), "/"


def _count_lines(path: str) -> int:
    """Lines of a file list, counted in 1 MB chunks (a list of 10^7 paths is ~1 GB)."""
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n + 1


def _onnx_files(descriptor: Descriptor, engine: str) -> tuple[dict[str, bytes] | None, str]:
    """The verified ONNX export (exported here once, if not cached) and, for ``onnx-int8``,
    the int8 graph (quantised here once), shipped to the actors; None and ``torch`` when
    the fp32 ONNX engine cannot serve this descriptor. ``onnx-int8`` never falls back: its
    vectors are not the float engines' (``descriptor`` carries its numerics already)."""
    if engine not in ("onnx", "onnx-int8"):
        return None, "torch"
    from cbir.runtime import EngineUnavailable
    from cbir.runtime.onnx_runner import cached_model

    try:
        paths = [cached_model(descriptor)[0]]
    except EngineUnavailable as exc:
        if engine == "onnx-int8":
            raise
        print(f"onnx engine unavailable for {descriptor.describe_name()}: {exc}; using torch", file=sys.stderr)
        return None, "torch"
    if engine == "onnx-int8":
        from cbir.runtime.quantize import int8_model

        paths.append(int8_model(descriptor)[0])
    files = [f for p in paths for f in (p, p.with_suffix(".json"))]
    return {f.name: f.read_bytes() for f in files}, engine


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
    calibrate: str | os.PathLike | None = None,
    progress: bool = True,
) -> DistributedReport:
    """Describe every image of ``inputs`` (folders or LIST.txt files) on a Ray cluster into
    the embeddings folder ``out_dir``; rows already there (same path, size, mtime) are kept.

    ``workers``: describing actors (default: the cluster's CPUs / ``cpus_per_worker``);
    ``block_rows``: listed paths per actor call, i.e. per Parquet shard at most;
    ``calibrate``: the onnx-int8 engine's calibration images (quantised once, here).
    """
    from cbir.index.locks import BusyError, FileLock

    descriptor = for_engine(descriptor, engine, calibrate)  # the folder's identity says int8 or not

    start = time.perf_counter()
    folder = EmbeddingsFolder(out_dir)
    folder.root.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(folder.lock_path).hold():
            folder.prepare(descriptor)
            damaged = folder.clean()
            try:
                with ray_session(address) as ray:
                    shards, n_workers, used = _run_pipeline(
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
        described=sum(s[1] for s in shards),
        failed=sum(s[2] for s in shards),
        shards_written=len(shards),
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
) -> tuple[list[tuple[str, int, int]], int, str]:  # fmt: skip
    """Build and run the Ray Data pipeline; returns ((shard, described, failed) per shard
    written, actors, engine used)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress and sys.stderr.isatty()
    ctx.print_on_execution_start = False
    fits = max(1, int(cluster_cpus(ray) // max(cpus_per_worker, 1e-3)))
    n_workers = workers or fits
    onnx_files, used = _onnx_files(descriptor, engine)
    ds, base = _file_list(ray, inputs, block_rows, n_workers)
    shipped = ray.put((folder.descriptor_path.read_bytes(), used, onnx_files, folder.done_keys()))
    results = ds.map_batches(
        DescribeFiles,
        fn_constructor_kwargs={
            "shipped": shipped, "base": base, "shard_dir": os.fspath(folder.shard_dir),
            "batch_size": batch_size, "max_pixels": max_pixels, "threads": max(1, int(cpus_per_worker)),
        },
        batch_size=None, batch_format="pyarrow", num_cpus=cpus_per_worker,  # a block per call: a shard
        # one block at a time per actor: a block queued behind another actor's would leave
        # this one idle at the end of the job while that one works through its queue
        compute=ray.data.ActorPoolStrategy(
            min_size=min(n_workers, fits), max_size=n_workers, max_tasks_in_flight_per_actor=1
        ),
    )  # fmt: skip
    shards = [(r["shard"], int(r["described"]), int(r["failed"])) for r in results.iter_rows()]
    return shards, n_workers, used
