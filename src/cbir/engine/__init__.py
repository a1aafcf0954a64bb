"""Inference engines beyond torch eager: the ONNX Runtime engine.

``onnx_runner(descriptor)`` returns the same kind of callable as
:func:`cbir.extract.torch_runner` (uint8 B x H x W x 3 -> float32 B x D). The first call
for a descriptor exports it (see :mod:`cbir.engine.export`) into a cache keyed by
:meth:`~cbir.models.descriptor.Descriptor.identity`; later calls, in any process, load
the cached file. ONNX Runtime's CPU kernels are several times faster than torch eager
for small CNNs such as EfficientNet-Lite at batch sizes of a few dozen.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cbir.engine.export import (
    MIN_COSINE,
    EngineUnavailable,
    ExportInfo,
    cache_key,
    default_cache_dir,
    export_onnx,
    graph_kind,
    make_session,
    run_session,
    usable_cores,
)
from cbir.models.descriptor import Descriptor

Runner = Callable[[np.ndarray], np.ndarray]


def onnx_available() -> bool:
    """True when ONNX Runtime and the exporter's dependencies import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cached_model(
    descriptor: Descriptor, cache_dir: str | os.PathLike | None = None, *, verbose: bool = True
) -> tuple[Path, ExportInfo]:
    """The verified ONNX file for ``descriptor``, exporting it on first use.

    Raises :class:`EngineUnavailable` when the export failed or disagreed with torch
    (that verdict is cached too, so the check is not repeated on every run).
    """
    if not onnx_available():
        raise EngineUnavailable("onnxruntime is not installed (pip install onnxruntime)")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"{cache_key(descriptor)}.onnx"
    meta = path.with_suffix(".json")
    if meta.is_file():
        try:
            info = ExportInfo(**json.loads(meta.read_text()))
        except (ValueError, TypeError):
            info = None
        if info is not None and not info.usable:
            raise EngineUnavailable(info.reason)
        if info is not None and path.is_file():
            return path, info
    if verbose:
        print(f"exporting {descriptor.describe_name()} to ONNX ({path}) ...", file=sys.stderr)
    try:
        info = export_onnx(descriptor, path)
    except EngineUnavailable:
        raise
    except Exception as exc:  # the tracer or ORT rejected this model: report, use torch
        raise EngineUnavailable(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    if not info.usable:
        raise EngineUnavailable(info.reason)
    return path, info


def onnx_runner(
    descriptor: Descriptor,
    *,
    threads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    spinning: bool = False,
    verbose: bool = True,
) -> Runner:
    """Run ``descriptor`` with ONNX Runtime (fp32, all graph optimisations).

    ``threads``: ONNX Runtime intra-op threads (default: every usable core; the decode
    workers run beside them because ORT threads sleep instead of spinning while idle).
    """
    path, info = cached_model(descriptor, cache_dir, verbose=verbose)
    try:
        session = make_session(path, threads=threads, spinning=spinning)
    except Exception as exc:  # a damaged cache file: say which one to delete
        raise EngineUnavailable(f"cannot load {path} ({exc}); delete it to re-export") from exc
    descriptor.eval()
    size = tuple(info.input_size) if info.input_size else None
    fallback: Runner | None = None

    def run(batch: np.ndarray) -> np.ndarray:
        nonlocal fallback
        if size is not None and tuple(batch.shape[1:3]) != size:
            # a fixed-size graph and an image of another size (the resize policy always
            # gives `size`, so only a caller passing its own arrays gets here): torch
            if fallback is None:
                from cbir.extract import torch_runner

                fallback = torch_runner(descriptor)
            return fallback(batch)
        return run_session(session, descriptor, batch)

    run.engine = "onnx"  # type: ignore[attr-defined]
    return run


__all__ = [
    "MIN_COSINE",
    "EngineUnavailable",
    "ExportInfo",
    "cache_key",
    "cached_model",
    "default_cache_dir",
    "export_onnx",
    "graph_kind",
    "onnx_available",
    "onnx_runner",
    "usable_cores",
]
