"""Extraction: many image files -> a float32 descriptor matrix, a row order and a failure list.

The pipeline is built for CPUs, where the model and the JPEG decoder compete for the
same few cores:

- **Decoding** runs in worker processes (``fork``ed before any work, so they start in
  milliseconds and hold no model). A worker decodes a whole planned batch, using JPEG
  draft mode to decode at the smallest DCT scale that is still at least the target size,
  and hands back one stacked uint8 array (cheap to pass between processes).
- **Batches are planned before decoding.** With ``squash``/``crop`` resizing every image
  has the same tensor size, so a batch is just the next ``batch_size`` files. With
  ``keep`` (aspect kept) the workers first read the image headers of a window of files
  and the planner groups files of equal output size, so batches stay full instead of
  being split into one small batch per aspect ratio.
- **The model runs while the next batches decode**: at most ``2 * workers + 2`` batches are
  in flight, which bounds memory whatever the number of images.
- **Threads**: the engine gets every core (ONNX Runtime's idle threads sleep instead of
  spinning); there is one decode process per core minus one, at least one. Earlier
  versions ran a DataLoader with one worker per core, a deep prefetch queue and torch's
  own intra-op threads: on 2 cores that oversubscription showed up as minutes of
  system time.
- **Two cores or fewer: lanes.** There a decode process can only run on a core the model's
  threads also want, and a parallel region waits for the preempted thread. So the default
  there is no worker process (``workers=0``) and an ONNX runner with two lanes: two
  one-thread model calls run at once on their own batches (:func:`_described`) while this
  process decodes the next batch on one thread (Pillow releases the GIL while it decodes
  and resizes). On 1,280 gpr-mini images this took the fp32 ONNX engine from 72% to 89%
  of its best model-only rate and int8 from 72% to 82%
  (docs/benchmarks/2026-12-03-speed.md). ``--workers N`` keeps decoding in N separate
  processes, which also isolates a decoder crash from the job.

A file that fails to decode is recorded with its reason and the run goes on.
:func:`iter_extract` yields batches as they finish (the index commits each one, so an
interrupted job loses at most one batch); :func:`extract` collects them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir.data.decode import DEFAULT_MAX_PIXELS, DecodeError, image_size, load_image, load_pixels
from cbir.data.transforms import Preprocess
from cbir.fileio import atomic_numpy_save, atomic_write_text
from cbir.models.descriptor import Descriptor
from cbir.runtime import DEFAULT_ENGINE, Runner, for_engine, make_runner, usable_cores
from cbir.runtime.device import AUTO_LANES_MAX_CORES

Box = tuple[float, float, float, float]


@dataclass
class Failure:
    """A file that was skipped, and why."""

    path: str
    reason: str


@dataclass
class Batch:
    """Descriptors for ``indices`` (positions in the input list)."""

    indices: list[int]
    vectors: np.ndarray
    failures: list[tuple[int, Failure]] = field(default_factory=list)


@dataclass
class ExtractionResult:
    features: np.ndarray
    paths: list[str]
    failures: list[Failure]
    seconds: float
    descriptor: dict[str, Any] = field(default_factory=dict)
    #: what ran the model: ``engine`` (torch, onnx, onnx-int8) and ``device`` (cpu, cuda)
    runtime: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        n = len(self.paths) + len(self.failures)
        return n / self.seconds if self.seconds > 0 else float("nan")

    def manifest(self) -> dict[str, Any]:
        return {
            "files": self.paths,
            "failures": [asdict(f) for f in self.failures],
            "descriptor": self.descriptor,
            "shape": list(self.features.shape),
            "runtime": self.runtime,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
        }

    def save(self, out: str | os.PathLike) -> Path:
        """Write ``out`` (.npy, rows in manifest order) and ``out`` with .json (the manifest)."""
        out = Path(out)
        atomic_numpy_save(out, self.features)
        manifest = out.with_suffix(".json")
        atomic_write_text(manifest, json.dumps(self.manifest(), indent=1))
        return manifest


def crop_box(img, box: Box):
    """Crop to (x1, y1, x2, y2) in pixels, clipped to the image, at least 1 x 1."""
    w, h = img.size
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = max(0, min(w - 1, int(round(x1)))), max(1, min(w, int(round(x2))))
    y1, y2 = max(0, min(h - 1, int(round(y1)))), max(1, min(h, int(round(y2))))
    return img.crop((x1, y1, max(x1 + 1, x2), max(y1 + 1, y2)))


#: At most this many usable cores: decode in this process while the model runs in lanes
#: (module docstring, "Two cores or fewer").
IN_PROCESS_MAX_CORES = AUTO_LANES_MAX_CORES


def default_workers() -> int:
    """Decode processes: one per core minus the one the model mostly occupies, 1 to 8; none
    on :data:`IN_PROCESS_MAX_CORES` cores or fewer (decoded in-process beside the lanes)."""
    cores = usable_cores()
    return 0 if cores <= IN_PROCESS_MAX_CORES else min(8, cores - 1)


# ----------------------------------------------------------------------------------------
# decode workers (run in child processes; plain data in, plain data out)
# ----------------------------------------------------------------------------------------
@dataclass
class _Task:
    """One planned batch: files to decode, resize and stack."""

    indices: list[int]
    paths: list[str]
    boxes: list[Box | None]
    preprocess: Preprocess
    max_pixels: int | None


#: (shape, indices, stacked uint8 array) groups and (index, reason) failures of one task.
_Decoded = tuple[list[tuple[tuple[int, ...], list[int], np.ndarray]], list[tuple[int, str]]]


def _decode_one(
    path: str, box: Box | None, preprocess: Preprocess, max_pixels: int | None
) -> np.ndarray:
    if box is None:
        return preprocess.to_array(load_pixels(path, max_pixels=max_pixels, target_size=preprocess.resized_size))
    return preprocess.to_array(crop_box(load_image(path, max_pixels=max_pixels), box))


def _decode_or_reason(
    path: str, box: Box | None, preprocess: Preprocess, max_pixels: int | None
) -> np.ndarray | str:
    """The image's array, or why it could not be decoded."""
    try:
        return _decode_one(path, box, preprocess, max_pixels)
    except DecodeError as exc:
        return exc.reason
    except Exception as exc:  # a resize of a degenerate image, etc.: report, don't die
        return f"{type(exc).__name__}: {exc}"


