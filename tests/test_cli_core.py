"""The core commands end to end: ``cbir extract``, ``cbir whiten``, ``cbir bench gpr1200``.

They run in-process through typer's CliRunner on a small random-weight descriptor saved
to a file (``--model FILE``), which is also how a user pins a descriptor; one test runs
the installed ``cbir`` script to check that errors reach the user as messages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from typer.testing import CliRunner

from cbir.cli.commands import app
from cbir.data.datasets import list_images
from cbir.extract import extract
from cbir.models import Descriptor, Whitening
from cbir.runtime.device import resolve_device

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def descriptor_file(tmp_path_factory: pytest.TempPathFactory, tiny_descriptor) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.cbir"
    tiny_descriptor.save(path)
    return path


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def squash(text: str) -> str:
    """Text without whitespace or box drawing, so a message wrapped in rich's panel
    still contains its words and paths in one piece."""
    return "".join(ch for ch in text if not ch.isspace() and not 0x2500 <= ord(ch) <= 0x257F)


def ok(*args: str | Path):
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


# ---------------------------------------------------------------------------------------
# cbir extract
# ---------------------------------------------------------------------------------------
def test_extract_writes_matrix_and_manifest(
    tmp_path: Path, image_dir: Path, descriptor_file: Path
) -> None:
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "out" / "feats.npy"
    result = ok("extract", image_dir, "--out", out, "--model", descriptor_file, "-j", "0", "-q")
    assert "12 images described" in result.output and "1 failed" in result.output
    assert "broken.jpg" in result.output
    feats = np.load(out)
    manifest = json.loads(out.with_suffix(".json").read_text())
    expected_order = [str(p) for p in list_images(image_dir) if p.name != "broken.jpg"]
    assert manifest["files"] == expected_order
    assert [Path(f["path"]).name for f in manifest["failures"]] == ["broken.jpg"]
    assert manifest["failures"][0]["reason"]
    assert feats.dtype == np.float32 and feats.shape == (12, manifest["descriptor"]["dim"])
    assert manifest["shape"] == [12, feats.shape[1]]
    # the default engine is ONNX Runtime; --device auto is a GPU only with onnxruntime-gpu and a GPU
    assert manifest["runtime"] == {"engine": "onnx", "device": resolve_device("auto", "onnx")}
    # the rows are the Python API's vectors for those files, in that order
    desc = Descriptor.load(descriptor_file)
    assert manifest["descriptor"]["identity"] == desc.identity()
    api = extract(desc, expected_order, workers=0, progress=False)
    np.testing.assert_allclose(feats, api.features, atol=1e-6)


def test_extract_several_inputs_and_single_files(
    tmp_path: Path, image_dir: Path, descriptor_file: Path
) -> None:
    extra = make_image(tmp_path / "extra.png", seed=7)
    out = tmp_path / "f.npy"
    ok("extract", image_dir / "sub", extra, "--out", out, "-m", descriptor_file, "-j", "0", "-q")
    files = json.loads(out.with_suffix(".json").read_text())["files"]
    assert [Path(f).name for f in files] == ["a.png", "b.png", "extra.png"]
    assert np.load(out).shape[0] == 3


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [  # exit codes: 2 invalid usage or argument, 4 bad input (docs/cli.md)
        (["extract", "{missing}", "--out", "{out}"], "no such file or folder", 4),
        (["extract", "{empty}", "--out", "{out}"], "no images found", 4),
        (["extract", "{images}", "--out", "{out}", "--pooling", "gem:p=x"], "bad value 'x'", 2),
        (["extract", "{images}", "--out", "{out}", "--pooling", "mac:p=3"], "does not take", 2),
        (["extract", "{images}", "--out", "{out}", "--model", "nonsense"], "unknown backbone", 2),
        (["extract", "{images}", "--out", "{out}", "--scales", "1,-2"], "positive", 2),
        (["extract", "{images}", "--out", "{out}", "--whiten", "{junk}"], "not a readable", 2),
        (["extract", "{images}", "--out", "{out}", "--whiten", "{missing}"], "missing", 4),
        (["extract", "{images}", "--out", "{out}", "--model", "{junk}"], "not a readable", 2),
        (["extract", "{images}", "--out", "{out}", "--crop", "999"], "crop must be", 2),
    ],
)
def test_extract_errors_are_messages(
    tmp_path: Path, image_dir: Path, descriptor_file: Path, args: list[str], message: str, code: int
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pt").write_bytes(b"junk\n")
    values = {
        "missing": tmp_path / "missing",
        "empty": tmp_path / "empty",
        "images": image_dir,
        "out": tmp_path / "f.npy",
        "junk": tmp_path / "junk.pt",
    }
    argv = [a.format(**values) for a in args]
    if "--model" not in argv:
        argv += ["--model", str(descriptor_file)]
    result = invoke(*argv, "-j", "0", "-q")
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)  # a usage error, not a traceback
    assert squash(message) in squash(result.output)
    assert not (tmp_path / "f.npy").exists()


def test_installed_script_reports_errors_without_traceback(tmp_path: Path) -> None:
    cbir = Path(sys.executable).with_name("cbir")
    if not cbir.exists():
        pytest.skip("the cbir script is not installed beside this Python")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [str(cbir), "extract", str(tmp_path / "missing"), "--out", str(tmp_path / "f.npy")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 4  # bad input (docs/cli.md, "Exit codes")
    assert "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------
# cbir whiten
# ---------------------------------------------------------------------------------------
def test_whiten_then_extract_with_it(
    tmp_path: Path, image_dir: Path, descriptor_file: Path
) -> None:
    wfile = tmp_path / "w.pt"
    result = ok(
        "whiten", image_dir, "--out", wfile, "--dim", "6", "-m", descriptor_file, "-j", "0", "-q"
    )
    assert "-> 6" in result.output
    w = Whitening.load(str(wfile))
    assert w.out_dim == 6 and w.meta["kind"] == "pca" and w.meta["n"] == 12
    out = tmp_path / "white.npy"
    model = ("-m", descriptor_file, "--whiten", wfile)
    ok("extract", image_dir, "--out", out, *model, "-j", "0", "-q")
    feats = np.load(out)
    assert feats.shape == (12, 6)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-4)


def test_learned_whitening_needs_class_folders(
    tmp_path: Path, image_dir: Path, descriptor_file: Path
) -> None:
    classes = tmp_path / "classes"
    for c in range(3):
        for i in range(3):
            make_image(classes / f"class{c}" / f"{i}.jpg", seed=10 * c + i)
    wfile = tmp_path / "lw.pt"
    learned = ("--kind", "learned", "-m", descriptor_file)
    ok("whiten", classes, "--out", wfile, *learned, "-j", "0", "-q")
    assert Whitening.load(str(wfile)).meta["kind"] == "learned"
    # a flat folder has no classes with two images: a message, not a traceback
    result = invoke(
        "whiten", image_dir / "sub", "--out", wfile, "--kind", "learned",
        "-m", descriptor_file, "-j", "0", "-q",
    )
    assert result.exit_code == 4 and isinstance(result.exception, SystemExit)
    result = invoke("whiten", image_dir, "--out", wfile, "--kind", "zca", "-m", descriptor_file)
    assert result.exit_code == 2 and "unknown whitening kind" in result.output


# ---------------------------------------------------------------------------------------
# cbir bench gpr1200
# ---------------------------------------------------------------------------------------
def make_gpr_folder(root: Path, with_subsets: bool = True, images_dir: bool = True) -> Path:
    """4 categories x 3 images named like GPR1200 (category before the first '_')."""
    folder = root / "images" if images_dir else root
    for cat in range(4):
        for i in range(3):
            # images of one category share their blobs (same seed), noise differs by size
            make_image(folder / f"{cat}_img_{i}.jpg", seed=cat, size=(96 + 8 * i, 72))
    if with_subsets:
        (root / "subsets.json").write_text(json.dumps({"things": [0, 1], "faces": [2, 3]}))
    return root


def official_map(features: np.ndarray, names: list[str]) -> np.ndarray:
    """Per-query AP by the GPR1200 definition, recomputed from saved features."""
    labels = np.array([int(n.split("_", 1)[0]) for n in names])
    f64 = features.astype(np.float64)
    sims = (f64 @ f64.T).astype(np.float32)  # the project's scores: see test_eval_gpr.py
    aps = []
    for q in range(len(labels)):
        hits = labels[np.argsort(-sims[q], kind="stable")] == labels[q]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(precision[hits].sum() / hits.sum())
    return np.array(aps)


@pytest.mark.slow
def test_bench_gpr1200_table_json_and_saved_features(tmp_path: Path, descriptor_file: Path) -> None:
    root = make_gpr_folder(tmp_path / "gpr")
    rjson, feats_path = tmp_path / "r.json", tmp_path / "f.npy"
    result = ok(
        "bench", "gpr1200", root, "-m", descriptor_file, "-j", "0", "-q",
        "--out", rjson, "--save-features", feats_path,
    )
    report = json.loads(rjson.read_text())
    assert {"mAP", "things", "faces", "GPR1000", "images_per_second", "files"} <= set(report)
    assert report["files"] == sorted(report["files"], key=lambda n: (int(n.split("_")[0]), n))
    assert len(report["files"]) == 12 and report["images_per_second"] > 0
    feats = np.load(feats_path)
    assert feats.shape[0] == 12
    aps = official_map(feats, report["files"])
    assert report["mAP"] == float(aps.mean())  # exactly the protocol on the saved rows
    assert report["things"] == float(aps[:6].mean())
    assert report["faces"] == float(aps[6:].mean())
    assert report["GPR1000"] == report["things"]
    # the printed table: every figure with 4 decimals
    out = result.output
    assert f"{report['mAP']:.4f}" in out
    for name in ("things", "faces"):
        line = next(ln for ln in out.splitlines() if name in ln)
        assert f"{report[name]:.4f}" in line
    assert "images/s" in out


@pytest.mark.slow
def test_bench_gpr1200_flat_folder_default_domains(tmp_path: Path, descriptor_file: Path) -> None:
    root = make_gpr_folder(tmp_path / "flat", with_subsets=False, images_dir=False)
    rjson = tmp_path / "r.json"
    ok("bench", "gpr1200", root, "-m", descriptor_file, "-j", "0", "-q", "--out", rjson)
    report = json.loads(rjson.read_text())
    # categories 0-3 all fall in GPR1200's first domain (landmarks, 0-199)
    assert report["landmarks"] == report["mAP"] and "faces" not in report


def test_bench_gpr1200_refuses_a_partial_benchmark(tmp_path: Path, descriptor_file: Path) -> None:
    root = make_gpr_folder(tmp_path / "gpr")
    (root / "images" / "3_img_9.jpg").write_bytes(b"")
    result = invoke("bench", "gpr1200", root, "-m", descriptor_file, "-j", "0", "-q")
    assert result.exit_code == 4 and isinstance(result.exception, SystemExit)
    assert "images/3_img_9.jpg:emptyfile" in squash(result.output)
    result = invoke("bench", "gpr1200", tmp_path / "nowhere", "-m", descriptor_file, "-q")
    assert result.exit_code == 4 and isinstance(result.exception, SystemExit)
