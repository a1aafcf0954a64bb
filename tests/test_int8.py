"""The onnx-int8 engine: quantised, cached, a distinct identity, refused where it would mix.

Every test asserts which engine (and execution provider) actually ran, so a silent
fallback to fp32 or torch fails them.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from typer.testing import CliRunner

from cbir.models import Descriptor, build_descriptor
from cbir.runtime import (
    DeviceUnavailable,
    EngineMismatch,
    for_engine,
    make_runner,
    resolve_device,
)
from cbir.runtime.onnx_runner import cached_model, onnx_available

pytestmark = pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A made-up calibration folder: 32 textured images of assorted sizes."""
    root = tmp_path_factory.mktemp("calib")
    for i in range(32):
        make_image(root / f"c{i:02d}.jpg", seed=500 + i, size=(80 + 3 * i, 64 + (i % 5) * 9))
    return root


@pytest.fixture(scope="module")
def desc() -> Descriptor:
    """A small CNN at a fixed input size (squash), as the default descriptor is."""
    return build_descriptor("timm:resnet10t", pretrained=False, pooling="gem", image_size=64, resize="squash")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _batch(files: list[Path], d: Descriptor) -> np.ndarray:
    from PIL import Image

    return np.stack([d.preprocess.to_array(Image.open(f).convert("RGB")) for f in files])


