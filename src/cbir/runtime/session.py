"""ONNX Runtime sessions: creation (threads, providers) and running a descriptor graph."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from cbir.models.descriptor import Descriptor
from cbir.runtime.device import DeviceUnavailable, usable_cores

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def features_head(descriptor: Descriptor, maps: list[np.ndarray]) -> np.ndarray:
    """Per-scale feature maps from a ``features`` graph -> descriptors, by the descriptor's
    own :meth:`~cbir.models.descriptor.Descriptor.head` (pooling, combination, whitening)."""
    with torch.inference_mode():
        return descriptor.head([torch.from_numpy(m) for m in maps]).float().numpy()


#: Sessions of cached model files, by (path, mtime, size, threads, spinning, device): a
#: session costs 0.2-0.6 s to create (graph optimisation), which a process that makes
#: several runners of one model (an index's writer and its queries, repeated
#: extractions, the benchmark's repeats) pays once. Sessions are safe to share between
#: threads. A few entries at most: each holds its weights.
_SESSIONS: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_MAX_SESSIONS = 4
_LOCK = threading.Lock()


def cached_session(path: str | os.PathLike, *, threads: int | None, spinning: bool = False,
                   device: str = "cpu") -> Any:
    """:func:`make_session` of a model file, reused while the file is unchanged."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, threads or usable_cores(), spinning, device)
    with _LOCK:
        if key in _SESSIONS:
            _SESSIONS.move_to_end(key)
            return _SESSIONS[key]
    session = make_session(path, threads=threads, spinning=spinning, device=device)
    with _LOCK:
        _SESSIONS[key] = session
        while len(_SESSIONS) > _MAX_SESSIONS:
            _SESSIONS.popitem(last=False)
    return session


def make_session(
    model: bytes | str | os.PathLike, *, threads: int | None, spinning: bool = False, device: str = "cpu"
) -> Any:
    """An ONNX Runtime session: all graph optimisations, ``threads`` intra-op threads,
    on ``device`` (``cpu`` or ``cuda``, already resolved).

    Spinning is off by default: ORT's idle threads would otherwise busy-wait between
    batches and take the cores away from the decode workers (the oversubscription that
    shows up as system time). On ``cuda`` the session must really have the CUDA provider;
    ONNX Runtime otherwise drops to the CPU with only a log line, which is raised here.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or usable_cores()
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    src = model if isinstance(model, bytes) else os.fspath(model)
    providers = [CUDA, CPU] if device == "cuda" else [CPU]
    session = ort.InferenceSession(src, so, providers=providers)
    if device == "cuda" and CUDA not in session.get_providers():
        raise DeviceUnavailable("ONNX Runtime could not start its CUDA provider (check CUDA/cuDNN libraries)")
    return session


def run_session(session: Any, descriptor: Descriptor, images: np.ndarray) -> np.ndarray:
    """uint8 B x H x W x 3 -> float32 B x D through ``session`` (pooling in torch for
    ``features`` graphs)."""
    outs = session.run(None, {"images": np.ascontiguousarray(images, dtype=np.uint8)})
    if len(outs) == 1 and outs[0].ndim == 2:
        return np.asarray(outs[0], dtype=np.float32)
    return features_head(descriptor, outs)