def _decode_task(task: _Task, threads: Executor | None = None) -> _Decoded:
    """Decode a planned batch (its files spread over ``threads`` when given: in-process
    decoding); images of an unexpected size form their own groups."""
    def one(path: str, box: Box | None) -> np.ndarray | str:
        return _decode_or_reason(path, box, task.preprocess, task.max_pixels)

    if threads is not None and len(task.paths) > 1:
        decoded = list(threads.map(one, task.paths, task.boxes))
    else:
        decoded = [one(p, b) for p, b in zip(task.paths, task.boxes, strict=True)]
    groups: dict[tuple[int, ...], tuple[list[int], list[np.ndarray]]] = {}
    failures: list[tuple[int, str]] = []
    for i, arr in zip(task.indices, decoded, strict=True):
        if isinstance(arr, str):
            failures.append((i, arr))
            continue
        idx, arrays = groups.setdefault(arr.shape, ([], []))
        idx.append(i)
        arrays.append(arr)
    out = [(shape, idx, np.stack(arrays)) for shape, (idx, arrays) in groups.items()]
    return out, failures


def _header_sizes(paths: list[str]) -> list[tuple[int, int] | None]:
    """Upright (width, height) from each file's header; None where it cannot be read."""
    sizes: list[tuple[int, int] | None] = []
    for p in paths:
        try:
            sizes.append(image_size(p))
        except DecodeError:
            sizes.append(None)  # decoded (and its failure explained) like any other file
    return sizes