def test_int8_export_is_cached_beside_the_fp32_one(onnx_cache: Path, calib: Path, desc: Descriptor,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    import cbir.runtime.quantize as quantize

    d8 = for_engine(desc, "onnx-int8", calib)
    path, info = quantize.int8_model(d8, calib, verbose=False)
    fp32, _ = cached_model(desc, verbose=False)
    assert path.parent == fp32.parent and path.name.startswith(fp32.stem) and "int8" in path.name
    assert info.usable and info.calibration == d8.numerics["calibration"]
    assert info.calibration_images == 16 and info.input_size == [64, 64]
    ops = {n.op_type for n in onnx.load(os.fspath(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["agreement"]["median"] >= quantize.MIN_MEDIAN_COSINE
    # cached: a second call quantises nothing
    monkeypatch.setattr(quantize, "quantize", lambda *a, **k: pytest.fail("quantised again"))
    again, _ = quantize.int8_model(d8, calib, verbose=False)
    assert again == path


def test_pooling_and_whitening_stay_in_float(onnx_cache: Path, calib: Path, desc: Descriptor) -> None:
    """Only backbone nodes are quantised: every quantised node's name is under /backbone/."""
    import onnx

    from cbir.runtime.quantize import int8_model

    path, _ = int8_model(for_engine(desc, "onnx-int8", calib), calib, verbose=False)
    graph = onnx.load(os.fspath(path)).graph
    by_out = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type in ("Pow", "ReduceMean", "ReduceL2"):  # GeM and the L2 norms
            for name in node.input:
                src = by_out.get(name)
                assert src is None or src.op_type != "QuantizeLinear", node.name
        if node.op_type == "Conv":
            assert "/backbone/" in node.name


def test_aspect_kept_graph_quantises_with_the_normalisation_folded(onnx_cache: Path, calib: Path,
                                                                   tmp_path: Path) -> None:
    """A size-generic graph (resize keep) takes images of any shape; its normalisation is
    folded into the first convolution as in the fixed-size graph."""
    from cbir.runtime.quantize import int8_model

    keep = build_descriptor("timm:resnet10t", pretrained=False, pooling="gem", image_size=72, resize="keep")
    d8 = for_engine(keep, "onnx-int8", calib)
    _, info = int8_model(d8, calib, verbose=False)
    assert info.input_size is None and info.zero_point is not None
    run8, run32 = make_runner(d8, "onnx-int8", verbose=False), make_runner(keep, "onnx", verbose=False)
    for shape in ((2, 72, 48), (1, 40, 72)):
        x = np.random.default_rng(sum(shape)).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
        assert np.median(_cos(run8(x), run32(x))) >= 0.95


def test_identity_records_the_int8_engine(calib: Path, desc: Descriptor, tmp_path: Path) -> None:
    d8 = for_engine(desc, "onnx-int8", calib)
    assert d8.identity() != desc.identity()
    assert d8.base_identity() == desc.base_identity()
    assert d8.describe_name().endswith("/onnx-int8") and desc.numerics is None
    # the int8 engine resizes with OpenCV; the float32 descriptor keeps Pillow's
    assert d8.preprocess.resampler == "opencv" and desc.preprocess.resampler == "pillow"
    back = for_engine(d8, "onnx")
    assert back.identity() == desc.identity() and back.preprocess == desc.preprocess  # float32 vectors again
    d8.save(tmp_path / "d8.cbir")
    loaded = Descriptor.load(tmp_path / "d8.cbir")
    assert loaded.identity() == d8.identity() and loaded.numerics == d8.numerics
    # another calibration set is another identity (its vectors differ)
    other = tmp_path / "other"
    for i in range(10):
        make_image(other / f"o{i}.png", seed=900 + i)
    assert for_engine(desc, "onnx-int8", other).identity() != d8.identity()
    # an int8 descriptor from before the int8 engine resized with OpenCV (an index's stored
    # one) keeps Pillow and its identity: that index's new vectors match its old ones
    old = copy.copy(d8)
    old.preprocess = desc.preprocess
    old.save(tmp_path / "old8.cbir")
    stored = Descriptor.load(tmp_path / "old8.cbir")
    assert stored.preprocess.resampler == "pillow" and stored.identity() not in (d8.identity(), desc.identity())
    assert for_engine(stored, "onnx-int8") is stored


def test_quality_gate_int8_close_to_fp32(onnx_cache: Path, calib: Path, desc: Descriptor, tmp_path: Path) -> None:
    """On made-up images outside the calibration set, int8 vectors stay close to fp32."""
    files = [make_image(tmp_path / f"q{i}.jpg", seed=1000 + i, size=(100, 70 + i)) for i in range(24)]
    x = _batch(files, desc)
    d8 = for_engine(desc, "onnx-int8", calib)
    int8, fp32 = make_runner(d8, "onnx-int8", calibrate=calib, verbose=False), make_runner(desc, "onnx", verbose=False)
    assert (int8.engine, fp32.engine) == ("onnx-int8", "onnx")
    cos = _cos(int8(x), fp32(x))
    assert np.median(cos) >= 0.98 and np.percentile(cos, 1) >= 0.9, (np.median(cos), cos.min())
    assert not np.allclose(int8(x), fp32(x), atol=1e-6)  # it really is another engine


def test_engine_that_ran_is_the_one_asked_for(onnx_cache: Path, calib: Path, desc: Descriptor) -> None:
    """A silent fallback (int8 -> fp32, onnx -> torch, cuda -> cpu) fails here."""
    d8 = for_engine(desc, "onnx-int8", calib)
    for engine, d in (("torch", desc), ("onnx", desc), ("onnx-int8", d8)):
        run = make_runner(d, engine, device="cpu", calibrate=calib, verbose=False)
        assert run.engine == engine and run.device == "cpu"
        assert run.providers == ([] if engine == "torch" else ["CPUExecutionProvider"])
    # the descriptor's numerics and the engine must agree, both ways
    with pytest.raises(EngineMismatch):
        make_runner(d8, "onnx", verbose=False)
    with pytest.raises(EngineMismatch):
        make_runner(desc, "onnx-int8", calibrate=calib, verbose=False)


def test_cuda_is_a_demand_not_a_wish() -> None:
    """``--device cuda`` without a usable GPU stops; ``auto`` resolves to what exists."""
    import torch

    assert resolve_device("cpu", "onnx") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("auto", "torch") == "cuda"
        return
    assert resolve_device("auto", "torch") == "cpu" and resolve_device("auto", "onnx-int8") == "cpu"
    for engine in ("torch", "onnx", "onnx-int8"):
        with pytest.raises(DeviceUnavailable):
            resolve_device("cuda", engine)
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_extract_records_the_int8_identity(onnx_cache: Path, calib: Path, desc: Descriptor, image_dir: Path) -> None:
    from cbir.data.datasets import list_images
    from cbir.extract import extract

    files = list_images(image_dir)
    a = extract(desc, files, engine="onnx-int8", calibrate=calib, workers=0, progress=False)
    b = extract(desc, files, engine="onnx", workers=0, progress=False)
    assert a.descriptor["identity"] == for_engine(desc, "onnx-int8", calib).identity()
    assert b.descriptor["identity"] == desc.identity() != a.descriptor["identity"]
    assert a.descriptor["name"].endswith("onnx-int8")
    assert np.median(_cos(a.features, b.features)) >= 0.98


def test_a_ray_actor_describes_with_the_int8_engine(onnx_cache: Path, calib: Path, desc: Descriptor,
                                                    image_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``cbir extract --ray --engine onnx-int8``: the driver ships the int8 graph with the
    fp32 export, the actor runs int8 (not fp32, which would be a silent fallback), and its
    vectors are the single machine's int8 vectors."""
    ray = pytest.importorskip("ray")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from cbir.data.datasets import list_images
    from cbir.distributed.extraction import DescribeFiles, _onnx_files
    from cbir.extract import extract

    d8 = for_engine(desc, "onnx-int8", calib)
    files, engine = _onnx_files(d8, "onnx-int8")
    assert engine == "onnx-int8" and sum("-int8-" in name for name in files) == 2  # graph + its record
    monkeypatch.setattr(ray, "get", lambda ref: ref)  # the shipped files, without a cluster
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    model = tmp_path / "d8.cbir"
    d8.save(model)
    shards = tmp_path / "shards"
    shards.mkdir()
    actor = DescribeFiles((model.read_bytes(), engine, files, np.array([], dtype="S16")), "/", str(shards), 4, None,
                          threads=1)  # fmt: skip
    paths = [str(p) for p in list_images(image_dir)]
    out = actor(pa.table({"text": paths}))
    assert actor.runner.engine == "onnx-int8"
    assert actor.descriptor.identity() == d8.identity() != desc.identity()
    t = pq.read_table(shards / out["shard"][0].as_py())
    ref = extract(d8, paths, engine="onnx-int8", workers=0, progress=False)
    assert t.column("path").to_pylist() == list(ref.paths)
    assert _cos(np.array(t.column("vector").to_pylist(), np.float32), ref.features).min() > 0.9999


def test_index_refuses_to_mix_int8_and_fp32(onnx_cache: Path, calib: Path, desc: Descriptor, image_dir: Path,
                                            tmp_path: Path) -> None:
    from cbir.index import Index
    from cbir.index.errors import DescriptorMismatchError

    db = tmp_path / "db8"
    with Index.create(db, model=desc, engine="onnx-int8", calibrate=calib) as idx:
        assert idx.engine == "onnx-int8"
        report = idx.sync([image_dir], workers=0, progress=False)
        assert report.added == 12
    with pytest.raises(DescriptorMismatchError, match="onnx-int8"):
        Index.open(db, engine="onnx")
    with pytest.raises(DescriptorMismatchError):
        Index.open(db, model=desc, engine="onnx")  # fp32 vectors of the same network
    with Index.open(db, readonly=True) as idx:  # no engine given: the one that made the vectors
        assert idx.engine == "onnx-int8"
        hits = idx.search(image_dir / "img_03.jpg", k=1)
        assert hits[0].path.endswith("img_03.jpg")
    fp = tmp_path / "db32"
    with Index.create(fp, model=desc, engine="onnx") as idx:
        idx.sync([image_dir], workers=0, progress=False)
    with pytest.raises(DescriptorMismatchError):
        Index.open(fp, engine="onnx-int8", calibrate=calib)


def test_no_calibration_images_is_a_clear_error(desc: Descriptor, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    import cbir.runtime.quantize as quantize

    monkeypatch.delenv("CBIR_CALIBRATE", raising=False)
    monkeypatch.setattr(quantize, "DEFAULT_CALIBRATION", tmp_path / "absent")
    with pytest.raises(quantize.CalibrationUnavailable, match="--calibrate"):
        for_engine(desc, "onnx-int8")
    with pytest.raises(quantize.CalibrationUnavailable, match="no such folder"):
        for_engine(desc, "onnx-int8", tmp_path / "nowhere")


def test_cli_extract_with_the_int8_engine(onnx_cache: Path, calib: Path, desc: Descriptor, image_dir: Path,
                                          tmp_path: Path) -> None:
    from cbir.cli.commands import app

    model = tmp_path / "tiny.cbir"
    desc.save(model)
    out = tmp_path / "v.npy"
    args = ["extract", str(image_dir), "--model", str(model), "--engine", "onnx-int8", "--calibrate", str(calib),
            "--device", "cpu", "--out", str(out), "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["descriptor"]["identity"] == for_engine(desc, "onnx-int8", calib).identity()
    assert manifest["runtime"] == {"engine": "onnx-int8", "device": "cpu"}  # what ran, not what was asked
    assert np.load(out).shape == (12, desc.dim)
