"""The torch engine's frozen graphs (cbir.runtime.frozen): used, equal to eager, never stale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbir.models import build_descriptor
from cbir.runtime import frozen
from cbir.runtime.torch_runner import torch_runner


def _images(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize(
    "options",
    [
        {"model": "timm:resnet10t", "pooling": "gem"},
        {"model": "timm:resnet10t", "pooling": "rmac"},
        {"model": "timm:resnet10t", "pooling": "gem", "scales": [1.0, 0.7]},
        {"model": "efficientnet-lite0", "pooling": "gem"},  # "same" padding computed in Python
    ],
    ids=["gem", "rmac", "multiscale", "lite0"],
)
def test_frozen_graph_runs_and_gives_eager_vectors(options: dict) -> None:
    desc = build_descriptor(options.pop("model"), pretrained=False, image_size=64, **options)
    run = torch_runner(desc)
    eager = torch_runner(desc, freeze=False)
    assert eager.graph is None
    for b in (5, 2):  # a graph traced on one batch size serves another
        x = _images(b, 64, 64, seed=b)
        assert _cosines(run(x), eager(x)).min() > 0.9999
    assert isinstance(run.graph, frozen.FrozenDescriptor)
    assert isinstance(run.graph.graphs[(64, 64)], torch.jit.ScriptModule)  # the graph ran, not eager


def test_graphs_are_dropped_when_the_weights_change() -> None:
    desc = build_descriptor("timm:resnet10t", pretrained=False, pooling="gem", image_size=48)
    run = torch_runner(desc)
    x = _images(3, 48, 48)
    before = run(x)
    first = run.graph.graphs[(48, 48)]
    with torch.no_grad():  # what an optimiser step does: in place
        for p in desc.parameters():
            p.mul_(1.5).add_(0.01)
    after = run(x)
    assert run.graph.graphs[(48, 48)] is not first
    assert _cosines(after, torch_runner(desc, freeze=False)(x)).min() > 0.9999
    assert _cosines(after, before).min() < 0.999  # the change was visible, not the stale graph


def test_a_network_in_training_mode_runs_eager() -> None:
    """A graph is traced in eval mode: a descriptor switched back to training (by a trainer
    sharing it) must not be answered by that graph, nor re-traced at every call."""
    desc = build_descriptor("timm:resnet10t", pretrained=False, pooling="gem", image_size=48)
    run = torch_runner(desc)
    x = _images(2, 48, 48)
    run(x)
    graph = run.graph.graphs[(48, 48)]
    desc.train()
    seen: list[bool] = []
    hook = desc.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    with torch.no_grad():
        run.graph(desc.preprocess.normalize(torch.from_numpy(x)))
    hook.remove()
    assert seen == [True]  # the eager network ran, in training mode
    assert run.graph.graphs[(48, 48)] is graph


def test_a_graph_that_disagrees_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frozen, "MIN_COSINE", 1.5)  # no cosine passes
    desc = build_descriptor("timm:resnet10t", pretrained=False, pooling="gem", image_size=48)
    run = torch_runner(desc)
    x = _images(2, 48, 48)
    out = run(x)
    assert run.graph.graphs == {(48, 48): None}
    np.testing.assert_array_equal(out, torch_runner(desc, freeze=False)(x))


def test_sizes_beyond_the_limit_run_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frozen, "MAX_GRAPHS", 1)
    desc = build_descriptor("timm:resnet10t", pretrained=False, pooling="gem", resize="keep")
    run = torch_runner(desc)
    eager = torch_runner(desc, freeze=False)
    a, b = _images(2, 48, 64), _images(2, 64, 48)
    run(a)
    out = run(b)
    assert set(run.graph.graphs) == {(48, 64)}
    np.testing.assert_array_equal(out, eager(b))
