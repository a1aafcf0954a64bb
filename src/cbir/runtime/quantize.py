"""The ``onnx-int8`` engine: the descriptor's ONNX graph with a statically quantised backbone.

Why int8: on CPUs with AVX-512 VNNI (or AVX2's ``vpmaddubsw``) ONNX Runtime's uint8 x int8
convolutions do several times more multiply-adds per cycle than fp32 ones, and the
backbone is nearly all of a descriptor's arithmetic.

How (ONNX Runtime's own tools, :func:`onnxruntime.quantization.quantize_static`):

- **QDQ format, per-channel int8 weights, uint8 activations** (U8S8: the combination
  ONNX Runtime's x86 kernels fuse into ``QLinearConv``; S8S8 measured 3x slower here).
- **Only the backbone is quantised**: nodes whose name is under ``/backbone/`` in the
  exported graph. Input normalisation, pooling (GeM's powers and means), multi-scale
  combination, whitening and the L2 normalisations stay in float, where an 8-bit range
  would cost accuracy for no speed.
- **Input normalisation folded into the first convolutions** (:func:`fold_normalization`):
  the per-channel ``(x / 255 - mean) / std`` becomes the convolutions' weights and bias,
  and the pixels enter as ``x - Z`` (one scalar). Why: with the backbone in NHWC
  layout, ONNX Runtime runs a 3-channel broadcast per pixel, which measured 30% of the
  int8 model's time. The one approximation: the first convolution's zero padding now
  pads with pixel value Z (the mean pixel) instead of each channel's mean, which
  changes only the outermost ring of its output.
- **Calibrated on images that are in no benchmark**: ``--calibrate DIR``, else
  ``$CBIR_CALIBRATE``, else ``../shared/datasets/train-pool`` where it exists (classes
  disjoint from gpr-mini's). :data:`CALIBRATION_IMAGES` files spread over the folder
  calibrate; :data:`CHECK_IMAGES` others check the result against fp32.
- **Cached** beside the fp32 export, keyed by the fp32 key and the calibration set's
  digest; the descriptor's identity records ``onnx-int8`` and that digest
  (:func:`int8_descriptor`), so an index never mixes int8 and fp32 vectors.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cbir.data.transforms import OPENCV_INTERPOLATIONS
from cbir.errors import CbirError
from cbir.fileio import atomic_write_bytes, atomic_write_text
from cbir.models.descriptor import Descriptor
from cbir.runtime.runner import EngineUnavailable, Runner, read_cached_model

ENGINE = "onnx-int8"
#: How the int8 engine's descriptors resize (cbir.data.transforms.RESAMPLERS): on two cores
#: Pillow's resize was the largest part of the int8 pipeline's decode side, OpenCV's takes a
#: sixth of its time (docs/performance.md)
INT8_RESAMPLER = "opencv"
#: Bumped whenever the quantisation recipe changes, so stale cache entries are not reused.
QUANT_VERSION = 4
#: Calibration images (spread evenly over the calibration folder's sorted files).
CALIBRATION_IMAGES = 128
#: Other images of the same folder on which int8 vectors are compared with fp32 ones.
CHECK_IMAGES = 48
#: An int8 graph whose median cosine to fp32 falls below this is refused.
MIN_MEDIAN_COSINE = 0.98
#: Where the default calibration images are looked for (relative to the working folder).
DEFAULT_CALIBRATION = Path("..") / "shared" / "datasets" / "train-pool"


class CalibrationUnavailable(CbirError, ValueError):
    """``onnx-int8`` needs calibration images and none were given or found."""

    exit_code = 2
    code = "calibration_unavailable"


# ----------------------------------------------------------------------------------------
# calibration images
# ----------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """The images that set the activation ranges, the images that check them, a digest."""

    root: str
    files: list[str]
    check: list[str]
    digest: str


def calibration_root(calibrate: str | os.PathLike | None = None) -> Path:
    """The calibration folder: ``calibrate``, else ``$CBIR_CALIBRATE``, else train-pool."""
    given = calibrate or os.environ.get("CBIR_CALIBRATE")
    if given:
        root = Path(given)
        if not root.is_dir():
            raise CalibrationUnavailable(f"--calibrate {root}: no such folder")
        return root
    if DEFAULT_CALIBRATION.is_dir():
        return DEFAULT_CALIBRATION
    raise CalibrationUnavailable(
        "--engine onnx-int8 needs calibration images that are in no benchmark: pass --calibrate DIR "
        f"(a few hundred photos like the ones you will index), or set CBIR_CALIBRATE; {DEFAULT_CALIBRATION} "
        "does not exist here"
    )


def calibration_set(calibrate: str | os.PathLike | None = None) -> Calibration:
    """Pick the calibration and check images (deterministic: sorted names, even spread).
    Listed once per folder and process (a second extraction in the same process, or the
    index's writer after its opening, does not walk thousands of files again)."""
    return _calibration_set(os.path.abspath(calibration_root(calibrate)))


@functools.lru_cache(maxsize=8)
def _calibration_set(root_path: str) -> Calibration:
    from cbir.data.datasets import list_images

    root = Path(root_path)
    files = [os.fspath(f) for f in list_images(root)]
    if len(files) < 8:
        raise CalibrationUnavailable(f"{root} holds {len(files)} images; calibration needs at least 8")
    n = min(CALIBRATION_IMAGES, max(4, len(files) // 2))
    step = len(files) / n
    picked = sorted({int(k * step) for k in range(n)})
    rest = [i for i in range(len(files)) if i not in set(picked)]
    m = min(CHECK_IMAGES, len(rest))
    check = [rest[int(k * len(rest) / m)] for k in range(m)] if m else []
    h = hashlib.sha256(f"{QUANT_VERSION}".encode())
    for i in picked:
        h.update(os.path.relpath(files[i], root).encode())
        h.update(str(os.path.getsize(files[i])).encode())
    return Calibration(os.fspath(root), [files[i] for i in picked], [files[i] for i in check], h.hexdigest()[:16])


def int8_descriptor(descriptor: Descriptor, calibrate: str | os.PathLike | None = None) -> Descriptor:
    """``descriptor`` marked as producing onnx-int8 vectors of this calibration (a copy).

    The mark is part of :meth:`Descriptor.identity`; the calibration folder goes in
    ``meta`` (not in the identity) so a later run can quantise again where the cache is
    gone."""
    cal = calibration_set(calibrate or descriptor.meta.get("calibration_dir"))
    out = copy.copy(descriptor)  # shares the modules (weights), not the attributes
    out.meta = {**descriptor.meta, "calibration_dir": os.path.abspath(cal.root)}
    out.numerics = {"engine": ENGINE, "calibration": cal.digest}
    if descriptor.preprocess.interpolation in OPENCV_INTERPOLATIONS:
        # int8 vectors are the engine's own already (no float32 index can take them), so
        # resizing with OpenCV (pixels a level or two from Pillow's, several times faster)
        # costs no float32 index its identity
        out.preprocess = replace(descriptor.preprocess, resampler=INT8_RESAMPLER)
    return out


# ----------------------------------------------------------------------------------------
# graph preparation
# ----------------------------------------------------------------------------------------
def fold_normalization(model: Any) -> tuple[Any, int | None]:
    """Fold ``(cast(x) / 255 - mean) / std`` into the convolutions that read it.

    Returns the model and the pixel zero point Z (None when the graph does not have that
    shape, e.g. multi-scale graphs whose normalised input also feeds a Resize: then it is
    returned unchanged). The convolutions then read ``cast(x) - Z``; their zero padding
    stands for pixel value Z.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    by_out = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def const(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name]).astype(np.float64)
        node = by_out.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t).astype(np.float64)
        return None

    # find Div(std) <- Sub(mean) <- Div(255) <- Cast
    convs = [n for n in g.node if n.op_type == "Conv"]
    if not convs:
        return model, None
    norm_out = convs[0].input[0]
    first = by_out.get(norm_out)
    if first is not None and first.op_type == "Pad":  # a "same" padding before the first convolution
        norm_out = first.input[0]
    div_std = by_out.get(norm_out)
    sub = by_out.get(div_std.input[0]) if div_std is not None and div_std.op_type == "Div" else None
    div255 = by_out.get(sub.input[0]) if sub is not None and sub.op_type == "Sub" else None
    if div255 is None or div255.op_type != "Div":
        return model, None
    std, mean, scale = const(div_std.input[1]), const(sub.input[1]), const(div255.input[1])
    readers = consumers.get(norm_out, [])
    convs = []  # the convolutions that see the normalised image, directly or after a zero Pad
    for r in readers:
        if r.op_type == "Conv":
            convs.append(r)
        elif r.op_type == "Pad" and r.input[0] == norm_out and _zero_pad(r, const):
            after = consumers.get(r.output[0], [])
            if not after or any(a.op_type != "Conv" for a in after):
                return model, None
            convs.extend(after)
        elif r.op_type != "Shape":  # a Shape only reads the size, which the shift keeps
            return model, None
    if std is None or mean is None or scale is None or not convs:
        return model, None
    std, mean = std.reshape(-1) * float(scale.reshape(-1)[0]), mean.reshape(-1) * float(scale.reshape(-1)[0])
    # now normalised = (x - mean) / std in pixel units, per channel
    zp = int(np.clip(round(float(np.mean(mean))), 0, 255))
    for conv in convs:
        if conv.input[1] not in inits or any(a.name == "group" and a.i != 1 for a in conv.attribute):
            return model, None
    done: set[str] = set()
    for conv in convs:
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 else np.zeros(
            w.shape[0])
        # conv(W, (x - m)/s) = conv(W/s, x - Z) + sum W (Z - m)/s
        w2 = w / std.reshape(1, -1, 1, 1)
        b2 = b + np.sum(w2 * (zp - mean).reshape(1, -1, 1, 1), axis=(1, 2, 3))
        wname, bname = conv.input[1] + "_folded", conv.output[0] + "_folded_bias"
        if wname not in done:
            g.initializer.append(numpy_helper.from_array(w2.astype(np.float32), wname))
            done.add(wname)
        g.initializer.append(numpy_helper.from_array(b2.astype(np.float32), bname))
        conv.input[1] = wname
        if len(conv.input) > 2:
            conv.input[2] = bname
        else:
            conv.input.append(bname)
    zname = "cbir_pixel_zero_point"
    g.initializer.append(numpy_helper.from_array(np.array(zp, dtype=np.float32), zname))
    shifted = "cbir_shifted_pixels"
    g.node.insert(list(g.node).index(div255), helper.make_node("Sub", [div255.input[0], zname], [shifted],
                                                               name="/cbir_shift"))
    for reader in readers:
        reader.input[0] = shifted
    for node in (div_std, sub, div255):
        g.node.remove(node)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return model, zp


def feed_pixels(model: Any, zp: int) -> bool:
    """Let the quantised first convolutions read the uint8 pixels themselves.

    After :func:`fold_normalization` the graph computes ``Q(cast(x) - Z)`` with a
    calibrated scale near 1. With scale exactly 1 and zero point Z that is ``x`` itself,
    bit for bit (pixels are integers in 0..255), so the cast, the subtraction and the
    quantisation are removed and the DequantizeLinear nodes read the image tensor.
    Returns False (graph untouched) when the expected nodes are not there.
    """
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    sub = next((n for n in g.node if n.name == "/cbir_shift"), None)
    if sub is None:
        return False
    readers = [n for n in g.node if sub.output[0] in n.input]
    cast = next((n for n in g.node if n.output and n.output[0] == sub.input[0]), None)
    if cast is None or cast.op_type != "Cast" or not readers or any(r.op_type != "QuantizeLinear" for r in readers):
        return False
    for q in readers:
        if len(q.input) < 3 or q.input[1] not in inits or q.input[2] not in inits:
            return False
        if numpy_helper.to_array(inits[q.input[2]]).dtype != np.uint8:
            return False
    for q in readers:
        for name, value in ((q.input[1], np.array(1.0, np.float32)), (q.input[2], np.array(zp, np.uint8))):
            inits[name].CopyFrom(numpy_helper.from_array(value.reshape(numpy_helper.to_array(inits[name]).shape),
                                                         name))
        for n in g.node:
            for k, name in enumerate(n.input):
                if name == q.output[0]:
                    n.input[k] = cast.input[0]
    for node in [*readers, sub]:
        g.node.remove(node)
    if not any(cast.output[0] in n.input for n in g.node):
        g.node.remove(cast)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return True


def _zero_pad(node: Any, const: Any) -> bool:
    """A constant-mode Pad that pads with zeros (what a "same" convolution's padding is)."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("mode", b"constant") not in (b"constant", "constant"):
        return False
    if len(node.input) > 2 and node.input[2]:
        value = const(node.input[2])
        return value is not None and not value.any()
    return True


@dataclass
class Int8Info:
    """What a quantisation produced and how it compares with fp32 (stored beside it)."""

    key: str
    usable: bool
    calibration: str
    calibration_root: str
    calibration_images: int
    zero_point: int | None
    agreement: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    input_size: list[int] | None = None


def _batches(descriptor: Descriptor, files: list[str]) -> list[np.ndarray]:
    """Decoded images in batches of about 8 images of 224 x 224 worth of pixels: the
    calibrator keeps every activation of a batch, which for large inputs is gigabytes."""
    from cbir.extract import decoded_batches

    side = descriptor.preprocess.size
    batch_size = max(1, min(8, 8 * 224 * 224 // max(1, side * side)))
    return [a for _, a, _ in decoded_batches(files, descriptor.preprocess, batch_size=batch_size, workers=1)
            if a is not None]


def quantize(descriptor: Descriptor, fp32_path: Path, out: Path, cal: Calibration,
             input_size: list[int] | None) -> Int8Info:
    """Quantise the fp32 graph ``fp32_path`` into ``out`` and compare it with fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from cbir.runtime.session import make_session, run_session

    model, zp = fold_normalization(onnx.load(os.fspath(fp32_path)))
    nodes = [n.name for n in model.graph.node if "/backbone/" in n.name]
    if not nodes:
        raise EngineUnavailable("no backbone nodes in the exported graph: nothing to quantise")
    batches = _batches(descriptor, cal.files)

    class Reader(CalibrationDataReader):
        """One batch per range (``CalibStridedMinMax``): ranges are merged after every batch,
        so calibration holds one batch's activations at a time, not every batch's."""

        def __init__(self) -> None:
            self.set_range(0, len(batches))

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.it = iter(batches[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            b = next(self.it, None)
            return None if b is None else {"images": b}

    with tempfile.TemporaryDirectory(prefix="cbir-int8-") as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(model, src)
        quantize_static(
            src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "CalibStridedMinMax": 1},
        )
        quantized = onnx.load(dst)
        if zp is not None:
            feed_pixels(quantized, zp)
        data = quantized.SerializeToString()
    agreement = _agreement(descriptor, make_session(fp32_path, threads=None), make_session(data, threads=None),
                           _batches(descriptor, cal.check), run_session)
    usable = agreement.get("median", 0.0) >= MIN_MEDIAN_COSINE
    info = Int8Info(
        key=out.stem, usable=usable, calibration=cal.digest, calibration_root=os.path.abspath(cal.root),
        calibration_images=len(cal.files), zero_point=zp, agreement=agreement, input_size=input_size,
        reason="" if usable else (f"int8 vectors disagree with fp32 on {cal.root} (median cosine "
                                  f"{agreement.get('median', 0):.4f} < {MIN_MEDIAN_COSINE})"),
    )
    if usable:
        atomic_write_bytes(out, data)
    atomic_write_text(out.with_suffix(".json"), json.dumps(asdict(info), indent=1))
    return info


def _agreement(descriptor: Descriptor, fp32: Any, int8: Any, batches: list[np.ndarray], run: Any) -> dict[str, float]:
    """Cosine between fp32 and int8 vectors of the check images (median, 1st percentile, min)."""
    if not batches:
        return {}
    a = np.concatenate([run(fp32, descriptor, b) for b in batches]).astype(np.float64)
    b = np.concatenate([run(int8, descriptor, x) for x in batches]).astype(np.float64)
    cos = np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"median": float(np.median(cos)), "p1": float(np.percentile(cos, 1)), "min": float(cos.min()),
            "images": float(len(cos))}


# ----------------------------------------------------------------------------------------
# cache and runner
# ----------------------------------------------------------------------------------------
def int8_model(
    descriptor: Descriptor, calibrate: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None, *, verbose: bool = True,
) -> tuple[Path, Int8Info]:
    """The verified int8 ONNX file for ``descriptor``, quantising it on first use.

    ``descriptor`` may already carry int8 numerics (from :func:`int8_descriptor`, e.g. an
    index's stored descriptor): the calibration set must then have the recorded digest.
    """
    from cbir.runtime.onnx_runner import cached_model

    recorded = (descriptor.numerics or {}).get("calibration")
    # the descriptor names its calibration digest: a cached graph is found without listing
    # (and hashing) the calibration folder, which for thousands of files takes a second
    cal = None if recorded is not None and calibrate is None else calibration_set(
        calibrate or descriptor.meta.get("calibration_dir"))
    if cal is not None and recorded is not None and recorded != cal.digest:
        raise CalibrationUnavailable(
            f"this descriptor's int8 vectors were calibrated on another image set (digest {recorded}); "
            f"{cal.root} gives {cal.digest}: pass the original --calibrate folder"
        )
    digest = recorded if cal is None else cal.digest
    fp32_path, fp32_info = cached_model(descriptor, cache_dir, verbose=verbose)
    out = fp32_path.with_name(f"{fp32_path.stem}-int8-{digest}.onnx")
    cached = read_cached_model(out, Int8Info)
    if cached is not None:
        return cached
    if cal is None:
        cal = calibration_set(descriptor.meta.get("calibration_dir"))
        if cal.digest != recorded:
            raise CalibrationUnavailable(
                f"the int8 graph of calibration {recorded} is not cached and {cal.root} now gives {cal.digest}: "
                "pass the original --calibrate folder"
            )
    if verbose:
        print(f"quantising {descriptor.describe_name()} to int8 on {len(cal.files)} images of {cal.root} "
              f"({out}) ...", file=sys.stderr)
    info = quantize(descriptor, fp32_path, out, cal, fp32_info.input_size)
    if not info.usable:
        raise EngineUnavailable(info.reason)
    return out, info


def int8_runner(
    descriptor: Descriptor,
    *,
    calibrate: str | os.PathLike | None = None,
    threads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    spinning: bool = False,
    verbose: bool = True,
    device: str = "cpu",
    lanes: int | str | None = 1,
) -> Runner:
    """Run ``descriptor`` with its int8 graph (quantised and cached on first use); ``threads``
    and ``lanes`` as for :func:`cbir.runtime.onnx_runner.onnx_runner`."""
    from cbir.runtime.export import ExportInfo
    from cbir.runtime.onnx_runner import onnx_available, session_runner

    if not onnx_available():
        raise EngineUnavailable("--engine onnx-int8 needs onnxruntime (pip install 'cbir[onnx]')")
    path, info = int8_model(descriptor, calibrate, cache_dir, verbose=verbose)
    shape = ExportInfo(key=info.key, kind="descriptor", usable=True, min_cosine=info.agreement.get("min", 0.0),
                       checked_shapes=[], input_size=info.input_size)
    return session_runner(descriptor, path, shape, engine=ENGINE, device=device, threads=threads, spinning=spinning,
                          lanes=lanes)  # fmt: skip
