"""Inference engines: how a descriptor's network runs, on which device.

One name, ``engine``, means the inference engine: ``torch`` (eager PyTorch, the
reference), ``onnx`` (ONNX Runtime, fp32, several times faster on CPUs) or ``onnx-int8``
(the same graph with a statically quantised backbone, see :mod:`cbir.runtime.quantize`).
:func:`make_runner` is the one entry point; :mod:`cbir.extract` only consumes the
:class:`Runner` it returns.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from typing import Any

from cbir.models.descriptor import Descriptor
from cbir.runtime.device import DEVICES, DeviceUnavailable, resolve_device, usable_cores
from cbir.runtime.runner import ENGINES, EngineUnavailable, Runner
from cbir.runtime.torch_runner import torch_runner


def _onnx_importable() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


#: ``onnx`` where ONNX Runtime imports (several times faster on CPUs), else ``torch``.
DEFAULT_ENGINE = "onnx" if _onnx_importable() else "torch"


class EngineMismatch(EngineUnavailable):
    """The engine asked for makes vectors of other numerics than the descriptor's (an index
    built with ``onnx-int8`` searched with ``onnx``, or the reverse)."""

    exit_code = 2
    code = "engine_mismatch"


def descriptor_engine(descriptor: Descriptor) -> str | None:
    """The engine a descriptor's numerics require (``onnx-int8``), None for float32 ones."""
    return (descriptor.numerics or {}).get("engine")


def for_engine(descriptor: Descriptor, engine: str, calibrate: str | os.PathLike | None = None) -> Descriptor:
    """``descriptor`` with the numerics ``engine`` gives its vectors: the identity callers
    record (an extraction's manifest, a new index) must say whether the vectors are int8."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "onnx-int8":
        if descriptor_engine(descriptor) == engine and calibrate is None:
            return descriptor
        from cbir.runtime.quantize import int8_descriptor

        return int8_descriptor(descriptor, calibrate)
    if descriptor.numerics:  # back to the float32 descriptor the int8 one was made from
        out = copy.copy(descriptor)
        out.numerics = None
        out.preprocess = dataclasses.replace(out.preprocess, resampler="pillow")
        return out
    return descriptor


def engine_for(descriptor: Descriptor, engine: str | None) -> str:
    """The engine to run ``descriptor`` with: ``engine``, or (None) the one its vectors
    need. Raises :class:`EngineMismatch` when ``engine`` makes other numerics."""
    needed = descriptor_engine(descriptor)
    if engine is None:
        return needed or DEFAULT_ENGINE
    if (engine == "onnx-int8") != (needed == "onnx-int8"):
        made = needed or "a float32 engine (torch or onnx)"
        raise EngineMismatch(
            f"{descriptor.describe_name()} vectors were made by {made}; --engine {engine} makes incomparable "
            f"vectors: use --engine {needed or DEFAULT_ENGINE} (or leave --engine out)"
        )
    return engine


def make_runner(descriptor: Descriptor, engine: str = DEFAULT_ENGINE, **options: Any) -> Runner:
    """The runner of ``engine`` for ``descriptor``.

    ``options``: ``device`` (auto|cpu|cuda) for every engine; ``threads``, ``lanes``
    (concurrent calls that split the cores: 1 by default, ``auto`` for bulk extraction),
    ``cache_dir``, ``verbose`` for the ONNX engines; ``calibrate`` (a folder of images)
    for ``onnx-int8``. The torch engine always has one lane.

    When the fp32 ONNX engine cannot serve a descriptor (ONNX Runtime missing, an export
    that fails or disagrees with torch), the run goes on with torch and says so on
    stderr: the vectors are the same either way (checked to cosine 0.9999), only the
    speed differs, and the returned runner's ``engine`` says ``torch``. ``onnx-int8``
    never falls back: its vectors differ from fp32 ones, so a silent substitute would
    give an index vectors of another identity.
    """
    device = options.pop("device", "auto")
    calibrate = options.pop("calibrate", None)
    engine_for(descriptor, engine)  # never int8 vectors from a float engine, or the reverse
    if engine == "torch":  # torch's thread pool is per process: one call at a time
        return torch_runner(descriptor, device=device)
    if engine == "onnx":
        from cbir.runtime.onnx_runner import onnx_runner  # imported lazily: optional path

        try:
            return onnx_runner(descriptor, device=device, **options)
        except EngineUnavailable as exc:
            name = descriptor.describe_name()
            print(f"onnx engine unavailable for {name}: {exc}; using torch", file=sys.stderr)
            return torch_runner(descriptor, device=device)
    if engine == "onnx-int8":
        from cbir.runtime.quantize import int8_runner  # imported lazily: optional path

        return int8_runner(descriptor, device=device, calibrate=calibrate, **options)
    raise ValueError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")


__all__ = [
    "DEFAULT_ENGINE",
    "DEVICES",
    "ENGINES",
    "DeviceUnavailable",
    "EngineMismatch",
    "EngineUnavailable",
    "Runner",
    "descriptor_engine",
    "engine_for",
    "for_engine",
    "make_runner",
    "resolve_device",
    "torch_runner",
    "usable_cores",
]
