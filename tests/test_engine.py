"""The ONNX Runtime engine: exported descriptors agree with torch, are cached, fall back.

Agreement is the issue's criterion: cosine >= 0.9999 between the two engines' vectors
of every image, for every pooling, multi-scale and whitening, at several input sizes
(including odd ones, which exercise the exported "same" padding and the R-MAC regions).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import dataset_or_skip, make_image
from typer.testing import CliRunner

from cbir.extract import extract
from cbir.models import build_descriptor, fit_pca_whitening
from cbir.runtime import DEFAULT_ENGINE, EngineUnavailable, Runner, make_runner, torch_runner
from cbir.runtime.onnx_runner import cached_model, onnx_available, onnx_runner

pytestmark = pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")

SHAPES = [(2, 64, 48), (3, 37, 64), (1, 64, 64), (2, 63, 17)]


def _images(shapes: list[tuple[int, int, int]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(*s, 3), dtype=np.uint8) for s in shapes]


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _tiny(pooling: str, *, scales: list[float] | None = None, whiten: bool = False, size: int = 64):
    desc = build_descriptor(
        "timm:resnet10t", pretrained=False, pooling=pooling, scales=scales,
        image_size=size, resize="keep",
    )
    if whiten:  # a whitening fitted on the descriptor's own vectors of random images
        feats = np.concatenate([torch_runner(desc)(x) for x in _images([(8, 64, 64)] * 4, 9)])
        desc.whitening = fit_pca_whitening(feats, dim=16)
    return desc


def test_default_engine_is_onnx_when_onnxruntime_imports() -> None:
    assert DEFAULT_ENGINE == "onnx"


@pytest.mark.parametrize(
    ("pooling", "scales", "whiten"),
    [
        ("gem", None, False),
        ("mac", None, True),
        ("spoc", [1.0, 0.7071, 0.5], False),
        ("rmac", [1.0, 0.7071], True),
        ("rgem", None, False),
    ],
)
def test_onnx_agrees_with_torch(onnx_cache: Path, pooling: str, scales, whiten: bool) -> None:
    desc = _tiny(pooling, scales=scales, whiten=whiten)
    onnx, ref = onnx_runner(desc, verbose=False), torch_runner(desc)
    for x in _images(SHAPES):
        a, b = onnx(x), ref(x)
        assert a.shape == b.shape == (len(x), desc.dim)
        assert a.dtype == np.float32
        assert _min_cos(a, b) >= 0.9999, (pooling, x.shape)


def test_export_is_cached_and_reused(onnx_cache: Path, capsys: pytest.CaptureFixture) -> None:
    desc = _tiny("gem", scales=[1.0, 0.5])
    path, info = cached_model(desc)
    assert path.is_file() and path.parent == onnx_cache / "onnx"
    assert info.usable and info.dynamic_size
    assert "exporting" in capsys.readouterr().err
    mtime = path.stat().st_mtime_ns
    again, _ = cached_model(desc)
    assert again == path and path.stat().st_mtime_ns == mtime
    assert "exporting" not in capsys.readouterr().err
    # a different descriptor (other GeM p) is a different cache entry
    other, _ = cached_model(_tiny("gem:p=4", scales=[1.0, 0.5]))
    assert other != path


def test_graph_that_ignores_sizes_falls_back_to_torch(
    onnx_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Exporting R-MAC as one traced graph freezes its regions at the example's size: the
    check at a second aspect ratio must catch it and the run must go on with torch."""
    import cbir.runtime.export as export
    import cbir.runtime.onnx_runner as onnx_module

    monkeypatch.setattr(export, "graph_kind", lambda d: "descriptor")
    desc = _tiny("rmac", size=160)  # feature maps of 5 x 1 to 5 x 5 cells
    with pytest.raises(EngineUnavailable, match="disagrees with torch"):
        cached_model(desc, verbose=False)
    run = make_runner(desc, "onnx", verbose=False)
    assert "using torch" in capsys.readouterr().err
    assert run.engine == "torch"
    x = _images([(2, 160, 40)])[0]
    np.testing.assert_array_equal(run(x), torch_runner(desc)(x))
    # the verdict is cached: no second export attempt
    monkeypatch.setattr(onnx_module, "export_onnx", lambda *a, **k: pytest.fail("re-exported"))
    with pytest.raises(EngineUnavailable):
        cached_model(desc, verbose=False)


def test_extract_files_with_both_engines(onnx_cache: Path, image_dir: Path) -> None:
    from cbir.data.datasets import list_images

    desc = _tiny("gem")
    files = list_images(image_dir)
    a = extract(desc, files, engine="onnx", workers=1, progress=False)
    b = extract(desc, files, engine="torch", workers=0, progress=False)
    assert a.paths == b.paths == [os.fspath(f) for f in files]
    assert _min_cos(a.features, b.features) >= 0.9999


@pytest.mark.slow
def test_efficientnet_lite0_odd_sizes(onnx_cache: Path) -> None:
    """The Lite models' TF "same" padding depends on each layer's input parity."""
    desc = build_descriptor(resize="keep")
    onnx, ref = onnx_runner(desc, verbose=False), torch_runner(desc)
    for x in _images([(2, 224, 224), (2, 224, 161), (1, 97, 224), (1, 223, 131)], seed=3):
        assert _min_cos(onnx(x), ref(x)) >= 0.9999, x.shape


