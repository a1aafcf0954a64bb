"""The decode pipeline of :mod:`cbir.extract`: planning, order, failures, workers."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image

from cbir.data.transforms import Preprocess
from cbir.eval.ranking import block_positive_ranks, positive_ranks
from cbir.extract import decoded_batches, extract, iter_extract
from cbir.runtime import torch_runner


@pytest.fixture
def mixed_dir(tmp_path: Path) -> list[Path]:
    """Landscape and portrait images interleaved, plus an empty and a corrupt file."""
    root = tmp_path / "mixed"
    files = []
    for i in range(10):
        size = (90, 60) if i % 2 == 0 else (50, 80)
        files.append(make_image(root / f"{i:02d}.jpg", seed=i, size=size))
    (root / "empty.jpg").write_bytes(b"")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return files + [root / "empty.jpg", root / "corrupt.png"]


def _collect(stream) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for indices, arrays, _ in stream:
        for k, i in enumerate(indices):
            out[i] = arrays[k]
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_keep_aspect_batches_are_full_and_single_shaped(
    mixed_dir: list[Path], workers: int
) -> None:
    pre = Preprocess(size=48, resize="keep")
    batches = list(decoded_batches(mixed_dir, pre, batch_size=4, workers=workers))
    shaped = [(idx, arr) for idx, arr, _ in batches if arr is not None]
    # 5 landscape + 5 portrait images: planned as 4 + 1 of each, not one batch per file
    assert sorted(len(idx) for idx, _ in shaped) == [1, 1, 4, 4]
    for idx, arr in shaped:
        assert arr.dtype == np.uint8 and arr.shape[0] == len(idx)
        assert len({pre.output_size(*(90, 60) if i % 2 == 0 else (50, 80)) for i in idx}) == 1
    failures = dict(f for _, _, fails in batches for f in fails)
    assert set(failures) == {10, 11}
    assert "empty" in failures[10]


def test_workers_and_inline_decode_give_identical_pixels(mixed_dir: list[Path]) -> None:
    pre = Preprocess(size=40, resize="keep")
    inline = _collect(decoded_batches(mixed_dir, pre, batch_size=3, workers=0))
    pooled = _collect(decoded_batches(mixed_dir, pre, batch_size=3, workers=2, window=4))
    assert inline.keys() == pooled.keys() == set(range(10))
    for i in inline:
        np.testing.assert_array_equal(inline[i], pooled[i])


def test_threaded_inline_decode_gives_the_same_pixels_and_failures(
    mixed_dir: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """workers=0 decodes each batch with several threads: same pixels, same failures, in
    the same order as one thread; the threads really ran (more than one decoding thread)."""
    import threading

    ex = importlib.import_module("cbir.extract")  # the package exports a function of that name

    seen: set[int] = set()
    real = ex._decode_one

    def spy(*args, **kwargs):
        seen.add(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "_decode_one", spy)
    pre = Preprocess(size=40, resize="squash")
    one = list(decoded_batches(mixed_dir, pre, batch_size=6, workers=0, threads=1))
    assert seen == {threading.get_ident()}
    seen.clear()
    many = list(decoded_batches(mixed_dir, pre, batch_size=6, workers=0, threads=3))
    assert len(seen) > 1 and threading.get_ident() not in seen
    assert [(idx, fails) for idx, _, fails in one] == [(idx, fails) for idx, _, fails in many]
    for (_, a, _), (_, b, _) in zip(one, many, strict=True):
        np.testing.assert_array_equal(a, b)
    assert {i for _, _, fails in many for i, _ in fails} == {10, 11}


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 0), (3, 2), (4, 3), (32, 8)])
def test_default_workers_follow_the_cores(monkeypatch: pytest.MonkeyPatch, cores: int, workers: int) -> None:
    """Two cores or fewer: no decode process (decode, then infer); above: cores - 1, 1 to 8."""
    ex = importlib.import_module("cbir.extract")  # the package exports a function of that name

    monkeypatch.setattr(ex, "usable_cores", lambda: cores)
    assert ex.default_workers() == workers


def test_crop_boxes_decide_the_size(tmp_path: Path) -> None:
    path = make_image(tmp_path / "a.jpg", seed=1, size=(100, 80))
    pre = Preprocess(size=32, resize="keep")
    boxes = [None, (10, 10, 60, 30), (0, 0, 20, 80)]
    got = _collect(decoded_batches([path] * 3, pre, batch_size=8, workers=0, boxes=boxes))
    assert got[0].shape == (26, 32, 3)
    assert got[1].shape == (13, 32, 3)  # a 50 x 20 crop
    assert got[2].shape == (32, 8, 3)  # a 20 x 80 crop


def test_extract_rows_follow_input_and_match_single_images(
    mixed_dir: list[Path], tiny_descriptor
) -> None:
    res = extract(
        tiny_descriptor, mixed_dir, engine="torch", batch_size=4, workers=1, progress=False
    )
    assert res.paths == [os.fspath(p) for p in mixed_dir[:10]]
    assert [Path(f.path).name for f in res.failures] == ["empty.jpg", "corrupt.png"]
    run = torch_runner(tiny_descriptor)
    for k in (0, 3, 9):  # the same vector as describing the file alone
        alone = decoded_batches([mixed_dir[k]], tiny_descriptor.preprocess, workers=0)
        single = _collect(alone)[0]
        np.testing.assert_allclose(res.features[k], run(single[None])[0], atol=1e-5)


def test_iter_extract_can_stop_early(mixed_dir: list[Path], tiny_descriptor) -> None:
    """Closing the generator after one batch shuts the workers down (no hang, no error)."""
    it = iter_extract(
        tiny_descriptor, mixed_dir * 20, engine="torch", batch_size=2, workers=2, progress=False
    )
    first = next(it)
    it.close()
    assert len(first.indices) == 2 and first.vectors.shape == (2, tiny_descriptor.dim)


def test_bad_batch_size_is_a_clear_error(mixed_dir: list[Path]) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        list(decoded_batches(mixed_dir, Preprocess(), batch_size=0))


@pytest.mark.parametrize("max_candidates", [1, 7, 1 << 22])
def test_block_ranks_equal_row_by_row_ranks(max_candidates: int) -> None:
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=(13, 60)), 1).astype(np.float32)  # many ties
    scores[3, 10:20] = scores[3, 5]  # a run of exact ties with a positive inside
    positives = [np.sort(rng.choice(60, size=k, replace=False)) for k in rng.integers(0, 6, 13)]
    positives[3] = np.array([5, 12, 40])
    got = block_positive_ranks(scores, positives, max_candidates=max_candidates)
    for r in range(13):
        np.testing.assert_array_equal(got[r], positive_ranks(scores[r], positives[r]))
