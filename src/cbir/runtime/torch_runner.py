"""The torch engine: the reference every other engine is checked against (eager, or frozen on CPUs)."""

from __future__ import annotations

import numpy as np
import torch

from cbir.allocator import tune_allocator
from cbir.models.descriptor import Descriptor
from cbir.runtime.device import resolve_device
from cbir.runtime.frozen import FrozenDescriptor
from cbir.runtime.runner import Runner


def torch_runner(descriptor: Descriptor, *, device: str = "cpu", freeze: bool = True) -> Runner:
    """Run the descriptor with PyTorch on ``device`` (``auto``, ``cpu`` or ``cuda``).

    On the CPU glibc's malloc is tuned first (see :mod:`cbir.allocator`: without it, page
    faults cost more than the convolutions), and with ``freeze`` the network runs through
    frozen TorchScript graphs, each checked against eager (:mod:`cbir.runtime.frozen`:
    batch norms folded, about 1.3x the model's speed); ``freeze=False`` runs eager only.
    The descriptor is moved (in place) to the runner's device: on CUDA the uint8 batch is
    normalised there, so only 1 byte per pixel crosses the bus.
    """
    where = resolve_device(device, "torch")
    if where == "cpu":
        tune_allocator()
    descriptor.eval()
    # both ways: a descriptor an earlier GPU runner moved to the GPU must come back for a CPU one
    descriptor.to(where)
    dev = torch.device(where)
    model = FrozenDescriptor(descriptor) if freeze and where == "cpu" else descriptor

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch))
            if dev.type != "cpu":
                x = x.to(dev, non_blocking=True)
            x = descriptor.preprocess.normalize(x)
            return model(x).float().cpu().numpy()

    return Runner(run, engine="torch", device=where, graph=model if isinstance(model, FrozenDescriptor) else None)