@pytest.mark.slow
def test_cli_extract_onnx_matches_torch(onnx_cache: Path, tmp_path: Path) -> None:
    """``cbir extract DIR --engine onnx --out F.npy`` (the default model) matches torch."""
    from cbir.cli.commands import app

    images = tmp_path / "imgs"
    for i in range(6):
        make_image(images / f"{i}.jpg", seed=40 + i, size=(120 + 7 * i, 90))
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    outs = {}
    for engine in ("onnx", "torch"):
        out = tmp_path / f"{engine}.npy"
        args = ["extract", str(images), "--engine", engine, "--out", str(out), "-q"]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        assert "6 images described" in res.output and "1 failed" in res.output
        outs[engine] = np.load(out)
    assert outs["onnx"].shape == outs["torch"].shape == (6, 1280)
    assert _min_cos(outs["onnx"], outs["torch"]) >= 0.9999


@pytest.mark.slow
def test_gpr_mini_images_agree(onnx_cache: Path) -> None:
    from cbir.data.datasets import load_gpr_collection

    files = load_gpr_collection(dataset_or_skip("gpr-mini")).files[::85]
    desc = build_descriptor()
    a = extract(desc, files, engine="onnx", progress=False)
    b = extract(desc, files, engine="torch", progress=False)
    assert not a.failures and a.paths == b.paths
    assert _min_cos(a.features, b.features) >= 0.9999


def test_damaged_cache_file_falls_back_with_a_message(
    onnx_cache: Path, capsys: pytest.CaptureFixture
) -> None:
    desc = _tiny("spoc", scales=[1.0, 0.7071, 0.5])
    path, _ = cached_model(desc, verbose=False)
    path.write_bytes(b"not an onnx model")
    run = make_runner(desc, "onnx", verbose=False)
    err = capsys.readouterr().err
    assert run.engine == "torch" and "delete it to re-export" in err and str(path) in err


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(os.fspath(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_fixed_size_policy_exports_a_fixed_size_graph(onnx_cache: Path) -> None:
    """Squash gives every image one size: the graph is traced at it (batch stays dynamic);
    an array of another size, which only a caller's own arrays can be, goes to torch."""
    desc = build_descriptor("timm:resnet10t", pretrained=False, image_size=64, resize="squash")
    path, info = cached_model(desc, verbose=False)
    assert info.input_size == [64, 64] and not info.dynamic_size
    onnx, ref = onnx_runner(desc, verbose=False), torch_runner(desc)
    for x in _images([(1, 64, 64), (5, 64, 64)]):
        assert _min_cos(onnx(x), ref(x)) >= 0.9999
    odd = _images([(2, 48, 80)])[0]
    np.testing.assert_array_equal(onnx(odd), ref(odd))


def test_constant_pads_are_folded_into_the_convolution() -> None:
    """An asymmetric zero Pad before a Conv becomes the Conv's own pads attribute, with
    the same output; a Pad of another value is left alone."""
    import io

    import onnxruntime as ort
    import torch
    import torch.nn.functional as F

    from cbir.runtime.export import optimize_graph

    class Net(torch.nn.Module):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
            self.value = value

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(F.pad(x, [0, 1, 1, 2], value=self.value))

    x = torch.randn(2, 3, 15, 16)
    for value, folds in ((0.0, True), (1.0, False)):
        net = Net(value).eval()
        buf = io.BytesIO()
        torch.onnx.export(net, (x,), buf, dynamo=False, input_names=["x"], opset_version=17)
        out = optimize_graph(buf.getvalue())
        import onnx

        ops = [n.op_type for n in onnx.load_from_string(out).graph.node]
        assert ("Pad" not in ops) == folds, (value, ops)
        sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, net(x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_efficientnet_lite0_default_graph_has_no_size_arithmetic(onnx_cache: Path) -> None:
    """The default descriptor (224 squash) exports with every TF "same" padding a
    constant inside its Conv: no Pad, Shape or Mod node is left to break ONNX Runtime's
    blocked layout, and the vectors still agree with torch."""
    desc = build_descriptor()
    path, info = cached_model(desc, verbose=False)
    assert info.input_size == [224, 224]
    ops = _op_counts(path)
    assert ops.get("Conv", 0) > 40
    assert not {"Pad", "Shape", "Mod"} & set(ops), ops
    x = _images([(3, 224, 224)], seed=5)[0]
    assert _min_cos(onnx_runner(desc, verbose=False)(x), torch_runner(desc)(x)) >= 0.9999


def test_extraction_runs_onnx_in_lanes_on_two_cores(
    onnx_cache: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bulk extraction asks for lanes="auto"; on two cores that is two one-thread calls on
    one shared session, giving the vectors of one call on both cores."""
    import importlib

    from cbir.data.datasets import list_images
    from cbir.runtime import device as device_module

    extract_module = importlib.import_module("cbir.extract")  # the package's `extract` is the function
    monkeypatch.setattr(device_module, "usable_cores", lambda: 2)
    made: list[Runner] = []

    def recording(*args, **kwargs) -> Runner:
        made.append(make_runner(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(extract_module, "make_runner", recording)
    desc = _tiny("gem")
    files = list_images(image_dir)
    laned = extract(desc, files, engine="onnx", workers=0, batch_size=3, progress=False)
    assert [(r.engine, r.lanes) for r in made] == [("onnx", 2)]
    one = make_runner(desc, "onnx", lanes=1, verbose=False)
    assert (one.engine, one.lanes) == ("onnx", 1)
    single = extract(desc, files, runner=one, workers=0, batch_size=3, progress=False)
    assert laned.paths == single.paths
    assert _min_cos(laned.features, single.features) >= 0.99999
