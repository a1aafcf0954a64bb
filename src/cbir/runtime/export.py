"""Export a :class:`~cbir.models.descriptor.Descriptor` to ONNX, verified and cached.

The graph takes what the decode workers produce (uint8 B x H x W x 3) and does
everything else itself: the cast, the mean/std normalisation, the backbone at every
scale, pooling, multi-scale combination, whitening and the L2 normalisation. The batch
axis is always dynamic. Where the resize policy gives every image the same size (the
default 224 x 224 squash), the graph is traced at that size with every padding a
constant, which ONNX Runtime runs about a third faster than a size-generic graph; where
it keeps the aspect ratio, height and width are dynamic too, so one file serves every
shape.

Two graph kinds:

- ``descriptor``: the whole descriptor (GeM, MAC, SPoC: poolings written as reductions
  over the spatial axes, which follow any input size).
- ``features``: normalisation + backbone at every scale, returning the feature maps.
  Used for the regional poolings (R-MAC, R-GeM): their regions are laid out from the
  feature map's size in Python (:func:`cbir.models.pooling.rmac_regions`), which a trace
  would freeze at the example's size; the runner pools these maps with the descriptor's
  own torch code, which costs well under a millisecond per image.

EfficientNet-Lite's ``Conv2dDynamicSamePadding`` computes TensorFlow-style "same"
padding with ``math.ceil`` and ``max`` on Python ints, which a trace freezes. While
exporting, its ``forward`` is swapped for a numerically identical one: constant paddings
for stride-1 layers (they do not depend on the size), and for the strided layers either
constants (fixed-size graph) or ``(k_eff - s) + (-size mod s)`` written with operations
the tracer records (dynamic graph). The exported graph is then constant-folded and its
constant ``Pad`` nodes merged into the convolutions (:func:`optimize_graph`).

Every export is checked before it is used: ONNX Runtime and torch describe random
images at the traced size and (where the resize policy lets sizes vary) at a different
aspect ratio; an export that disagrees (cosine below :data:`MIN_COSINE`) is recorded as
unusable and the caller falls back to torch instead of returning wrong vectors.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbir.fileio import atomic_write_bytes, atomic_write_text
from cbir.models.descriptor import Descriptor
from cbir.models.pooling import RMAC, RGeM
from cbir.runtime.runner import EngineUnavailable
from cbir.runtime.session import features_head, make_session, run_session

#: Bumped whenever the exported graph changes, so stale cache entries are not reused.
EXPORT_VERSION = 2
OPSET = 17
#: Minimum cosine between ONNX Runtime's and torch's descriptor of one image.
MIN_COSINE = 0.9999


# ----------------------------------------------------------------------------------------
# export-friendly "same" padding
# ----------------------------------------------------------------------------------------
def _same_padding(self: nn.Conv2d) -> tuple[int, int, int, int]:
    """(effective kernel h, w, stride h, w) of a TF "same" convolution."""
    kh, kw = self.weight.shape[-2:]
    sh, sw = self.stride
    eh = (kh - 1) * self.dilation[0] + 1
    ew = (kw - 1) * self.dilation[1] + 1
    if eh < sh or ew < sw:  # pragma: no cover - no such layer in the Lite models
        raise EngineUnavailable("a 'same' convolution with a stride above its kernel size")
    return eh, ew, sh, sw


def _conv(self: nn.Conv2d, x: torch.Tensor, ph: Any, pw: Any) -> torch.Tensor:
    """Convolve with total paddings (ph, pw), split TF-style (the extra pixel after)."""
    if isinstance(ph, int) and isinstance(pw, int) and ph % 2 == 0 and pw % 2 == 0:
        # symmetric: the convolution's own padding attribute, no Pad node in the graph
        return F.conv2d(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2), self.dilation,
                        self.groups)
    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _same_conv_dynamic(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """TF "same" convolution whose padding follows the input size in the exported graph.

    With o = ceil(i / s), the library's pad ``(o - 1) s + k_eff - i`` equals
    ``(k_eff - s) + ((-i) mod s)``; for every EfficientNet-Lite layer k_eff >= s, so the
    ``max(., 0)`` of the original is never active (checked). A stride-1 layer's padding
    does not depend on the size at all (k_eff - 1), so only the few strided layers carry
    size arithmetic; every other layer exports as a plain padded Conv, which ONNX
    Runtime can keep in its blocked memory layout from one layer to the next.
    """
    eh, ew, sh, sw = _same_padding(self)
    if sh == 1 and sw == 1:
        return _conv(self, x, eh - 1, ew - 1)
    ih, iw = x.shape[-2], x.shape[-1]
    return _conv(self, x, (eh - sh) + (-ih) % sh, (ew - sw) + (-iw) % sw)


def _same_conv_static(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """TF "same" convolution for a graph traced at the one size it will ever see: the
    paddings are plain numbers, so the exporter writes constants (folded into the Conv
    after export, see :func:`optimize_graph`)."""
    eh, ew, sh, sw = _same_padding(self)
    ih, iw = int(x.shape[-2]), int(x.shape[-1])
    return _conv(self, x, (eh - sh) + (-ih) % sh, (ew - sw) + (-iw) % sw)


@contextlib.contextmanager
def export_friendly(static: bool = False) -> Iterator[None]:
    """Swap in an exportable same-padding convolution for the duration of an export:
    ``static`` for a graph of one input size, else one whose padding follows the size."""
    try:
        from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
    except ImportError:  # the Lite package is not installed: nothing to patch
        yield
        return
    original = Conv2dDynamicSamePadding.forward
    Conv2dDynamicSamePadding.forward = _same_conv_static if static else _same_conv_dynamic
    try:
        yield
    finally:
        Conv2dDynamicSamePadding.forward = original


def optimize_graph(model_bytes: bytes) -> bytes:
    """Constant-fold the exported graph and merge constant ``Pad`` nodes into the ``Conv``
    that follows them (ONNX Conv takes asymmetric pads; torch's conv2d cannot say so).

    Why: a standalone Pad forces ONNX Runtime to convert the tensor out of and back into
    its blocked (NCHWc) layout around it. The folding is ONNX Runtime's hardware-
    independent "basic" level (standard operators only), so the cached file stays
    portable. On any failure the unmodified graph is returned: the export is verified
    against torch afterwards either way.
    """
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    try:
        with tempfile.TemporaryDirectory(prefix="cbir-onnx-") as tmp:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.optimized_model_filepath = os.path.join(tmp, "basic.onnx")
            so.log_severity_level = 3
            ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
            model = onnx.load(so.optimized_model_filepath)
    except Exception:  # noqa: BLE001 - an optimisation, never a reason to fail
        return model_bytes
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded = []
    for node in graph.node:
        if node.op_type != "Pad" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        after = consumers.get(node.output[0], [])
        if attrs.get("mode", b"constant") not in (b"constant", "constant") or len(after) != 1:
            continue
        conv = after[0]
        if conv.op_type != "Conv" or conv.input[0] != node.output[0]:
            continue
        if len(node.input) > 2 and node.input[2]:  # a pad value other than 0 cannot fold
            value = inits.get(node.input[2])
            if value is None or numpy_helper.to_array(value).any():
                continue
        if len(node.input) > 3 and node.input[3]:  # explicit axes: leave it alone
            continue
        pads = numpy_helper.to_array(inits[node.input[1]]).astype(int).tolist()
        conv_attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
            continue
        if conv_attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        old = list(conv_attrs.get("pads", [0, 0, 0, 0]))
        new = [old[0] + pads[2], old[1] + pads[3], old[2] + pads[6], old[3] + pads[7]]
        for a in [a for a in conv.attribute if a.name == "pads"]:
            conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = node.input[0]
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    try:
        onnx.checker.check_model(model)
    except Exception:  # noqa: BLE001
        return model_bytes
    return model.SerializeToString()


# ----------------------------------------------------------------------------------------
# the exported module
# ----------------------------------------------------------------------------------------
def graph_kind(descriptor: Descriptor) -> str:
    """``features`` for poolings whose regions depend on the map's size, else ``descriptor``."""
    return "features" if isinstance(descriptor.pooling, (RMAC, RGeM)) else "descriptor"


class ExportGraph(nn.Module):
    """uint8 B x H x W x 3 -> descriptors (``descriptor``) or per-scale maps (``features``)."""

    def __init__(self, descriptor: Descriptor, kind: str) -> None:
        super().__init__()
        self.descriptor = descriptor
        self.kind = kind
        pre = descriptor.preprocess
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        # the same operations, in the same order, as Preprocess.normalize
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = self.normalize(images)
        if self.kind == "descriptor":
            return self.descriptor(x)
        return tuple(self.descriptor.feature_maps(x))


# ----------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$CBIR_CACHE_DIR/onnx``, else ``$XDG_CACHE_HOME/cbir/onnx`` (``~/.cache/cbir/onnx``)."""
    root = os.environ.get("CBIR_CACHE_DIR")
    if root:
        return Path(root) / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "cbir" / "onnx"


def cache_key(descriptor: Descriptor) -> str:
    """Descriptor identity + graph kind + exporter versions: equal keys, equal graphs."""
    kind = graph_kind(descriptor)
    versions = f"{EXPORT_VERSION}/{OPSET}/{torch.__version__}/{kind}"
    tag = hashlib.sha256(versions.encode()).hexdigest()[:8]
    return f"{descriptor.base_identity()}-{kind}-{tag}"


@dataclass
class ExportInfo:
    """What an export produced and how it was checked (stored beside the .onnx file)."""

    key: str
    kind: str
    usable: bool
    min_cosine: float
    checked_shapes: list[list[int]]
    reason: str = ""
    #: [height, width] of a fixed-size graph (None: height and width are dynamic)
    input_size: list[int] | None = None

    @property
    def dynamic_size(self) -> bool:
        """A usable graph that takes any height and width."""
        return self.usable and self.input_size is None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def _example_shapes(descriptor: Descriptor) -> list[tuple[int, int, int]]:
    """(batch, H, W) to trace with (the first), then to check with.

    Where the resize policy keeps the aspect ratio, the checks sweep aspect ratios in
    both orientations, with odd sides, so the *feature map's* size changes too: a graph
    that froze a size computed from it (like R-MAC's regions) is only caught then.
    Duplicates are dropped, so fixed-size policies check one size at two batch sizes.
    """
    pre = descriptor.preprocess
    sources = [(1000, 751), (1000, 1000)]
    for ratio in (0.75, 0.5, 0.3, 0.15):
        short = round(1000 * ratio) + 1
        sources += [(short, 1000), (1000, short)]
    shapes: list[tuple[int, int, int]] = []
    seen: set[tuple[int, int]] = set()
    for k, (w, h) in enumerate(sources):
        ow, oh = pre.output_size(w, h)
        if (oh, ow) not in seen or k == 1:
            seen.add((oh, ow))
            shapes.append((2 if k == 0 else 1 + k % 3, oh, ow))
    return shapes


def _example_images(rng: np.random.Generator, b: int, h: int, w: int) -> np.ndarray:
    """Images with structure (coloured blobs on noise), not plain noise: on noise every
    region of a feature map looks alike, and a graph that pools the wrong regions would
    still agree with torch."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = rng.normal(0, 10, size=(b, h, w, 3)).astype(np.float32) + 40
    for k in range(b):
        for _ in range(4):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(2, max(h, w) / 3)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            out[k] += blob[..., None] * rng.uniform(0, 215, 3).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def _torch_reference(graph: ExportGraph, images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out = graph(torch.from_numpy(images))
    if graph.kind == "descriptor":
        return out.float().numpy()
    return features_head(graph.descriptor, [m.numpy() for m in out])


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(num / np.maximum(den, 1e-12)))


def export_onnx(descriptor: Descriptor, path: str | os.PathLike) -> ExportInfo:
    """Export ``descriptor`` to ``path`` (atomically) and check it against torch.

    The returned :class:`ExportInfo` says whether the graph may be used and for which
    sizes; it is also written to ``path`` with the suffix ``.json``.
    """
    import onnxruntime as ort  # noqa: F401  (fail early and clearly if missing)

    path = Path(path)
    descriptor = descriptor.eval()
    kind = graph_kind(descriptor)
    graph = ExportGraph(descriptor, kind).eval()
    shapes = _example_shapes(descriptor)
    rng = np.random.default_rng(0)
    examples = [_example_images(rng, b, h, w) for b, h, w in shapes]
    # one size for every image (squash/crop policies): a fixed-size graph, else dynamic
    dynamic = len({(h, w) for _, h, w in shapes}) > 1
    n_out = 1 if kind == "descriptor" else len(descriptor.scales)
    outputs = ["descriptors"] if kind == "descriptor" else [f"features{i}" for i in range(n_out)]
    axes: dict[str, dict[int, str]] = {
        "images": {0: "batch", 1: "height", 2: "width"} if dynamic else {0: "batch"}
    }
    for name in outputs:
        maps = {0: "batch", 2: "fh", 3: "fw"} if dynamic else {0: "batch"}
        axes[name] = {0: "batch"} if kind == "descriptor" else maps
    buf = io.BytesIO()
    with export_friendly(static=not dynamic), warnings.catch_warnings(), \
            torch.inference_mode(False), torch.no_grad():
        # the TorchScript tracer warns about every Python int it sees; the check below
        # is what tells us whether any of them mattered
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (torch.from_numpy(examples[0]),),
            buf,
            dynamo=False,
            input_names=["images"],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    model_bytes = optimize_graph(buf.getvalue())
    session = make_session(model_bytes, threads=None)
    worst = 1.0
    checked: list[list[int]] = []
    for images in examples:
        ref = _torch_reference(graph, images)
        got = run_session(session, descriptor, images)
        worst = min(worst, _min_cosine(ref, got) if got.shape == ref.shape else -1.0)
        checked.append(list(images.shape))
    usable = worst >= MIN_COSINE
    reason = "" if usable else (
        f"the exported graph disagrees with torch (min cosine {worst:.6f} < {MIN_COSINE}); "
        "this backbone's graph does not follow the input size"
    )
    info = ExportInfo(
        key=path.stem, kind=kind, usable=usable,
        min_cosine=worst, checked_shapes=checked, reason=reason,
        input_size=None if dynamic else [shapes[0][1], shapes[0][2]],
    )
    if usable:
        atomic_write_bytes(path, model_bytes)
    atomic_write_text(path.with_suffix(".json"), info.to_json())
    return info
