"""Extraction: many image files -> a float32 descriptor matrix, a row order and a failure list.

Decoding runs in worker processes (``torch.utils.data.DataLoader``), which hand back
resized uint8 arrays (cheap to pass between processes); the model runs in the main
process on batches of equal-shaped images while the workers decode the next ones.
A file that fails to decode is recorded with its reason and the run goes on.

:func:`iter_extract` yields batches as they finish (the index commits each one, so an
interrupted job loses at most one batch); :func:`extract` collects them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cbir.data.decode import DEFAULT_MAX_PIXELS, DecodeError, load_image
from cbir.data.transforms import Preprocess
from cbir.fileio import atomic_numpy_save, atomic_write_text
from cbir.models.descriptor import Descriptor

#: A runner maps a uint8 batch (B x H x W x 3) to float32 descriptors (B x D).
DEFAULT_ENGINE = "torch"

Runner = Callable[[np.ndarray], np.ndarray]
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


class _DecodeDataset(Dataset):
    """Decodes and resizes one file; returns (index, uint8 array or None, reason)."""

    def __init__(self, paths: Sequence[str], preprocess: Preprocess, max_pixels: int | None, boxes: Sequence[Box | None] | None) -> None:
        self.paths = [os.fspath(p) for p in paths]
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        path = self.paths[i]
        box = self.boxes[i] if self.boxes is not None else None
        try:
            if box is None:
                img = load_image(path, max_pixels=self.max_pixels, target_size=self.preprocess.resized_size)
            else:
                img = load_image(path, max_pixels=self.max_pixels)
                img = crop_box(img, box)
            return i, self.preprocess.to_array(img), None
        except DecodeError as exc:
            return i, None, exc.reason
        except Exception as exc:  # a resize of a degenerate image, etc.: report, don't die
            return i, None, f"{type(exc).__name__}: {exc}"


def crop_box(img, box: Box):
    """Crop to (x1, y1, x2, y2) in pixels, clipped to the image, at least 1 x 1."""
    w, h = img.size
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = max(0, min(w - 1, int(round(x1)))), max(1, min(w, int(round(x2))))
    y1, y2 = max(0, min(h - 1, int(round(y1)))), max(1, min(h, int(round(y2))))
    return img.crop((x1, y1, max(x1 + 1, x2), max(y1 + 1, y2)))


def default_workers() -> int:
    """Decode workers: one per core (the model's threads overlap with them)."""
    return max(1, min(8, os.cpu_count() or 1))


def torch_runner(descriptor: Descriptor) -> Runner:
    """Run the descriptor with PyTorch eager on the CPU."""
    descriptor.eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = descriptor.preprocess.normalize(torch.from_numpy(batch))
            return descriptor(x).float().numpy()

    return run


def make_runner(descriptor: Descriptor, engine: str = "torch", **options: Any) -> Runner:
    """Pick the inference engine: ``torch`` or ``onnx`` (ONNX Runtime, see :mod:`cbir.engine`)."""
    if engine == "torch":
        return torch_runner(descriptor)
    if engine == "onnx":
        from cbir.engine import onnx_runner  # optional dependency path

        return onnx_runner(descriptor, **options)
    raise ValueError(f"unknown engine {engine!r}: use 'torch' or 'onnx'")


def _shape_batches(
    items: Iterable[tuple[int, np.ndarray | None, str | None]], batch_size: int, max_buffered: int
) -> Iterator[tuple[list[int], list[np.ndarray], list[tuple[int, str]]]]:
    """Group decoded images by shape into batches; memory stays bounded by ``max_buffered``."""
    buckets: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    buffered = 0
    failures: list[tuple[int, str]] = []
    for i, arr, reason in items:
        if arr is None:
            failures.append((i, reason or "unknown error"))
            continue
        bucket = buckets.setdefault(arr.shape, [])
        bucket.append((i, arr))
        buffered += 1
        if len(bucket) >= batch_size:
            yield [j for j, _ in bucket], [a for _, a in bucket], failures
            failures = []
            buffered -= len(bucket)
            del buckets[arr.shape]
        elif buffered >= max_buffered:
            shape = max(buckets, key=lambda s: len(buckets[s]))
            flushed = buckets.pop(shape)
            buffered -= len(flushed)
            yield [j for j, _ in flushed], [a for _, a in flushed], failures
            failures = []
    for flushed in buckets.values():
        yield [j for j, _ in flushed], [a for _, a in flushed], failures
        failures = []
    if failures:
        yield [], [], failures


def iter_extract(
    descriptor: Descriptor,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 32,
    workers: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    engine: str = "torch",
    runner: Runner | None = None,
    boxes: Sequence[Box | None] | None = None,
    progress: bool = True,
    desc: str = "describing",
) -> Iterator[Batch]:
    """Yield :class:`Batch` objects as they are computed (order: by shape, then input)."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        return
    run = runner or make_runner(descriptor, engine)
    workers = default_workers() if workers is None else workers
    dataset = _DecodeDataset(paths, descriptor.preprocess, max_pixels, boxes)
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=lambda x: x,
        prefetch_factor=4 * batch_size if workers > 0 else None,
        persistent_workers=False,
    )
    bar = _progress(len(paths), desc, progress)
    try:
        for indices, arrays, failures in _shape_batches(loader, batch_size, max_buffered=4 * batch_size):
            vectors = run(np.stack(arrays)) if arrays else np.zeros((0, descriptor.dim), np.float32)
            fails = [(i, Failure(paths[i], r)) for i, r in failures]
            bar.update(len(indices) + len(fails))
            for _, f in fails:
                bar.write(f"skipped {f.path}: {f.reason}") if progress else None
            yield Batch(indices=indices, vectors=np.asarray(vectors, dtype=np.float32), failures=fails)
    finally:
        bar.close()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, leave=False)


def extract(
    descriptor: Descriptor,
    paths: Sequence[str | os.PathLike],
    **kwargs: Any,
) -> ExtractionResult:
    """Describe every file; rows follow the input order with failed files left out."""
    paths = [os.fspath(p) for p in paths]
    start = time.perf_counter()
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
        descriptor={"name": descriptor.describe_name(), "identity": descriptor.identity(), **descriptor.spec()},
    )
