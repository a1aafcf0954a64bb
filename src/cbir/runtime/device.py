"""Where inference runs: CPU cores and the ``--device auto|cpu|cuda`` choice.

``auto`` means "the GPU when this engine can use one here": torch asks
``torch.cuda.is_available()``, ONNX Runtime asks whether its CUDA execution provider is
built in *and* a GPU is visible. ``cuda`` is a demand: when it cannot be met the run
stops with :class:`DeviceUnavailable` instead of quietly running on the CPU, whose
throughput is an order of magnitude different.
"""

from __future__ import annotations

import os

from cbir.errors import CbirError

DEVICES = ("auto", "cpu", "cuda")


class DeviceUnavailable(CbirError, RuntimeError):
    """``--device cuda`` was asked for and this engine cannot run on a GPU here."""

    exit_code = 2
    http_status = 503
    code = "device_unavailable"


def usable_cores() -> int:
    """Cores this process may run on (affinity masks and container CPU sets respected)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def torch_cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def ort_cuda_available() -> bool:
    """ONNX Runtime has its CUDA provider compiled in (onnxruntime-gpu) and a GPU is visible."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    return torch_cuda_available()


def resolve_device(device: str = "auto", engine: str = "torch") -> str:
    """``cpu`` or ``cuda`` for ``engine`` (``torch``, ``onnx``, ``onnx-int8``).

    Raises :class:`DeviceUnavailable` for ``cuda`` without a usable GPU and ``ValueError``
    for an unknown name.
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    available = torch_cuda_available() if engine == "torch" else ort_cuda_available()
    if device == "cuda" and not available:
        what = "torch.cuda.is_available() is False" if engine == "torch" else (
            "ONNX Runtime's CUDAExecutionProvider is not available (pip install onnxruntime-gpu) or no GPU is visible"
        )
        raise DeviceUnavailable(f"--device cuda with engine {engine}: {what}")
    return "cuda" if available else "cpu"
