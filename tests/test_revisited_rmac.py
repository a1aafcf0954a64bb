"""R-MAC with region-wise PCA-whitening (Gordo et al. 2016) inside the descriptor."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image

from cbir.benchmarks import learn_region_whitening
from cbir.models import RADENOVIC_SCALES, build_descriptor
from cbir.models.descriptor import Descriptor
from cbir.models.pooling import RMAC, l2n, regional, rmac


@pytest.fixture
def train_dir(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    for i in range(8):
        make_image(root / f"class{i % 2}" / f"{i}.jpg", seed=50 + i, size=(96, 72))
    return root


def _rmac_descriptor(**kwargs) -> Descriptor:
    return build_descriptor(
        "timm:resnet10t", pretrained=False, pooling="rmac", image_size=64, **kwargs
    )


def test_plain_rmac_is_unchanged() -> None:
    pool = RMAC(levels=3)
    x = torch.rand(2, 16, 9, 12)
    assert pool.spec() == {"name": "rmac", "levels": 3}
    assert torch.allclose(pool(x), rmac(x, 3))
    assert pool.out_dim(16) == 16


def test_region_whitening_is_applied_per_region_then_summed(train_dir: Path) -> None:
    desc = _rmac_descriptor()
    w = learn_region_whitening(train_dir, desc, dim=24, workers=0, progress=False)
    assert w.meta["kind"] == "pca-regions" and w.meta["images"] == 8
    assert w.meta["regions"] > 8  # several regions per image
    assert desc.dim == 24 and desc.pooled_dim == 24
    assert desc.describe_name().endswith("/rw24")
    x = torch.rand(1, desc.backbone.out_channels, 5, 7)
    regions = l2n(regional(x, 3, "max"))
    manual = l2n((regions - w.mean) @ w.projection.T).sum(dim=1)
    assert torch.allclose(desc.pooling(x), manual, atol=1e-6)
    # not the same as whitening the summed R-MAC vector once
    assert not torch.allclose(l2n(desc.pooling(x)), w(rmac(x, 3)), atol=1e-3)


def test_region_whitening_travels_in_the_descriptor_file(train_dir: Path, tmp_path: Path) -> None:
    desc = _rmac_descriptor()
    plain_identity = desc.identity()
    learn_region_whitening(train_dir, desc, dim=32, workers=0, progress=False)
    assert desc.identity() != plain_identity
    path = tmp_path / "rmac.cbir"
    desc.save(path)
    loaded = Descriptor.load(path)
    x = torch.rand(2, 3, 64, 80)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), desc(x), atol=1e-6)
    assert loaded.identity() == desc.identity() and loaded.dim == 32
    assert loaded.pooling.spec()["region_whitening"]["out_dim"] == 32


def test_region_whitening_with_multiscale(train_dir: Path) -> None:
    desc = _rmac_descriptor(scales=list(RADENOVIC_SCALES))
    single = _rmac_descriptor()
    w_ms = learn_region_whitening(train_dir, desc, workers=0, progress=False)
    w_1 = learn_region_whitening(train_dir, single, workers=0, progress=False)
    assert w_ms.meta["regions"] > w_1.meta["regions"]  # regions of every scale are samples
    out = desc.describe([make_image_pil(1)])
    assert out.shape == (1, desc.dim)
    assert np.linalg.norm(out) == pytest.approx(1.0, abs=1e-4)


def make_image_pil(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))


def test_region_whitening_needs_rmac(train_dir: Path) -> None:
    desc = build_descriptor("timm:resnet10t", pretrained=False, pooling="gem", image_size=64)
    with pytest.raises(ValueError, match="R-MAC"):
        learn_region_whitening(train_dir, desc, workers=0, progress=False)


def test_rmac_whiten_command(train_dir: Path, tmp_path: Path, tiny_descriptor) -> None:
    from typer.testing import CliRunner

    from cbir.cli.main import app

    base = tmp_path / "tiny.cbir"
    tiny_descriptor.save(base)
    out = tmp_path / "rw.cbir"
    args = ["rmac-whiten", str(train_dir), "--out", str(out), "--model", str(base), "--dim", "20"]
    res = CliRunner().invoke(app, [*args, "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    assert "512 -> 20" in res.output
    loaded = Descriptor.load(out)
    assert loaded.pooling.name == "rmac" and loaded.dim == 20
    gem_args = [*args[:-2], "--pooling", "gem", "--workers", "0", "-q"]
    res = CliRunner().invoke(app, gem_args)
    assert res.exit_code != 0 and "R-MAC" in res.output


@pytest.mark.slow
def test_region_whitened_descriptor_exports_to_onnx(train_dir: Path) -> None:
    import onnxruntime as ort

    desc = _rmac_descriptor()
    learn_region_whitening(train_dir, desc, dim=16, workers=0, progress=False)
    x = torch.rand(1, 3, 64, 80)
    buf = io.BytesIO()
    torch.onnx.export(desc, (x,), buf, input_names=["x"], output_names=["y"], dynamo=False)
    sess = ort.InferenceSession(buf.getvalue())
    y = sess.run(None, {"x": x.numpy()})[0]
    with torch.inference_mode():
        assert np.abs(y - desc(x).numpy()).max() < 1e-4
