"""The ONNX Runtime engine (fp32).

``onnx_runner(descriptor)`` returns a :class:`~cbir.runtime.runner.Runner` like
:func:`cbir.runtime.torch_runner.torch_runner`. The first call for a descriptor exports
it (see :mod:`cbir.runtime.export`) into a cache keyed by
:meth:`~cbir.models.descriptor.Descriptor.identity`; later calls, in any process, load
the cached file. ONNX Runtime's CPU kernels are several times faster than torch eager
for small CNNs such as EfficientNet-Lite at batch sizes of a few dozen.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cbir.models.descriptor import Descriptor
from cbir.runtime.device import plan_lanes, resolve_device
from cbir.runtime.export import ExportInfo, cache_key, default_cache_dir, export_onnx
from cbir.runtime.runner import EngineUnavailable, Runner, read_cached_model
from cbir.runtime.session import cached_session, run_session


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
        raise EngineUnavailable("onnxruntime is not installed (pip install 'cbir[onnx]')")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"{cache_key(descriptor)}.onnx"
    cached = read_cached_model(path, ExportInfo)
    if cached is not None:
        return cached
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


def session_runner(
    descriptor: Descriptor, path: Path, info: ExportInfo, *, engine: str, device: str,
    threads: int | None, spinning: bool, lanes: int | str | None = 1,
) -> Runner:
    """A :class:`Runner` over the ONNX file ``path`` (fp32 or int8: same inputs and outputs).

    ``lanes`` > 1: the cores are split between that many concurrent calls, which share
    one session (ONNX Runtime's ``run`` is thread-safe and releases the GIL)."""
    where = resolve_device(device, engine)
    n_lanes, threads = plan_lanes(lanes, threads, where)
    try:
        session = cached_session(path, threads=threads, spinning=spinning, device=where)
    except EngineUnavailable:
        raise
    except Exception as exc:  # a damaged cache file: say which one to delete
        if type(exc).__name__ == "DeviceUnavailable":
            raise
        raise EngineUnavailable(f"cannot load {path} ({exc}); delete it to re-export") from exc
    descriptor.eval()
    size = tuple(info.input_size) if info.input_size else None

    fallback: Runner | None = None

    def run(batch: np.ndarray) -> np.ndarray:
        nonlocal fallback
        if size is not None and tuple(batch.shape[1:3]) != size:
            # the resize policy always gives `size`; only a caller passing its own arrays
            # gets here. fp32 vectors are torch's, so torch serves them; int8 vectors are
            # not, and mixing the two in one result is what the identity exists to prevent
            if engine != "onnx":
                raise ValueError(f"the {engine} graph takes {size[0]} x {size[1]} images, got {batch.shape[1:3]}")
            if fallback is None:
                from cbir.runtime.torch_runner import torch_runner

                fallback = torch_runner(descriptor, device=where)
            return fallback(batch)
        return run_session(session, descriptor, batch)

    return Runner(run, engine=engine, device=where, providers=list(session.get_providers()), lanes=n_lanes)


def onnx_runner(
    descriptor: Descriptor,
    *,
    threads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    spinning: bool = False,
    verbose: bool = True,
    device: str = "cpu",
    lanes: int | str | None = 1,
    **_: Any,
) -> Runner:
    """Run ``descriptor`` with ONNX Runtime (fp32, all graph optimisations).

    ``threads``: ONNX Runtime intra-op threads (default: every usable core; the decode
    workers run beside them because ORT threads sleep instead of spinning while idle),
    split between ``lanes`` concurrent calls (``auto``: see :func:`plan_lanes`).
    """
    path, info = cached_model(descriptor, cache_dir, verbose=verbose)
    return session_runner(descriptor, path, info, engine="onnx", device=device, threads=threads, spinning=spinning,
                          lanes=lanes)  # fmt: skip
