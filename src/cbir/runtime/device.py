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


#: ``lanes="auto"`` runs one single-threaded model call per core on machines with at most
#: this many cores: there a model on every core stalls whenever the decoder preempts one
#: of its threads (docs/benchmarks/2026-12-03-speed.md); more cores were not measured.
AUTO_LANES_MAX_CORES = 2


def auto_lanes(cores: int) -> int:
    """Lanes for a runner that has ``cores`` cores to itself: one per core on a small
    machine (up to :data:`AUTO_LANES_MAX_CORES`), else one call on all of them."""
    return cores if cores <= AUTO_LANES_MAX_CORES else 1


def plan_lanes(lanes: int | str | None, threads: int | None, device: str) -> tuple[int, int]:
    """(lanes, threads per lane) for a CPU runner: ``lanes`` model calls may run at once,
    each on its own ``threads`` intra-op threads.

    One call on every core is the fastest layout for a single batch; on a small machine
    several one-thread calls side by side keep every core busy while another batch
    decodes, instead of a parallel region waiting for the preempted thread. ``auto``
    (or None) gives one lane per core up to :data:`AUTO_LANES_MAX_CORES` cores unless
    ``threads`` was given; a GPU always has one lane.
    """
    total = threads or usable_cores()
    if device == "cuda":
        return 1, total
    if lanes is None or lanes == "auto":
        lanes = auto_lanes(usable_cores()) if threads is None else 1
    if isinstance(lanes, bool) or not str(lanes).isdigit() or int(lanes) < 1:
        raise ValueError(f"lanes must be 'auto' or a positive integer, got {lanes!r}")
    return int(lanes), max(1, total // int(lanes))


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


def describe_device(device: str) -> str:
    """``cpu``, or ``cuda`` with the GPU's name (``cuda (NVIDIA H200)``): what a log line or a
    run's summary says, so that where a run actually ran is on record, not assumed."""
    if not str(device).startswith("cuda"):
        return "cpu"
    import torch

    return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
