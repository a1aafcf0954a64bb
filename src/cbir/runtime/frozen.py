"""Frozen TorchScript graphs of a descriptor, one per input size, for the torch engine on CPUs.

``torch.jit.freeze`` folds every batch norm into its convolution and inlines the weights as
constants; on the default EfficientNet-Lite0 descriptor that runs the model about 1.3x as fast
as eager on two cores (docs/performance.md), with the same vectors to float rounding. A
trace records the sizes it saw (EfficientNet-Lite's "same" padding is computed from the input
size in Python), so a graph is kept per input size and every new graph is checked against
eager on the batch that made it: a graph that disagrees is never used, and that size stays
eager. The weights are frozen too, so the graphs are dropped whenever a parameter changes in
place (an optimiser step bumps its version counter).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch

from cbir.models.descriptor import Descriptor

log = logging.getLogger(__name__)

#: sizes (height, width) with a graph of their own; further sizes run eager (``--resize keep``
#: can give every image its own size, and a trace costs about a second)
MAX_GRAPHS = 4
#: a frozen graph whose vectors fall below this cosine to eager's is refused
MIN_COSINE = 0.9999


def _weights_version(descriptor: Descriptor) -> int:
    return sum(p._version for p in descriptor.parameters()) + sum(b._version for b in descriptor.buffers())


class FrozenDescriptor:
    """Calls ``descriptor`` on normalised CPU batches through frozen graphs where they agree.

    ``graphs`` maps an input size to its graph, or to ``None`` where eager runs (a graph
    refused, or more sizes than :data:`MAX_GRAPHS`); tests read it to see which ran.
    """

    def __init__(self, descriptor: Descriptor) -> None:
        self.descriptor = descriptor
        self.graphs: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor] | None] = {}
        self._version = _weights_version(descriptor)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.descriptor.training:  # graphs are traced in eval mode; a training network runs as it is
            return self.descriptor(x)
        version = _weights_version(self.descriptor)
        if version != self._version:  # trained since: the frozen weights are stale
            self.graphs.clear()
            self._version = version
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if size not in self.graphs and len(self.graphs) < MAX_GRAPHS:
            self.graphs[size] = self._freeze(x)
        graph = self.graphs.get(size)
        return graph(x) if graph is not None else self.descriptor(x)

    def _freeze(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Trace and freeze on two images of ``x``; keep the graph only if it gives eager's vectors.

        Two images, not the batch: the trace and the checks cost a few forward passes, paid
        once per size, and the graph must serve every batch size anyway (checked on 1 and 2).
        """
        example = x[:2].clone()
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                # the tracer warns about every Python int it sees; the check below decides
                warnings.simplefilter("ignore")
                graph = torch.jit.freeze(torch.jit.trace(self.descriptor, example, check_trace=False).eval())
                pairs = [(graph(e), self.descriptor(e)) for e in (example, example[:1])]
        except Exception as exc:  # noqa: BLE001 - any tracer failure means "stay eager"
            log.info("torch engine: no frozen graph for %s (%s); eager", tuple(x.shape[-2:]), exc)
            return None
        cos = min(_min_cosine(f, e) for f, e in pairs)
        if cos < MIN_COSINE:
            log.info("torch engine: frozen graph for %s disagrees with eager (cosine %.6f); eager",
                     tuple(x.shape[-2:]), cos)
            return None
        return graph


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(1), b.double().flatten(1)
    if a.shape != b.shape:
        return -1.0
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())
