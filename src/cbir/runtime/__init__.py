"""Inference engines: how a descriptor's network runs, on which device.

One name, ``engine``, means the inference engine: ``torch`` (eager PyTorch, the
reference), ``onnx`` (ONNX Runtime, fp32, several times faster on CPUs) or ``onnx-int8``
(the same graph with a statically quantised backbone, see :mod:`cbir.runtime.quantize`).
:func:`make_runner` is the one entry point; :mod:`cbir.extract` only consumes the
:class:`Runner` it returns.
"""

from __future__ import annotations

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


def make_runner(descriptor: Descriptor, engine: str = DEFAULT_ENGINE, **options: Any) -> Runner:
    """The runner of ``engine`` for ``descriptor``.

    ``options``: ``device`` (auto|cpu|cuda) for every engine; ``threads``, ``cache_dir``,
    ``verbose`` for the ONNX engines; ``calibrate`` (a folder of images) for ``onnx-int8``.

    When the fp32 ONNX engine cannot serve a descriptor (ONNX Runtime missing, an export
    that fails or disagrees with torch), the run goes on with torch and says so on
    stderr: the vectors are the same either way (checked to cosine 0.9999), only the
    speed differs, and the returned runner's ``engine`` says ``torch``. ``onnx-int8``
    never falls back: its vectors differ from fp32 ones, so a silent substitute would
    give an index vectors of another identity.
    """
    device = options.pop("device", "cpu")
    if engine == "torch":
        return torch_runner(descriptor, device=device)
    if engine == "onnx":
        from cbir.runtime.onnx_runner import onnx_runner  # imported lazily: optional path

        try:
            return onnx_runner(descriptor, device=device, **options)
        except EngineUnavailable as exc:
            name = descriptor.describe_name()
            print(f"onnx engine unavailable for {name}: {exc}; using torch", file=sys.stderr)
            return torch_runner(descriptor, device=device)
    raise ValueError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")


__all__ = [
    "DEFAULT_ENGINE",
    "DEVICES",
    "ENGINES",
    "DeviceUnavailable",
    "EngineUnavailable",
    "Runner",
    "make_runner",
    "resolve_device",
    "torch_runner",
    "usable_cores",
]
