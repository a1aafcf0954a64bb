"""Keep glibc's malloc from handing activation buffers back to the kernel after every op.

Why this exists: PyTorch's CPU allocator is plain ``malloc``. A CNN forward pass on a
batch allocates and frees activation tensors of tens of megabytes, one per layer. glibc
serves blocks above its mmap threshold (128 KiB, raised adaptively to at most 32 MiB)
with a fresh ``mmap`` and returns them with ``munmap`` on ``free``, so every layer of
every batch page-faults its output buffer in again and the kernel zeroes it page by
page. Measured here (EfficientNet-Lite0, 224x224, 2 threads), a batch of 32 cost 55 ms
per image, more system time than user time; with the thresholds below it costs 22 ms.
The same pathology made the torch engine slower than the one-process naive loop.

:func:`tune_allocator` raises the mmap and trim thresholds once per process (1 GiB), so
freed buffers stay in the heap and are reused by the next layer. The price is that the
process keeps its peak activation memory mapped instead of returning it between
batches: bounded by the largest batch, and what a long extraction reuses anyway.

It does nothing on systems without glibc, and ``CBIR_TUNE_MALLOC=0`` turns it off.
ONNX Runtime has its own arena allocator and does not need it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap and stay there after ``free``.
THRESHOLD = 1 << 30

_done: bool | None = None


def tune_allocator() -> bool:
    """Raise glibc's mmap/trim thresholds for this process (idempotent).

    Returns True when the setting is in effect. Safe to call from any entry point that
    is about to run torch on the CPU; later calls are free.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("CBIR_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, THRESHOLD) == 1 and ok
    _done = ok
    return ok
