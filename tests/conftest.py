"""Shared fixtures: small images made on the fly, tiny descriptors, the shared datasets."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: ../shared/datasets beside the project root; integration tests skip when it is absent.
DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def make_image(path: Path, seed: int, size: tuple[int, int] = (96, 72), fmt: str | None = None) -> Path:
    """A deterministic, textured RGB image (smooth blobs + noise) so descriptors differ."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, max(w, h) / 2)
        color = rng.uniform(0, 255, 3)
        mask = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img += mask[..., None] * color
    img += rng.normal(0, 12, img.shape)
    arr = np.clip(img, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Twelve distinct JPEG/PNG images in a folder (with one subfolder)."""
    root = tmp_path / "images"
    for i in range(10):
        make_image(root / f"img_{i:02d}.jpg", seed=i)
    make_image(root / "sub" / "a.png", seed=100)
    make_image(root / "sub" / "b.png", seed=101)
    return root


@pytest.fixture(scope="session")
def tiny_descriptor():
    """A small random-weight timm CNN: fast enough for every test that needs a model.
    Its weights are seeded, so a failure seen once is seen again (torch otherwise seeds
    each process differently)."""
    import torch

    from cbir.models import build_descriptor

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_descriptor("timm:resnet10t", pretrained=False, pooling="gem", image_size=64)


@pytest.fixture(scope="session")
def tiny_file(tiny_descriptor, tmp_path_factory) -> Path:
    """The tiny descriptor saved as a descriptor file (what ``--model FILE`` takes)."""
    path = tmp_path_factory.mktemp("desc") / "tiny.cbir"
    tiny_descriptor.save(path)
    return path


@pytest.fixture(scope="session")
def lite0_descriptor():
    """The real default descriptor (EfficientNet-Lite0 weights shipped on PyPI)."""
    from cbir.models import build_descriptor

    return build_descriptor()


def dataset_or_skip(name: str) -> Path:
    path = DATASETS / name
    if not path.exists():
        pytest.skip(f"{path} not present (shared benchmark data)")
    return path


os.environ.setdefault("TQDM_DISABLE", "1")

# ONNX exports made by tests go to a throw-away cache, not the user's ~/.cache.
# Removed when the run ends: one left behind per run had filled /tmp with 3 GB.
if "CBIR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _TEST_CACHE = tempfile.mkdtemp(prefix="cbir-test-cache-")
    os.environ["CBIR_CACHE_DIR"] = _TEST_CACHE
    atexit.register(shutil.rmtree, _TEST_CACHE, True)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory):
    """One ONNX export cache per test module (CBIR_CACHE_DIR), outside the user's home."""
    path = tmp_path_factory.mktemp("onnx-cache")
    old = os.environ.get("CBIR_CACHE_DIR")
    os.environ["CBIR_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CBIR_CACHE_DIR", None)
    else:
        os.environ["CBIR_CACHE_DIR"] = old


def _one_thread(get: Callable[[], int], set_: Callable[[int], None]) -> Iterator[None]:
    """Run the fixture's tests with one thread of a library, then restore its count."""
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


@pytest.fixture(scope="module")
def faiss_one_thread():
    """One OpenMP thread for FAISS: its k-means spins for minutes on a loaded 2-core machine."""
    import faiss

    yield from _one_thread(faiss.omp_get_max_threads, faiss.omp_set_num_threads)


def modules_loaded_by_help(commands: list[list[str]], modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after ``cbir`` (its real entry
    point) printed the help of each of ``commands`` (e.g. ``["index", "--help"]``)."""
    probe = (
        "import sys\n"
        "from cbir.cli.main import main\n"
        f"for args in {commands!r}:\n"
        "    sys.argv = ['cbir', *args]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, (args, exc.code)\n"
        f"print('LOADED:' + ','.join(m for m in {modules!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    loaded = proc.stdout.strip().splitlines()[-1].removeprefix("LOADED:")
    return [m for m in loaded.split(",") if m]


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny training models are too small for intra-op threads to pay off on a busy machine."""
    import torch

    yield from _one_thread(torch.get_num_threads, torch.set_num_threads)


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight descriptor saved as a file: training starts from it offline."""
    import torch

    from cbir.models.descriptor import build_descriptor

    torch.manual_seed(0)
    desc = build_descriptor("timm:resnet10t", pretrained=False, pooling="gem", image_size=32)
    path = tmp_path_factory.mktemp("model") / "tiny.cbir"
    desc.save(path)
    return path
