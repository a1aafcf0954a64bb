"""What every engine returns: a callable that says which engine and device actually ran.

A runner maps a uint8 batch (B x H x W x 3, what the decode workers produce) to float32
descriptors (B x D). It carries ``engine`` and ``device`` (and, for ONNX Runtime, the
execution providers the session really got), so callers and tests can check that the
engine they asked for is the one that ran rather than a silent fallback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cbir.errors import CbirError

#: The inference engines, by the name ``--engine`` takes.
ENGINES = ("torch", "onnx", "onnx-int8")


class EngineUnavailable(CbirError, RuntimeError):
    """An engine cannot serve this descriptor (for ``onnx``, the caller may use torch)."""

    code = "engine_unavailable"


@dataclass
class Runner:
    """uint8 B x H x W x 3 -> float32 B x D, labelled with what runs it."""

    fn: Callable[[np.ndarray], np.ndarray]
    #: the engine that runs (``torch``, ``onnx`` or ``onnx-int8``)
    engine: str
    #: ``cpu`` or ``cuda``
    device: str = "cpu"
    #: ONNX Runtime execution providers of the session, in priority order (empty for torch)
    providers: list[str] = field(default_factory=list)
    #: how many calls may run at once, each on its own cores (bulk extraction keeps that
    #: many batches in flight: :func:`cbir.runtime.device.plan_lanes`)
    lanes: int = 1
    #: the torch engine's frozen graphs (:class:`cbir.runtime.frozen.FrozenDescriptor`), when
    #: it runs through them; ``None`` for eager and for the ONNX engines
    graph: Any = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.fn(batch)


InfoT = TypeVar("InfoT")


def read_cached_model(model: Path, info_type: Callable[..., InfoT]) -> tuple[Path, InfoT] | None:
    """The cached graph ``model`` and its ``.json`` record, when both are there and usable.

    A record that says the graph was refused (``usable`` false) is final: its ``reason`` is
    raised rather than paying for the export or calibration again. A missing or unreadable
    record means "not cached" (``None``).
    """
    meta = model.with_suffix(".json")
    if not meta.is_file():
        return None
    try:
        info: Any = info_type(**json.loads(meta.read_text()))
    except (ValueError, TypeError):
        return None
    if not info.usable:
        raise EngineUnavailable(info.reason)
    return (model, info) if model.is_file() else None