class _InlineExecutor(Executor):
    """Runs tasks at submission, in this process (``workers=0``: the default on two cores
    or fewer, and for tests and debugging)."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            fut.set_exception(exc)
        return fut


def _make_pool(workers: int) -> Executor:
    if workers <= 0:
        return _InlineExecutor()
    methods = multiprocessing.get_all_start_methods()
    # fork: workers start at once and inherit the imported modules; they only run
    # Pillow and NumPy, never the model, so the parent's thread pools do not matter
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    from cbir.workers import init_worker  # workers die with us and never hold our locks

    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker, initargs=(os.getpid(),))


# ----------------------------------------------------------------------------------------
# planning
# ----------------------------------------------------------------------------------------
def _chunks(seq: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(seq), size):
        yield list(seq[start : start + size])


def _plan_window(
    window: list[int],
    sizes: list[tuple[int, int] | None] | None,
    boxes: Sequence[Box | None] | None,
    preprocess: Preprocess,
    batch_size: int,
) -> list[list[int]]:
    """Cut a window of file indices into batches of equal output size where known."""
    if sizes is None:  # every output has the same size: input order
        return list(_chunks(window, batch_size))
    by_shape: dict[tuple[int, int], list[int]] = {}
    unknown: list[int] = []
    for i, size in zip(window, sizes, strict=True):
        if size is None or (boxes is not None and boxes[i] is not None):
            unknown.append(i)  # header unreadable, or a crop box: size known after decoding
        else:
            by_shape.setdefault(preprocess.output_size(*size), []).append(i)
    plan: list[list[int]] = []
    for shape in sorted(by_shape):
        plan.extend(_chunks(by_shape[shape], batch_size))
    plan.extend(_chunks(unknown, batch_size))
    return plan


def decoded_batches(
    paths: Sequence[str],
    preprocess: Preprocess,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    boxes: Sequence[Box | None] | None = None,
    window: int | None = None,
    threads: int | None = None,
) -> Iterator[tuple[list[int], np.ndarray | None, list[tuple[int, str]]]]:
    """Yield (indices, uint8 B x H x W x 3 or None, failures) in a deterministic order.

    Decoding runs ``workers`` processes ahead of the consumer with at most
    ``2 * workers + 2`` batches in flight; ``window`` files (default 16 batches) are
    planned at a time when the output size depends on the image (``keep``). With
    ``workers=0`` each batch is decoded in this process when the consumer asks for it, by
    ``threads`` threads (default: one per usable core).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    paths = [os.fspath(p) for p in paths]
    if boxes is not None and len(boxes) != len(paths):
        raise ValueError(f"{len(boxes)} boxes for {len(paths)} files")
    workers = default_workers() if workers is None else max(0, workers)
    window = window or 16 * batch_size
    variable = preprocess.resize == "keep"
    order = list(range(len(paths)))
    windows = list(_chunks(order, window))
    max_inflight = 2 * workers + 2
    pool = _make_pool(workers)
    n_threads = 1 if workers else max(1, usable_cores() if threads is None else threads)
    decode_threads = ThreadPoolExecutor(n_threads, thread_name_prefix="cbir-decode") if n_threads > 1 else None

    def submit_headers(win: list[int]) -> list[Future]:
        return [pool.submit(_header_sizes, [paths[i] for i in part]) for part in _chunks(win, 128)]

    def submit_task(indices: list[int]) -> Future:
        task = _Task(
            indices=indices,
            paths=[paths[i] for i in indices],
            boxes=[boxes[i] for i in indices] if boxes is not None else [None] * len(indices),
            preprocess=preprocess,
            max_pixels=max_pixels,
        )
        return pool.submit(_decode_task, task, decode_threads)

    def finish(fut: Future) -> Iterator[tuple[list[int], np.ndarray | None, list[tuple[int, str]]]]:
        try:
            groups, failures = fut.result()
        except BrokenProcessPool as exc:
            raise RuntimeError(
                "a decode worker died (out of memory, or a crash inside an image decoder); "
                "rerun with --workers 0 to find the file"
            ) from exc
        if not groups:
            yield [], None, failures
        for k, (_shape, indices, arrays) in enumerate(groups):
            yield indices, arrays, failures if k == 0 else []

    pending: deque[Future] = deque()
    try:
        headers = submit_headers(windows[0]) if variable and windows else None
        for w, win in enumerate(windows):
            sizes = [s for f in headers for s in f.result()] if headers is not None else None
            if variable and w + 1 < len(windows):  # read the next window's headers early
                headers = submit_headers(windows[w + 1])
            for indices in _plan_window(win, sizes, boxes, preprocess, batch_size):
                while len(pending) >= max_inflight:
                    yield from finish(pending.popleft())
                pending.append(submit_task(indices))
        while pending:
            yield from finish(pending.popleft())
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        if decode_threads is not None:
            decode_threads.shutdown(wait=True)


