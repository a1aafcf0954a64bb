"""The descriptor: backbone + pooling + multi-scale + whitening + preprocessing, as one object.

A descriptor is what a retrieval system is defined by: two vectors are comparable only
if the same descriptor made them. So it is one ``nn.Module`` whose file holds its
architecture, pooling, whitening, preprocessing and weights (like
deep-image-retrieval's checkpoints): ``Descriptor.load(path)`` alone reproduces the
vectors, and :meth:`Descriptor.identity` fingerprints all of it for indexes to check.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cbir.data.transforms import Preprocess
from cbir.defaults import RADENOVIC_SCALES as RADENOVIC_SCALES  # written once, in cbir.defaults
from cbir.fileio import atomic_torch_save
from cbir.models.backbones import DEFAULT_BACKBONE, Backbone, BackboneSpec, build_backbone
from cbir.models.pooling import GeM, Pooling, RGeM, build_pooling, l2n, multiscale_combine
from cbir.models.whitening import Whitening

FILE_FORMAT = "cbir-descriptor"
FILE_VERSION = 1
#: File suffix used for descriptor files by convention (any name works).
SUFFIX = ".cbir"



class Descriptor(nn.Module):
    """Maps a normalised image batch (B x 3 x H x W) to L2-normalised descriptors (B x D)."""

    def __init__(
        self,
        backbone: Backbone,
        pooling: Pooling,
        preprocess: Preprocess | None = None,
        whitening: Whitening | None = None,
        scales: tuple[float, ...] | list[float] = (1.0,),
        ms_power: float | None = None,
        meta: dict[str, Any] | None = None,
        numerics: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not scales or any(s <= 0 for s in scales):
            raise ValueError("scales must be positive numbers")
        self.backbone = backbone
        self.pooling = pooling
        self.preprocess = preprocess or backbone.default_preprocess
        self.whitening = whitening
        self.scales = tuple(float(s) for s in scales)
        self.ms_power = ms_power
        self.meta: dict[str, Any] = dict(meta or {})
        #: None for float32 vectors (torch and onnx agree to cosine 0.9999); else what makes
        #: them differ, e.g. ``{"engine": "onnx-int8", "calibration": DIGEST}``. Part of the
        #: identity, so an index never mixes vectors of two numerics (see cbir.runtime).
        self.numerics: dict[str, str] | None = dict(numerics) if numerics else None
        if whitening is not None and whitening.in_dim != self.pooled_dim:
            raise ValueError(f"whitening expects {whitening.in_dim}-d input but pooling gives {self.pooled_dim}")

    # -- shape ----------------------------------------------------------------------------
    @property
    def pooled_dim(self) -> int:
        """Size of the pooled vector (the backbone's channels unless the pooling projects)."""
        return self.pooling.out_dim(self.backbone.out_channels)

    @property
    def dim(self) -> int:
        return self.whitening.out_dim if self.whitening is not None else self.pooled_dim

    @property
    def multiscale_power(self) -> float:
        """Power of the generalised mean across scales: GeM's p for GeM poolings (as
        Radenovic et al.), else 1 (plain average)."""
        if self.ms_power is not None:
            return float(self.ms_power)
        if isinstance(self.pooling, (GeM, RGeM)):
            return float(self.pooling.p.detach())
        return 1.0

    # -- computation ------------------------------------------------------------------------
    # The stages, written once: every engine (torch, the ONNX export, the region whitening
    # that pools regions instead of images) goes through these, so the resampling, the
    # cross-scale combination and the whitening cannot drift apart between them.
    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's feature map of the normalised batch ``x`` at every scale."""
        maps = []
        for s in self.scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            maps.append(self.backbone(xs))
        return maps

    def combine(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale feature maps -> the multi-scale pooled vector (L2-normalised, not whitened)."""
        return l2n(multiscale_combine([l2n(self.pooling(m)) for m in maps], self.multiscale_power))

    def head(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale feature maps -> descriptors: pooling, multi-scale combination, whitening."""
        v = self.combine(maps)
        if self.whitening is not None:
            v = self.whitening(v)
        return v

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-scale pooled descriptor before whitening (L2-normalised)."""
        return self.combine(self.feature_maps(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_maps(x))

    @torch.inference_mode()
    def describe(self, images: list[Image.Image] | Image.Image) -> np.ndarray:
        """Describe decoded PIL images (N x D float32). For files, use :mod:`cbir.extract`."""
        if isinstance(images, Image.Image):
            images = [images]
        self.eval()
        out = [self(self.preprocess(img)).numpy() for img in images]
        return np.concatenate(out, axis=0).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)

    # -- identity and (de)serialisation ------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """The architecture, without weights: JSON-serialisable."""
        return {
            "backbone": self.backbone.spec.to_dict(),
            "pooling": self.pooling.spec(),
            "preprocess": self.preprocess.to_dict(),
            "scales": list(self.scales),
            "ms_power": self.ms_power,
            "whitening": self.whitening.spec() if self.whitening is not None else None,
            "dim": self.dim,
        }

    def weights_digest(self) -> str:
        h = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def base_identity(self) -> str:
        """Fingerprint of architecture, preprocessing and weights, whatever the numerics:
        what the float32 graph (and its ONNX export) depends on."""
        spec = self.spec()
        spec.pop("whitening", None)  # covered by the weights digest (its buffers)
        spec["preprocess"].pop("resampler", None)  # decides the pixels, not the graph: in identity()
        blob = json.dumps(spec, sort_keys=True).encode() + self.weights_digest().encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def identity(self) -> str:
        """Fingerprint of everything that decides the vectors: equal iff same vectors.
        Float32 descriptors keep the identity they always had; other numerics (the int8
        engine) and another resampler than Pillow change it."""
        base = self.base_identity()
        extra = dict(self.numerics or {})
        if self.preprocess.resampler != "pillow":
            extra["resampler"] = self.preprocess.resampler
        if not extra:
            return base
        blob = base.encode() + json.dumps(extra, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe_name(self) -> str:
        """Short human label, e.g. ``efficientnet-lite0/gem(p=3)/ms3/pca512``."""
        parts = [self.backbone.spec.name]
        pool = self.pooling.spec()
        skip = ("name", "learnable", "region_whitening")
        extra = ",".join(f"{k}={v}" for k, v in pool.items() if k not in skip)
        parts.append(f"{pool['name']}({extra})" if extra else pool["name"])
        if pool.get("region_whitening"):
            parts.append(f"rw{pool['region_whitening']['out_dim']}")
        if len(self.scales) > 1:
            parts.append("ms" + "+".join(f"{s:.3g}" for s in self.scales))
        if self.whitening is not None:
            parts.append(f"{self.whitening.meta.get('kind', 'w')}{self.whitening.out_dim}")
        if self.numerics:
            parts.append(self.numerics.get("engine", "numerics"))
        return "/".join(parts)

    def save(self, path: str | os.PathLike) -> None:
        """Write the self-describing descriptor file (atomically)."""
        payload = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "backbone": self.backbone.spec.to_dict(),
            "pooling": self.pooling.spec(),
            "preprocess": self.preprocess.to_dict(),
            "scales": list(self.scales),
            "ms_power": self.ms_power,
            "whitening": self.whitening.state() if self.whitening is not None else None,
            "state_dict": {k: v for k, v in self.state_dict().items() if not k.startswith("whitening.")},
            "meta": self.meta,
            "numerics": self.numerics,
        }
        atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Descriptor:
        """Rebuild a descriptor from its file alone (no network, no other files)."""
        path = Path(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path} is not a readable cbir descriptor file: {exc}") from exc
        if not isinstance(obj, dict) or obj.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a cbir descriptor file")
        if int(obj.get("version", 0)) > FILE_VERSION:
            raise ValueError(f"{path} was written by a newer cbir (format {obj['version']})")
        backbone = build_backbone(BackboneSpec.from_dict(obj["backbone"]), pretrained=False)
        pooling = build_pooling(dict(obj["pooling"]))
        whitening = Whitening.from_state(obj["whitening"]) if obj.get("whitening") else None
        desc = cls(
            backbone,
            pooling,
            preprocess=Preprocess.from_dict(obj["preprocess"]),
            whitening=whitening,
            scales=obj.get("scales", [1.0]),
            ms_power=obj.get("ms_power"),
            meta=obj.get("meta", {}),
            numerics=obj.get("numerics"),
        )
        missing, unexpected = desc.load_state_dict(obj["state_dict"], strict=False)
        missing = [k for k in missing if not k.startswith("whitening.")]
        if missing or unexpected:
            raise ValueError(
                f"{path}: weights do not fit the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return desc.eval()


def build_descriptor(
    model: str | os.PathLike = DEFAULT_BACKBONE,
    *,
    pooling: str | dict[str, Any] | None = None,
    scales: list[float] | tuple[float, ...] | None = None,
    whitening: Whitening | str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    token: str = "patch",
    image_size: int | None = None,
    resize: str | None = None,
    crop: int | None = None,
    ms_power: float | None = None,
) -> Descriptor:
    """The one entry point for "give me a descriptor", used by every command.

    ``model`` is a backbone name or a descriptor file; for a file, only the options
    given explicitly override what the file says. ``whitening`` is a
    :class:`Whitening` or a whitening file.
    """
    if isinstance(model, os.PathLike) or (isinstance(model, str) and os.path.isfile(model)):
        desc = Descriptor.load(model)
        if pooling is not None:
            desc.pooling = build_pooling(pooling)
        if scales is not None:
            desc.scales = tuple(float(s) for s in scales)
        if ms_power is not None:
            desc.ms_power = ms_power
    else:
        backbone = build_backbone(str(model), weights=weights, pretrained=pretrained, token=token)
        desc = Descriptor(backbone, build_pooling(pooling or "gem"), scales=scales or (1.0,), ms_power=ms_power)
    desc.preprocess = desc.preprocess.override(size=image_size, resize=resize, crop=crop)
    if whitening is not None:
        w = whitening if isinstance(whitening, Whitening) else Whitening.load(os.fspath(whitening))
        if w.in_dim != desc.pooled_dim:
            raise ValueError(f"whitening is for {w.in_dim}-d vectors, pooling gives {desc.pooled_dim}")
        desc.whitening = w
    return desc.eval()
