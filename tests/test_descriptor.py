"""The descriptor as one object: file round trip, identity, multi-scale, whitening, backbones.

Small random-weight timm models keep these fast; the real EfficientNet-Lite0 weights (from
the PyPI package) are used where the claim is about them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cbir.data.transforms import Preprocess
from cbir.models import (
    BackboneError,
    Descriptor,
    build_backbone,
    build_descriptor,
    fit_pca_whitening,
)
from cbir.models.pooling import build_pooling, l2n

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny(pooling: str = "gem", **kwargs) -> Descriptor:
    """A fresh random-weight descriptor (the session fixture must not be mutated)."""
    return build_descriptor(
        "timm:resnet10t", pretrained=False, pooling=pooling, image_size=64, **kwargs
    )


def batch(seed: int = 0, shape: tuple[int, ...] = (2, 3, 64, 96)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def with_whitening(desc: Descriptor, dim: int = 8) -> Descriptor:
    with torch.inference_mode():
        pooled = desc.pooled(batch(1, (12, 3, 32, 32))).numpy()
    desc.whitening = fit_pca_whitening(pooled, dim=dim)
    return desc


# ---------------------------------------------------------------------------------------
# file round trip and identity
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pooling", "scales", "whiten"),
    [("gem", (1.0,), False), ("gem:learn", (1.0, 0.7071, 0.5), True), ("rmac", (1.0,), True)],
)
def test_save_load_gives_identical_vectors(
    tmp_path: Path, pooling: str, scales: tuple[float, ...], whiten: bool
) -> None:
    desc = tiny(pooling, scales=list(scales))
    if whiten:
        with_whitening(desc)
    path = tmp_path / "d.cbir"
    desc.save(path)
    back = Descriptor.load(path)
    x = batch()
    with torch.inference_mode():
        assert torch.equal(desc.eval()(x), back(x))
    assert back.identity() == desc.identity()
    assert back.spec() == desc.spec() and back.describe_name() == desc.describe_name()
    # the file alone is enough, also through the one entry point used by the CLI
    again = build_descriptor(str(path))
    with torch.inference_mode():
        assert torch.equal(again(x), back(x))
    img = Image.fromarray((np.arange(90 * 70 * 3) % 251).astype(np.uint8).reshape(70, 90, 3))
    assert np.array_equal(desc.describe(img), back.describe(img))


def test_identity_changes_with_weights_pooling_preprocess_scales_whitening() -> None:
    base = tiny()
    ident = base.identity()
    assert copy.deepcopy(base).identity() == ident  # a pure function of the content

    changed_weights = copy.deepcopy(base)
    with torch.no_grad():
        next(changed_weights.backbone.parameters()).view(-1)[0] += 1e-3
    changed_pooling = copy.deepcopy(base)
    changed_pooling.pooling = build_pooling("gem:p=4")
    changed_preprocess = copy.deepcopy(base)
    changed_preprocess.preprocess = base.preprocess.override(size=72)
    changed_resize = copy.deepcopy(base)
    changed_resize.preprocess = base.preprocess.override(resize="squash")
    changed_scales = copy.deepcopy(base)
    changed_scales.scales = (1.0, 0.5)
    whitened = with_whitening(copy.deepcopy(base), dim=4)
    rewhitened = copy.deepcopy(whitened)
    with torch.no_grad():
        rewhitened.whitening.projection[0, 0] += 1e-3

    variants = [
        changed_weights, changed_pooling, changed_preprocess, changed_resize,
        changed_scales, whitened, rewhitened,
    ]
    idents = [v.identity() for v in variants]
    assert ident not in idents and len(set(idents)) == len(idents)


def test_loading_files_that_are_not_descriptors(tmp_path: Path) -> None:
    (tmp_path / "junk.cbir").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="not a readable cbir descriptor"):
        Descriptor.load(tmp_path / "junk.cbir")
    torch.save({"format": "something-else"}, tmp_path / "other.cbir")
    with pytest.raises(ValueError, match="not a cbir descriptor file"):
        Descriptor.load(tmp_path / "other.cbir")


# ---------------------------------------------------------------------------------------
# multi-scale and whitening
# ---------------------------------------------------------------------------------------
def test_multiscale_is_the_gem_of_per_scale_descriptors() -> None:
    desc = tiny("gem:p=3", scales=[1.0, 0.5]).eval()
    x = batch(2)
    with torch.inference_mode():
        per_scale = []
        for s in (1.0, 0.5):
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear")
            per_scale.append(l2n(desc.pooling(desc.backbone(xs))))
        # Radenovic et al. 2018: generalised mean of the scales with GeM's own p
        expected = l2n(((per_scale[0] ** 3 + per_scale[1] ** 3) / 2) ** (1 / 3))
        got = desc(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        single = copy.deepcopy(desc)
        single.scales = (1.0,)
        assert not torch.allclose(single(x), got, atol=1e-3)
    assert desc.multiscale_power == pytest.approx(3.0)
    assert tiny("mac", scales=[1.0, 0.5]).multiscale_power == 1.0


def test_whitening_attached() -> None:
    desc = with_whitening(tiny(), dim=8).eval()
    x = batch(3)
    with torch.inference_mode():
        out = desc(x)
        assert out.shape == (2, 8) and desc.dim == 8
        torch.testing.assert_close(out, desc.whitening(desc.pooled(x)))
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2), rtol=1e-4, atol=1e-4)
    assert desc.describe_name().endswith("pca8")
    wrong = fit_pca_whitening(np.random.default_rng(0).normal(size=(30, 8)))
    with pytest.raises(ValueError, match="8-d"):
        build_descriptor("timm:resnet10t", pretrained=False, whitening=wrong)


def test_whitening_file_through_build_descriptor(tmp_path: Path) -> None:
    desc = with_whitening(tiny(), dim=8)
    desc.whitening.save(str(tmp_path / "w.pt"))
    built = build_descriptor(
        "timm:resnet10t", pretrained=False, image_size=64, whitening=tmp_path / "w.pt"
    )
    assert built.dim == 8
    assert torch.equal(built.whitening.projection, desc.whitening.projection)


# ---------------------------------------------------------------------------------------
# backbones
# ---------------------------------------------------------------------------------------
def test_vit_patch_tokens_become_a_map_and_cls_is_an_option() -> None:
    vit = build_backbone("timm:vit_tiny_patch16_224", pretrained=False)
    assert vit.out_channels == 192
    with torch.inference_mode():
        assert vit(torch.zeros(2, 3, 64, 96)).shape == (2, 192, 4, 6)  # 16-pixel patches
        assert vit(torch.zeros(1, 3, 70, 90)).shape == (1, 192, 5, 6)  # padded to whole patches
    cls = build_backbone("timm:vit_tiny_patch16_224", pretrained=False, token="cls")
    with torch.inference_mode():
        assert cls(torch.zeros(2, 3, 64, 96)).shape == (2, 192, 1, 1)
    # the class token is the first token, not the patches' mean
    cls.body.load_state_dict(vit.body.state_dict())
    x = batch(4, (1, 3, 64, 64))
    with torch.inference_mode():
        tokens = vit.body.forward_features(x)
        torch.testing.assert_close(cls(x)[:, :, 0, 0], tokens[:, 0])
    # every pooling applies to the token map
    desc = Descriptor(vit, build_pooling("gem")).eval()
    for pooling in ("gem", "mac", "rmac"):
        desc.pooling = build_pooling(pooling)
        with torch.inference_mode():
            out = desc(batch(5, (2, 3, 64, 96)))
        assert out.shape == (2, 192) and torch.isfinite(out).all()


def test_vit_descriptor_round_trip_keeps_the_token_choice(tmp_path: Path) -> None:
    desc = build_descriptor(
        "timm:vit_tiny_patch16_224", pretrained=False, token="cls", pooling="spoc", image_size=64
    )
    desc.save(tmp_path / "vit.cbir")
    back = Descriptor.load(tmp_path / "vit.cbir")
    assert back.backbone.spec.token == "cls"
    x = batch(6, (1, 3, 64, 64))
    with torch.inference_mode():
        assert torch.equal(desc.eval()(x), back(x))


@pytest.mark.slow
def test_efficientnet_lite0_on_non_square_input(lite0_descriptor: Descriptor) -> None:
    backbone = lite0_descriptor.backbone
    assert backbone.spec.name == "efficientnet-lite0" and backbone.out_channels == 1280
    with torch.inference_mode():
        assert backbone(torch.zeros(1, 3, 160, 224)).shape == (1, 1280, 5, 7)
        assert backbone(torch.zeros(1, 3, 224, 120)).shape == (1, 1280, 7, 4)
    # a descriptor that keeps the aspect ratio sees a non-square map end to end
    keep = Descriptor(
        backbone,
        build_pooling("gem"),
        preprocess=lite0_descriptor.preprocess.override(resize="keep"),
    )
    img = Image.fromarray((np.indices((150, 300)).sum(0) % 256).astype(np.uint8)).convert("RGB")
    assert keep.preprocess(img).shape == (1, 3, 112, 224)
    vec = keep.describe(img)
    assert vec.shape == (1, 1280) and np.isfinite(vec).all()
    assert float(np.linalg.norm(vec)) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_default_descriptor_file_round_trip(tmp_path: Path, lite0_descriptor: Descriptor) -> None:
    """The default descriptor (real weights, BatchNorm statistics) reloads bit for bit."""
    lite0_descriptor.save(tmp_path / "lite0.cbir")
    back = Descriptor.load(tmp_path / "lite0.cbir")
    assert back.identity() == lite0_descriptor.identity()
    x = batch(7, (1, 3, 224, 224))
    with torch.inference_mode():
        assert torch.equal(lite0_descriptor.eval()(x), back(x))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("resnet50", "unknown backbone 'resnet50'"),
        ("timm:", "needs a model name"),
        ("timm:no_such_model_xyz", "no model 'no_such_model_xyz'"),
        ("efficientnet-lite9", "unknown backbone"),
    ],
)
def test_unknown_backbones(name: str, message: str) -> None:
    with pytest.raises(BackboneError, match=message):
        build_backbone(name, pretrained=False)


def test_bad_token_and_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="token"):
        build_backbone("timm:resnet10t", pretrained=False, token="middle")
    for name in ("timm:resnet10t", "efficientnet-lite0"):
        with pytest.raises(BackboneError, match="not found"):
            build_backbone(name, weights=tmp_path / "nope.pth")


def test_local_weights_file(tmp_path: Path) -> None:
    source = build_backbone("timm:resnet10t", pretrained=False)
    torch.save({"state_dict": source.body.state_dict()}, tmp_path / "w.pth")
    loaded = build_backbone("timm:resnet10t", weights=tmp_path / "w.pth")
    for (k, a), (_, b) in zip(
        source.body.state_dict().items(), loaded.body.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    # weights of another architecture, or a file that holds no weights: a BackboneError
    with pytest.raises(BackboneError, match="resnet14t"):
        build_backbone("timm:resnet14t", weights=tmp_path / "w.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(BackboneError, match="junk.pth"):
        build_backbone("timm:resnet10t", weights=tmp_path / "junk.pth")
    with pytest.raises(BackboneError, match="junk.pth"):
        build_backbone("efficientnet-lite0", weights=tmp_path / "junk.pth")


def test_timm_pretrained_offline_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # empty cache
    with pytest.raises(BackboneError, match="--weights"):
        build_backbone("timm:resnet10t", pretrained=True)


# ---------------------------------------------------------------------------------------
# preprocessing travels with the descriptor
# ---------------------------------------------------------------------------------------
def test_preprocess_geometry_and_overrides() -> None:
    keep = Preprocess(size=224, resize="keep")
    assert keep.resized_size(640, 480) == (224, 168) and keep.output_size(480, 640) == (168, 224)
    crop = Preprocess(size=256, resize="crop", crop=224)
    assert crop.resized_size(640, 480) == (341, 256) and crop.output_size(640, 480) == (224, 224)
    squash = Preprocess(size=224, resize="squash")
    assert squash.output_size(640, 480) == (224, 224)
    # a new size keeps the crop ratio; None changes nothing
    assert crop.override(size=128) == Preprocess(size=128, resize="crop", crop=112)
    assert crop.override(size=None, resize=None) == crop
    assert Preprocess.from_dict(crop.to_dict()) == crop
    with pytest.raises(ValueError, match="resize"):
        Preprocess(resize="stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="crop must be"):
        crop.override(crop=300)  # larger than the short side: it would pad with black
    img = Image.new("RGB", (640, 480), (255, 0, 0))
    x = crop(img)
    assert x.shape == (1, 3, 224, 224)
    expected_red = (1.0 - crop.mean[0]) / crop.std[0]
    assert float(x[0, 0, 0, 0]) == pytest.approx(expected_red, rel=1e-5)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("policy", ["squash", "keep", "crop"])
def test_opencv_resampler_gives_pillows_geometry_and_nearly_its_pixels(policy: str, interpolation: str) -> None:
    pil = Preprocess(size=96, resize=policy, crop=80 if policy == "crop" else None,  # type: ignore[arg-type]
                     interpolation=interpolation)
    fast = Preprocess.from_dict({**pil.to_dict(), "resampler": "opencv"})
    assert fast.resampler == "opencv" and Preprocess.from_dict(fast.to_dict()) == fast
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:1000, 0:1000]
    smooth = np.stack([(xx * 0.25) % 256, (yy * 0.25) % 256, ((xx + yy) * 0.125) % 256], -1).astype(np.uint8)
    differ = 0
    # growing, shrinking, both at once (squash of a tall or wide image), unchanged
    for w, h in ((40, 30), (300, 197), (96, 96), (50, 260), (260, 50), (1000, 700)):
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a, b = pil.to_array(Image.fromarray(noise)), fast.to_array(noise)  # an image or its array
        assert a.shape == b.shape and b.dtype == np.uint8 and b.flags.c_contiguous
        np.testing.assert_array_equal(fast.to_array(Image.fromarray(noise)), b)
        differ += int(not np.array_equal(a, b))
        # on a smooth image the two filters agree closely (on noise, only the geometry can)
        a, b = pil.to_array(Image.fromarray(smooth[:h, :w])), fast.to_array(smooth[:h, :w])
        assert np.abs(a.astype(int) - b).mean() < 2.0, (w, h)
    assert differ >= 4  # another kernel really ran: an identity of its own is needed


def test_the_resampler_is_in_the_identity_only_when_not_pillow() -> None:
    # every descriptor made before the resampler existed keeps its file format and identity
    assert "resampler" not in Preprocess().to_dict()
    assert Preprocess.from_dict(Preprocess().to_dict()).resampler == "pillow"
    a = build_descriptor("timm:resnet10t", pretrained=False, pooling="gem", image_size=64)
    b = copy.copy(a)
    b.preprocess = Preprocess.from_dict({**a.preprocess.to_dict(), "resampler": "opencv"})
    assert b.identity() != a.identity()  # other pixels, other vectors
    assert b.base_identity() == a.base_identity()  # the same graph: one ONNX export serves both
    with pytest.raises(ValueError, match="resampler"):
        Preprocess(resampler="torch")
    with pytest.raises(ValueError, match="opencv resampler"):
        Preprocess(interpolation="nearest", resampler="opencv")