# ----------------------------------------------------------------------------------------
# extraction
# ----------------------------------------------------------------------------------------
def iter_extract(
    descriptor: Descriptor,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 32,
    workers: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    engine: str = DEFAULT_ENGINE,
    device: str = "auto",
    calibrate: str | os.PathLike | None = None,
    runner: Runner | None = None,
    boxes: Sequence[Box | None] | None = None,
    progress: bool = True,
    desc: str = "describing",
    threads: int | None = None,
) -> Iterator[Batch]:
    """Yield :class:`Batch` objects as they are computed (order: planned batches).

    ``engine`` (torch, onnx, onnx-int8) and ``device`` (auto, cpu, cuda) choose the
    runner unless ``runner`` is given (an ONNX runner made here has ``lanes="auto"``:
    on two cores, two one-thread model calls side by side); ``calibrate``: the onnx-int8
    calibration folder; ``threads``: decoding threads with ``workers=0`` (default: one
    per usable core, or one when the runner has several lanes, which decode overlaps)."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        return
    if runner is None:
        descriptor = for_engine(descriptor, engine, calibrate)
    run = runner or _default_runner(descriptor, engine, device, calibrate)
    lanes = getattr(run, "lanes", 1)  # a plain callable has one
    bar = _progress(len(paths), desc, progress)
    stream = decoded_batches(
        paths, descriptor.preprocess, batch_size=batch_size, workers=workers,
        max_pixels=max_pixels, boxes=boxes, threads=threads if threads or lanes == 1 else 1,
    )  # fmt: skip
    described = _described(stream, run, lanes)
    try:
        for indices, vectors, failures in described:
            if vectors is None:
                vectors = np.zeros((0, descriptor.dim), np.float32)
            fails = [(i, Failure(paths[i], r)) for i, r in failures]
            bar.update(len(indices) + len(fails))
            if progress:
                for _, f in fails:
                    bar.write(f"skipped {f.path}: {f.reason}")
            yield Batch(indices=indices, vectors=vectors, failures=fails)
    finally:
        described.close()
        stream.close()
        bar.close()


def _default_runner(descriptor: Descriptor, engine: str, device: str, calibrate: Any) -> Runner:
    """The runner bulk extraction makes when none is given: ``lanes="auto"`` (on two cores, two
    one-thread ONNX calls side by side)."""
    return make_runner(descriptor, engine, device=device, calibrate=calibrate, lanes="auto")


_Described = tuple[list[int], np.ndarray | None, list[tuple[int, str]]]


def _described(
    stream: Iterator[tuple[list[int], np.ndarray | None, list[tuple[int, str]]]], run: Any, lanes: int
) -> Iterator[_Described]:
    """(indices, float32 vectors or None, failures) of each decoded batch, in order.

    With ``lanes`` > 1 up to that many batches are in the model at once, each call on its
    own thread (and its share of the cores), while this thread decodes the next batch:
    on a small machine every core stays busy and no parallel region waits for a thread
    the decoder preempted. At most ``lanes`` batches are described ahead of the consumer.
    """
    if lanes <= 1:
        for indices, arrays, failures in stream:
            yield indices, None if arrays is None else np.asarray(run(arrays), dtype=np.float32), failures
        return
    pool = ThreadPoolExecutor(lanes, thread_name_prefix="cbir-lane")
    pending: deque[tuple[list[int], Future | None, list[tuple[int, str]]]] = deque()

    def done(item: tuple[list[int], Future | None, list[tuple[int, str]]]) -> _Described:
        indices, fut, failures = item
        return indices, None if fut is None else np.asarray(fut.result(), dtype=np.float32), failures

    try:
        for indices, arrays, failures in stream:
            while len(pending) >= lanes:
                yield done(pending.popleft())
            pending.append((indices, None if arrays is None else pool.submit(run, arrays), failures))
        while pending:
            yield done(pending.popleft())
    finally:
        for _, fut, _ in pending:
            if fut is not None:
                fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, leave=False
    )


def extract(
    descriptor: Descriptor,
    paths: Sequence[str | os.PathLike],
    **kwargs: Any,
) -> ExtractionResult:
    """Describe every file; rows follow the input order with failed files left out."""
    paths = [os.fspath(p) for p in paths]
    start = time.perf_counter()  # the runner's set-up (an export, a session) counts, as in iter_extract
    run = kwargs.get("runner")
    if run is None:  # the identity recorded must say which numerics made the vectors
        engine, calibrate = kwargs.get("engine", DEFAULT_ENGINE), kwargs.get("calibrate")
        descriptor = for_engine(descriptor, engine, calibrate)
        if paths:  # made here, not in iter_extract, so the result can say what ran
            run = kwargs["runner"] = _default_runner(descriptor, engine, kwargs.get("device", "auto"), calibrate)
    feats = np.zeros((len(paths), descriptor.dim), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    failures: list[tuple[int, Failure]] = []
    for batch in iter_extract(descriptor, paths, **kwargs):
        if batch.indices:
            feats[batch.indices] = batch.vectors
            ok[batch.indices] = True
        failures.extend(batch.failures)
    seconds = time.perf_counter() - start
    failures.sort(key=lambda t: t[0])
    keep = np.flatnonzero(ok)
    return ExtractionResult(
        features=feats[keep],
        paths=[paths[i] for i in keep],
        failures=[f for _, f in failures],
        seconds=seconds,
        descriptor={
            "name": descriptor.describe_name(),
            "identity": descriptor.identity(),
            **descriptor.spec(),
        },
        runtime={k: getattr(run, k) for k in ("engine", "device") if hasattr(run, k)},
    )
